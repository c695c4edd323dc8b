//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several operator replicas
//! exactly one reconciles.
//!
//! Hand-written: the crates that do this track older kube releases, and the protocol is
//! small. A replica holds the lease while it renews it; another takes it over only after
//! `duration` has passed without a renewal. Every write carries the `resourceVersion` it
//! read, so two replicas racing for an expired lease cannot both win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};

#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (the pod name).
    pub holder: String,
    /// How long a lease is valid without renewal.
    pub duration: Duration,
    /// How often the holder renews, and a candidate retries.
    pub renew_every: Duration,
}

pub struct LeaderLease {
    api: Api<Lease>,
    settings: LeaseSettings,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Attempt {
    /// This replica holds the lease (newly or still).
    Held,
    /// Another replica holds a lease that has not expired.
    HeldBy(String),
}

impl LeaderLease {
    pub fn new(client: kube::Client, settings: LeaseSettings) -> Self {
        Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
        }
    }

    pub fn settings(&self) -> &LeaseSettings {
        &self.settings
    }

    /// Tries once to acquire or renew the lease.
    pub async fn try_acquire(&self) -> Result<Attempt, kube::Error> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.settings.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec_held_since(now, now, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Held),
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    Ok(Attempt::HeldBy("(another replica, just now)".into()))
                }
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let transitions = spec.lease_transitions.unwrap_or(0);
        let next = if holder == self.settings.holder {
            let acquired = spec.acquire_time.map(|t| t.0).unwrap_or(now);
            self.spec_held_since(acquired, now, transitions)
        } else if holder.is_empty() || self.expired(&spec, now) {
            self.spec_held_since(now, now, transitions + 1)
        } else {
            return Ok(Attempt::HeldBy(holder));
        };
        lease.spec = Some(next);
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Attempt::Held),
            // Someone else wrote first; they hold it now.
            Err(kube::Error::Api(e)) if e.code == 409 => {
                Ok(Attempt::HeldBy("(another replica, just now)".into()))
            }
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up so a standby takes over at once instead of waiting for expiry.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.settings.holder.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        spec.acquire_time = None;
        lease.spec = Some(spec);
        self.api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await?;
        Ok(())
    }

    fn expired(&self, spec: &LeaseSpec, now: Timestamp) -> bool {
        let Some(renewed) = spec.renew_time.as_ref().map(|t| t.0) else {
            return true;
        };
        let seconds = spec
            .lease_duration_seconds
            .map_or(self.settings.duration.as_secs() as i64, i64::from);
        renewed + SignedDuration::from_secs(seconds) < now
    }

    fn spec_held_since(&self, acquired: Timestamp, now: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.settings.holder.clone()),
            lease_duration_seconds: Some(self.settings.duration.as_secs().max(1) as i32),
            acquire_time: Some(MicroTime(acquired)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }
}

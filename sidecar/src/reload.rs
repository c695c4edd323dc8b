//! Hot reload: notices changed config and credential files and swaps in a new snapshot.
//!
//! Polling, not inotify: it sees every way a file can change (editors' rename dance, the
//! kubelet's `..data` symlink swap, network filesystems) through one code path, and reading a
//! few small files every couple of seconds costs nothing next to the kubelet's own
//! propagation delay of up to a minute.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::config::{ConfigSource, LoadedConfig, RawConfig};
use crate::metrics::Metrics;
use crate::otlp::SpanSink;
use crate::pod::PodIdentity;
use crate::snapshot::Snapshot;

/// What the data path and the admin server share.
pub struct SharedState {
    snapshot: ArcSwap<Snapshot>,
    draining: AtomicBool,
    /// None when metrics are turned off (`--metrics false`).
    pub metrics: Option<Arc<Metrics>>,
    /// Some when spans are exported (`--otlp-endpoint`).
    pub spans: Option<Arc<SpanSink>>,
    pub pod: PodIdentity,
}

impl SharedState {
    pub fn new(
        snapshot: Snapshot,
        metrics: Option<Arc<Metrics>>,
        spans: Option<Arc<SpanSink>>,
        pod: PodIdentity,
    ) -> Arc<Self> {
        Arc::new(Self {
            snapshot: ArcSwap::from_pointee(snapshot),
            draining: AtomicBool::new(false),
            metrics,
            spans,
            pod,
        })
    }

    /// The snapshot in force now; a request keeps the one it got until it ends.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    fn swap(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
    }

    /// Set on SIGTERM so that readiness fails and the pod is taken out of rotation.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

pub struct Reloader {
    source: ConfigSource,
    state: Arc<SharedState>,
    last_raw: Option<RawConfig>,
    last_good: LoadedConfig,
    last_read_error: Option<String>,
}

impl Reloader {
    pub fn new(source: ConfigSource, state: Arc<SharedState>, loaded: LoadedConfig) -> Self {
        Self {
            source,
            state,
            last_raw: None,
            last_good: loaded,
            last_read_error: None,
        }
    }

    pub async fn run(mut self, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.poll_once();
        }
    }

    /// One check of the files; swaps the snapshot if the config or a credential changed.
    pub fn poll_once(&mut self) {
        self.pick_up_config_change();
        let current = self.state.snapshot();
        let next = match Snapshot::build(&self.last_good, Some(&current)) {
            Ok(next) => next,
            Err(error) => {
                tracing::error!(%error, "cannot apply configuration; keeping the last good one");
                return;
            }
        };
        if next.config_hash == current.config_hash
            && next.credentials_digest() == current.credentials_digest()
        {
            return;
        }
        log_changes(&current, &next);
        self.state.swap(next);
    }

    fn pick_up_config_change(&mut self) {
        let raw = match self.source.read() {
            Ok(raw) => raw,
            Err(error) => {
                let message = error.to_string();
                if self.last_read_error.as_ref() != Some(&message) {
                    tracing::error!(error = %message, "cannot read configuration; keeping the last good one");
                    self.last_read_error = Some(message);
                }
                return;
            }
        };
        self.last_read_error = None;
        if self.last_raw.as_ref() == Some(&raw) {
            return;
        }
        let accepted = match raw.parse(&self.source) {
            Ok(loaded) => {
                if loaded.hash != self.last_good.hash {
                    self.last_good = loaded;
                }
                true
            }
            Err(error) => {
                tracing::error!(%error, "rejected new configuration; keeping the last good one");
                false
            }
        };
        // The first read at start is the config already loaded, not a reload.
        if self.last_raw.is_some() {
            if let Some(metrics) = &self.state.metrics {
                metrics.config_reload(accepted);
            }
        }
        self.last_raw = Some(raw);
    }
}

fn log_changes(current: &Snapshot, next: &Snapshot) {
    if next.config_hash != current.config_hash {
        tracing::info!(
            config_hash = %next.config_hash,
            endpoints = next.endpoints.len(),
            "configuration reloaded"
        );
    }
    for name in &next.missing {
        if !current.is_missing(name) {
            tracing::warn!(endpoint = %name, "expected endpoint has no configuration any more; answering it with 503 until it comes back");
        }
    }
    for name in &current.missing {
        if !next.is_missing(name) {
            tracing::info!(endpoint = %name, "expected endpoint arrived; serving it");
        }
    }
    for endpoint in &next.endpoints {
        let before = current.by_name(endpoint.name());
        let old_fp = before.and_then(|e| e.credential()).map(|c| c.fingerprint());
        let new_fp = endpoint.credential().map(|c| c.fingerprint());
        if new_fp.is_some() && new_fp != old_fp {
            tracing::info!(
                endpoint = endpoint.name(),
                fingerprint = new_fp,
                "credential loaded"
            );
            if endpoint
                .credential()
                .is_some_and(|c| !c.pattern().masks_anything())
            {
                tracing::warn!(
                    endpoint = endpoint.name(),
                    min_len = crate::redact::MIN_MASKED_KEY_LEN,
                    "the key is too short to be told apart from ordinary text, so it is not masked in responses"
                );
            }
        }
        if let Some(error) = endpoint.unavailable_reason() {
            let was_unavailable = before.and_then(|e| e.unavailable_reason()).is_some();
            if !was_unavailable {
                tracing::warn!(endpoint = endpoint.name(), %error, "endpoint has no usable credential");
            }
        }
    }
}

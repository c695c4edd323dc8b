//! The LlmEndpoint controller: one `reconcile` that computes the desired ConfigMap, Secret
//! and status for the namespace's environment and applies what differs, with server-side
//! apply under one field manager.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::crd::{LlmEndpoint, LlmEndpointStatus};
use crate::metrics::Metrics;
use crate::render::{render, CopiedKey, Rendering, CONFIG_FILE};

mod cache;
use cache::Caches;

pub const FIELD_MANAGER: &str = "llmesh-operator";
/// The namespace label that selects the environment an LlmEndpoint is rendered for.
pub const ENVIRONMENT_LABEL: &str = "llmesh.io/environment";
pub const CONFIG_HASH_ANNOTATION: &str = "llmesh.io/config-hash";
pub const ENDPOINT_LABEL: &str = "llmesh.io/endpoint";
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "llmesh-operator");

/// Reconciles in flight at once. A reconcile reads only caches, so what it waits on is its
/// writes; more in flight only means more open connections (the client speaks HTTP/1.1,
/// one TLS session per request in flight) and more memory, not more throughput from an
/// API server that is already the bottleneck.
const CONCURRENCY: u16 = 64;

/// A missing secret is retried this often even without a watch event (the watch normally
/// brings it back within a second of the secret appearing).
const CREDENTIALS_RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("LlmEndpoint has no namespace")]
    NotNamespaced,
    #[error("the watches behind the controller's caches stopped")]
    CachesClosed,
}

/// What every reconcile shares.
pub struct Context {
    pub client: kube::Client,
    pub default_environment: String,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// The controller's cache of LlmEndpoints: whether the ones named in `fallbacks` exist.
    pub endpoints: Store<LlmEndpoint>,
    /// Namespaces, owned ConfigMaps and Secrets: what a reconcile reads.
    pub caches: Caches,
    pub status_writes: Arc<StatusWrites>,
}

/// The `resourceVersion` each endpoint got from the operator's last status write, until the
/// cache shows that version. A reconcile that starts in between (an owned object's event
/// arrived first) would see the old status and write the same conditions again with new
/// times, which costs a write and another reconcile; it waits for the status event instead.
/// Versions are compared as numbers (the API server's etcd revisions); one that does not
/// parse is never taken as stale.
#[derive(Default)]
pub struct StatusWrites(std::sync::Mutex<HashMap<ObjectRef<LlmEndpoint>, u64>>);

impl StatusWrites {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<LlmEndpoint>, u64>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn record(&self, written: &LlmEndpoint) {
        if let Some(version) = resource_version(written) {
            self.entries().insert(ObjectRef::from_obj(written), version);
        }
    }

    /// True while `cached` is older than the operator's own last status write to it.
    fn is_behind(&self, cached: &LlmEndpoint) -> bool {
        let key = ObjectRef::from_obj(cached);
        let mut entries = self.entries();
        let Some(written) = entries.get(&key).copied() else {
            return false;
        };
        match resource_version(cached) {
            Some(seen) if seen < written => true,
            _ => {
                entries.remove(&key);
                false
            }
        }
    }

    fn forget(&self, deleted: &LlmEndpoint) {
        self.entries().remove(&ObjectRef::from_obj(deleted));
    }
}

fn resource_version(object: &LlmEndpoint) -> Option<u64> {
    object.resource_version()?.parse().ok()
}

#[derive(Debug, Clone)]
pub struct Settings {
    /// The environment of namespaces without the `llmesh.io/environment` label.
    pub default_environment: String,
    /// Watch one namespace only (tests, or a namespaced install); all when `None`.
    pub namespace: Option<String>,
}

/// Runs the controller until the stream ends (on shutdown signal).
pub async fn run(client: kube::Client, settings: Settings, metrics: Arc<Metrics>) {
    let scoped: Api<LlmEndpoint> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (caches, feeds) = cache::open(&client, settings.namespace.as_deref());
    let (endpoints, endpoints_writer) = reflector::store();
    metrics.watch_endpoints(endpoints.clone());
    // An endpoint created or deleted: re-check the endpoints that fall back to it. One
    // watch of LlmEndpoints serves both, so the dependents come through a channel.
    let (dependents, dependents_due) = futures::channel::mpsc::unbounded();
    let by_fallback = endpoints.clone();
    let status_writes = Arc::new(StatusWrites::default());
    let deletions = Arc::clone(&status_writes);
    let endpoint_events = watcher(scoped, watcher::Config::default())
        .modify(cache::slim)
        .reflect(endpoints_writer)
        .inspect_ok(move |event| {
            if let watcher::Event::Delete(endpoint) = event {
                deletions.forget(endpoint);
            }
            if let watcher::Event::Apply(endpoint) | watcher::Event::Delete(endpoint) = event {
                for dependent in endpoints_falling_back_to(&by_fallback, endpoint) {
                    let _ = dependents.unbounded_send(dependent);
                }
            }
        })
        .applied_objects();
    let by_secret = endpoints.clone();
    let by_namespace = endpoints.clone();
    let context = Arc::new(Context {
        endpoints: endpoints.clone(),
        caches,
        status_writes,
        client: client.clone(),
        default_environment: settings.default_environment.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        ),
        metrics,
    });
    Controller::for_stream(endpoint_events, endpoints)
        .with_config(ControllerConfig::default().concurrency(CONCURRENCY))
        .owns_stream(feeds.config_maps)
        // Both the copies it owns and the source Secrets (created late or rotated: re-render
        // the endpoints that use them) come from one watch.
        .watches_stream(feeds.secrets, move |secret| {
            let owner = owning_endpoint(&secret);
            endpoints_using_secret(&by_secret, &secret)
                .into_iter()
                .chain(owner)
        })
        // A namespace's environment label changed: re-render everything in it.
        .watches_stream(feeds.namespaces, move |ns| {
            endpoints_in_namespace(&by_namespace, &ns.name_any())
        })
        .reconcile_on(dependents_due)
        .shutdown_on_signal()
        .run(reconcile_measured, error_policy, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile stream error");
            }
        })
        .await;
}

/// The LlmEndpoint that controls `secret` (a copy the operator made), if any.
fn owning_endpoint(secret: &Secret) -> Option<ObjectRef<LlmEndpoint>> {
    let namespace = secret.namespace()?;
    secret
        .owner_references()
        .iter()
        .find(|o| {
            o.controller == Some(true)
                && o.kind == LlmEndpoint::kind(&())
                && o.api_version == LlmEndpoint::api_version(&())
        })
        .map(|o| ObjectRef::new(&o.name).within(&namespace))
}

fn endpoints_using_secret(
    store: &Store<LlmEndpoint>,
    secret: &Secret,
) -> Vec<ObjectRef<LlmEndpoint>> {
    let namespace = secret.namespace();
    let name = secret.name_any();
    store
        .state()
        .iter()
        .filter(|e| e.namespace() == namespace)
        .filter(|e| {
            std::iter::once(&e.spec.base)
                .chain(e.spec.environments.values())
                .flat_map(|s| {
                    [
                        &s.secret_ref,
                        &s.redis_password_secret_ref,
                        &s.cache_redis_password_secret_ref,
                    ]
                })
                .any(|r| r.as_ref().is_some_and(|r| r.name == name))
        })
        .map(|e| ObjectRef::from_obj(e.as_ref()))
        .collect()
}

fn endpoints_falling_back_to(
    store: &Store<LlmEndpoint>,
    target: &LlmEndpoint,
) -> Vec<ObjectRef<LlmEndpoint>> {
    let namespace = target.namespace();
    let name = target.name_any();
    store
        .state()
        .iter()
        .filter(|e| e.namespace() == namespace && e.name_any() != name)
        .filter(|e| {
            std::iter::once(&e.spec.base)
                .chain(e.spec.environments.values())
                .filter_map(|s| s.fallbacks.as_ref())
                .any(|fallbacks| fallbacks.contains(&name))
        })
        .map(|e| ObjectRef::from_obj(e.as_ref()))
        .collect()
}

fn endpoints_in_namespace(
    store: &Store<LlmEndpoint>,
    namespace: &str,
) -> Vec<ObjectRef<LlmEndpoint>> {
    store
        .state()
        .iter()
        .filter(|e| e.namespace().as_deref() == Some(namespace))
        .map(|e| ObjectRef::from_obj(e.as_ref()))
        .collect()
}

pub fn error_policy(endpoint: Arc<LlmEndpoint>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(
        namespace = endpoint.namespace().unwrap_or_default(),
        name = endpoint.name_any(),
        %error,
        "reconcile failed; retrying"
    );
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile_measured(
    endpoint: Arc<LlmEndpoint>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = reconcile(endpoint, Arc::clone(&ctx)).await;
    ctx.metrics
        .observe_reconcile("LlmEndpoint", result.is_ok(), started.elapsed());
    result
}

/// The outcome of looking up the Secret keys the endpoint needs (the provider key, the
/// Redis passwords of shared limits and of the shared cache).
enum Credentials {
    NotNeeded,
    /// The content of Secret `llmesh-<name>`.
    Resolved(BTreeMap<String, ByteString>),
    Unresolved {
        reason: &'static str,
        message: String,
    },
}

pub async fn reconcile(endpoint: Arc<LlmEndpoint>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = endpoint.namespace().ok_or(Error::NotNamespaced)?;
    let name = endpoint.name_any();
    ctx.caches
        .wait_until_ready()
        .await
        .map_err(|_| Error::CachesClosed)?;
    if ctx.status_writes.is_behind(&endpoint) {
        // The event of that write is on its way and triggers a reconcile of its own.
        return Ok(Action::await_change());
    }
    let Some(environment) = environment_of(&ctx, &namespace) else {
        tracing::debug!(%namespace, "namespace not cached yet; its watch event re-triggers");
        return Ok(Action::requeue(Duration::from_secs(1)));
    };
    let generation = endpoint.metadata.generation;

    let rendering = match render(&name, &endpoint.spec, &environment) {
        Ok(r) => r,
        Err(error) => {
            let message = error.to_string();
            publish(
                &ctx,
                &endpoint,
                EventType::Warning,
                "RenderFailed",
                &message,
            )
            .await;
            let conditions = vec![
                condition(
                    "ConfigRendered",
                    false,
                    "RenderFailed",
                    &message,
                    generation,
                ),
                condition(
                    "CredentialsResolved",
                    false,
                    "RenderFailed",
                    "the configuration did not render",
                    generation,
                ),
                condition("Ready", false, "RenderFailed", &message, generation),
            ];
            let status = LlmEndpointStatus {
                observed_generation: generation,
                environment: Some(environment),
                provider: None,
                model: None,
                config_hash: None,
                conditions,
            };
            update_status(&ctx, &endpoint, status).await?;
            // Only a spec (or label) change can fix this; both trigger a reconcile.
            return Ok(Action::await_change());
        }
    };

    let credentials = resolve_credentials(&ctx, &namespace, &rendering.secrets);
    // The ConfigMap and the Secret copy do not depend on each other: both writes go out at
    // once, which halves the round trips a new endpoint waits for before its status.
    let ((), (credentials_condition, ready, requeue)) = futures::try_join!(
        apply_config_map(&ctx, &endpoint, &namespace, &rendering),
        apply_credentials(&ctx, &endpoint, &namespace, &rendering, &credentials),
    )?;
    let ready_condition = if ready {
        condition(
            "Ready",
            true,
            "Rendered",
            &format!("rendered for environment {environment}"),
            generation,
        )
    } else {
        condition(
            "Ready",
            false,
            "CredentialsUnresolved",
            "a Secret key it needs is not available",
            generation,
        )
    };
    let existing: Vec<String> = ctx
        .endpoints
        .state()
        .iter()
        .filter(|e| e.namespace().as_deref() == Some(namespace.as_str()))
        .map(|e| e.name_any())
        .collect();
    let fallbacks_condition =
        fallbacks_condition(&rendering.config.fallbacks, &existing, generation);
    let status = LlmEndpointStatus {
        observed_generation: generation,
        environment: Some(environment.clone()),
        provider: Some(rendering.config.provider.as_str().to_string()),
        model: Some(rendering.config.model.clone()),
        config_hash: Some(rendering.config_hash.clone()),
        conditions: vec![
            condition(
                "ConfigRendered",
                true,
                "Rendered",
                &format!("ConfigMap llmesh-{name}"),
                generation,
            ),
            credentials_condition,
            fallbacks_condition,
            ready_condition,
        ],
    };
    update_status(&ctx, &endpoint, status).await?;
    Ok(match requeue {
        Some(after) => Action::requeue(after),
        None => Action::await_change(),
    })
}

/// Copies the Secret keys the endpoint needs (or removes a copy no longer needed) and
/// says how that went: the `CredentialsResolved` condition, whether the endpoint can be
/// Ready, and when to look again for a key that is missing.
async fn apply_credentials(
    ctx: &Context,
    endpoint: &LlmEndpoint,
    namespace: &str,
    rendering: &Rendering,
    credentials: &Credentials,
) -> Result<(Condition, bool, Option<Duration>), Error> {
    let name = endpoint.name_any();
    let generation = endpoint.metadata.generation;
    Ok(match credentials {
        Credentials::NotNeeded => {
            delete_copied_secret(ctx, namespace, &name).await?;
            (
                condition(
                    "CredentialsResolved",
                    true,
                    "NotNeeded",
                    "this provider needs no key",
                    generation,
                ),
                true,
                None,
            )
        }
        Credentials::Resolved(data) => {
            apply_secret(ctx, endpoint, namespace, rendering, data).await?;
            let sources = rendering
                .secrets
                .iter()
                .map(|c| format!("{}/{}", c.source.name, c.source.key))
                .collect::<Vec<_>>()
                .join(", ");
            (
                condition(
                    "CredentialsResolved",
                    true,
                    "SecretFound",
                    &format!("copied {sources}"),
                    generation,
                ),
                true,
                None,
            )
        }
        Credentials::Unresolved { reason, message } => {
            publish(ctx, endpoint, EventType::Warning, reason, message).await;
            (
                condition("CredentialsResolved", false, reason, message, generation),
                false,
                Some(CREDENTIALS_RETRY),
            )
        }
    })
}

/// The namespace's environment, or `None` while the namespace is not yet in the cache (its
/// watch event then re-triggers every endpoint in it).
fn environment_of(ctx: &Context, namespace: &str) -> Option<String> {
    let ns = ctx.caches.namespace(namespace)?;
    Some(
        ns.labels()
            .get(ENVIRONMENT_LABEL)
            .cloned()
            .unwrap_or_else(|| ctx.default_environment.clone()),
    )
}

fn owned_meta(endpoint: &LlmEndpoint, namespace: &str, rendering: &Rendering) -> ObjectMeta {
    let name = endpoint.name_any();
    ObjectMeta {
        name: Some(format!("llmesh-{name}")),
        namespace: Some(namespace.to_string()),
        labels: Some(BTreeMap::from([
            (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
            (ENDPOINT_LABEL.to_string(), name),
        ])),
        annotations: Some(BTreeMap::from([(
            CONFIG_HASH_ANNOTATION.to_string(),
            rendering.config_hash.clone(),
        )])),
        owner_references: endpoint.controller_owner_ref(&()).map(|r| vec![r]),
        ..ObjectMeta::default()
    }
}

/// True when `existing` already carries everything `desired` sets, so no write is needed.
fn meta_matches(existing: &ObjectMeta, desired: &ObjectMeta) -> bool {
    let contains = |have: &Option<BTreeMap<String, String>>,
                    want: &Option<BTreeMap<String, String>>| {
        want.iter()
            .flatten()
            .all(|(k, v)| have.as_ref().and_then(|h| h.get(k)) == Some(v))
    };
    let owners = |refs: &Option<Vec<OwnerReference>>| refs.clone().unwrap_or_default();
    contains(&existing.labels, &desired.labels)
        && contains(&existing.annotations, &desired.annotations)
        && owners(&desired.owner_references).iter().all(|o| {
            owners(&existing.owner_references)
                .iter()
                .any(|e| e.uid == o.uid)
        })
}

async fn apply_config_map(
    ctx: &Context,
    endpoint: &LlmEndpoint,
    namespace: &str,
    rendering: &Rendering,
) -> Result<(), Error> {
    let desired = ConfigMap {
        metadata: owned_meta(endpoint, namespace, rendering),
        data: Some(BTreeMap::from([(
            CONFIG_FILE.to_string(),
            rendering.yaml.clone(),
        )])),
        ..ConfigMap::default()
    };
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let existing = ctx
        .caches
        .config_map(namespace, &format!("llmesh-{}", endpoint.name_any()));
    apply_if_changed(ctx, &api, existing.as_deref(), &desired, |existing| {
        existing.data == desired.data
    })
    .await
}

/// Server-side applies `desired` unless the cached object (`existing`) already matches it:
/// a resync that finds nothing changed makes no write.
async fn apply_if_changed<K>(
    ctx: &Context,
    api: &Api<K>,
    existing: Option<&K>,
    desired: &K,
    same_content: impl Fn(&K) -> bool,
) -> Result<(), Error>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let name = desired.meta().name.clone().unwrap_or_default();
    if let Some(existing) = existing {
        if same_content(existing) && meta_matches(existing.meta(), desired.meta()) {
            return Ok(());
        }
    }
    let mut body = serde_json::to_value(desired).map_err(kube::Error::SerdeError)?;
    body["apiVersion"] = json!(K::api_version(&()));
    body["kind"] = json!(K::kind(&()));
    ctx.metrics.count_write(&K::kind(&()));
    tracing::info!(
        kind = %K::kind(&()),
        namespace = desired.meta().namespace.as_deref().unwrap_or_default(),
        name = %name,
        "applying"
    );
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

fn resolve_credentials(ctx: &Context, namespace: &str, wanted: &[CopiedKey]) -> Credentials {
    if wanted.is_empty() {
        return Credentials::NotNeeded;
    }
    let mut data = BTreeMap::new();
    for CopiedKey { key, source } in wanted {
        let Some(secret) = ctx.caches.secret(namespace, &source.name) else {
            return Credentials::Unresolved {
                reason: "SecretNotFound",
                message: format!("Secret {namespace}/{} does not exist", source.name),
            };
        };
        match secret.data.as_ref().and_then(|d| d.get(&source.key)) {
            Some(value) if !value.0.is_empty() => {
                data.insert(key.to_string(), value.clone());
            }
            _ => {
                return Credentials::Unresolved {
                    reason: "KeyNotFound",
                    message: format!(
                        "Secret {namespace}/{} has no key {:?}",
                        source.name, source.key
                    ),
                }
            }
        }
    }
    Credentials::Resolved(data)
}

async fn apply_secret(
    ctx: &Context,
    endpoint: &LlmEndpoint,
    namespace: &str,
    rendering: &Rendering,
    data: &BTreeMap<String, ByteString>,
) -> Result<(), Error> {
    let desired = Secret {
        metadata: owned_meta(endpoint, namespace, rendering),
        data: Some(data.clone()),
        type_: Some("Opaque".into()),
        ..Secret::default()
    };
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let existing = ctx
        .caches
        .secret(namespace, &format!("llmesh-{}", endpoint.name_any()));
    apply_if_changed(ctx, &api, existing.as_deref(), &desired, |existing| {
        existing.data == desired.data
    })
    .await
}

/// An endpoint that switched to a provider without a key (dev on mock) keeps no copy of one.
async fn delete_copied_secret(ctx: &Context, namespace: &str, name: &str) -> Result<(), Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let copied = format!("llmesh-{name}");
    if ctx.caches.secret(namespace, &copied).is_some() {
        ctx.metrics.count_write("Secret");
        api.delete(&copied, &DeleteParams::default()).await?;
    }
    Ok(())
}

/// Writes the status when it differs from what is stored, keeping each condition's
/// `lastTransitionTime` unless its status flipped.
async fn update_status(
    ctx: &Context,
    endpoint: &LlmEndpoint,
    mut status: LlmEndpointStatus,
) -> Result<(), Error> {
    let previous = endpoint.status.clone().unwrap_or_default();
    for c in &mut status.conditions {
        if let Some(old) = previous.conditions.iter().find(|o| o.type_ == c.type_) {
            if old.status == c.status {
                c.last_transition_time = old.last_transition_time.clone();
            }
        }
    }
    if previous == status {
        return Ok(());
    }
    let api: Api<LlmEndpoint> = Api::namespaced(
        ctx.client.clone(),
        &endpoint.namespace().unwrap_or_default(),
    );
    let body = json!({
        "apiVersion": LlmEndpoint::api_version(&()),
        "kind": LlmEndpoint::kind(&()),
        "status": status,
    });
    ctx.metrics.count_write("LlmEndpoint/status");
    let written = api
        .patch_status(
            &endpoint.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
    ctx.status_writes.record(&written);
    Ok(())
}

/// `FallbacksResolved`: a warning, not a failure, since endpoints may be created in any
/// order and the sidecar skips a fallback it does not know.
fn fallbacks_condition(
    fallbacks: &[String],
    existing: &[String],
    generation: Option<i64>,
) -> Condition {
    let missing: Vec<&str> = fallbacks
        .iter()
        .filter(|f| !existing.contains(f))
        .map(String::as_str)
        .collect();
    if fallbacks.is_empty() {
        condition(
            "FallbacksResolved",
            true,
            "NoFallbacks",
            "no fallbacks",
            generation,
        )
    } else if missing.is_empty() {
        condition(
            "FallbacksResolved",
            true,
            "Found",
            "every fallback exists in this namespace",
            generation,
        )
    } else {
        condition(
            "FallbacksResolved",
            false,
            "FallbackNotFound",
            &format!(
                "no LlmEndpoint {} in this namespace: requests do not fall back there until it exists",
                missing.join(", ")
            ),
            generation,
        )
    }
}

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
        observed_generation: generation,
    }
}

async fn publish(
    ctx: &Context,
    endpoint: &LlmEndpoint,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note.to_string()),
        action: "Reconcile".into(),
        secondary: None,
    };
    ctx.metrics.count_write("Event");
    if let Err(error) = ctx
        .recorder
        .publish(&event, &endpoint.object_ref(&()))
        .await
    {
        tracing::warn!(%error, "cannot publish event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint_at(version: &str) -> LlmEndpoint {
        let mut endpoint: LlmEndpoint = serde_json::from_value(json!({
            "apiVersion": "llmesh.io/v1alpha1", "kind": "LlmEndpoint",
            "metadata": {"name": "chat", "namespace": "team", "resourceVersion": version},
            "spec": {"provider": "mock", "model": "m"},
        }))
        .unwrap();
        endpoint.metadata.resource_version = Some(version.to_string());
        endpoint
    }

    #[test]
    fn a_cached_endpoint_older_than_the_last_status_write_is_behind_until_it_catches_up() {
        let writes = StatusWrites::default();
        assert!(!writes.is_behind(&endpoint_at("5")));
        writes.record(&endpoint_at("7"));
        assert!(writes.is_behind(&endpoint_at("6")));
        assert!(!writes.is_behind(&endpoint_at("7")));
        // Caught up once: forgotten, so a later older copy is not held back either.
        assert!(!writes.is_behind(&endpoint_at("6")));
        writes.record(&endpoint_at("9"));
        assert!(!writes.is_behind(&endpoint_at("not-a-number")));
        writes.record(&endpoint_at("11"));
        writes.forget(&endpoint_at("11"));
        assert!(!writes.is_behind(&endpoint_at("10")));
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn missing_fallbacks_are_named_in_a_false_condition() {
        let c = fallbacks_condition(
            &names(&["backup", "azure", "spare"]),
            &names(&["chat", "azure"]),
            Some(3),
        );
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "FallbackNotFound")
        );
        assert_eq!(
            c.message,
            "no LlmEndpoint backup, spare in this namespace: requests do not fall back there until it exists"
        );
        assert_eq!(c.observed_generation, Some(3));
        let c = fallbacks_condition(&names(&["azure"]), &names(&["azure"]), None);
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Found"));
        let c = fallbacks_condition(&[], &[], None);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "NoFallbacks")
        );
    }
}

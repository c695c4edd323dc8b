//! The LlmEndpoint controller: one `reconcile` that computes the desired ConfigMap, Secret
//! and status for the namespace's environment and applies what differs, with server-side
//! apply under one field manager.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::crd::{LlmEndpoint, LlmEndpointStatus};
use crate::metrics::Metrics;
use crate::render::{render, CopiedKey, Rendering, CONFIG_FILE};

pub const FIELD_MANAGER: &str = "llmesh-operator";
/// The namespace label that selects the environment an LlmEndpoint is rendered for.
pub const ENVIRONMENT_LABEL: &str = "llmesh.io/environment";
pub const CONFIG_HASH_ANNOTATION: &str = "llmesh.io/config-hash";
pub const ENDPOINT_LABEL: &str = "llmesh.io/endpoint";
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "llmesh-operator");

/// A missing secret is retried this often even without a watch event (the watch normally
/// brings it back within a second of the secret appearing).
const CREDENTIALS_RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("LlmEndpoint has no namespace")]
    NotNamespaced,
}

/// What every reconcile shares.
pub struct Context {
    pub client: kube::Client,
    pub default_environment: String,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// The controller's cache of LlmEndpoints: whether the ones named in `fallbacks` exist.
    pub endpoints: Store<LlmEndpoint>,
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
    let scoped = |client: &kube::Client| -> Api<LlmEndpoint> {
        match &settings.namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    };
    let owned_config =
        watcher::Config::default().labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1));
    let (config_maps, secrets): (Api<ConfigMap>, Api<Secret>) = match &settings.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let controller = Controller::new(scoped(&client), watcher::Config::default());
    let endpoints = controller.store();
    metrics.watch_endpoints(endpoints.clone());
    let by_secret = endpoints.clone();
    let by_namespace = endpoints.clone();
    let by_fallback = endpoints.clone();
    let context = Arc::new(Context {
        endpoints: endpoints.clone(),
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
    controller
        .owns(config_maps, owned_config.clone())
        .owns(secrets.clone(), owned_config)
        // A source Secret created late or rotated: re-render the endpoints that use it.
        .watches(secrets, watcher::Config::default(), move |secret| {
            endpoints_using_secret(&by_secret, &secret)
        })
        // An endpoint created or deleted: re-check the endpoints that fall back to it.
        .watches(
            scoped(&client),
            watcher::Config::default(),
            move |endpoint| endpoints_falling_back_to(&by_fallback, &endpoint),
        )
        // A namespace's environment label changed: re-render everything in it.
        .watches(
            Api::<Namespace>::all(client),
            watcher::Config::default(),
            move |ns| endpoints_in_namespace(&by_namespace, &ns.name_any()),
        )
        .shutdown_on_signal()
        .run(reconcile_measured, error_policy, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile stream error");
            }
        })
        .await;
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
    let environment = environment_of(&ctx, &namespace).await?;
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

    apply_config_map(&ctx, &endpoint, &namespace, &rendering).await?;
    let credentials = resolve_credentials(&ctx, &namespace, &rendering.secrets).await?;
    let (credentials_condition, ready, requeue) = match &credentials {
        Credentials::NotNeeded => {
            delete_copied_secret(&ctx, &namespace, &name).await?;
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
            apply_secret(&ctx, &endpoint, &namespace, &rendering, data).await?;
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
            publish(&ctx, &endpoint, EventType::Warning, reason, message).await;
            (
                condition("CredentialsResolved", false, reason, message, generation),
                false,
                Some(CREDENTIALS_RETRY),
            )
        }
    };
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

async fn environment_of(ctx: &Context, namespace: &str) -> Result<String, Error> {
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    let ns = namespaces.get(namespace).await?;
    Ok(ns
        .labels()
        .get(ENVIRONMENT_LABEL)
        .cloned()
        .unwrap_or_else(|| ctx.default_environment.clone()))
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
    apply_if_changed(ctx, &api, &desired, |existing| {
        existing.data == desired.data
    })
    .await
}

/// Server-side applies `desired` unless the stored object already matches it: a resync
/// that finds nothing changed makes no write.
async fn apply_if_changed<K>(
    ctx: &Context,
    api: &Api<K>,
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
    if let Some(existing) = api.get_opt(&name).await? {
        if same_content(&existing) && meta_matches(existing.meta(), desired.meta()) {
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

async fn resolve_credentials(
    ctx: &Context,
    namespace: &str,
    wanted: &[CopiedKey],
) -> Result<Credentials, Error> {
    if wanted.is_empty() {
        return Ok(Credentials::NotNeeded);
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let mut data = BTreeMap::new();
    for CopiedKey { key, source } in wanted {
        let Some(secret) = api.get_opt(&source.name).await? else {
            return Ok(Credentials::Unresolved {
                reason: "SecretNotFound",
                message: format!("Secret {namespace}/{} does not exist", source.name),
            });
        };
        match secret.data.as_ref().and_then(|d| d.get(&source.key)) {
            Some(value) if !value.0.is_empty() => {
                data.insert(key.to_string(), value.clone());
            }
            _ => {
                return Ok(Credentials::Unresolved {
                    reason: "KeyNotFound",
                    message: format!(
                        "Secret {namespace}/{} has no key {:?}",
                        source.name, source.key
                    ),
                })
            }
        }
    }
    Ok(Credentials::Resolved(data))
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
    apply_if_changed(ctx, &api, &desired, |existing| {
        existing.data == desired.data
    })
    .await
}

/// An endpoint that switched to a provider without a key (dev on mock) keeps no copy of one.
async fn delete_copied_secret(ctx: &Context, namespace: &str, name: &str) -> Result<(), Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let copied = format!("llmesh-{name}");
    if api.get_metadata_opt(&copied).await?.is_some() {
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
    api.patch_status(
        &endpoint.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
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

//! The controller against a real API server: per-environment rendering, secrets that
//! arrive late or rotate, namespace label changes, and garbage collection of what it owns.
//! Each test runs its own controller scoped to its own namespace.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{eventually, install_crd};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use llmesh_operator::controller::{self, Settings, CONFIG_HASH_ANNOTATION};
use llmesh_operator::crd::LlmEndpoint;
use llmesh_sidecar::config::{EndpointConfig, ProviderKind};
use llmesh_testenv::ControlPlane;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

const SPEC: &str = r#"{
    "provider": "openai",
    "model": "gpt-4o",
    "secretRef": {"name": "openai", "key": "apiKey"},
    "environments": {
        "dev": {"provider": "mock"},
        "test": {"model": "gpt-4o-mini"},
        "prod": {"secretRef": {"name": "openai-prod", "key": "apiKey"}}
    }
}"#;

struct Setup {
    client: kube::Client,
    ns: String,
    metrics: std::sync::Arc<llmesh_operator::metrics::Metrics>,
    controller: tokio::task::JoinHandle<()>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.controller.abort();
    }
}

/// A namespace labelled with `environment`, the CRD, and a controller watching the namespace.
async fn setup(prefix: &str, environment: &str) -> Setup {
    let plane = ControlPlane::shared().await;
    install_crd(plane).await;
    let ns = plane.namespace(prefix).await.unwrap();
    let client = plane.client().await.unwrap();
    label_namespace(&client, &ns, environment).await;
    let metrics = std::sync::Arc::new(llmesh_operator::metrics::Metrics::new().unwrap());
    let controller = tokio::spawn(controller::run(
        client.clone(),
        Settings {
            default_environment: "default".into(),
            namespace: Some(ns.clone()),
        },
        std::sync::Arc::clone(&metrics),
    ));
    Setup {
        client,
        ns,
        metrics,
        controller,
    }
}

async fn label_namespace(client: &kube::Client, ns: &str, environment: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let patch = json!({"metadata": {"labels": {"llmesh.io/environment": environment}}});
    namespaces
        .patch(ns, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

async fn create_secret(client: &kube::Client, ns: &str, name: &str, key: &str) {
    create_secret_with(client, ns, name, "apiKey", key).await;
}

async fn create_secret_with(
    client: &kube::Client,
    ns: &str,
    name: &str,
    data_key: &str,
    value: &str,
) {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            data_key.to_string(),
            ByteString(value.as_bytes().to_vec()),
        )])),
        ..Default::default()
    };
    api.patch(
        name,
        &PatchParams::apply("llmesh-test").force(),
        &Patch::Apply(&{
            let mut v = serde_json::to_value(&secret).unwrap();
            v["apiVersion"] = json!("v1");
            v["kind"] = json!("Secret");
            v
        }),
    )
    .await
    .unwrap();
}

async fn create_endpoint(client: &kube::Client, ns: &str, name: &str) {
    create_endpoint_with(client, ns, name, serde_json::from_str(SPEC).unwrap()).await;
}

async fn create_endpoint_with(
    client: &kube::Client,
    ns: &str,
    name: &str,
    spec: serde_json::Value,
) {
    let api: Api<LlmEndpoint> = Api::namespaced(client.clone(), ns);
    let endpoint: LlmEndpoint = serde_json::from_value(json!({
        "apiVersion": "llmesh.io/v1alpha1",
        "kind": "LlmEndpoint",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap();
    api.create(&PostParams::default(), &endpoint).await.unwrap();
}

fn condition<'a>(
    e: &'a LlmEndpoint,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    e.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// Waits until the endpoint's status satisfies `check`, returning the endpoint.
async fn wait_status(
    client: &kube::Client,
    ns: &str,
    name: &str,
    check: impl Fn(&LlmEndpoint) -> bool,
) -> LlmEndpoint {
    let api: Api<LlmEndpoint> = Api::namespaced(client.clone(), ns);
    let last = std::sync::Mutex::new(None);
    let found = eventually(WAIT, || async {
        let e = api.get(name).await.ok()?;
        *last.lock().unwrap() = Some(e.status.clone());
        check(&e).then_some(e)
    })
    .await;
    found.unwrap_or_else(|| panic!("status never matched; last: {:?}", last.lock().unwrap()))
}

fn is_ready(e: &LlmEndpoint) -> bool {
    condition(e, "Ready").is_some_and(|c| c.status == "True")
        && e.status.as_ref().and_then(|s| s.observed_generation) == e.metadata.generation
}

async fn rendered(client: &kube::Client, ns: &str, name: &str) -> (ConfigMap, EndpointConfig) {
    let cm: ConfigMap = Api::namespaced(client.clone(), ns)
        .get(&format!("llmesh-{name}"))
        .await
        .unwrap();
    let yaml = cm.data.as_ref().unwrap()["endpoint.yaml"].clone();
    (cm, serde_yaml_ng::from_str(&yaml).unwrap())
}

async fn copied_key(client: &kube::Client, ns: &str, name: &str) -> Option<String> {
    copied(client, ns, name, "apiKey").await
}

/// Key `data_key` of Secret `llmesh-<name>`, the copy the sidecar mounts.
async fn copied(client: &kube::Client, ns: &str, name: &str, data_key: &str) -> Option<String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = api.get_opt(&format!("llmesh-{name}")).await.unwrap()?;
    Some(String::from_utf8(secret.data?.get(data_key)?.0.clone()).unwrap())
}

#[tokio::test]
async fn each_environment_gets_its_own_rendering_and_key() {
    for (environment, provider, model, key) in [
        ("dev", ProviderKind::Mock, "gpt-4o", None),
        ("test", ProviderKind::Openai, "gpt-4o-mini", Some("sk-base")),
        ("prod", ProviderKind::Openai, "gpt-4o", Some("sk-prod")),
    ] {
        let s = setup(&format!("env-{environment}"), environment).await;
        create_secret(&s.client, &s.ns, "openai", "sk-base").await;
        create_secret(&s.client, &s.ns, "openai-prod", "sk-prod").await;
        create_endpoint(&s.client, &s.ns, "chat").await;
        let endpoint = wait_status(&s.client, &s.ns, "chat", is_ready).await;
        let status = endpoint.status.clone().unwrap();
        assert_eq!(status.environment.as_deref(), Some(environment));
        assert_eq!(status.model.as_deref(), Some(model));
        for type_ in ["ConfigRendered", "CredentialsResolved", "Ready"] {
            let c = condition(&endpoint, type_).unwrap();
            assert_eq!(c.status, "True", "{environment}: {c:?}");
            assert_eq!(c.observed_generation, endpoint.metadata.generation);
        }

        let (cm, config) = rendered(&s.client, &s.ns, "chat").await;
        assert_eq!(
            (config.provider, config.model.as_str()),
            (provider, model),
            "{environment}"
        );
        assert_eq!(
            cm.metadata.annotations.unwrap()[CONFIG_HASH_ANNOTATION],
            status.config_hash.unwrap()
        );
        let owner = &cm.metadata.owner_references.unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("LlmEndpoint", endpoint.metadata.uid.as_deref().unwrap())
        );
        assert_eq!(
            copied_key(&s.client, &s.ns, "chat").await.as_deref(),
            key,
            "{environment}"
        );
        let managers: Vec<_> = cm
            .metadata
            .managed_fields
            .unwrap()
            .into_iter()
            .filter_map(|f| f.manager)
            .collect();
        assert_eq!(managers, ["llmesh-operator"]);

        // The operator's metrics count the endpoint under its environment, as Ready.
        let ready_series =
            format!("llmesh_operator_endpoints{{environment=\"{environment}\",ready=\"true\"}} 1");
        let scraped = eventually(Duration::from_secs(10), || async {
            let text = String::from_utf8(s.metrics.render()).unwrap();
            text.contains(&ready_series).then_some(text)
        })
        .await;
        let text = scraped.unwrap_or_else(|| {
            panic!(
                "{ready_series} not in:\n{}",
                String::from_utf8_lossy(&s.metrics.render())
            )
        });
        assert!(
            text.contains(
                "llmesh_operator_reconciles_total{kind=\"LlmEndpoint\",result=\"success\"}"
            ),
            "{text}"
        );
    }
}

#[tokio::test]
async fn a_secret_created_late_or_rotated_is_picked_up() {
    let s = setup("late-secret", "test").await;
    create_endpoint(&s.client, &s.ns, "chat").await;
    let waiting = wait_status(&s.client, &s.ns, "chat", |e| {
        condition(e, "CredentialsResolved").is_some_and(|c| c.reason == "SecretNotFound")
    })
    .await;
    assert_eq!(condition(&waiting, "Ready").unwrap().status, "False");
    assert!(condition(&waiting, "CredentialsResolved")
        .unwrap()
        .message
        .contains("openai"));
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(s.client.clone(), &s.ns);
    let seen = eventually(WAIT, || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("SecretNotFound"))
    })
    .await;
    assert!(seen.is_some(), "an Event says the secret is missing");

    let started = tokio::time::Instant::now();
    create_secret(&s.client, &s.ns, "openai", "sk-late").await;
    wait_status(&s.client, &s.ns, "chat", is_ready).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "picked up by the watch, not the retry timer"
    );
    assert_eq!(
        copied_key(&s.client, &s.ns, "chat").await.as_deref(),
        Some("sk-late")
    );

    create_secret(&s.client, &s.ns, "openai", "sk-rotated").await;
    let rotated = eventually(WAIT, || async {
        (copied_key(&s.client, &s.ns, "chat").await.as_deref() == Some("sk-rotated")).then_some(())
    })
    .await;
    assert!(rotated.is_some(), "the rotated key was copied");
}

#[tokio::test]
async fn the_redis_passwords_are_copied_beside_the_key_and_kept_out_of_the_config() {
    let s = setup("redis-password", "prod").await;
    create_secret(&s.client, &s.ns, "openai", "sk-prod").await;
    create_endpoint_with(
        &s.client,
        &s.ns,
        "chat",
        json!({
            "provider": "openai",
            "model": "gpt-4o",
            "secretRef": {"name": "openai", "key": "apiKey"},
            "redisPasswordSecretRef": {"name": "redis", "key": "password"},
            "limits": {
                "requestsPerMinute": 600,
                "scope": "global",
                "redis": {"url": "redis://redis.llmesh:6379"}
            },
            "cacheRedisPasswordSecretRef": {"name": "cache-redis", "key": "password"},
            "cache": {"shared": {"url": "redis://cache.llmesh:6379"}}
        }),
    )
    .await;
    let missing = |secret: &'static str| {
        move |e: &LlmEndpoint| {
            condition(e, "CredentialsResolved").is_some_and(|c| {
                c.reason == "SecretNotFound" && c.message.contains(&format!("/{secret} does not"))
            })
        }
    };
    let waiting = wait_status(&s.client, &s.ns, "chat", missing("redis")).await;
    assert_eq!(condition(&waiting, "Ready").unwrap().status, "False");

    let started = tokio::time::Instant::now();
    create_secret_with(&s.client, &s.ns, "redis", "password", "redis-pw-1").await;
    let waiting = wait_status(&s.client, &s.ns, "chat", missing("cache-redis")).await;
    assert_eq!(condition(&waiting, "Ready").unwrap().status, "False");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the password's Secret is watched too"
    );
    let started = tokio::time::Instant::now();
    create_secret_with(&s.client, &s.ns, "cache-redis", "password", "cache-pw-1").await;
    let ready = wait_status(&s.client, &s.ns, "chat", is_ready).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the cache password's Secret is watched too"
    );
    assert_eq!(
        condition(&ready, "CredentialsResolved").unwrap().message,
        "copied openai/apiKey, redis/password, cache-redis/password"
    );
    assert_eq!(
        copied(&s.client, &s.ns, "chat", "cacheRedisPassword")
            .await
            .as_deref(),
        Some("cache-pw-1")
    );
    assert_eq!(
        copied(&s.client, &s.ns, "chat", "redisPassword")
            .await
            .as_deref(),
        Some("redis-pw-1")
    );
    assert_eq!(
        copied_key(&s.client, &s.ns, "chat").await.as_deref(),
        Some("sk-prod")
    );
    let (cm, config) = rendered(&s.client, &s.ns, "chat").await;
    assert_eq!(
        config.limits.redis.unwrap().password_file.unwrap(),
        std::path::Path::new("/var/run/secrets/llmesh/chat/redisPassword")
    );
    assert_eq!(
        config.cache.unwrap().shared.unwrap().password_file.unwrap(),
        std::path::Path::new("/var/run/secrets/llmesh/chat/cacheRedisPassword")
    );
    let rendered_data = format!("{:?}", cm.data);
    assert!(!rendered_data.contains("redis-pw-1") && !rendered_data.contains("cache-pw-1"));

    create_secret_with(&s.client, &s.ns, "redis", "password", "redis-pw-2").await;
    let rotated = eventually(WAIT, || async {
        (copied(&s.client, &s.ns, "chat", "redisPassword")
            .await
            .as_deref()
            == Some("redis-pw-2"))
        .then_some(())
    })
    .await;
    assert!(rotated.is_some(), "the rotated password was copied");
    create_secret_with(&s.client, &s.ns, "cache-redis", "password", "cache-pw-2").await;
    let rotated = eventually(WAIT, || async {
        (copied(&s.client, &s.ns, "chat", "cacheRedisPassword")
            .await
            .as_deref()
            == Some("cache-pw-2"))
        .then_some(())
    })
    .await;
    assert!(rotated.is_some(), "the rotated cache password was copied");
}

#[tokio::test]
async fn a_namespace_label_change_re_renders() {
    let s = setup("relabel", "prod").await;
    create_secret(&s.client, &s.ns, "openai-prod", "sk-prod").await;
    create_endpoint(&s.client, &s.ns, "chat").await;
    wait_status(&s.client, &s.ns, "chat", is_ready).await;
    assert_eq!(
        copied_key(&s.client, &s.ns, "chat").await.as_deref(),
        Some("sk-prod")
    );

    label_namespace(&s.client, &s.ns, "dev").await;
    let endpoint = wait_status(&s.client, &s.ns, "chat", |e| {
        e.status.as_ref().and_then(|st| st.environment.as_deref()) == Some("dev") && is_ready(e)
    })
    .await;
    assert_eq!(endpoint.status.unwrap().provider.as_deref(), Some("mock"));
    assert_eq!(
        rendered(&s.client, &s.ns, "chat").await.1.provider,
        ProviderKind::Mock
    );
    assert_eq!(
        copied_key(&s.client, &s.ns, "chat").await,
        None,
        "dev keeps no copy of the key"
    );
}

#[tokio::test]
async fn deleting_the_endpoint_removes_what_it_owned() {
    let s = setup("delete", "test").await;
    create_secret(&s.client, &s.ns, "openai", "sk-base").await;
    create_endpoint(&s.client, &s.ns, "chat").await;
    wait_status(&s.client, &s.ns, "chat", is_ready).await;
    let api: Api<LlmEndpoint> = Api::namespaced(s.client.clone(), &s.ns);
    api.delete("chat", &DeleteParams::background())
        .await
        .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(s.client.clone(), &s.ns);
    // The garbage collector learns of a new CRD on its discovery resync, every 30 s, and
    // only then watches LlmEndpoints; on a loaded 2-core machine the whole can take longer.
    let gone = eventually(Duration::from_secs(90), || async {
        let cm = cms.get_opt("llmesh-chat").await.ok()?;
        let secret = copied_key(&s.client, &s.ns, "chat").await;
        (cm.is_none() && secret.is_none()).then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "the ConfigMap and Secret were garbage-collected"
    );
}

#[tokio::test]
async fn a_fallback_that_does_not_exist_yet_is_a_status_warning_until_it_does() {
    let s = setup("fallbacks", "dev").await;
    create_endpoint_with(
        &s.client,
        &s.ns,
        "chat",
        json!({"provider": "mock", "model": "m", "fallbacks": ["backup"]}),
    )
    .await;
    let missing = |e: &LlmEndpoint| {
        is_ready(e)
            && condition(e, "FallbacksResolved")
                .is_some_and(|c| c.status == "False" && c.reason == "FallbackNotFound")
    };
    let endpoint = wait_status(&s.client, &s.ns, "chat", missing).await;
    let message = &condition(&endpoint, "FallbacksResolved").unwrap().message;
    assert!(
        message.starts_with("no LlmEndpoint backup in this namespace"),
        "{message}"
    );

    // Created afterwards: endpoints may come in any order.
    create_endpoint_with(
        &s.client,
        &s.ns,
        "backup",
        json!({"provider": "mock", "model": "m"}),
    )
    .await;
    wait_status(&s.client, &s.ns, "chat", |e| {
        condition(e, "FallbacksResolved").is_some_and(|c| c.status == "True" && c.reason == "Found")
    })
    .await;
}

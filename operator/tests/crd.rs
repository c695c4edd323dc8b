//! The committed CRD matches the types, installs on a real API server, and the API server
//! itself rejects invalid LlmEndpoints (schema and CEL rules) and stores environment
//! overrides as written.

use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::CustomResourceExt;
use llmesh_operator::crd::LlmEndpoint;
use llmesh_operator::render::render;
use llmesh_sidecar::config::Duration;
use llmesh_testenv::ControlPlane;
use serde_json::json;

mod common;

use common::{install_crd, CRD_FILE};

#[test]
fn committed_crd_matches_the_types() {
    let committed = std::fs::read_to_string(CRD_FILE).unwrap();
    let generated = serde_yaml_ng::to_string(&LlmEndpoint::crd()).unwrap();
    assert!(
        committed == generated,
        "crds/llmendpoints.llmesh.io.yaml is out of date: run `cargo run -p llmesh-operator --bin crdgen > crds/llmendpoints.llmesh.io.yaml`"
    );
}

/// Untyped, so that specs the Rust types would refuse still reach the API server.
fn endpoint(name: &str, spec: serde_json::Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "llmesh.io/v1alpha1",
        "kind": "LlmEndpoint",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

#[tokio::test]
async fn the_api_server_accepts_valid_and_rejects_invalid_endpoints() {
    let plane = ControlPlane::shared().await;
    install_crd(plane).await;
    let client = plane.client().await.unwrap();
    let ns = plane.namespace("crd").await.unwrap();
    let api: Api<DynamicObject> =
        Api::namespaced_with(client, &ns, &ApiResource::erase::<LlmEndpoint>(&()));

    let valid = endpoint(
        "gpt-4o",
        json!({
            "provider": "openai",
            "model": "gpt-4o",
            "aliases": ["gpt-4o-latest"],
            "secretRef": {"name": "openai", "key": "apiKey"},
            "timeouts": {"firstByte": "2m", "idle": "90s"},
            "environments": {
                "dev": {"provider": "mock", "mock": {"tokenInterval": "20ms"}},
                "prod": {"secretRef": {"name": "openai-prod", "key": "apiKey"}},
            },
        }),
    );
    let stored = api
        .create(&PostParams::default(), &valid)
        .await
        .expect("a valid endpoint is stored");
    let typed: LlmEndpoint = serde_json::from_value(serde_json::to_value(stored).unwrap()).unwrap();
    assert_eq!(
        typed.spec.environments["dev"].provider,
        Some(llmesh_sidecar::config::ProviderKind::Mock)
    );

    // An environment's entry is stored as written (no defaults filled in, no field
    // required), so that it merges over the base field by field; `null` is kept and removes.
    let overrides = endpoint(
        "cached",
        json!({
            "provider": "openai",
            "model": "gpt-4o",
            "secretRef": {"name": "openai", "key": "apiKey"},
            "retry": {"maxAttempts": 5, "backoffBase": "1s"},
            "cache": {"ttl": "1h", "shared": {"url": "redis://redis.llmesh:6379"}},
            "cacheRedisPasswordSecretRef": {"name": "redis", "key": "password"},
            "environments": {
                "dev": {"provider": "mock", "cache": null},
                "test": {"cache": {"shared": null}},
                "prod": {
                    "retry": {"maxAttempts": 2},
                    "cache": {"allowSampling": true, "shared": {"timeout": "250ms"}},
                },
            },
        }),
    );
    let stored = api
        .create(&PostParams::default(), &overrides)
        .await
        .expect("partial environment blocks are stored");
    let environments = &stored.data["spec"]["environments"];
    assert_eq!(environments["prod"]["retry"], json!({"maxAttempts": 2}));
    assert_eq!(
        environments["prod"]["cache"],
        json!({"allowSampling": true, "shared": {"timeout": "250ms"}})
    );
    assert_eq!(environments["dev"]["cache"], serde_json::Value::Null);
    assert_eq!(environments["test"]["cache"], json!({"shared": null}));
    let typed: LlmEndpoint = serde_json::from_value(serde_json::to_value(stored).unwrap()).unwrap();
    let prod = render("cached", &typed.spec, "prod").unwrap().config;
    assert_eq!(prod.retry.backoff_base, Duration::from_secs(1));
    let cache = prod.cache.unwrap();
    assert_eq!(cache.ttl, Duration::from_secs(3600));
    assert!(cache.allow_sampling);
    let shared = cache.shared.unwrap();
    assert_eq!(shared.url, "redis://redis.llmesh:6379");
    assert_eq!(shared.timeout, Duration::from_millis(250));
    assert_eq!(
        render("cached", &typed.spec, "test")
            .unwrap()
            .config
            .cache
            .unwrap()
            .shared,
        None
    );
    assert_eq!(
        render("cached", &typed.spec, "dev").unwrap().config.cache,
        None
    );

    let rejected = [
        (json!({"provider": "openai"}), "spec.model is required"),
        (json!({"model": "m"}), "spec.provider is required"),
        (
            json!({"provider": "claude", "model": "m"}),
            "Unsupported value: \"claude\"",
        ),
        (
            json!({"provider": "openai", "model": "m", "timeouts": {"idle": "5 minutes"}}),
            "should match",
        ),
        (
            json!({"provider": "openai", "model": "m", "mock": {}}),
            "mock settings apply only to provider mock",
        ),
        (
            json!({"provider": "azure-openai", "model": "m"}),
            "provider azure-openai needs azure.apiVersion",
        ),
        (
            json!({"provider": "openai", "model": "m", "baseUrl": "ftp://x"}),
            "baseUrl must start with http",
        ),
        (
            json!({"provider": "openai", "model": "m", "environments": {"Prod_1": {}}}),
            "environment names are lowercase DNS labels",
        ),
        (
            json!({"provider": "openai", "model": "m", "maxRequestBodyBytes": 0}),
            "should be greater than or equal to 1",
        ),
        (
            json!({"provider": "mock", "model": "m", "environments": {"prod": {"limits": {
                "requestsPerMinute": 60, "scope": "global",
                "redis": {"url": "redis://r:6379", "passwordFile": "/etc/pw"}
            }}}}),
            "give the password as redisPasswordSecretRef",
        ),
        (
            json!({"provider": "mock", "model": "m",
                "cache": {"shared": {"url": "redis://r:6379", "passwordFile": "/etc/pw"}}}),
            "give the password as cacheRedisPasswordSecretRef",
        ),
        (
            json!({"provider": "mock", "model": "m", "environments": {"prod": {
                "cache": {"shared": {"passwordFile": "/etc/pw"}}
            }}}),
            "give the password as cacheRedisPasswordSecretRef",
        ),
        (
            json!({"provider": "mock", "model": "m", "cache": {"ttl": "1 hour"}}),
            "should match",
        ),
    ];
    for (i, (spec, expected)) in rejected.into_iter().enumerate() {
        let err = api
            .create(
                &PostParams::default(),
                &endpoint(&format!("bad-{i}"), spec.clone()),
            )
            .await
            .expect_err(&format!("{spec} must be rejected"));
        assert!(
            err.to_string().contains(expected),
            "{spec}: expected {expected:?} in {err}"
        );
    }
}

//! The monitoring stack on the node: the real Prometheus Operator and Prometheus discover an
//! llmesh sidecar through a PodMonitor shaped like the chart's, and PromQL returns its app's
//! requests and tokens. A test binary of its own, so its node holds only this stack.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use llmesh_testenv::monitoring::{install_prometheus, sample_values, SCRAPE_INTERVAL};
use llmesh_testenv::{pods, ControlPlane};
use serde_json::json;

/// First start of a pod on a busy 2-core machine.
const START: Duration = Duration::from_secs(90);
/// Discovery, the reloader's configuration update and a few scrapes.
const SCRAPED: Duration = Duration::from_secs(120);

/// The chart's PodMonitor (charts/llmesh/templates/monitoring.yaml, default values): every
/// pod of every namespace, scraped only where a port is named `llmesh-admin`.
fn chart_pod_monitor(namespace: &str) -> serde_json::Value {
    json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": "llmesh-sidecars", "namespace": namespace},
        "spec": {
            "selector": {},
            "namespaceSelector": {"any": true},
            "podMetricsEndpoints": [{"port": "llmesh-admin", "path": "/metrics", "interval": SCRAPE_INTERVAL}],
        },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prometheus_operator_scrapes_the_sidecar_through_the_charts_pod_monitor() {
    let plane = ControlPlane::start_with_node().await.unwrap();
    let client = plane.client().await.unwrap();

    let installing = Instant::now();
    let prometheus = install_prometheus(&plane)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", plane.node().unwrap().log_tail()));
    eprintln!(
        "monitoring stack (CRDs, operator, Prometheus Ready) in {:?}",
        installing.elapsed()
    );

    let ns = plane.namespace("monitored").await.unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    config_maps
        .create(
            &PostParams::default(),
            &pods::endpoint_config_map(
                "mock",
                "name: mock\nprovider: mock\nmodel: mock-gpt\naliases: [chat]\n",
            ),
        )
        .await
        .unwrap();
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods_api
        .create(
            &PostParams::default(),
            &pods::sidecar_pod("app", &["mock"], "chat"),
        )
        .await
        .unwrap();
    pods::wait_for(&pods_api, "app", START, "Ready", pods::is_ready)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", plane.node().unwrap().log_tail()));

    let gvk = GroupVersionKind::gvk("monitoring.coreos.com", "v1", "PodMonitor");
    let pod_monitors: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns,
        &ApiResource::from_gvk_with_plural(&gvk, "podmonitors"),
    );
    let monitor = chart_pod_monitor(&ns);
    pod_monitors
        .patch(
            "llmesh-sidecars",
            &PatchParams::apply("llmesh-tests"),
            &Patch::Apply(&monitor),
        )
        .await
        .unwrap();

    let scraping = Instant::now();
    let positive = |result: &serde_json::Value| sample_values(result).iter().any(|v| *v > 0.0);
    let requests = prometheus
        .wait_for(
            &format!(r#"sum(llmesh_requests_total{{namespace="{ns}", pod="app"}})"#),
            SCRAPED,
            positive,
        )
        .await
        .unwrap();
    eprintln!(
        "PodMonitor applied to the app's request count in Prometheus: {:?} ({requests})",
        scraping.elapsed()
    );
    let tokens = prometheus
        .wait_for(
            &format!(r#"sum by (token_type) (gen_ai_client_token_usage_sum{{namespace="{ns}", pod="app"}})"#),
            SCRAPED,
            positive,
        )
        .await
        .unwrap();
    eprintln!("tokens by type: {tokens}");

    // The series as a user's queries see them: the labels the PodMonitor's target adds beside
    // the sidecar's own.
    let series = prometheus
        .query(&format!(r#"llmesh_requests_total{{namespace="{ns}"}}"#))
        .await
        .unwrap();
    eprintln!("llmesh_requests_total series: {series}");
    let targets = prometheus.active_targets().await.unwrap();
    let target = targets
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["labels"]["namespace"] == ns.as_str())
        .unwrap_or_else(|| panic!("no target in {ns}: {targets}"));
    assert_eq!(target["health"], "up", "{target}");
    assert_eq!(
        target["scrapePool"],
        format!("podMonitor/{ns}/llmesh-sidecars/0"),
        "{target}"
    );
}

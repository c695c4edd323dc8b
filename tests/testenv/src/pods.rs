//! Pods on the node: the injected pod's shape, and waiting until a pod's status says what a
//! test expects.

use std::time::{Duration, Instant};

use anyhow::bail;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::Api;
use serde_json::json;

/// The sidecar image as `scripts/images` tags it (the chart's default).
pub const SIDECAR_IMAGE: &str = concat!("ghcr.io/llmesh/sidecar:", env!("CARGO_PKG_VERSION"));
/// A shell and wget: the tests' app container.
pub const BUSYBOX_IMAGE: &str = concat!("llmesh.local/busybox:", env!("CARGO_PKG_VERSION"));

/// Polls the pod until `done` holds, failing after `timeout` (or as soon as the pod has
/// failed) with the pod's last status.
pub async fn wait_for(
    pods: &Api<Pod>,
    name: &str,
    timeout: Duration,
    what: &str,
    done: impl Fn(&Pod) -> bool,
) -> anyhow::Result<Pod> {
    let deadline = Instant::now() + timeout;
    loop {
        let pod = pods.get_opt(name).await?;
        if let Some(pod) = pod.as_ref().filter(|p| done(p)) {
            return Ok(pod.clone());
        }
        let failed = pod.as_ref().is_some_and(|p| phase(p) == "Failed");
        if failed || Instant::now() > deadline {
            let status = pod
                .and_then(|p| p.status)
                .map(|s| serde_json::to_string_pretty(&s).unwrap_or_default());
            bail!("pod {name} not {what} after {timeout:?}; status: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The pod's Ready condition is True.
pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

pub fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or_default()
}

/// How often the named container (or init container) has restarted.
pub fn restarts(pod: &Pod, container: &str) -> Option<i32> {
    let status = pod.status.as_ref()?;
    status
        .container_statuses
        .iter()
        .chain(status.init_container_statuses.iter())
        .flatten()
        .find(|c| c.name == container)
        .map(|c| c.restart_count)
}

/// The pod's IP on the node's pod network.
pub fn ip(pod: &Pod) -> Option<&str> {
    pod.status.as_ref()?.pod_ip.as_deref()
}

/// A pod as the injection webhook makes it: the sidecar image as a native sidecar on
/// projected volumes of `llmesh-<endpoint>` ConfigMaps and Secrets, and an app container
/// that asks its sidecar for `model` every second and prints the answer.
pub fn sidecar_pod(name: &str, endpoints: &[&str], model: &str) -> Pod {
    let request = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    let app = format!(
        "while true; do wget -q -O- --header 'content-type: application/json' \
         --post-data '{request}' http://127.0.0.1:4000/v1/chat/completions 2>&1; echo; sleep 1; done"
    );
    let config_items: Vec<_> = endpoints
        .iter()
        .map(|e| {
            json!({"configMap": {"name": format!("llmesh-{e}"), "optional": true,
                         "items": [{"key": "endpoint.yaml", "path": format!("{e}.yaml")}]}})
        })
        .collect();
    let key_items: Vec<_> = endpoints
        .iter()
        .map(|e| {
            json!({"secret": {"name": format!("llmesh-{e}"), "optional": true,
                         "items": [{"key": "apiKey", "path": format!("{e}/apiKey")}]}})
        })
        .collect();
    let probe = json!({"httpGet": {"path": "/readyz", "port": "llmesh-admin"}, "periodSeconds": 1, "failureThreshold": 120});
    from_json(json!({
        "metadata": {"name": name},
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "initContainers": [{
                "name": "llmesh-sidecar",
                "image": SIDECAR_IMAGE,
                "imagePullPolicy": "Never",
                "restartPolicy": "Always",
                "args": ["--config-dir", "/etc/llmesh/endpoints", "--expect-endpoints", endpoints.join(","),
                         "--listen", "127.0.0.1:4000", "--admin-listen", "0.0.0.0:4001"],
                "ports": [{"name": "llmesh-admin", "containerPort": 4001}],
                "startupProbe": probe,
                "readinessProbe": probe,
                "securityContext": {
                    "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                    "readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
                    "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
                },
                "volumeMounts": [
                    {"name": "llmesh-config", "mountPath": "/etc/llmesh/endpoints", "readOnly": true},
                    {"name": "llmesh-credentials", "mountPath": "/var/run/secrets/llmesh", "readOnly": true},
                ],
            }],
            "containers": [{
                "name": "app", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c", app],
            }],
            "volumes": [
                {"name": "llmesh-config", "projected": {"sources": config_items}},
                {"name": "llmesh-credentials", "projected": {"sources": key_items}},
            ],
        },
    }))
}

/// The ConfigMap `llmesh-<endpoint>` as the operator renders it: `endpoint.yaml` holds `yaml`.
pub fn endpoint_config_map(endpoint: &str, yaml: &str) -> ConfigMap {
    from_json(
        json!({"metadata": {"name": format!("llmesh-{endpoint}")}, "data": {"endpoint.yaml": yaml}}),
    )
}

/// The objects above are written as JSON literals; their shape is fixed, so this cannot fail.
fn from_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("a well-formed object literal")
}

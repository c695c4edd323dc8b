//! Waiting on pods of the node: tests poll the pod's status until it says what they expect.

use std::time::{Duration, Instant};

use anyhow::bail;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;

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

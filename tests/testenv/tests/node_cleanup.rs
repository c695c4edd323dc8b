//! Stopping a node leaves nothing on the host: no process, mount, cgroup, network interface or
//! file outside its directory, and not its directory either. A test binary of its own, so that
//! its node is the only one while it runs.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use llmesh_testenv::{pods, ControlPlane};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_node_leaves_nothing_on_the_host() {
    let plane = ControlPlane::start_with_node().await.unwrap();
    let ns = plane.namespace("cleanup").await.unwrap();
    let pods_api: Api<Pod> = Api::namespaced(plane.client().await.unwrap(), &ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "runner"},
        "spec": {"containers": [{
            "name": "main",
            "image": concat!("llmesh.local/busybox:", env!("CARGO_PKG_VERSION")),
            "imagePullPolicy": "Never",
            "command": ["/bin/sh", "-c", "exec sleep 3600"],
        }]},
    }))
    .unwrap();
    pods_api.create(&PostParams::default(), &pod).await.unwrap();
    pods::wait_for(
        &pods_api,
        "runner",
        Duration::from_secs(90),
        "Ready",
        pods::is_ready,
    )
    .await
    .unwrap();

    let footprint = plane.node_footprint().unwrap();
    let while_running = footprint.leftovers();
    // The check sees a running node: its processes, mounts, cgroups and bridge.
    for kind in [
        "process",
        "mount",
        "cgroup",
        "network interface",
        "directory",
    ] {
        assert!(
            while_running.iter().any(|l| l.starts_with(kind)),
            "no {kind} found while the node runs: {while_running:#?}"
        );
    }

    drop(plane);
    assert_eq!(footprint.leftovers(), Vec::<String>::new());
}

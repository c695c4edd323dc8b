//! Shared by the operator's integration tests.

#![allow(dead_code)] // each test binary uses a different part

use std::time::Duration;

use llmesh_testenv::ControlPlane;

pub const CRD_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../crds/llmendpoints.llmesh.io.yaml"
);

/// Installs the committed CRD (idempotent) and waits until it is Established.
pub async fn install_crd(plane: &ControlPlane) {
    let crd = serde_yaml_ng::from_str(&std::fs::read_to_string(CRD_FILE).unwrap()).unwrap();
    plane.install_crd(&crd).await.unwrap();
}

/// Polls `check` until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

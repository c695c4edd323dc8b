//! Shared by the operator's integration tests.

#![allow(dead_code)] // each test binary uses a different part

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
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

/// A free loopback port (for a process that binds it a moment later).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

/// A running operator process with its stderr (its log) collected; killed when dropped.
pub struct OperatorProcess {
    pub child: Child,
    logs: Arc<Mutex<String>>,
}

impl OperatorProcess {
    /// Spawns `command` with its stdout discarded and its stderr collected for `logs`.
    pub fn spawn(command: &mut Command) -> Self {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start llmesh-operator");
        let logs = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&logs);
        let stderr = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut logs = sink.lock().expect("log lock");
                logs.push_str(&line);
                logs.push('\n');
            }
        });
        Self { child, logs }
    }

    /// Everything the process has logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().expect("log lock").clone()
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

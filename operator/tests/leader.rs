//! Two operator processes against a real API server: one leads, the other stands by and
//! takes over when the leader dies.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, install_crd};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, Patch, PatchParams, PostParams};
use llmesh_operator::crd::LlmEndpoint;
use llmesh_testenv::ControlPlane;
use serde_json::json;

struct Operator {
    child: Child,
    logs: Arc<Mutex<String>>,
}

impl Operator {
    fn start(plane: &ControlPlane, ns: &str, identity: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_llmesh-operator"))
            .env("KUBECONFIG", &plane.kubeconfig)
            .args([
                "--namespace",
                ns,
                "--lease-namespace",
                ns,
                "--identity",
                identity,
            ])
            .args([
                "--lease-duration",
                "3s",
                "--lease-renew",
                "500ms",
                "--admin-listen",
                "127.0.0.1:0",
            ])
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

    fn logs(&self) -> String {
        self.logs.lock().expect("log lock").clone()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt("llmesh-operator")
        .await
        .ok()??
        .spec?
        .holder_identity
}

async fn endpoint_ready(api: &Api<LlmEndpoint>, name: &str) -> bool {
    let endpoint = serde_json::from_value::<LlmEndpoint>(json!({
        "apiVersion": "llmesh.io/v1alpha1", "kind": "LlmEndpoint",
        "metadata": {"name": name},
        "spec": {"provider": "mock", "model": "m"},
    }))
    .unwrap();
    api.create(&PostParams::default(), &endpoint).await.unwrap();
    eventually(Duration::from_secs(20), || async {
        let e = api.get(name).await.ok()?;
        e.status?
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
            .then_some(())
    })
    .await
    .is_some()
}

#[tokio::test]
async fn a_standby_replica_takes_over_when_the_leader_dies() {
    let plane = ControlPlane::shared().await;
    install_crd(plane).await;
    let ns = plane.namespace("leader").await.unwrap();
    let client = plane.client().await.unwrap();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            &ns,
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {"llmesh.io/environment": "dev"}}})),
        )
        .await
        .unwrap();
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let endpoints: Api<LlmEndpoint> = Api::namespaced(client, &ns);

    let a = Operator::start(plane, &ns, "replica-a");
    let led = eventually(Duration::from_secs(20), || async {
        (holder(&leases).await? == "replica-a").then_some(())
    })
    .await;
    assert!(led.is_some(), "replica-a took the lease:\n{}", a.logs());
    let b = Operator::start(plane, &ns, "replica-b");
    let standing_by = eventually(Duration::from_secs(10), || async {
        b.logs()
            .contains("another replica leads; standing by")
            .then_some(())
    })
    .await;
    assert!(standing_by.is_some(), "replica-b waits:\n{}", b.logs());
    assert!(
        endpoint_ready(&endpoints, "first").await,
        "the leader reconciles:\n{}",
        a.logs()
    );
    assert!(!b.logs().contains("leading: reconciling"));

    // The leader dies without releasing the lease: the standby waits for it to expire.
    a.signal("-KILL");
    let took_over = eventually(Duration::from_secs(15), || async {
        (holder(&leases).await? == "replica-b").then_some(())
    })
    .await;
    assert!(took_over.is_some(), "replica-b took over:\n{}", b.logs());
    let transitions = leases
        .get("llmesh-operator")
        .await
        .unwrap()
        .spec
        .unwrap()
        .lease_transitions;
    assert_eq!(transitions, Some(1));
    assert!(
        endpoint_ready(&endpoints, "second").await,
        "the new leader reconciles:\n{}",
        b.logs()
    );

    // A graceful stop hands the lease back at once.
    b.signal("-TERM");
    let released = eventually(Duration::from_secs(10), || async {
        holder(&leases).await.is_none().then_some(())
    })
    .await;
    assert!(
        released.is_some(),
        "replica-b released the lease:\n{}",
        b.logs()
    );
}

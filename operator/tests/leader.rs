//! Two operator processes against a real API server: one leads, the other stands by and
//! takes over when the leader dies.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{eventually, install_crd, OperatorProcess};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, Patch, PatchParams, PostParams};
use llmesh_operator::crd::LlmEndpoint;
use llmesh_testenv::ControlPlane;
use serde_json::json;

/// A replica named `identity`, watching and leasing in `ns`, with short lease timings.
fn start_replica(plane: &ControlPlane, ns: &str, identity: &str) -> OperatorProcess {
    OperatorProcess::spawn(
        Command::new(env!("CARGO_BIN_EXE_llmesh-operator"))
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
            ]),
    )
}

fn signal(operator: &OperatorProcess, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &operator.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
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

    let a = start_replica(plane, &ns, "replica-a");
    let led = eventually(Duration::from_secs(20), || async {
        (holder(&leases).await? == "replica-a").then_some(())
    })
    .await;
    assert!(led.is_some(), "replica-a took the lease:\n{}", a.logs());
    let b = start_replica(plane, &ns, "replica-b");
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
    signal(&a, "-KILL");
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
    signal(&b, "-TERM");
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

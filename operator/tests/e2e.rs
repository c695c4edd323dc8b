//! The whole story on a real node: `helm install` the chart, label namespaces `dev` and `prod`
//! for their environment and for injection, apply one LlmEndpoint manifest and one app
//! Deployment to both, unchanged, and check that each app gets answers through its injected
//! sidecar on 127.0.0.1:4000: dev from the mock, prod from the recording upstream with the
//! prod key, which the upstream never gets from dev. Then a key rotation reaches the running
//! prod pods, a Job with a sidecar completes, `helm upgrade` reaches new pods and
//! `helm uninstall` leaves new pods alone.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, LogParams, PostParams};
use llmesh_testenv::{pods, tool, ControlPlane};
use llmesh_testkit::{FakeUpstream, Options};
use serde_json::json;
use sha2::Digest as _;

const RELEASE_NAMESPACE: &str = "llmesh-system";
const BUSYBOX_IMAGE: &str = concat!("llmesh.local/busybox:", env!("CARGO_PKG_VERSION"));
/// The official OpenAI Python SDK and tests/images/openai-app.py: configured only by the
/// environment the injection sets.
const OPENAI_APP_IMAGE: &str = concat!("llmesh.local/openai-app:", env!("CARGO_PKG_VERSION"));
const PROD_KEY: &str = "sk-prod-first-0123456789abcdef";
const ROTATED_KEY: &str = "sk-prod-second-0123456789abcdef";
const DEV_KEY: &str = "sk-dev-0123456789abcdef";
/// A step on a busy 2-core machine: image start, leader election, kubelet volume updates.
const STEP: Duration = Duration::from_secs(120);

/// Runs `helm` or `kubectl` against the test cluster; panics with its output if it fails.
async fn run(plane: &ControlPlane, program: &str, args: &[&str], stdin: Option<&str>) -> String {
    use tokio::io::AsyncWriteExt as _;
    let mut command = tokio::process::Command::new(tool(program));
    command
        .args(args)
        .env("KUBECONFIG", &plane.kubeconfig)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    input
        .write_all(stdin.unwrap_or_default().as_bytes())
        .await
        .unwrap();
    drop(input);
    let output = child.wait_with_output().await.unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{program} {} failed:\n{text}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    text
}

fn chart() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/llmesh")
        .to_string_lossy()
        .into_owned()
}

/// The app: the official OpenAI SDK with no llmesh in it and no setting of its own. Every
/// second it makes a plain and a streamed call for the model `chat` and logs each answer.
fn app_deployment() -> String {
    serde_json::to_string(&json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "app"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "app"}},
            "template": {
                "metadata": {"labels": {"app": "app"}, "annotations": {"llmesh.io/endpoints": "chat"}},
                "spec": {
                    "terminationGracePeriodSeconds": 2,
                    "containers": [{
                        "name": "app", "image": OPENAI_APP_IMAGE, "imagePullPolicy": "IfNotPresent",
                        "args": ["chat"],
                    }],
                },
            },
        },
    }))
    .unwrap()
}

/// The app's answers so far, plain and streamed: its JSON log lines that say `ok`.
fn answers(logs: &str) -> (usize, usize) {
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["ok"] == true)
        .collect();
    let plain = lines
        .iter()
        .filter(|v| v["stream"] == false && v["object"] == "chat.completion")
        .count();
    let streamed = lines
        .iter()
        .filter(|v| v["stream"] == true && v["chunks"].as_u64().unwrap_or(0) > 1)
        .count();
    (plain, streamed)
}

/// One LlmEndpoint for every environment: the recording upstream with the namespace's key,
/// except in dev, which uses the mock and needs no key.
fn endpoint_manifest(upstream: &FakeUpstream) -> String {
    serde_json::to_string(&json!({
        "apiVersion": "llmesh.io/v1alpha1",
        "kind": "LlmEndpoint",
        "metadata": {"name": "chat"},
        "spec": {
            "provider": "openai-compatible",
            "baseUrl": upstream.base_url(),
            "model": "gpt-4o",
            "secretRef": {"name": "openai", "key": "apiKey"},
            "environments": {"dev": {"provider": "mock"}},
        },
    }))
    .unwrap()
}

fn secret_manifest(key: &str) -> String {
    serde_json::to_string(&json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "openai"},
        "stringData": {"apiKey": key},
    }))
    .unwrap()
}

async fn running_app_pod(pods_api: &Api<Pod>) -> Pod {
    common::eventually(STEP, || async {
        let list = pods_api
            .list(&ListParams::default().labels("app=app"))
            .await
            .ok()?;
        list.items
            .into_iter()
            .find(|p| pods::is_ready(p) && p.metadata.deletion_timestamp.is_none())
    })
    .await
    .expect("no Ready app pod")
}

async fn app_logs(pods_api: &Api<Pod>, pod: &Pod) -> String {
    let params = LogParams {
        container: Some("app".into()),
        ..LogParams::default()
    };
    pods_api
        .logs(pod.metadata.name.as_deref().unwrap(), &params)
        .await
        .unwrap_or_default()
}

/// Waits until the app has three plain and three streamed answers; fails with its last words.
async fn wait_for_answers(pods_api: &Api<Pod>, pod: &Pod) {
    let deadline = Instant::now() + STEP;
    loop {
        let logs = app_logs(pods_api, pod).await;
        let (plain, streamed) = answers(&logs);
        if plain >= 3 && streamed >= 3 {
            return;
        }
        let last: Vec<&str> = logs.lines().rev().take(6).collect();
        assert!(
            Instant::now() < deadline,
            "the app of {} got {plain} plain and {streamed} streamed answers; it said last: {last:#?}",
            pod.metadata.namespace.as_deref().unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn injected_sidecar(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::Container> {
    pod.spec
        .as_ref()?
        .init_containers
        .as_ref()?
        .iter()
        .find(|c| c.name == "llmesh-sidecar")
}

fn fingerprint(key: &str) -> String {
    let digest = sha2::Sha256::digest(key.as_bytes());
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_inject_serve_rotate_upgrade_uninstall() {
    let plane = ControlPlane::start_with_node().await.unwrap();
    let node = plane.node().unwrap();
    let client = plane.client().await.unwrap();
    let started = Instant::now();

    // The Prometheus Operator and a Prometheus first, so the chart finds monitoring.coreos.com
    // and installs its PodMonitor, ServiceMonitor, rules and dashboard.
    let prometheus = llmesh_testenv::monitoring::install_prometheus(&plane)
        .await
        .unwrap();
    eprintln!(
        "Prometheus Operator and Prometheus up: {:?}",
        started.elapsed()
    );

    // helm install, with no values: the images scripts/images built carry the chart's names.
    run(
        &plane,
        "helm",
        &[
            "install",
            "llmesh",
            &chart(),
            "-n",
            RELEASE_NAMESPACE,
            "--create-namespace",
            "--wait",
            "--timeout",
            "4m",
        ],
        None,
    )
    .await;
    eprintln!("helm install --wait: {:?}", started.elapsed());
    let leases: Api<Lease> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let leader = common::eventually(STEP, || async {
        leases
            .get_opt("llmesh-operator")
            .await
            .ok()
            .flatten()?
            .spec?
            .holder_identity
    })
    .await
    .expect("no operator became leader");
    assert!(leader.starts_with("llmesh-operator-"), "{leader}");
    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    common::eventually(STEP, || async {
        let config = webhooks.get_opt("llmesh-sidecar-injector").await.ok()??;
        let bundle = config.webhooks?.first()?.client_config.ca_bundle.clone()?;
        (!bundle.0.is_empty()).then_some(())
    })
    .await
    .expect("the operator never filled the webhook's caBundle");

    // The recording upstream, on the host's address on the pod network.
    let upstream = FakeUpstream::start_on((node.host_address, 0).into(), Options::default())
        .await
        .unwrap();

    // The platform engineer's part: namespaces, keys, one endpoint manifest for both.
    for (ns, key) in [("dev", DEV_KEY), ("prod", PROD_KEY)] {
        run(&plane, "kubectl", &["create", "namespace", ns], None).await;
        run(
            &plane,
            "kubectl",
            &[
                "label",
                "namespace",
                ns,
                &format!("llmesh.io/environment={ns}"),
                "llmesh.io/inject=enabled",
            ],
            None,
        )
        .await;
        run(
            &plane,
            "kubectl",
            &["apply", "-n", ns, "-f", "-"],
            Some(&secret_manifest(key)),
        )
        .await;
        run(
            &plane,
            "kubectl",
            &["apply", "-n", ns, "-f", "-"],
            Some(&endpoint_manifest(&upstream)),
        )
        .await;
    }
    for ns in ["dev", "prod"] {
        let ready = run(
            &plane,
            "kubectl",
            &[
                "wait",
                "-n",
                ns,
                "llmendpoint/chat",
                "--for=condition=Ready",
                "--timeout=120s",
            ],
            None,
        )
        .await;
        assert!(ready.contains("condition met"), "{ready}");
    }

    // The app developer's part: the same Deployment in dev first; the mock answers, and the
    // upstream hears nothing.
    let dev_pods: Api<Pod> = Api::namespaced(client.clone(), "dev");
    let prod_pods: Api<Pod> = Api::namespaced(client.clone(), "prod");
    run(
        &plane,
        "kubectl",
        &["apply", "-n", "dev", "-f", "-"],
        Some(&app_deployment()),
    )
    .await;
    let dev_pod = running_app_pod(&dev_pods).await;
    let sidecar = injected_sidecar(&dev_pod).expect("the dev pod got the sidecar");
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    wait_for_answers(&dev_pods, &dev_pod).await;
    assert!(upstream.requests().is_empty(), "dev reached the upstream");
    eprintln!("dev app answered by the mock: {:?}", started.elapsed());

    // prod: the same Deployment, answered by the upstream with the prod key.
    run(
        &plane,
        "kubectl",
        &["apply", "-n", "prod", "-f", "-"],
        Some(&app_deployment()),
    )
    .await;
    let prod_pod = running_app_pod(&prod_pods).await;
    assert!(injected_sidecar(&prod_pod).is_some());
    wait_for_answers(&prod_pods, &prod_pod).await;
    let seen = upstream.requests();
    assert!(!seen.is_empty());
    for request in &seen {
        assert_eq!(
            request.header("authorization"),
            Some(format!("Bearer {PROD_KEY}").as_str()),
            "the upstream got another key than prod's"
        );
        assert_eq!(request.json()["model"], "gpt-4o");
    }
    let logs = app_logs(&prod_pods, &prod_pod).await + &app_logs(&dev_pods, &dev_pod).await;
    assert!(!logs.contains("sk-"), "a key reached an app:\n{logs}");
    eprintln!("prod app answered by the upstream: {:?}", started.elapsed());

    // The Prometheus Operator found the sidecars through the chart's PodMonitor: the app's
    // requests and tokens, by namespace and LlmEndpoint as the alerts and dashboard group them.
    let positive = |result: &serde_json::Value| {
        llmesh_testenv::monitoring::sample_values(result)
            .iter()
            .any(|v| *v > 0.0)
    };
    for query in [
        r#"sum by (namespace, endpoint) (llmesh_requests_total{namespace="prod", endpoint="chat"})"#,
        r#"sum(gen_ai_client_token_usage_sum{namespace="prod"})"#,
        // And the operator's replicas through the chart's ServiceMonitor.
        r#"sum(up{namespace="llmesh-system", service="llmesh-operator-metrics"})"#,
    ] {
        let result = prometheus.wait_for(query, STEP, positive).await.unwrap();
        eprintln!("Prometheus: {query} = {result}: {:?}", started.elapsed());
    }

    // Key rotation in the source Secret reaches the running prod pod with no restart.
    let rotation = Instant::now();
    run(
        &plane,
        "kubectl",
        &["apply", "-n", "prod", "-f", "-"],
        Some(&secret_manifest(ROTATED_KEY)),
    )
    .await;
    common::eventually(STEP, || async {
        let last = upstream.last_request()?;
        (last.header("authorization") == Some(format!("Bearer {ROTATED_KEY}").as_str()))
            .then_some(())
    })
    .await
    .expect("the rotated key never reached the upstream");
    let rotated_in = rotation.elapsed();
    eprintln!(
        "key rotation: Secret update to the first request with the new key in {rotated_in:?}"
    );
    let pod = prod_pods
        .get(prod_pod.metadata.name.as_deref().unwrap())
        .await
        .unwrap();
    assert_eq!(pods::restarts(&pod, "llmesh-sidecar"), Some(0));
    let metrics = reqwest::get(format!("http://{}:4001/metrics", pods::ip(&pod).unwrap()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let info: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("llmesh_endpoint_credential_info{"))
        .collect();
    assert!(
        info.iter().any(|l| l.contains(&fingerprint(ROTATED_KEY))),
        "{info:?}"
    );
    assert!(!metrics.contains(ROTATED_KEY) && !metrics.contains(PROD_KEY));

    // A Job with an injected sidecar completes once its app is done.
    let job = json!({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "one-call"},
        "spec": {"backoffLimit": 0, "template": {
            "metadata": {"annotations": {"llmesh.io/endpoints": "chat"}},
            "spec": {"restartPolicy": "Never", "containers": [{
                "name": "app", "image": OPENAI_APP_IMAGE, "imagePullPolicy": "IfNotPresent",
                "args": ["chat", "1"],
            }]},
        }},
    });
    run(
        &plane,
        "kubectl",
        &["apply", "-n", "dev", "-f", "-"],
        Some(&job.to_string()),
    )
    .await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), "dev");
    common::eventually(STEP, || async {
        let status = jobs.get("one-call").await.ok()?.status?;
        assert_eq!(status.failed.unwrap_or(0), 0, "the Job failed");
        (status.succeeded.unwrap_or(0) == 1).then_some(())
    })
    .await
    .expect("the Job with a sidecar did not complete");

    // helm upgrade with a changed value reaches pods created afterwards.
    run(
        &plane,
        "helm",
        &[
            "upgrade",
            "llmesh",
            &chart(),
            "-n",
            RELEASE_NAMESPACE,
            "--reuse-values",
            "--set",
            "sidecar.resources.memoryRequest=96Mi",
            "--wait",
            "--timeout",
            "4m",
        ],
        None,
    )
    .await;
    let probe_pod = |name: &str| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": {"llmesh.io/endpoints": "chat"}},
            "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
                "name": "app", "image": BUSYBOX_IMAGE, "imagePullPolicy": "IfNotPresent",
                "command": ["/bin/sh", "-c", "exec sleep 3600"],
            }]},
        }))
        .unwrap()
    };
    // The upgraded operator replicas take over the webhook; until then a pod may still meet an
    // old one, so each try asks again. Dry runs: the webhook answers them as it answers real
    // creations, and no pod is stored or started for a try.
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    common::eventually(STEP, || async {
        let pod = dev_pods
            .create(&dry_run, &probe_pod("after-upgrade"))
            .await
            .ok()?;
        let request = injected_sidecar(&pod)?
            .resources
            .as_ref()?
            .requests
            .as_ref()?
            .get("memory")?
            .0
            .clone();
        (request == "96Mi").then_some(())
    })
    .await
    .expect("no pod got the upgraded sidecar resources");
    eprintln!("helm upgrade reached new pods: {:?}", started.elapsed());

    // helm uninstall removes the webhook configuration; new pods are left alone.
    run(
        &plane,
        "helm",
        &["uninstall", "llmesh", "-n", RELEASE_NAMESPACE, "--wait"],
        None,
    )
    .await;
    assert!(webhooks
        .get_opt("llmesh-sidecar-injector")
        .await
        .unwrap()
        .is_none());
    let after = dev_pods
        .create(&PostParams::default(), &probe_pod("after-uninstall"))
        .await
        .unwrap();
    assert!(
        injected_sidecar(&after).is_none(),
        "a pod was injected after uninstall"
    );
    eprintln!("whole story: {:?}", started.elapsed());
}

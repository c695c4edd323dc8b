//! The node mode: pods run. A Deployment and a Job on the node, and the llmesh sidecar image
//! as a native sidecar beside an app container, as an injected pod has it: the app gets answers
//! on 127.0.0.1:4000, a ConfigMap change and a Secret rotation reach the running sidecar
//! without a restart, and two such pods each have their own 127.0.0.1:4000.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, ListParams, LogParams, PostParams};
use llmesh_testenv::pods::BUSYBOX_IMAGE;
use llmesh_testenv::{pods, ControlPlane, NODE_NAME};
use llmesh_testkit::{FakeUpstream, Options};
use serde_json::json;

/// First start of a pod on a busy 2-core machine.
const START: Duration = Duration::from_secs(90);
/// The kubelet's volume update: `syncFrequency: 10s` with the Watch strategy, and margin.
const VOLUME_UPDATE: Duration = Duration::from_secs(60);

fn object<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_is_ready_and_runs_a_deployment_and_a_job() {
    let plane = ControlPlane::shared_with_node().await;
    let client = plane.client().await.unwrap();
    let ns = plane.namespace("node-workloads").await.unwrap();

    let node: k8s_openapi::api::core::v1::Node =
        Api::all(client.clone()).get(NODE_NAME).await.unwrap();
    let addresses = node.status.unwrap().addresses.unwrap();
    let internal = addresses.iter().find(|a| a.type_ == "InternalIP").unwrap();
    assert_eq!(
        internal.address,
        plane.node().unwrap().host_address.to_string(),
        "the node's IP is its address on the pod bridge"
    );

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    deployments
        .create(
            &PostParams::default(),
            &object(json!({
                "metadata": {"name": "sleeper"},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {"app": "sleeper"}},
                    "template": {
                        "metadata": {"labels": {"app": "sleeper"}},
                        "spec": {"containers": [{
                            "name": "main", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never",
                            "command": ["/bin/sh", "-c", "exec sleep 3600"],
                        }]},
                    },
                },
            })),
        )
        .await
        .unwrap();
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    jobs.create(
        &PostParams::default(),
        &object(json!({
            "metadata": {"name": "once"},
            "spec": {"backoffLimit": 0, "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{
                    "name": "main", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never",
                    "command": ["/bin/sh", "-c", "echo job-done"],
                }],
            }}},
        })),
    )
    .await
    .unwrap();

    // The Deployment's pod is scheduled onto the node by kube-scheduler and runs.
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let deadline = Instant::now() + START;
    let running = loop {
        let list = pods_api
            .list(&ListParams::default().labels("app=sleeper"))
            .await
            .unwrap();
        if let Some(pod) = list.items.into_iter().find(pods::is_ready) {
            break pod;
        }
        assert!(
            Instant::now() < deadline,
            "no Ready pod of the Deployment\n{}",
            plane.node().unwrap().log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        running.spec.as_ref().unwrap().node_name.as_deref(),
        Some(NODE_NAME)
    );
    assert!(pods::ip(&running).unwrap().starts_with("10.244.77."));

    // The Job completes, and its output is readable through the API server from the kubelet.
    let deadline = Instant::now() + START;
    loop {
        let job = jobs.get("once").await.unwrap();
        if job.status.and_then(|s| s.succeeded).unwrap_or(0) == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the Job did not complete");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let job_pod = pods_api
        .list(&ListParams::default().labels("job-name=once"))
        .await
        .unwrap()
        .items
        .remove(0);
    let logs = pods_api
        .logs(
            job_pod.metadata.name.as_deref().unwrap(),
            &LogParams::default(),
        )
        .await
        .unwrap();
    assert_eq!(logs.trim(), "job-done");
}

async fn app_logs(pods_api: &Api<Pod>, pod: &str) -> String {
    let params = LogParams {
        container: Some("app".into()),
        ..LogParams::default()
    };
    pods_api.logs(pod, &params).await.unwrap_or_default()
}

/// Waits until the app's log has a line containing `needle`; returns how long it took.
async fn wait_for_answer(
    pods_api: &Api<Pod>,
    pod: &str,
    needle: &str,
    timeout: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        let logs = app_logs(pods_api, pod).await;
        if logs.lines().any(|l| l.contains(needle)) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "no answer with {needle} from pod {pod} after {timeout:?}; its app said:\n{}",
            logs.lines().rev().take(10).collect::<Vec<_>>().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_image_serves_its_app_and_follows_configmap_and_secret_changes() {
    let plane = ControlPlane::shared_with_node().await;
    let node = plane.node().unwrap();
    let client = plane.client().await.unwrap();
    let ns = plane.namespace("node-sidecar").await.unwrap();

    // The provider, on the host's address on the pod bridge: it records the key it gets.
    let upstream = FakeUpstream::start_on((node.host_address, 0).into(), Options::default())
        .await
        .unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let endpoint = |model: &str| {
        format!(
            "name: chat\nprovider: openai\nbaseUrl: {}\nmodel: {model}\ncredential:\n  file: /var/run/secrets/llmesh/chat/apiKey\n",
            upstream.base_url()
        )
    };
    config_maps
        .create(
            &PostParams::default(),
            &pods::endpoint_config_map("chat", &endpoint("model-one")),
        )
        .await
        .unwrap();
    let first_key = "sk-first-0123456789abcdef";
    let second_key = "sk-second-0123456789abcdef";
    let key_secret = |key: &str| -> Secret {
        object(json!({"metadata": {"name": "llmesh-chat"}, "stringData": {"apiKey": key}}))
    };
    secrets
        .create(&PostParams::default(), &key_secret(first_key))
        .await
        .unwrap();

    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods_api
        .create(
            &PostParams::default(),
            &pods::sidecar_pod("app", &["chat"], "chat"),
        )
        .await
        .unwrap();
    let started = Instant::now();
    let pod = pods::wait_for(&pods_api, "app", START, "Ready", pods::is_ready)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", node.log_tail()));
    eprintln!("pod with the sidecar Ready in {:?}", started.elapsed());

    // The app, in its own container, reaches the sidecar on 127.0.0.1:4000; the sidecar adds
    // the key from the mounted Secret and rewrites the model.
    wait_for_answer(&pods_api, "app", "chat.completion", Duration::from_secs(30)).await;
    let recorded = upstream.last_request().unwrap();
    assert_eq!(
        recorded.header("authorization"),
        Some(format!("Bearer {first_key}").as_str())
    );
    assert_eq!(recorded.json()["model"], "model-one");

    // The admin port is served on the pod's own address on the bridge.
    let pod_ip = pods::ip(&pod).unwrap().to_string();
    let ready: serde_json::Value = reqwest::get(format!("http://{pod_ip}:4001/readyz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready", "{ready}");

    // A ConfigMap change reaches the running sidecar through the kubelet's volume update.
    let change = Instant::now();
    config_maps
        .replace(
            "llmesh-chat",
            &PostParams::default(),
            &pods::endpoint_config_map("chat", &endpoint("model-two")),
        )
        .await
        .unwrap();
    loop {
        if upstream
            .last_request()
            .is_some_and(|r| r.json()["model"] == "model-two")
        {
            break;
        }
        assert!(
            change.elapsed() < VOLUME_UPDATE,
            "the sidecar never used the new ConfigMap"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "ConfigMap change reached the sidecar in {:?}",
        change.elapsed()
    );

    // A Secret change rotates the key, also without a restart.
    let rotation = Instant::now();
    secrets
        .replace(
            "llmesh-chat",
            &PostParams::default(),
            &key_secret(second_key),
        )
        .await
        .unwrap();
    loop {
        let last = upstream.last_request().unwrap();
        if last.header("authorization") == Some(format!("Bearer {second_key}").as_str()) {
            break;
        }
        assert!(
            rotation.elapsed() < VOLUME_UPDATE,
            "the sidecar never used the rotated key"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "Secret rotation reached the sidecar in {:?}",
        rotation.elapsed()
    );

    let pod = pods_api.get("app").await.unwrap();
    assert_eq!(
        pods::restarts(&pod, "llmesh-sidecar"),
        Some(0),
        "the sidecar was restarted"
    );
    assert_eq!(pods::restarts(&pod, "app"), Some(0));
    // The app never saw a key.
    let logs = app_logs(&pods_api, "app").await;
    assert!(
        !logs.contains("sk-first") && !logs.contains("sk-second"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pods_each_have_their_own_sidecar_on_127_0_0_1_4000() {
    let plane = ControlPlane::shared_with_node().await;
    let client = plane.client().await.unwrap();
    let ns = plane.namespace("node-pair").await.unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    for (endpoint, model) in [("left", "mock-left"), ("right", "mock-right")] {
        let yaml = format!("name: {endpoint}\nprovider: mock\nmodel: {model}\naliases: [chat]\n");
        config_maps
            .create(
                &PostParams::default(),
                &pods::endpoint_config_map(endpoint, &yaml),
            )
            .await
            .unwrap();
    }
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    // Both ask for the alias `chat`: each sidecar answers with its own endpoint's model.
    for side in ["left", "right"] {
        pods_api
            .create(
                &PostParams::default(),
                &pods::sidecar_pod(side, &[side], "chat"),
            )
            .await
            .unwrap();
    }
    for side in ["left", "right"] {
        pods::wait_for(&pods_api, side, START, "Ready", pods::is_ready)
            .await
            .unwrap_or_else(|e| panic!("{e:#}\n{}", plane.node().unwrap().log_tail()));
    }
    for side in ["left", "right"] {
        wait_for_answer(
            &pods_api,
            side,
            &format!("\"model\":\"mock-{side}\""),
            Duration::from_secs(30),
        )
        .await;
        let other = if side == "left" { "right" } else { "left" };
        let logs = app_logs(&pods_api, side).await;
        assert!(
            !logs.contains(&format!("mock-{other}")),
            "{side} reached the other pod's sidecar:\n{logs}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_with_the_sidecar_completes_when_its_app_exits() {
    let plane = ControlPlane::shared_with_node().await;
    let client = plane.client().await.unwrap();
    let ns = plane.namespace("node-job").await.unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    config_maps
        .create(
            &PostParams::default(),
            &pods::endpoint_config_map("chat", "name: chat\nprovider: mock\nmodel: mock-job\n"),
        )
        .await
        .unwrap();
    // The injected pod's spec, with an app that makes one call and exits.
    let mut spec =
        serde_json::to_value(pods::sidecar_pod("unused", &["chat"], "chat").spec).unwrap();
    spec["restartPolicy"] = json!("Never");
    spec["containers"][0]["command"] = json!(["/bin/sh", "-c",
        "wget -q -O- --header 'content-type: application/json' \
         --post-data '{\"model\": \"chat\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}' \
         http://127.0.0.1:4000/v1/chat/completions"]);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    jobs.create(
        &PostParams::default(),
        &object(json!({
            "metadata": {"name": "one-call"},
            "spec": {"backoffLimit": 0, "template": {"spec": spec}},
        })),
    )
    .await
    .unwrap();
    // The kubelet stops the native sidecar once the app is done, so the Job completes.
    let deadline = Instant::now() + START;
    loop {
        let status = jobs
            .get("one-call")
            .await
            .unwrap()
            .status
            .unwrap_or_default();
        if status.succeeded.unwrap_or(0) == 1 {
            break;
        }
        assert_eq!(status.failed.unwrap_or(0), 0, "the Job failed");
        assert!(
            Instant::now() < deadline,
            "the Job with a sidecar did not complete\n{}",
            plane.node().unwrap().log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod = pods_api
        .list(&ListParams::default().labels("job-name=one-call"))
        .await
        .unwrap()
        .items
        .remove(0);
    let logs = app_logs(&pods_api, pod.metadata.name.as_deref().unwrap()).await;
    assert!(logs.contains("\"model\":\"mock-job\""), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_get_service_account_tokens_and_reach_the_api_server_as_in_a_cluster() {
    let plane = ControlPlane::shared_with_node().await;
    let client = plane.client().await.unwrap();
    let ns = plane.namespace("node-sa").await.unwrap();
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let sa = "/var/run/secrets/kubernetes.io/serviceaccount";
    // busybox's TLS cannot talk to Go's, so a plain request stands in for a client: the Go
    // HTTPS server at the in-cluster address answers it with its typical 400. Then the pod's
    // routes: its subnet and the API server's address, nothing else (so no way out).
    let script = format!(
        "cat {sa}/namespace; echo; \
         test -s {sa}/token && grep -q 'BEGIN CERTIFICATE' {sa}/ca.crt && echo token-ok; \
         printf 'GET /version HTTP/1.0\\r\\n\\r\\n' | nc -w 5 $KUBERNETES_SERVICE_HOST $KUBERNETES_SERVICE_PORT | head -n 1; \
         ip route"
    );
    pods_api
        .create(
            &PostParams::default(),
            &object(json!({
                "metadata": {"name": "reader"},
                "spec": {"restartPolicy": "Never", "containers": [{
                    "name": "main", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never",
                    "command": ["/bin/sh", "-c", script],
                }]},
            })),
        )
        .await
        .unwrap();
    let pod = pods::wait_for(&pods_api, "reader", START, "Succeeded", |p| {
        pods::phase(p) == "Succeeded"
    })
    .await
    .unwrap();
    let logs = pods_api
        .logs("reader", &LogParams::default())
        .await
        .unwrap();
    let lines: Vec<&str> = logs.lines().map(str::trim).collect();
    assert_eq!(
        lines,
        [
            ns.as_str(),
            "token-ok",
            "HTTP/1.0 400 Bad Request",
            "10.96.0.1 via 10.244.77.1 dev eth0",
            &format!(
                "10.244.77.0/24 dev eth0 scope link  src {}",
                pods::ip(&pod).unwrap()
            ),
        ],
        "{logs}"
    );
}

//! What an injected pod relies on: starting on a projected volume whose endpoints have not
//! all arrived (`--expect-endpoints`), and knowing whose pod it is (`POD_NAMESPACE`,
//! `POD_SERVICE_ACCOUNT` from the downward API).

mod common;

use std::process::Command;
use std::time::Duration;

use common::{client, eventually, KubeletVolume, Sidecar, BIN};
use serde_json::{json, Value};

/// Many reload intervals (the harness polls every 100 ms), to ride out a loaded machine.
const RELOAD_WAIT: Duration = Duration::from_secs(5);

const CHAT: &str = "name: chat\nprovider: mock\nmodel: mock-chat\n";
const EMBED_BY_DEFAULT: &str = "name: embed\nprovider: mock\nmodel: mock-embed\ndefault: true\n";

/// A sidecar started as an injected pod's is: on its projected volume holding `files`,
/// told to expect the endpoints `expected`.
fn start_expecting(files: &[(&str, &str)], expected: &str) -> (Sidecar, KubeletVolume) {
    let dir = tempfile::tempdir().unwrap();
    let volume_dir = dir.path().join("endpoints");
    let volume = KubeletVolume::create(&volume_dir, files);
    let sidecar = Sidecar::start_with(
        dir,
        &[
            "--config-dir",
            volume_dir.to_str().unwrap(),
            "--expect-endpoints",
            expected,
        ],
    );
    (sidecar, volume)
}

/// The `llmesh_endpoint_missing` series of a scrape.
async fn missing_series(sidecar: &Sidecar) -> Vec<String> {
    sidecar
        .metrics_text()
        .await
        .lines()
        .filter(|l| l.starts_with("llmesh_endpoint_missing{"))
        .map(str::to_string)
        .collect()
}

/// Status and body of a chat call naming `model`, with `x-llmesh-endpoint` if given.
async fn chat(sidecar: &Sidecar, model: &str, endpoint_header: Option<&str>) -> (u16, Value) {
    let mut request = client()
        .post(sidecar.url("/v1/chat/completions"))
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}));
    if let Some(name) = endpoint_header {
        request = request.header("x-llmesh-endpoint", name);
    }
    let r = request.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test]
async fn an_expected_endpoint_is_served_once_its_configmap_arrives() {
    // The projected volume of a pod whose only endpoint's ConfigMap does not exist yet.
    let (sidecar, mut volume) = start_expecting(&[], "chat");

    // Ready, so that the startup probe lets the app start, and saying what it waits for.
    let (status, ready) = sidecar.readiness().await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["complete"], false);
    assert_eq!(ready["missing"], json!(["chat"]));
    assert_eq!(ready["endpoints"], json!([]));
    assert_eq!(
        ready["pod"],
        json!({"namespace": null, "serviceAccount": null})
    );

    let (status, body) = chat(&sidecar, "chat", None).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "endpoint_not_ready");
    assert_eq!(body["error"]["type"], "llmesh_error");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("ConfigMap llmesh-chat"), "{message}");
    let (status, body) = chat(&sidecar, "anything", Some("chat")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("endpoint_not_ready"))
    );
    // A name nobody expected stays an unknown model.
    let (status, body) = chat(&sidecar, "gpt-9", None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    assert!(sidecar
        .logs()
        .contains("expected endpoint has no configuration yet"));
    assert_eq!(
        missing_series(&sidecar).await,
        ["llmesh_endpoint_missing{endpoint=\"chat\"} 1"]
    );

    // The LlmEndpoint is created: the kubelet adds its ConfigMap to the volume.
    volume.update(&[("chat.yaml", CHAT)]);
    assert!(
        eventually(RELOAD_WAIT, || async {
            chat(&sidecar, "chat", None).await.0 == 200
        })
        .await,
        "the endpoint was not served after its file arrived:\n{}",
        sidecar.logs()
    );
    let (status, ready) = sidecar.readiness().await;
    assert_eq!(status, 200);
    assert_eq!(ready["complete"], true);
    assert_eq!(ready["missing"], json!([]));
    assert_eq!(ready["endpoints"][0]["name"], "chat");
    assert!(
        sidecar
            .wait_for_log("expected endpoint arrived", RELOAD_WAIT)
            .await
    );
    assert!(missing_series(&sidecar).await.is_empty());

    // The LlmEndpoint is deleted: its file goes, and it is missing again, not an error.
    volume.update(&[]);
    assert!(
        eventually(RELOAD_WAIT, || async {
            chat(&sidecar, "chat", None).await.0 == 503
        })
        .await
    );
    assert_eq!(sidecar.readiness().await.1["missing"], json!(["chat"]));
}

#[tokio::test]
async fn the_endpoints_present_serve_while_another_is_missing() {
    let (sidecar, _volume) = start_expecting(&[("embed.yaml", EMBED_BY_DEFAULT)], "chat,embed");
    let (status, ready) = sidecar.readiness().await;
    assert_eq!(status, 200);
    assert_eq!(
        (&ready["missing"], &ready["complete"]),
        (&json!(["chat"]), &json!(false))
    );
    assert_eq!(chat(&sidecar, "embed", None).await.0, 200);
    // Not sent to the default endpoint: the app would get another model than it asked for.
    let (status, body) = chat(&sidecar, "chat", None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("endpoint_not_ready"))
    );
    // Other unknown names still go to the default, as without --expect-endpoints.
    assert_eq!(chat(&sidecar, "gpt-9", None).await.0, 200);
    let r = client()
        .get(sidecar.url("/v1/models/chat"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
}

#[tokio::test]
async fn expect_star_starts_on_whatever_is_there() {
    let (sidecar, mut volume) = start_expecting(&[], "*");
    let (status, ready) = sidecar.readiness().await;
    assert_eq!(status, 200);
    assert_eq!(
        (&ready["missing"], &ready["complete"]),
        (&json!([]), &json!(true))
    );
    volume.update(&[("chat.yaml", CHAT)]);
    assert!(
        eventually(RELOAD_WAIT, || async {
            chat(&sidecar, "chat", None).await.0 == 200
        })
        .await
    );
}

#[test]
fn without_expect_endpoints_an_empty_directory_still_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(BIN)
        .args(["--config-dir", dir.path().to_str().unwrap(), "--check"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no endpoint files"), "{stderr}");

    // Given, it is a valid (if waiting) configuration.
    let output = Command::new(BIN)
        .args(["--config-dir", dir.path().to_str().unwrap(), "--check"])
        .env("LLMESH_EXPECT_ENDPOINTS", "chat")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("chat MISSING"), "{stdout}");
}

#[test]
fn expect_endpoints_refuses_bad_names_and_a_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(BIN)
        .args([
            "--config-dir",
            dir.path().to_str().unwrap(),
            "--expect-endpoints",
            "chat,Not_A_Name",
            "--check",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not a valid endpoint name"), "{stderr}");

    // A whole config file has nothing to wait for.
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, "endpoints: [{name: chat, provider: mock, model: m}]").unwrap();
    let output = Command::new(BIN)
        .args([
            "--config",
            file.to_str().unwrap(),
            "--expect-endpoints",
            "chat",
            "--check",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--expect-endpoints goes with --config-dir"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_pod_s_identity_shows_on_readyz_and_as_an_info_metric() {
    let dir = tempfile::tempdir().unwrap();
    let volume_dir = dir.path().join("endpoints");
    let _volume = KubeletVolume::create(&volume_dir, &[("chat.yaml", CHAT)]);
    // As the webhook passes them: environment variables filled by the downward API.
    let sidecar = Sidecar::start_with_env(
        dir,
        &["--config-dir", volume_dir.to_str().unwrap()],
        &[
            ("POD_NAMESPACE", "team-a"),
            ("POD_SERVICE_ACCOUNT", "summarizer"),
        ],
    );
    let (status, ready) = sidecar.readiness().await;
    assert_eq!(status, 200);
    assert_eq!(
        ready["pod"],
        json!({"namespace": "team-a", "serviceAccount": "summarizer"})
    );
    let info: Vec<String> = sidecar
        .metrics_text()
        .await
        .lines()
        .filter(|l| l.starts_with("llmesh_pod_info"))
        .map(str::to_string)
        .collect();
    assert_eq!(
        info,
        ["llmesh_pod_info{namespace=\"team-a\",service_account=\"summarizer\"} 1"]
    );
    // Every other series is as it was: no pod labels added to them.
    assert_eq!(chat(&sidecar, "chat", None).await.0, 200);
    let text = sidecar.metrics_text().await;
    let request_series = text
        .lines()
        .find(|l| l.starts_with("llmesh_requests_total{"))
        .unwrap();
    assert!(!request_series.contains("team-a"), "{request_series}");
}

/// The kubelet updates the pod's key volume apart from its config volume, so an endpoint's
/// config may arrive before its key: that endpoint waits (503 credential_unavailable) but the
/// pod stays ready for the others, and the key is used as soon as it lands.
#[tokio::test]
async fn an_endpoint_whose_key_arrives_after_its_config_does_not_make_the_pod_unready() {
    let upstream = llmesh_testkit::FakeUpstream::start().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("apiKey");
    let remote = format!(
        "name: remote\nprovider: openai-compatible\nbaseUrl: {}\nmodel: up\ncredential: {{file: {}}}\n",
        upstream.base_url(),
        key_file.display()
    );
    let (sidecar, _volume) = start_expecting(
        &[("chat.yaml", CHAT), ("remote.yaml", &remote)],
        "chat,remote",
    );
    let (status, ready) = sidecar.readiness().await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["complete"], true);
    let remote_state = ready["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "remote")
        .unwrap()
        .clone();
    assert!(remote_state["error"].is_string(), "{ready}");
    let ask = |model: &'static str| {
        client()
            .post(sidecar.url("/v1/chat/completions"))
            .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    assert_eq!(ask("chat").await.unwrap().status(), 200);
    let waiting = ask("remote").await.unwrap();
    assert_eq!(waiting.status(), 503);
    let body: Value = waiting.json().await.unwrap();
    assert_eq!(body["error"]["code"], "credential_unavailable");

    std::fs::write(&key_file, "sk-arrived-later-0123456789").unwrap();
    let served = eventually(RELOAD_WAIT, || async {
        ask("remote").await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(served, "{}", sidecar.logs());
}

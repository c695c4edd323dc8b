//! Hot reload of config and keys, as files change on disk the way Kubernetes changes them.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{client, eventually, replace_file, KubeletVolume, Sidecar};
use llmesh_testkit::{directives, FakeUpstream};
use serde_json::{json, Value};

const RELOAD_WAIT: Duration = Duration::from_secs(5);

fn endpoint_yaml(upstream: &FakeUpstream, model: &str, key_file: &Path) -> String {
    format!(
        "name: chat
provider: openai-compatible
baseUrl: {}
model: {model}
credential: {{file: {}}}
",
        upstream.base_url(),
        key_file.display()
    )
}

/// A whole `--config` file with that one endpoint, plus `extra` endpoint fields.
fn config_yaml(upstream: &FakeUpstream, model: &str, key_file: &Path, extra: &str) -> String {
    let endpoint = endpoint_yaml(upstream, model, key_file).replace('\n', "\n    ");
    format!("endpoints:\n  - {endpoint}{extra}\n")
}

async fn upstream_saw(sidecar: &Sidecar, upstream: &FakeUpstream) -> (String, String) {
    let r = client()
        .post(sidecar.url("/v1/chat/completions"))
        .json(&json!({"model": "chat", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = upstream.last_request().unwrap();
    (
        seen.json()["model"].as_str().unwrap_or("").to_string(),
        seen.header("authorization").unwrap_or("").to_string(),
    )
}

/// The `llmesh_endpoint_credential_info` lines of a scrape, without the HELP and TYPE lines.
async fn credential_series(sidecar: &Sidecar) -> Vec<String> {
    let text = sidecar.metrics_text().await;
    text.lines()
        .filter(|l| l.starts_with("llmesh_endpoint_credential_info{"))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn a_changed_config_is_used_and_a_broken_one_is_rejected() {
    let upstream = FakeUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "k1").unwrap();
    let config = dir.path().join("config.yaml");
    let whole = |model: &str| config_yaml(&upstream, model, &key, "");
    std::fs::write(&config, whole("model-a")).unwrap();
    let sidecar = Sidecar::start_with(dir, &["--config", config.to_str().unwrap()]);
    assert_eq!(upstream_saw(&sidecar, &upstream).await.0, "model-a");
    let (_, ready) = sidecar.readiness().await;
    let first_hash = ready["configHash"].as_str().unwrap().to_string();

    replace_file(&config, &whole("model-b"));
    assert!(
        eventually(RELOAD_WAIT, || async {
            upstream_saw(&sidecar, &upstream).await.0 == "model-b"
        })
        .await
    );
    let (_, ready) = sidecar.readiness().await;
    let second_hash = ready["configHash"].as_str().unwrap().to_string();
    assert_ne!(first_hash, second_hash);

    // A config that does not validate: rejected, logged, the last good one keeps serving.
    replace_file(
        &config,
        &whole("model-c").replace("provider: openai-compatible", "provider: openai-compatibel"),
    );
    assert!(
        sidecar
            .wait_for_log("rejected new configuration", RELOAD_WAIT)
            .await
    );
    assert_eq!(upstream_saw(&sidecar, &upstream).await.0, "model-b");
    let (status, ready) = sidecar.readiness().await;
    assert_eq!(
        (status, ready["configHash"].as_str()),
        (200, Some(second_hash.as_str()))
    );
    // Logged once, not on every poll.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        sidecar.logs().matches("rejected new configuration").count(),
        1
    );

    // Fixed again: picked up.
    replace_file(&config, &whole("model-d"));
    assert!(
        eventually(RELOAD_WAIT, || async {
            upstream_saw(&sidecar, &upstream).await.0 == "model-d"
        })
        .await
    );
}

#[tokio::test]
async fn kubelet_style_swaps_of_config_and_secret_are_picked_up() {
    let upstream = FakeUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret_dir = dir.path().join("secret");
    let config_dir = dir.path().join("config");
    let mut secret = KubeletVolume::create(&secret_dir, &[("apiKey", "sk-first\n")]);
    let key = secret_dir.join("apiKey");
    let mut config = KubeletVolume::create(
        &config_dir,
        &[("endpoint.yaml", &endpoint_yaml(&upstream, "model-a", &key))],
    );
    let sidecar = Sidecar::start_with(dir, &["--config-dir", config_dir.to_str().unwrap()]);
    assert_eq!(
        upstream_saw(&sidecar, &upstream).await,
        ("model-a".into(), "Bearer sk-first".into())
    );
    let (_, ready) = sidecar.readiness().await;
    let first_fingerprint = ready["endpoints"][0]["credentialFingerprint"]
        .as_str()
        .unwrap()
        .to_string();

    // Key rotation: the next request uses the new key, no restart.
    secret.update(&[("apiKey", "sk-second\n")]);
    assert!(
        eventually(RELOAD_WAIT, || async {
            upstream_saw(&sidecar, &upstream).await.1 == "Bearer sk-second"
        })
        .await
    );
    let (_, ready) = sidecar.readiness().await;
    assert_ne!(
        ready["endpoints"][0]["credentialFingerprint"]
            .as_str()
            .unwrap(),
        first_fingerprint
    );
    let second_fingerprint = ready["endpoints"][0]["credentialFingerprint"]
        .as_str()
        .unwrap();
    // Prometheus sees the rotation too: one series, with the new fingerprint.
    assert_eq!(
        credential_series(&sidecar).await,
        [format!(
            "llmesh_endpoint_credential_info{{endpoint=\"chat\",fingerprint=\"{second_fingerprint}\"}} 1"
        )]
    );
    assert!(sidecar.wait_for_log("credential loaded", RELOAD_WAIT).await);

    config.update(&[("endpoint.yaml", &endpoint_yaml(&upstream, "model-b", &key))]);
    assert!(
        eventually(RELOAD_WAIT, || async {
            upstream_saw(&sidecar, &upstream).await.0 == "model-b"
        })
        .await
    );

    let logs = sidecar.logs();
    assert!(
        !logs.contains("sk-first") && !logs.contains("sk-second"),
        "a key leaked into the logs"
    );
}

#[tokio::test]
async fn a_missing_key_makes_the_endpoint_unready_until_it_appears() {
    let upstream = FakeUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("not-yet");
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, config_yaml(&upstream, "m", &key, "")).unwrap();
    let sidecar = Sidecar::start_with(dir, &["--config", config.to_str().unwrap()]);

    let (status, ready) = sidecar.readiness().await;
    assert_eq!(status, 503);
    assert_eq!(ready["status"], "not_ready");
    assert!(ready["endpoints"][0]["error"]
        .as_str()
        .unwrap()
        .contains("not-yet"));
    let r = client()
        .post(sidecar.url("/v1/chat/completions"))
        .json(&json!({"model": "chat", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "credential_unavailable");
    assert!(
        upstream.requests().is_empty(),
        "no request went out without its key"
    );
    assert_eq!(
        credential_series(&sidecar).await,
        ["llmesh_endpoint_credential_info{endpoint=\"chat\",fingerprint=\"\"} 0"]
    );

    std::fs::write(&key, "sk-arrived").unwrap();
    assert!(eventually(RELOAD_WAIT, || async { sidecar.readiness().await.0 == 200 }).await);
    assert_eq!(
        upstream_saw(&sidecar, &upstream).await.1,
        "Bearer sk-arrived"
    );

    // The file disappearing again keeps the last good key rather than failing requests.
    std::fs::remove_file(&key).unwrap();
    assert!(
        sidecar
            .wait_for_log("keeping the last good key", RELOAD_WAIT)
            .await
    );
    assert_eq!(
        upstream_saw(&sidecar, &upstream).await.1,
        "Bearer sk-arrived"
    );
    assert_eq!(sidecar.readiness().await.0, 200);
}

#[tokio::test]
async fn a_stream_in_flight_finishes_on_the_config_it_started_with() {
    let upstream = FakeUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "k").unwrap();
    let config = dir.path().join("config.yaml");
    let with_idle =
        |idle: &str| config_yaml(&upstream, "m", &key, &format!("timeouts: {{idle: {idle}}}"));
    std::fs::write(&config, with_idle("5s")).unwrap();
    let sidecar = Sidecar::start_with(dir, &["--config", config.to_str().unwrap()]);
    let mut response = client()
        .post(sidecar.url("/v1/chat/completions"))
        .header(directives::STREAM_CHUNKS, "8")
        .header(directives::CHUNK_INTERVAL_MS, "150")
        .json(&json!({"model": "chat", "stream": true, "messages": []}))
        .send()
        .await
        .unwrap();
    response.chunk().await.unwrap().expect("first chunk");
    // The new config's idle timeout is shorter than the gaps of the stream in flight.
    replace_file(&config, &with_idle("50ms"));
    assert!(
        sidecar
            .wait_for_log("configuration reloaded", RELOAD_WAIT)
            .await
    );
    let mut rest = String::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        rest.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        rest.ends_with("data: [DONE]\n\n"),
        "the stream kept its own deadlines: {rest}"
    );
    assert!(!rest.contains("error"), "{rest}");
}

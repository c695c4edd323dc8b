//! Headers that carry an app's own credentials or sessions, and those an endpoint lists in
//! `dropRequestHeaders`, never reach the upstream, on any route, also after a reload.

mod common;

use std::time::Duration;

use common::{client, eventually, replace_file, Sidecar};
use llmesh_testkit::FakeUpstream;
use serde_json::json;

const KEY: &str = "sk-endpoint-key-0123456789";

/// Sent by the app on every request; none may arrive upstream.
const ALWAYS_DROPPED: &[(&str, &str)] = &[
    ("authorization", "Bearer sk-the-apps-own-key"),
    ("api-key", "apps-azure-key"),
    ("x-api-key", "apps-anthropic-key"),
    ("cookie", "session=apps-session"),
    ("x-goog-api-key", "apps-gemini-key"),
    ("ocp-apim-subscription-key", "apps-apim-key"),
    ("x-auth-token", "apps-token"),
    ("proxy-authorization", "Basic apps-proxy"),
];

fn config(upstream: &FakeUpstream, key_file: &str, dropped: &str) -> String {
    format!(
        "endpoints:
  - name: chat
    provider: openai-compatible
    baseUrl: {base}
    model: upstream-model
    default: true
    credential: {{file: {key_file}}}
    dropRequestHeaders: [{dropped}]
",
        base = upstream.base_url()
    )
}

async fn send_with_app_headers(sidecar: &Sidecar, path: &str) {
    let mut request = if path.ends_with("/chat/completions") {
        client()
            .post(sidecar.url(path))
            .json(&json!({"model": "chat", "messages": []}))
    } else {
        client().get(sidecar.url(path))
    };
    for (name, value) in ALWAYS_DROPPED {
        request = request.header(*name, *value);
    }
    let response = request
        .header("X-Internal-Token", "apps-internal-token")
        .header("x-tenant", "tenant-a")
        .header("x-late", "added-by-reload")
        .header("x-kept", "kept")
        .send()
        .await
        .unwrap();
    assert!(
        response.status().as_u16() < 500,
        "{path}: {}",
        response.status()
    );
}

#[tokio::test]
async fn credential_like_and_listed_headers_never_reach_the_upstream() {
    let upstream = FakeUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, KEY).unwrap();
    let key_file = key_file.display().to_string();
    let config_path = dir.path().join("config.yaml");
    std::fs::write(
        &config_path,
        config(&upstream, &key_file, "x-internal-token, X-Tenant"),
    )
    .unwrap();
    let config_arg = config_path.display().to_string();
    let sidecar = Sidecar::start_with(dir, &["--config", &config_arg]);

    // A JSON route and a pass-through one.
    for path in ["/v1/chat/completions", "/v1/files"] {
        send_with_app_headers(&sidecar, path).await;
        let seen = upstream.last_request().unwrap();
        for (name, _) in ALWAYS_DROPPED.iter().filter(|(n, _)| *n != "authorization") {
            assert_eq!(seen.header(name), None, "{path}: {name} was forwarded");
        }
        assert_eq!(
            seen.header("authorization"),
            Some(format!("Bearer {KEY}").as_str()),
            "{path}: the endpoint's own key replaces the app's"
        );
        assert_eq!(seen.header("x-internal-token"), None, "{path}");
        assert_eq!(seen.header("x-tenant"), None, "{path}");
        assert_eq!(seen.header("x-late"), Some("added-by-reload"), "{path}");
        assert_eq!(seen.header("x-kept"), Some("kept"), "{path}");
    }

    // The list is part of the config: a reload extends it.
    replace_file(
        &config_path,
        &config(&upstream, &key_file, "x-internal-token, x-tenant, x-late"),
    );
    let reloaded = eventually(Duration::from_secs(5), || async {
        send_with_app_headers(&sidecar, "/v1/chat/completions").await;
        upstream.last_request().unwrap().header("x-late").is_none()
    })
    .await;
    assert!(reloaded, "x-late still forwarded after the reload");
    let seen = upstream.last_request().unwrap();
    assert_eq!(seen.header("x-kept"), Some("kept"));
    assert_eq!(seen.header("cookie"), None);
}

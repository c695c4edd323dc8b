//! The sidecar as a process between a client and the fake upstream: what the upstream
//! receives (headers, body, model rewrite, credentials) and what the client gets back.

mod common;

use std::time::Duration;

use common::{client, Sidecar};
use llmesh_testkit::{directives, FakeUpstream};
use serde_json::{json, Value};

const KEY: &str = "sk-test-0123456789abcdef-SECRET";

fn write_key(dir: &std::path::Path, name: &str, key: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("{key}\n")).unwrap();
    path.display().to_string()
}

/// A sidecar with one `openai-compatible` endpoint `chat` in front of `upstream`.
fn sidecar_for(upstream: &FakeUpstream, extra: &str) -> Sidecar {
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "key", KEY);
    let config = format!(
        "endpoints:
  - name: chat
    provider: openai-compatible
    baseUrl: {base}
    model: upstream-model
    aliases: [gpt-4o-mini]
    credential: {{file: {key}}}
{extra}",
        base = upstream.base_url()
    );
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, config).unwrap();
    let path = path.display().to_string();
    Sidecar::start_with(dir, &["--config", &path])
}

fn chat_body(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5})
}

/// A JSON body that arrives in pieces (chunked, with pauses, so the sidecar reads several
/// frames) is read whole: the upstream gets all of it, the model rewritten.
#[tokio::test]
async fn a_body_sent_in_pieces_is_read_whole() {
    use futures::StreamExt;
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_for(&upstream, "");
    let text = chat_body("gpt-4o-mini").to_string();
    let (first, rest) = text.split_at(10);
    let (second, third) = rest.split_at(rest.len() / 2);
    let pieces = [first, second, third].map(|piece| Ok::<_, std::io::Error>(piece.to_string()));
    let paced = futures::stream::iter(pieces).then(|piece| async move {
        tokio::time::sleep(Duration::from_millis(30)).await;
        piece
    });
    let response = client()
        .post(sidecar.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(paced))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        upstream.last_request().unwrap().json(),
        chat_body("upstream-model")
    );
}

/// Asserts an error response in OpenAI's envelope and returns its body.
async fn expect_error(response: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status().as_u16(), status);
    let body: Value = response.json().await.expect("error body is JSON");
    assert_eq!(body["error"]["code"], code, "{body}");
    body
}

#[tokio::test]
async fn injects_the_credential_rewrites_the_model_and_keeps_the_rest() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_for(&upstream, "");
    let response = client()
        .post(sidecar.url("/v1/chat/completions?trace=1"))
        .header("authorization", "Bearer sk-the-apps-own-key")
        .header("x-api-key", "also-the-app")
        .header("x-request-id", "req-abc-1")
        .header("openai-organization", "org-7")
        .json(&chat_body("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-abc-1");
    assert_eq!(response.headers()["x-llmesh-endpoint"], "chat");
    assert_eq!(response.headers()["x-fake-upstream"], "1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["model"], "upstream-model",
        "the upstream saw the rewritten model"
    );

    let seen = upstream.last_request().unwrap();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path_and_query, "/v1/chat/completions?trace=1");
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(seen.header("x-api-key"), None);
    // Not a UUID, so the upstream gets one standing for it (llama.cpp refuses others).
    let upstream_id = seen.header("x-request-id").unwrap();
    assert!(uuid::Uuid::try_parse(upstream_id).is_ok(), "{upstream_id}");
    assert_eq!(seen.header("openai-organization"), Some("org-7"));
    assert_eq!(
        seen.header("content-length"),
        Some(seen.body.len().to_string().as_str())
    );
    assert_eq!(seen.json(), chat_body("upstream-model"));

    tokio::time::sleep(Duration::from_millis(100)).await;
    let logs = sidecar.logs();
    assert!(
        !logs.contains("SECRET") && !logs.contains("sk-the-apps-own-key"),
        "a key leaked into the logs:\n{logs}"
    );
    let line = sidecar
        .log_events("request")
        .pop()
        .expect("one request line");
    assert_eq!(line["request_id"], "req-abc-1");
    assert_eq!(line["endpoint"], "chat");
    assert_eq!(line["model"], "gpt-4o-mini");
    assert_eq!(line["status"], 200);
    assert!(line["latency_ms"].as_f64().is_some());
}

#[tokio::test]
async fn openai_sends_bearer_and_azure_sends_api_key_to_the_deployment_path() {
    let upstream = FakeUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let openai_key = write_key(dir.path(), "openai", "sk-openai-key");
    let azure_key = write_key(dir.path(), "azure", "azure-key-value");
    let custom_key = write_key(dir.path(), "custom", "custom-key-value");
    let config = format!(
        "endpoints:
  - {{name: oai, provider: openai, baseUrl: '{base}', model: gpt-4o, credential: {{file: {openai_key}}}}}
  - {{name: az, provider: azure-openai, baseUrl: 'http://{addr}', model: gpt-4o, credential: {{file: {azure_key}}},
      azure: {{apiVersion: '2024-10-21', deployment: prod-gpt4o}}}}
  - {{name: custom, provider: openai-compatible, baseUrl: '{base}', model: m, credential: {{file: {custom_key}, header: x-api-key}}}}
",
        base = upstream.base_url(),
        addr = upstream.addr(),
    );
    std::fs::write(dir.path().join("c.yaml"), config).unwrap();
    let path = dir.path().join("c.yaml").display().to_string();
    let sidecar = Sidecar::start_with(dir, &["--config", &path]);

    for model in ["oai", "az", "custom"] {
        let r = client()
            .post(sidecar.url("/v1/chat/completions"))
            .json(&chat_body(model))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{model}");
    }
    let seen = upstream.requests();
    assert_eq!(
        seen[0].header("authorization"),
        Some("Bearer sk-openai-key")
    );
    assert_eq!(seen[0].path_and_query, "/v1/chat/completions");
    assert_eq!(
        seen[1].path_and_query,
        "/openai/deployments/prod-gpt4o/chat/completions?api-version=2024-10-21"
    );
    assert_eq!(seen[1].header("api-key"), Some("azure-key-value"));
    assert_eq!(seen[1].header("authorization"), None);
    assert_eq!(seen[2].header("x-api-key"), Some("custom-key-value"));
    assert_eq!(seen[2].header("authorization"), None);
}

#[tokio::test]
async fn selects_endpoints_by_header_then_model_then_default() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_for(
        &upstream,
        "  - {name: fallback, provider: mock, model: mock-model, default: true}\n",
    );
    let send = |model: &str, header: Option<&str>| {
        let mut req = client()
            .post(sidecar.url("/v1/chat/completions"))
            .json(&chat_body(model));
        if let Some(h) = header {
            req = req.header("x-llmesh-endpoint", h);
        }
        req.send()
    };
    // The header wins over the model.
    let r = send("gpt-4o-mini", Some("fallback")).await.unwrap();
    assert_eq!(r.headers()["x-llmesh-endpoint"], "fallback");
    assert_eq!(r.json::<Value>().await.unwrap()["model"], "mock-model");
    // Model by alias and by name.
    for model in ["gpt-4o-mini", "chat"] {
        let r = send(model, None).await.unwrap();
        assert_eq!(r.headers()["x-llmesh-endpoint"], "chat");
    }
    // Unknown model: the default endpoint.
    let r = send("claude-9", None).await.unwrap();
    assert_eq!(r.headers()["x-llmesh-endpoint"], "fallback");
    // Unknown endpoint header: 404 in OpenAI's envelope.
    expect_error(
        send("chat", Some("nope")).await.unwrap(),
        404,
        "endpoint_not_found",
    )
    .await;
    assert_eq!(
        upstream.requests().len(),
        2,
        "only the two chat requests reached the upstream"
    );
}

#[tokio::test]
async fn lists_and_retrieves_models_from_the_config() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_for(&upstream, "");
    let list: Value = client()
        .get(sidecar.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["object"], "list");
    let ids: Vec<_> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["chat", "gpt-4o-mini"]);
    let one: Value = client()
        .get(sidecar.url("/v1/models/gpt-4o-mini"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["id"], "gpt-4o-mini");
    assert_eq!(one["object"], "model");
    expect_error(
        client()
            .get(sidecar.url("/v1/models/none"))
            .send()
            .await
            .unwrap(),
        404,
        "model_not_found",
    )
    .await;
    assert!(
        upstream.requests().is_empty(),
        "models are answered from the config"
    );
}

#[tokio::test]
async fn passes_other_v1_paths_through_to_the_default_endpoint() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_for(&upstream, "");
    // No default endpoint and no header: the sidecar cannot choose.
    expect_error(
        client().get(sidecar.url("/v1/files")).send().await.unwrap(),
        400,
        "model_required",
    )
    .await;

    let r = client()
        .post(sidecar.url("/v1/files?purpose=batch"))
        .header("x-llmesh-endpoint", "chat")
        .header("content-type", "application/octet-stream")
        .body(vec![7u8; 100_000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = upstream.last_request().unwrap();
    assert_eq!(seen.path_and_query, "/v1/files?purpose=batch");
    assert_eq!(
        seen.body.len(),
        100_000,
        "the body streamed through untouched"
    );
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
}

#[tokio::test]
async fn answers_bad_requests_with_openai_errors() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_for(&upstream, "    maxRequestBodyBytes: 2000\n");
    let post = |body: Vec<u8>| {
        client()
            .post(sidecar.url("/v1/chat/completions"))
            .body(body)
            .send()
    };

    let body = expect_error(
        post(b"{\"model\": \"chat\", ".to_vec()).await.unwrap(),
        400,
        "invalid_json",
    )
    .await;
    assert_eq!(body["error"]["type"], "invalid_request_error");

    expect_error(post(b"[1, 2]".to_vec()).await.unwrap(), 400, "invalid_body").await;

    let body = expect_error(
        post(serde_json::to_vec(&chat_body("gpt-5-nonexistent")).unwrap())
            .await
            .unwrap(),
        404,
        "model_not_found",
    )
    .await;
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("gpt-5-nonexistent"));

    let big = json!({"model": "chat", "messages": [{"role": "user", "content": "x".repeat(5000)}]});
    expect_error(
        post(serde_json::to_vec(&big).unwrap()).await.unwrap(),
        413,
        "request_too_large",
    )
    .await;

    expect_error(
        client().get(sidecar.url("/healthz")).send().await.unwrap(),
        404,
        "unknown_url",
    )
    .await;

    assert!(
        upstream.requests().is_empty(),
        "no bad request reached the upstream"
    );
}

#[tokio::test]
async fn upstream_errors_pass_through_unchanged() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_for(&upstream, "");
    for status in [400u16, 401, 429, 500, 503] {
        let r = client()
            .post(sidecar.url("/v1/chat/completions"))
            .header(directives::STATUS, status.to_string())
            .json(&chat_body("chat"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status);
        assert_eq!(r.headers()["x-fake-upstream"], "1");
        assert!(r.headers().contains_key("x-request-id"));
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], format!("fake_{status}"));
    }
}

#[tokio::test]
async fn maps_upstream_failures_to_502_and_504() {
    let upstream = FakeUpstream::start().await.unwrap();
    // A port that was free a moment ago: nothing listens there.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sidecar = sidecar_for(
        &upstream,
        &format!(
            "    timeouts: {{connect: 200ms, firstByte: 300ms}}
    retry: {{maxAttempts: 1}}
  - {{name: gone, provider: openai-compatible, baseUrl: 'http://127.0.0.1:{closed_port}/v1', model: m}}
"
        ),
    );
    expect_error(
        client()
            .post(sidecar.url("/v1/chat/completions"))
            .json(&chat_body("gone"))
            .send()
            .await
            .unwrap(),
        502,
        "upstream_unreachable",
    )
    .await;

    expect_error(
        client()
            .post(sidecar.url("/v1/chat/completions"))
            .header(directives::DROP_CONNECTION, "1")
            .json(&chat_body("chat"))
            .send()
            .await
            .unwrap(),
        502,
        "upstream_reset",
    )
    .await;

    let started = std::time::Instant::now();
    let response = client()
        .post(sidecar.url("/v1/chat/completions"))
        .header(directives::DELAY_MS, "5000")
        .json(&chat_body("chat"))
        .send()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    let body = expect_error(response, 504, "upstream_timeout").await;
    assert_eq!(
        body["error"]["message"],
        "Endpoint 'chat': upstream did not send response headers within 300ms."
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "the timeout fired late: {elapsed:?}"
    );
    // The timed-out upstream call is abandoned, not left running.
    assert_eq!(upstream.wait_abandoned(1, Duration::from_secs(3)).await, 1);
}

#[tokio::test]
async fn generates_a_request_id_when_the_app_sends_none() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_for(&upstream, "");
    let r = client()
        .post(sidecar.url("/v1/chat/completions"))
        .json(&chat_body("chat"))
        .send()
        .await
        .unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    assert_eq!(
        upstream.last_request().unwrap().header("x-request-id"),
        Some(id.as_str())
    );
    let r = client().get(sidecar.url("/nope")).send().await.unwrap();
    assert!(
        r.headers().contains_key("x-request-id"),
        "errors carry an id too"
    );
}

#[tokio::test]
async fn mock_provider_serves_every_api_without_network() {
    let sidecar = Sidecar::start(
        "endpoints:
  - {name: chat, provider: mock, model: mock-gpt, mock: {latency: 100ms, completionTokens: 5}}
  - {name: embed, provider: mock, model: mock-embed, mock: {embeddingDimensions: 4}}
",
    );
    let started = std::time::Instant::now();
    let chat: Value = client()
        .post(sidecar.url("/v1/chat/completions"))
        .json(&chat_body("chat"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "latency is applied"
    );
    assert_eq!(chat["usage"]["completion_tokens"], 5);
    assert_eq!(chat["model"], "mock-gpt");

    let completion: Value = client()
        .post(sidecar.url("/v1/completions"))
        .json(&json!({"model": "chat", "prompt": "Once upon"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(completion["object"], "text_completion");
    assert_eq!(completion["usage"]["prompt_tokens"], 3);

    let emb: Value = client()
        .post(sidecar.url("/v1/embeddings"))
        .json(&json!({"model": "embed", "input": ["a", "b", "c"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(emb["data"].as_array().unwrap().len(), 3);
    assert_eq!(emb["data"][2]["embedding"].as_array().unwrap().len(), 4);

    // The Responses API, bridged to the mock's chat completions.
    let response: Value = client()
        .post(sidecar.url("/v1/responses"))
        .json(&json!({"model": "chat", "input": "hi", "max_output_tokens": 3}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(response["object"], "response");
    assert_eq!(response["status"], "incomplete");
    assert_eq!(response["usage"]["output_tokens"], 3);
    let text = response["output"][0]["content"][0]["text"]
        .as_str()
        .unwrap();
    assert_eq!(text.split(' ').count(), 3);
}

#[tokio::test]
async fn a_broken_config_at_start_exits_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "endpoints: [{name: chat, provider: openai, model: gpt-4o, timeouts: {total: 10s, firstByte: 1m}}]",
    )
    .unwrap();
    let out = std::process::Command::new(common::BIN)
        .args(["--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("endpoints[0].credential: is required for provider openai"),
        "{stderr}"
    );
    assert!(
        stderr.contains("endpoints[0].timeouts.firstByte: 1m is longer than timeouts.total (10s)"),
        "{stderr}"
    );

    std::fs::write(
        &path,
        "endpoints: [{name: chat, provider: claude, model: m}]",
    )
    .unwrap();
    let out = std::process::Command::new(common::BIN)
        .args(["--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown variant `claude`"), "{stderr}");
}

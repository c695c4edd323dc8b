//! The two-dialect front door against real processes: what an Anthropic endpoint receives
//! (its key and version, never the app's key), streams translated as they arrive, a
//! fallback from an Anthropic endpoint to an OpenAI-style one inside one call, and errors in
//! the envelope of the API the app called. The SDKs themselves are in tests/python.

mod common;

use std::time::{Duration, Instant};

use common::{client, Sidecar};
use llmesh_testkit::{directives, usage, FakeUpstream};
use serde_json::{json, Value};
use tempfile::TempDir;

const KEY: &str = "sk-ant-upstream-key-for-dialect-tests";

struct Setup {
    sidecar: Sidecar,
    _keys: TempDir,
}

/// `claude` (anthropic) and `local` (openai-compatible) on the same fake upstream, plus
/// `broken-claude` whose upstream refuses connections and falls back to `local`.
fn setup(upstream: &FakeUpstream) -> Setup {
    let keys = TempDir::new().unwrap();
    let key_file = keys.path().join("key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let root = format!("http://{}", upstream.addr());
    let sidecar = Sidecar::start(&format!(
        "endpoints:
  - name: claude
    provider: anthropic
    model: claude-upstream
    baseUrl: {root}
    credential: {{file: {key}}}
  - name: local
    provider: openai-compatible
    model: llama-upstream
    baseUrl: {root}/v1
  - name: broken-claude
    provider: anthropic
    model: claude-upstream
    baseUrl: http://127.0.0.1:{closed_port}
    credential: {{file: {key}}}
    retry: {{maxAttempts: 1}}
    fallbacks: [local]
",
        key = key_file.display()
    ));
    Setup {
        sidecar,
        _keys: keys,
    }
}

fn chat(model: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"},
        ],
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

fn message(model: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": model,
        "max_tokens": 64,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Hello"}],
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn an_openai_app_reaches_anthropic_with_the_endpoints_key_and_version_only() {
    let upstream = FakeUpstream::start().await.unwrap();
    let setup = setup(&upstream);
    let response = client()
        .post(setup.sidecar.url("/v1/chat/completions"))
        .bearer_auth("sk-the-apps-own-key")
        .json(&chat("claude", json!({"temperature": 0.5, "stop": "END"})))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert!(body["choices"][0]["message"]["content"].is_string());
    let cached = usage::CACHE_CREATION_TOKENS + usage::CACHE_READ_TOKENS;
    assert_eq!(
        body["usage"]["prompt_tokens"],
        usage::ANTHROPIC_INPUT_TOKENS + cached
    );
    assert_eq!(
        body["usage"]["completion_tokens"],
        usage::ANTHROPIC_OUTPUT_TOKENS
    );

    let sent = upstream.last_request().unwrap();
    assert_eq!(sent.path_and_query, "/v1/messages");
    assert_eq!(sent.header("x-api-key"), Some(KEY));
    assert_eq!(sent.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(sent.header("authorization"), None);
    let sent = sent.json();
    assert_eq!(sent["model"], "claude-upstream");
    assert_eq!(sent["system"], "Be brief.");
    assert_eq!(
        sent["messages"],
        json!([{"role": "user", "content": "Hello"}])
    );
    assert_eq!(sent["max_tokens"], 4096);
    assert_eq!(sent["stop_sequences"], json!(["END"]));
    assert!(!setup.sidecar.logs().contains(KEY));
}

#[tokio::test(flavor = "multi_thread")]
async fn translated_streams_reach_the_app_event_by_event() {
    let upstream = FakeUpstream::start().await.unwrap();
    let setup = setup(&upstream);
    for (route, body) in [
        (
            "/v1/chat/completions",
            chat("claude", json!({"stream": true})),
        ),
        ("/v1/messages", message("local", json!({"stream": true}))),
    ] {
        let sent = Instant::now();
        let mut response = client()
            .post(setup.sidecar.url(route))
            .header(directives::STREAM_CHUNKS, "4")
            .header(directives::CHUNK_INTERVAL_MS, "300")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{route}");
        let mut first_text_at = None;
        let mut all = String::new();
        while let Some(chunk) = response.chunk().await.unwrap() {
            let chunk = String::from_utf8_lossy(&chunk).into_owned();
            if first_text_at.is_none() && chunk.contains("tok0") {
                first_text_at = Some(sent.elapsed());
            }
            all.push_str(&chunk);
        }
        let total = sent.elapsed();
        let first = first_text_at.unwrap_or_else(|| panic!("{route}: no text in {all}"));
        // The upstream takes 3 × 300 ms after its first chunk: the first translated text
        // must not wait for the rest.
        assert!(
            first + Duration::from_millis(600) < total,
            "{route}: first text after {first:?}, stream over after {total:?}"
        );
        for i in 0..4 {
            assert!(all.contains(&format!("tok{i}")), "{route}: {all}");
        }
        match route {
            "/v1/messages" => {
                assert!(all.contains("event: message_start"));
                assert!(all.trim_end().ends_with(r#"data: {"type":"message_stop"}"#));
            }
            _ => {
                // The usage chunk the app did not ask for is not there.
                assert!(!all.contains(r#""usage":{"#), "{all}");
                assert!(all.trim_end().ends_with("data: [DONE]"));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_anthropic_endpoint_falls_back_to_an_openai_style_one_in_the_apps_dialect() {
    let upstream = FakeUpstream::start().await.unwrap();
    let setup = setup(&upstream);
    let response = client()
        .post(setup.sidecar.url("/v1/messages"))
        .header("x-api-key", "sk-the-apps-own-key")
        .header("anthropic-version", "2023-06-01")
        .json(&message("broken-claude", json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-llmesh-endpoint"], "local");
    assert_eq!(response.headers()["x-llmesh-attempts"], "2");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "message");
    assert_eq!(body["stop_reason"], "end_turn");
    assert_eq!(body["usage"]["output_tokens"], usage::COMPLETION_TOKENS);
    let sent = upstream.last_request().unwrap();
    assert_eq!(sent.path_and_query, "/v1/chat/completions");
    // Anthropic's headers and the app's key stay behind.
    assert_eq!(sent.header("anthropic-version"), None);
    assert_eq!(sent.header("x-api-key"), None);
    assert_eq!(sent.json()["model"], "llama-upstream");
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_come_in_the_envelope_of_the_api_the_app_called() {
    let upstream = FakeUpstream::start().await.unwrap();
    let setup = setup(&upstream);
    let post =
        |route: &str, body: Value| client().post(setup.sidecar.url(route)).json(&body).send();
    let anthropic_error = |body: &Value, kind: &str| {
        assert_eq!(body["type"], "error", "{body}");
        assert_eq!(body["error"]["type"], kind, "{body}");
        assert!(body["error"]["message"].is_string(), "{body}");
    };

    // The sidecar's own refusal, naming the parameter Anthropic's API has no place for.
    let response = post("/v1/messages", message("local", json!({"top_k": 5})))
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    anthropic_error(&body, "invalid_request_error");
    assert!(body["error"]["message"].as_str().unwrap().contains("top_k"));

    let response = post("/v1/chat/completions", chat("claude", json!({"n": 2})))
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["param"], "n");

    // An upstream's error (after the retries a 429 gets), translated with its status and
    // Retry-After kept.
    let response = client()
        .post(setup.sidecar.url("/v1/messages"))
        .header(directives::STATUS, "429")
        .header(directives::RESPONSE_HEADER, "retry-after: 1")
        .json(&message("local", json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "1");
    anthropic_error(&response.json().await.unwrap(), "rate_limit_error");

    let response = client()
        .post(setup.sidecar.url("/v1/chat/completions"))
        .header(directives::STATUS, "400")
        .json(&chat("claude", json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"]["message"].is_string(), "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error");

    // Routes an endpoint's provider does not have.
    let response = post("/v1/messages/count_tokens", message("local", json!({})))
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    anthropic_error(&response.json().await.unwrap(), "not_found_error");
    let response = post("/v1/embeddings", json!({"model": "claude", "input": "hi"}))
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "route_not_supported");
    // The refused calls never reached an upstream.
    for sent in upstream.requests() {
        assert!(
            !sent.path_and_query.contains("count_tokens")
                && !sent.path_and_query.contains("embeddings"),
            "{}",
            sent.path_and_query
        );
        assert!(sent.json().get("top_k").is_none() && sent.json().get("n").is_none());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn count_tokens_and_other_anthropic_calls_pass_through_natively() {
    let upstream = FakeUpstream::start().await.unwrap();
    let setup = setup(&upstream);
    let response = client()
        .post(setup.sidecar.url("/v1/messages/count_tokens"))
        .header("anthropic-version", "2023-06-01")
        .header("anthropic-beta", "token-counting-2024-11-01")
        .json(&json!({"model": "claude", "messages": [{"role": "user", "content": "Hello"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert!(body["input_tokens"].is_u64(), "{body}");
    let sent = upstream.last_request().unwrap();
    assert_eq!(sent.path_and_query, "/v1/messages/count_tokens");
    assert_eq!(
        sent.header("anthropic-beta"),
        Some("token-counting-2024-11-01")
    );
    assert_eq!(sent.header("x-api-key"), Some(KEY));
    assert_eq!(sent.json()["model"], "claude-upstream");
}

//! Issue 13's hostile inputs against the real binary: upstream headers with absurd numbers,
//! an upstream echoing the key, paths that try to leave the endpoint, request ids a server
//! refuses, streams without usage, and what an app is told when an endpoint cannot serve.

mod common;

use std::time::Duration;

use common::{client, Sidecar};
use llmesh_testkit::{directives, FakeUpstream, ECHO_AUTHORIZATION};
use serde_json::{json, Value};

const KEY: &str = "sk-hostile-0123456789abcdefghijKLMNOP";

/// One `openai-compatible` endpoint `chat` on `upstream` with the key in a file, plus `extra`.
fn sidecar_with_key(upstream: &FakeUpstream, extra: &str) -> Sidecar {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let config = format!(
        "endpoints:
  - name: chat
    provider: openai-compatible
    baseUrl: {}
    model: upstream-model
    credential: {{file: {}}}
{extra}",
        upstream.base_url(),
        key_file.display()
    );
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, config).unwrap();
    Sidecar::start_with(dir, &["--config", path.to_str().unwrap()])
}

async fn chat(
    sidecar: &Sidecar,
    body: Value,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut request = client()
        .post(sidecar.url("/v1/chat/completions"))
        .json(&body);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.text().await.unwrap())
}

fn hello(stream: bool) -> Value {
    json!({"model": "chat", "stream": stream, "messages": [{"role": "user", "content": "Hello"}]})
}

/// The sidecar still answers: it did not abort.
async fn assert_alive(sidecar: &Sidecar) {
    let ready = client()
        .get(sidecar.admin_url("/healthz"))
        .send()
        .await
        .expect("the sidecar process must still be running");
    assert_eq!(ready.status(), 200);
}

#[tokio::test]
async fn absurd_time_values_from_the_upstream_do_not_abort_the_sidecar() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_with_key(
        &upstream,
        "    retry: {maxAttempts: 2, backoffBase: 10ms, backoffMax: 20ms}\n    timeouts: {connect: 1s, firstByte: 2s, idle: 2s, total: 2s}\n",
    );
    let cases: &[(&str, &[&str])] = &[
        (
            "200",
            &[
                "x-ratelimit-remaining-requests: 5",
                "x-ratelimit-reset-requests: 1e300",
            ],
        ),
        ("503", &["retry-after-ms: 1e300"]),
        ("429", &["retry-after: 10000000000000000000"]),
        ("503", &["retry-after: Fri, 31 Dec 9999 23:59:59 GMT"]),
        ("429", &["retry-after: NaN", "retry-after-ms: -inf"]),
        // Last: it leaves the upstream allowance at zero.
        (
            "200",
            &[
                "x-ratelimit-remaining-requests: 0",
                "x-ratelimit-reset-requests: 9300000000000000000",
                "x-ratelimit-remaining-tokens: 0",
                "x-ratelimit-reset-tokens: 99999999999999999999999h",
            ],
        ),
    ];
    for (status, response_headers) in cases {
        let mut headers = vec![];
        if *status != "200" {
            headers.push((directives::STATUS, *status));
        }
        for h in *response_headers {
            headers.push((directives::RESPONSE_HEADER, *h));
        }
        let (got, _, _) = chat(&sidecar, hello(false), &headers).await;
        assert!(
            got == 200 || got == 429 || got == 503,
            "{status} {response_headers:?}: {got}"
        );
        assert_alive(&sidecar).await;
    }
    // The provider said "no requests left for ages": capped at an hour, so the next request
    // waits in the queue and is refused with a 429, and the process is still there.
    let (status, headers, _) = chat(&sidecar, hello(false), &[]).await;
    assert_eq!(status, 429);
    assert_eq!(headers["x-llmesh-limit"], "upstream_requests");
    assert_alive(&sidecar).await;
}

#[tokio::test]
async fn an_absurd_max_tokens_under_a_small_token_limit_does_not_abort_the_sidecar() {
    let sidecar = Sidecar::start(
        "endpoints:
  - name: chat
    provider: mock
    model: mock-model
    limits: {tokensPerMinute: 100, queueTimeout: 200ms}
",
    );
    let mut huge = hello(false);
    huge["max_tokens"] = json!(18_000_000_000_000_000_000u64);
    let (status, _, _) = chat(&sidecar, huge, &[]).await;
    assert!(status == 200 || status == 429, "{status}");
    for _ in 0..3 {
        let (status, _, _) = chat(&sidecar, hello(false), &[]).await;
        assert!(status == 200 || status == 429, "{status}");
    }
    assert_alive(&sidecar).await;
}

#[tokio::test]
async fn a_key_echoed_by_the_upstream_never_reaches_the_app_or_the_log() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_with_key(&upstream, "");
    let cases: &[(&[(&str, &str)], bool)] = &[
        (
            &[(directives::ECHO_KEY_IN, "header,www-authenticate")],
            false,
        ),
        (&[(directives::ECHO_KEY_IN, "body")], false),
        (
            &[
                (directives::ECHO_KEY_IN, "body"),
                (directives::FRAME_BYTES, "7"),
            ],
            false,
        ),
        (&[(directives::ECHO_KEY_IN, "ok-body")], false),
        (
            &[
                (directives::ECHO_KEY_IN, "ok-body"),
                (directives::FRAME_BYTES, "3"),
            ],
            false,
        ),
        (&[(directives::ECHO_KEY_IN, "stream")], true),
        (
            &[
                (directives::ECHO_KEY_IN, "stream"),
                (directives::FRAME_BYTES, "5"),
            ],
            true,
        ),
    ];
    for (headers, stream) in cases {
        let (status, response_headers, body) = chat(&sidecar, hello(*stream), headers).await;
        for (name, value) in &response_headers {
            let value = String::from_utf8_lossy(value.as_bytes());
            assert!(!value.contains(KEY), "{headers:?}: header {name}: {value}");
        }
        assert!(!body.contains(KEY), "{headers:?}: {body}");
        // Masked, not removed: the app sees where the key was, and bodies keep their length.
        assert!(
            body.contains("*****") || response_headers.contains_key(ECHO_AUTHORIZATION),
            "{headers:?}: {status} {body}"
        );
    }
    // The upstream did receive the key: the mask is on the way back only.
    let received = upstream.last_request().unwrap();
    assert_eq!(
        received.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert!(!sidecar.logs().contains(KEY));
}

/// Sends raw bytes: HTTP clients normalise `..` away before sending, an attacker does not.
/// (Async: the fake upstream runs on this test's runtime.)
async fn raw_request(sidecar: &Sidecar, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(sidecar.app).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let read = stream.read_to_end(&mut response);
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test]
async fn paths_that_would_leave_the_endpoint_are_refused_before_anything_is_sent() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_with_key(&upstream, "    default: true\n");
    for path in [
        "/v1/../../admin",
        "/v1/%2e%2e/%2e%2e/admin",
        "/v1//evil/x",
        "/v1/files/a%2f..%2fadmin",
        "/v1/./models",
    ] {
        let response = raw_request(
            &sidecar,
            &format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
        )
        .await;
        assert!(response.starts_with("HTTP/1.1 400"), "{path}: {response}");
        assert!(
            response.contains("\"code\":\"invalid_path\""),
            "{path}: {response}"
        );
    }
    assert!(
        upstream.requests().is_empty(),
        "nothing may reach the upstream"
    );
    // Ordinary passthrough paths still go through.
    let response = raw_request(
        &sidecar,
        "GET /v1/files/file-abc HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(
        upstream.last_request().unwrap().path_and_query,
        "/v1/files/file-abc"
    );
}

#[tokio::test]
async fn an_app_request_id_that_is_not_a_uuid_is_kept_for_the_app_and_replaced_upstream() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_with_key(&upstream, "");
    let (status, headers, _) = chat(
        &sidecar,
        hello(false),
        &[
            ("x-request-id", "my-trace-42"),
            (directives::UUID_REQUEST_ID, "1"),
        ],
    )
    .await;
    assert_eq!(status, 200, "a llama.cpp-like server refuses non-UUID ids");
    assert_eq!(headers["x-request-id"], "my-trace-42");
    let sent = upstream.last_request().unwrap();
    let upstream_id = sent.header("x-request-id").unwrap().to_string();
    assert!(uuid_like(&upstream_id), "{upstream_id}");
    let line = request_line(&sidecar, 1).await;
    assert_eq!(line["request_id"], "my-trace-42");
    assert_eq!(line["upstream_request_id"], upstream_id.as_str());

    // A UUID goes through as it is.
    let id = "0f8fad5b-d9cb-469f-a165-70867728950e";
    let (status, _, _) = chat(
        &sidecar,
        hello(false),
        &[("x-request-id", id), (directives::UUID_REQUEST_ID, "1")],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        upstream.last_request().unwrap().header("x-request-id"),
        Some(id)
    );
}

/// The `n`th request log line (1-based), once it is written: a line is written when its
/// response ends, which may be just after the client has read the last byte.
async fn request_line(sidecar: &Sidecar, n: usize) -> Value {
    let written = common::eventually(Duration::from_secs(5), || async {
        sidecar.log_events("request").len() >= n
    })
    .await;
    assert!(written, "{}", sidecar.logs());
    sidecar.log_events("request").swap_remove(n - 1)
}

fn uuid_like(s: &str) -> bool {
    s.len() == 36 && s.chars().filter(|c| *c == '-').count() == 4
}

#[tokio::test]
async fn a_stream_without_include_usage_gets_real_usage_and_only_the_events_it_asked_for() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_with_key(&upstream, "");
    let (status, _, body) = chat(
        &sidecar,
        hello(true),
        &[
            (directives::STREAM_CHUNKS, "3"),
            (directives::FRAME_BYTES, "9"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    let asked = upstream.last_request().unwrap().json();
    assert_eq!(asked["stream_options"]["include_usage"], true);
    assert!(
        !body.contains("\"prompt_tokens\""),
        "the usage chunk is the sidecar's: {body}"
    );
    assert_eq!(
        body.matches("data: ").count(),
        4,
        "3 chunks and [DONE]: {body}"
    );
    assert!(body.ends_with("data: [DONE]\n\n"));
    let line = request_line(&sidecar, 1).await;
    assert_eq!(line["prompt_tokens"], 10, "the upstream's own count");
    assert_eq!(line["usage_estimated"], false);

    // An app that asked for usage gets it, untouched.
    let mut wants_usage = hello(true);
    wants_usage["stream_options"] = json!({"include_usage": true});
    let (_, _, body) = chat(&sidecar, wants_usage, &[(directives::STREAM_CHUNKS, "3")]).await;
    assert!(body.contains("\"prompt_tokens\":10"), "{body}");

    // A server that sends no usage even when asked: estimated, and marked so.
    let (_, _, body) = chat(
        &sidecar,
        hello(true),
        &[
            (directives::STREAM_CHUNKS, "3"),
            (directives::NO_USAGE, "1"),
        ],
    )
    .await;
    assert!(body.ends_with("data: [DONE]\n\n"));
    let line = request_line(&sidecar, 3).await;
    assert_eq!(line["usage_estimated"], true);
}

#[tokio::test]
async fn a_circuit_opened_by_timeouts_says_so_and_hints_a_short_retry() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_with_key(
        &upstream,
        "    timeouts: {connect: 100ms, firstByte: 100ms}\n    retry: {maxAttempts: 1}\n    circuitBreaker: {consecutiveFailures: 1, cooldown: 30s}\n",
    );
    let (status, _, _) = chat(&sidecar, hello(false), &[(directives::DELAY_MS, "1000")]).await;
    assert_eq!(status, 504);
    let (status, headers, body) = chat(&sidecar, hello(false), &[]).await;
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "1");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "circuit_open");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("timed out"), "{message}");
}

#[tokio::test]
async fn routes_an_endpoint_does_not_serve_are_named_in_the_dialect_s_envelope() {
    let upstream = FakeUpstream::start().await.unwrap();
    // `responses: native`: the server is trusted to have the Responses API, and does not.
    let sidecar = sidecar_with_key(&upstream, "    default: true\n    responses: native\n");
    // Anthropic's SDK counting tokens, which no chat server can: an Anthropic-shaped 404
    // naming the route and the endpoint.
    let response = client()
        .post(sidecar.url("/v1/messages/count_tokens"))
        .json(&json!({"model": "claude-sonnet-4", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "not_found_error");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("POST /v1/messages/count_tokens") && message.contains("'chat'"),
        "{message}"
    );

    // A chat-only server asked for the Responses API answers a bare 404.
    let response = client()
        .post(sidecar.url("/v1/responses"))
        .header(directives::STATUS, "404")
        .json(&json!({"model": "chat", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "route_not_supported");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("POST /v1/responses") && message.contains("'chat'"),
        "{message}"
    );
}

#[tokio::test]
async fn a_model_that_is_not_a_string_is_a_400() {
    let sidecar =
        Sidecar::start("endpoints:\n  - {name: chat, provider: mock, model: m, default: true}\n");
    for model in [
        json!(42),
        json!(["chat"]),
        json!({"name": "chat"}),
        json!(true),
    ] {
        let (status, _, body) = chat(
            &sidecar,
            json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
            &[],
        )
        .await;
        assert_eq!(status, 400, "{model}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"]["code"], "invalid_type");
        assert_eq!(body["error"]["param"], "model");
    }
}

#[tokio::test]
async fn an_app_that_closes_right_after_done_completed_its_stream() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_with_key(&upstream, "");
    // Read until [DONE], then drop the connection while the upstream holds its body open.
    let mut response = client()
        .post(sidecar.url("/v1/chat/completions"))
        .header(directives::STREAM_CHUNKS, "2")
        .header(directives::FINISH_THEN_HOLD_MS, "2000")
        .json(&hello(true))
        .send()
        .await
        .unwrap();
    let mut seen = String::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        seen.push_str(&String::from_utf8_lossy(&chunk));
        if seen.contains("[DONE]") {
            break;
        }
    }
    drop(response);
    assert!(
        sidecar
            .wait_for_log("\"outcome\":\"completed\"", Duration::from_secs(5))
            .await,
        "{}",
        sidecar.logs()
    );
    assert!(!sidecar.logs().contains("client_disconnected"));
}

//! Retries, fallbacks, the circuit breaker and local rate limits, against the real binary and
//! the fault-injecting fake upstream.

mod common;

use std::time::{Duration, Instant};

use common::{client, Sidecar};
use llmesh_testkit::{directives, FakeUpstream};
use serde_json::{json, Value};

const FAST_RETRIES: &str = "    retry: {maxAttempts: 3, backoffBase: 10ms, backoffMax: 20ms}\n";

fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One `openai-compatible` endpoint `chat` on `upstream`, with `extra` YAML appended to it.
fn sidecar_for(upstream: &FakeUpstream, extra: &str) -> Sidecar {
    Sidecar::start(&format!(
        "endpoints:
  - name: chat
    provider: openai-compatible
    baseUrl: {}
    model: upstream-model
{extra}",
        upstream.base_url()
    ))
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

async fn post(sidecar: &Sidecar, headers: &[(&str, &str)]) -> (reqwest::Response, Duration) {
    let mut request = client()
        .post(sidecar.url("/v1/chat/completions"))
        .json(&chat("chat"));
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let started = Instant::now();
    let response = request.send().await.unwrap();
    (response, started.elapsed())
}

fn attempts(response: &reqwest::Response) -> u32 {
    response.headers()["x-llmesh-attempts"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_burst_of_503s_is_retried_with_the_same_body_and_request_id() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_for(&upstream, FAST_RETRIES);
    let (response, _) = post(
        &sidecar,
        &[
            (directives::STATUS, "503"),
            (directives::FAIL_TIMES, "2"),
            ("x-request-id", "burst-1"),
        ],
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(attempts(&response), 3);
    let requests = upstream.requests();
    assert_eq!(requests.len(), 3);
    // The app's id is not a UUID: every attempt carries the same UUID standing for it.
    let upstream_id = requests[0].header("x-request-id").unwrap();
    assert_ne!(upstream_id, "burst-1");
    for r in &requests {
        assert_eq!(r.header("x-request-id"), Some(upstream_id));
        assert_eq!(r.json()["model"], "upstream-model");
        assert_eq!(r.body, requests[0].body);
    }
}

#[tokio::test]
async fn attempts_run_out_and_the_last_upstream_error_is_returned_as_it_is() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_for(&upstream, FAST_RETRIES);
    let (response, _) = post(&sidecar, &[(directives::STATUS, "502")]).await;
    assert_eq!(response.status(), 502);
    assert_eq!(attempts(&response), 3);
    assert_eq!(response.headers()["x-fake-upstream"], "1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "fake_502");
    assert_eq!(upstream.requests().len(), 3);
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_for(&upstream, FAST_RETRIES);
    let (response, elapsed) = post(
        &sidecar,
        &[
            (directives::STATUS, "429"),
            (directives::FAIL_TIMES, "1"),
            (directives::RESPONSE_HEADER, "retry-after-ms: 400"),
        ],
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(attempts(&response), 2);
    assert!(
        elapsed >= Duration::from_millis(400),
        "retried before Retry-After: {elapsed:?}"
    );
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
}

#[tokio::test]
async fn a_retry_after_beyond_the_deadline_returns_the_provider_429_at_once() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_for(
        &upstream,
        &format!("{FAST_RETRIES}    timeouts: {{connect: 2s, firstByte: 2s, total: 2s}}\n"),
    );
    let (response, elapsed) = post(
        &sidecar,
        &[
            (directives::STATUS, "429"),
            (directives::RESPONSE_HEADER, "retry-after: 30"),
        ],
    )
    .await;
    assert_eq!(response.status(), 429);
    assert_eq!(attempts(&response), 1);
    assert_eq!(response.headers()["retry-after"], "30");
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "fake_429");
}

#[tokio::test]
async fn client_errors_are_never_retried() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_for(&upstream, FAST_RETRIES);
    for status in ["400", "401", "403", "404", "422"] {
        let (response, _) = post(&sidecar, &[(directives::STATUS, status)]).await;
        assert_eq!(response.status().as_str(), status);
        assert_eq!(attempts(&response), 1, "{status}");
    }
    assert_eq!(upstream.requests().len(), 5);
}

#[tokio::test]
async fn resets_and_slow_first_bytes_are_retried_before_the_response_starts() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_for(
        &upstream,
        &format!("{FAST_RETRIES}    timeouts: {{connect: 300ms, firstByte: 300ms}}\n"),
    );
    let (response, _) = post(
        &sidecar,
        &[
            (directives::DROP_CONNECTION, "1"),
            (directives::FAIL_TIMES, "1"),
            ("x-request-id", "reset-1"),
        ],
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(attempts(&response), 2);

    let (response, elapsed) = post(
        &sidecar,
        &[
            (directives::DELAY_MS, "2000"),
            (directives::FAIL_TIMES, "1"),
            ("x-request-id", "slow-1"),
        ],
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(attempts(&response), 2);
    assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");
}

#[tokio::test]
async fn a_stream_that_breaks_after_its_first_byte_is_not_retried() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_for(&upstream, FAST_RETRIES);
    let response = client()
        .post(sidecar.url("/v1/chat/completions"))
        .header(directives::STREAM_CHUNKS, "5")
        .header(directives::FAIL_AFTER_CHUNKS, "2")
        .json(&json!({"model": "chat", "stream": true, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(attempts(&response), 1);
    let text = response.text().await.unwrap();
    assert!(text.contains("upstream_stream_broken"), "{text}");
    assert_eq!(text.matches("chat.completion.chunk").count(), 2, "{text}");
    assert_eq!(upstream.requests().len(), 1, "the stream was retried");
}

#[tokio::test]
async fn the_retry_budget_cuts_retries_off_during_an_outage() {
    let upstream = FakeUpstream::start().await.unwrap();
    // No share of requests, a floor of 1/s over the 10 s window: 10 retries in all.
    let sidecar = sidecar_for(
        &upstream,
        "    retry: {maxAttempts: 3, backoffBase: 1ms, backoffMax: 1ms, budget: {ratio: 0, minPerSecond: 1}}
    circuitBreaker: {consecutiveFailures: 0}
",
    );
    let mut retried = 0;
    for _ in 0..20 {
        let (response, _) = post(&sidecar, &[(directives::STATUS, "503")]).await;
        assert_eq!(response.status(), 503);
        retried += attempts(&response) - 1;
    }
    assert_eq!(retried, 10);
    assert_eq!(upstream.requests().len(), 30);
}

#[tokio::test]
async fn fallbacks_are_tried_in_order_and_the_response_names_the_one_that_served() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = Sidecar::start(&format!(
        "endpoints:
  - name: primary
    provider: openai-compatible
    baseUrl: http://127.0.0.1:{down1}/v1
    model: primary-model
    retry: {{maxAttempts: 2, backoffBase: 1ms, backoffMax: 1ms}}
    fallbacks: [second, third]
  - name: second
    provider: openai-compatible
    baseUrl: http://127.0.0.1:{down2}/v1
    model: second-model
    retry: {{maxAttempts: 1}}
  - name: third
    provider: openai-compatible
    baseUrl: {up}
    model: third-model
",
        down1 = closed_port(),
        down2 = closed_port(),
        up = upstream.base_url()
    ));
    let response = client()
        .post(sidecar.url("/v1/chat/completions"))
        .json(&chat("primary"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-llmesh-endpoint"], "third");
    assert_eq!(attempts(&response), 4);
    assert_eq!(
        upstream.last_request().unwrap().json()["model"],
        "third-model"
    );
}

#[tokio::test]
async fn the_breaker_ejects_a_failing_endpoint_and_a_probe_brings_it_back() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = Sidecar::start(&format!(
        "endpoints:
  - name: chat
    provider: openai-compatible
    baseUrl: {}
    model: upstream-model
    retry: {{maxAttempts: 1}}
    circuitBreaker: {{consecutiveFailures: 2, cooldown: 700ms}}
    fallbacks: [spare]
  - name: spare
    provider: mock
    model: spare-model
  - name: lonely
    provider: openai-compatible
    baseUrl: {}
    model: m
    retry: {{maxAttempts: 1}}
    circuitBreaker: {{consecutiveFailures: 1, cooldown: 30s}}
",
        upstream.base_url(),
        upstream.base_url()
    ));
    let send = |model: &'static str, fail: bool| {
        let mut request = client()
            .post(sidecar.url("/v1/chat/completions"))
            .json(&chat(model));
        if fail {
            request = request.header(directives::STATUS, "500");
        }
        request.send()
    };
    for _ in 0..2 {
        let response = send("chat", true).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-llmesh-endpoint"], "spare");
    }
    assert_eq!(upstream.requests().len(), 2);
    // Open: straight to the fallback, the failing endpoint is not called.
    let response = send("chat", false).await.unwrap();
    assert_eq!(response.headers()["x-llmesh-endpoint"], "spare");
    assert_eq!(upstream.requests().len(), 2);
    assert!(
        sidecar
            .wait_for_log("circuit opened", Duration::from_secs(2))
            .await
    );

    // After the cooldown one probe goes through; its success closes the circuit.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let response = send("chat", false).await.unwrap();
    assert_eq!(response.headers()["x-llmesh-endpoint"], "chat");
    let response = send("chat", false).await.unwrap();
    assert_eq!(response.headers()["x-llmesh-endpoint"], "chat");
    assert_eq!(upstream.requests().len(), 4);

    // Without a fallback an open circuit fails fast with a 503 that says why and when the
    // endpoint is tried again, with a short Retry-After: an SDK told the whole 30 s cooldown
    // would sleep through it before each of its retries.
    let response = send("lonely", true).await.unwrap();
    assert_eq!(response.status(), 500);
    let started = Instant::now();
    let response = send("lonely", false).await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(response.headers()["retry-after-ms"], "1000");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "circuit_open");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("(its upstream answered with server errors (5xx))")
            && message.contains("tried again in 30s"),
        "{message}"
    );
}

#[tokio::test]
async fn over_a_limit_requests_get_openai_s_429_with_retry_after_and_the_limit_named() {
    let sidecar = Sidecar::start(
        "endpoints:
  - name: chat
    provider: mock
    model: mock-model
    limits: {requestsPerMinute: 3, queueTimeout: 100ms}
",
    );
    for _ in 0..3 {
        let (response, _) = post(&sidecar, &[]).await;
        assert_eq!(response.status(), 200);
    }
    let (response, elapsed) = post(&sidecar, &[]).await;
    assert_eq!(response.status(), 429);
    // 3 a minute: the next one is 20 s away, far past the queue's 100 ms, so no waiting.
    assert!(elapsed < Duration::from_millis(100), "{elapsed:?}");
    assert_eq!(response.headers()["retry-after"], "20");
    assert_eq!(response.headers()["x-llmesh-limit"], "requests_per_minute");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "requests");
    assert_eq!(
        body["error"]["message"],
        "Rate limit reached for endpoint 'chat' on requests per minute (limit 3). Please try again in 20s."
    );
}

#[tokio::test]
async fn concurrent_requests_over_the_cap_wait_their_turn() {
    let sidecar = Sidecar::start(
        "endpoints:
  - name: chat
    provider: mock
    model: mock-model
    mock: {latency: 200ms}
    limits: {maxConcurrent: 1, queueTimeout: 5s}
",
    );
    let started = Instant::now();
    let calls = (0..3).map(|_| post(&sidecar, &[]));
    let results = futures::future::join_all(calls).await;
    for (response, _) in &results {
        assert_eq!(response.status(), 200);
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(600),
        "ran in parallel: {elapsed:?}"
    );
}

#[tokio::test]
async fn token_reservations_settle_with_the_real_usage() {
    // 1000 tokens a minute; each call reserves its prompt plus max_tokens 400, and the mock
    // uses about 20. Without settlement the third call would find the bucket empty.
    let sidecar = Sidecar::start(
        "endpoints:
  - name: chat
    provider: mock
    model: gpt-4o-mini
    limits: {tokensPerMinute: 1000, queueTimeout: 0ms}
",
    );
    for i in 0..10 {
        let response = client()
            .post(sidecar.url("/v1/chat/completions"))
            .json(&json!({"model": "chat", "max_tokens": 400, "messages": [{"role": "user", "content": "hello"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "call {i}");
        response.bytes().await.unwrap();
    }
    let response = client()
        .post(sidecar.url("/v1/chat/completions"))
        .json(&json!({"model": "chat", "max_tokens": 5000, "messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["x-llmesh-limit"], "tokens_per_minute");
}

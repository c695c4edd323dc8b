//! `/metrics` of the real binary: every counter and histogram moves exactly as the requests
//! sent say it must, the exposition passes `promtool check metrics`, and `traceparent`
//! reaches the upstream.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{client, eventually, Sidecar};
use llmesh_testkit::{directives, FakeUpstream};
use serde_json::{json, Value};

/// One series: its name and labels, as exposed.
#[derive(Debug)]
struct Series {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

fn parse_exposition(text: &str) -> Vec<Series> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("series and value");
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = labels
            .split("\",")
            .filter(|l| !l.is_empty())
            .map(|pair| {
                let (k, v) = pair.split_once('=').expect("label pair");
                (k.to_string(), v.trim_matches('"').to_string())
            })
            .collect();
        out.push(Series {
            name: name.to_string(),
            labels,
            value: value.parse().expect("numeric value"),
        });
    }
    out
}

struct Scrape {
    text: String,
    series: Vec<Series>,
}

impl Scrape {
    /// The sum over every series of `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.series
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
            })
            .map(|s| s.value)
            .sum()
    }
}

async fn scrape(sidecar: &Sidecar) -> Scrape {
    let response = client()
        .get(sidecar.admin_url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = response.text().await.unwrap();
    Scrape {
        series: parse_exposition(&text),
        text,
    }
}

/// Waits until `check` holds on a scrape (a response's metrics are recorded when its body
/// ends, which may be just after the client has read it).
async fn scrape_until(sidecar: &Sidecar, check: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let s = scrape(sidecar).await;
        if check(&s) {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics never reached the expected state:\n{}",
            s.text
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn start(upstream: &FakeUpstream) -> Sidecar {
    Sidecar::start(&format!(
        "endpoints:
  - name: chat
    provider: openai-compatible
    baseUrl: {base}
    model: upstream-model
    retry: {{maxAttempts: 3, backoffBase: 10ms, backoffMax: 20ms}}
    price: {{inputPerMillionTokens: 2, outputPerMillionTokens: 10}}
  - name: tight
    provider: openai-compatible
    baseUrl: {base}
    model: tight-model
    limits: {{requestsPerMinute: 1, queueTimeout: 0ms}}
",
        base = upstream.base_url()
    ))
}

async fn post(sidecar: &Sidecar, body: Value, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = client()
        .post(sidecar.url("/v1/chat/completions"))
        .json(&body);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    request.send().await.unwrap()
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello there"}]})
}

const CHAT: [(&str, &str); 2] = [("endpoint", "chat"), ("model", "upstream-model")];

#[tokio::test]
async fn counters_and_histograms_follow_each_kind_of_request() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = start(&upstream);
    let before = scrape(&sidecar).await;
    assert_eq!(before.sum("llmesh_requests_total", &[]), 0.0);
    assert_eq!(before.sum("llmesh_requests_in_flight", &[]), 0.0);
    assert_eq!(before.sum("llmesh_build_info", &[]), 1.0);

    // A success: the fake upstream reports 10 prompt and 20 completion tokens.
    let ok = post(&sidecar, chat("chat"), &[]).await;
    assert_eq!(ok.status(), 200);
    ok.bytes().await.unwrap();
    let s = scrape_until(&sidecar, |s| s.sum("llmesh_requests_total", &[]) == 1.0).await;
    let success = [CHAT[0], CHAT[1], ("operation", "chat"), ("status", "200")];
    assert_eq!(s.sum("llmesh_requests_total", &success), 1.0);
    let tokens = |s: &Scrape, kind, source| {
        s.sum(
            "gen_ai_client_token_usage_sum",
            &[CHAT[0], ("token_type", kind), ("source", source)],
        )
    };
    assert_eq!(tokens(&s, "input", "reported"), 10.0);
    assert_eq!(tokens(&s, "output", "reported"), 20.0);
    let cost = s.sum("llmesh_cost_usd_total", &CHAT);
    assert!(
        (cost - (10.0 * 2.0 + 20.0 * 10.0) / 1e6).abs() < 1e-12,
        "{cost}"
    );
    assert_eq!(
        s.sum(
            "gen_ai_client_operation_duration_seconds_count",
            &[CHAT[0], ("provider", "openai-compatible")]
        ),
        1.0
    );
    assert_eq!(
        s.sum(
            "gen_ai_client_operation_duration_seconds_bucket",
            &[CHAT[0], ("le", "+Inf")]
        ),
        1.0
    );
    assert_eq!(s.sum("llmesh_upstream_attempts_total", &[CHAT[0]]), 1.0);
    assert_eq!(
        s.sum(
            "gen_ai_client_operation_time_to_first_chunk_seconds_count",
            &[]
        ),
        0.0,
        "not a stream"
    );

    // An upstream 400: counted with its status and error type, no tokens, not retried.
    let bad = post(&sidecar, chat("chat"), &[(directives::STATUS, "400")]).await;
    assert_eq!(bad.status(), 400);
    bad.bytes().await.unwrap();
    let s = scrape_until(&sidecar, |s| s.sum("llmesh_requests_total", &[]) == 2.0).await;
    assert_eq!(
        s.sum("llmesh_requests_total", &[CHAT[0], ("status", "400")]),
        1.0
    );
    assert_eq!(
        s.sum(
            "gen_ai_client_operation_duration_seconds_count",
            &[CHAT[0], ("error_type", "400")]
        ),
        1.0
    );
    assert_eq!(tokens(&s, "input", "reported"), 10.0, "unchanged");
    assert_eq!(s.sum("llmesh_upstream_retries_total", &[]), 0.0);

    // One 503 then a success: two attempts, one retry for server_error.
    let retried = post(
        &sidecar,
        chat("chat"),
        &[
            (directives::STATUS, "503"),
            (directives::FAIL_TIMES, "1"),
            ("x-request-id", "metrics-retry-1"),
        ],
    )
    .await;
    assert_eq!(retried.status(), 200);
    retried.bytes().await.unwrap();
    let s = scrape_until(&sidecar, |s| s.sum("llmesh_requests_total", &[]) == 3.0).await;
    assert_eq!(s.sum("llmesh_upstream_attempts_total", &[CHAT[0]]), 4.0);
    assert_eq!(
        s.sum(
            "llmesh_upstream_retries_total",
            &[CHAT[0], ("reason", "server_error"), ("retried", "true")]
        ),
        1.0
    );
    assert_eq!(
        s.sum("llmesh_requests_total", &[CHAT[0], ("status", "200")]),
        2.0
    );

    // The sidecar's own limit: the second call to `tight` is refused.
    for expected in [200, 429] {
        let r = post(&sidecar, chat("tight"), &[]).await;
        assert_eq!(r.status(), expected);
        r.bytes().await.unwrap();
    }
    let s = scrape_until(&sidecar, |s| s.sum("llmesh_requests_total", &[]) == 5.0).await;
    assert_eq!(
        s.sum(
            "llmesh_rate_limited_total",
            &[("endpoint", "tight"), ("limit", "requests_per_minute")]
        ),
        1.0
    );
    assert_eq!(
        s.sum(
            "gen_ai_client_operation_duration_seconds_count",
            &[("endpoint", "tight"), ("error_type", "rate_limit_exceeded")]
        ),
        1.0
    );
    assert_eq!(
        s.sum("llmesh_upstream_attempts_total", &[("endpoint", "tight")]),
        1.0,
        "a refused request never reaches the upstream"
    );
    assert_eq!(s.sum("llmesh_requests_in_flight", &[]), 0.0);
}

#[tokio::test]
async fn streamed_usage_comes_from_the_final_chunk_or_is_estimated_and_marked() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = start(&upstream);
    let tokens = |s: &Scrape, kind, source| {
        s.sum(
            "gen_ai_client_token_usage_sum",
            &[CHAT[0], ("token_type", kind), ("source", source)],
        )
    };

    let mut with_usage = chat("chat");
    with_usage["stream"] = json!(true);
    with_usage["stream_options"] = json!({"include_usage": true});
    let r = post(&sidecar, with_usage, &[(directives::STREAM_CHUNKS, "7")]).await;
    let text = r.text().await.unwrap();
    assert!(text.contains("\"usage\""), "{text}");
    let s = scrape_until(&sidecar, |s| s.sum("llmesh_requests_total", &[]) == 1.0).await;
    assert_eq!(tokens(&s, "input", "reported"), 10.0);
    assert_eq!(tokens(&s, "output", "reported"), 7.0);
    assert_eq!(
        s.sum(
            "gen_ai_client_operation_time_to_first_chunk_seconds_count",
            &[CHAT[0], ("operation", "chat")]
        ),
        1.0
    );

    // A server that sends no usage even when the sidecar asks for it (llama.cpp, some vLLM
    // settings): estimated, and marked so.
    let mut without_usage = chat("chat");
    without_usage["stream"] = json!(true);
    let r = post(
        &sidecar,
        without_usage,
        &[
            (directives::STREAM_CHUNKS, "5"),
            (directives::NO_USAGE, "1"),
        ],
    )
    .await;
    r.text().await.unwrap();
    let s = scrape_until(&sidecar, |s| s.sum("llmesh_requests_total", &[]) == 2.0).await;
    assert_eq!(
        tokens(&s, "output", "estimated"),
        5.0,
        "one token per chunk"
    );
    assert!(tokens(&s, "input", "estimated") > 0.0);
    assert_eq!(tokens(&s, "output", "reported"), 7.0, "unchanged");
    assert_eq!(
        s.sum(
            "gen_ai_client_operation_time_to_first_chunk_seconds_count",
            &[]
        ),
        2.0
    );
    let log = sidecar
        .log_events("request")
        .into_iter()
        .find(|e| e["usage_estimated"] == true)
        .expect("the estimate is marked in the log too");
    assert_eq!(log["completion_tokens"], 5);
}

#[tokio::test]
async fn the_exposition_passes_promtool() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = start(&upstream);
    post(&sidecar, chat("chat"), &[])
        .await
        .bytes()
        .await
        .unwrap();
    let s = scrape_until(&sidecar, |s| s.sum("llmesh_requests_total", &[]) == 1.0).await;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian's prometheus package; scripts/test installs it)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(s.text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool failed:\n{report}");
    assert!(report.trim().is_empty(), "promtool warned:\n{report}");
}

#[tokio::test]
async fn labels_hold_no_request_ids_user_input_or_keys() {
    let upstream = FakeUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "sk-metrics-secret-key").unwrap();
    std::fs::write(
        dir.path().join("config.yaml"),
        format!(
            "endpoints:
  - name: chat
    provider: openai-compatible
    baseUrl: {}
    model: upstream-model
    default: true
    credential: {{file: {}}}
",
            upstream.base_url(),
            key.display()
        ),
    )
    .unwrap();
    let config = dir.path().join("config.yaml");
    let sidecar = Sidecar::start_with(dir, &["--config", config.to_str().unwrap()]);
    // An unknown model goes to the default endpoint: the label is the endpoint's model.
    post(
        &sidecar,
        chat("user-chosen-model-name"),
        &[("x-request-id", "req-visible-in-logs-only")],
    )
    .await
    .bytes()
    .await
    .unwrap();
    let s = scrape_until(&sidecar, |s| s.sum("llmesh_requests_total", &[]) == 1.0).await;
    for secret in [
        "sk-metrics-secret-key",
        "req-visible-in-logs-only",
        "user-chosen-model-name",
        "hello there",
    ] {
        assert!(!s.text.contains(secret), "{secret} leaked into /metrics");
    }
    assert_eq!(
        s.sum(
            "llmesh_requests_total",
            &[("model", "upstream-model"), ("status", "200")]
        ),
        1.0
    );
}

#[tokio::test]
async fn metrics_can_be_turned_off() {
    let sidecar = Sidecar::start_with_flags(
        "endpoints: [{name: chat, provider: mock, model: m}]\n",
        &["--metrics", "false"],
    );
    let r = client()
        .get(sidecar.admin_url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn traceparent_reaches_the_upstream_under_a_new_span_and_logs_carry_it() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = start(&upstream);
    let incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let r = post(&sidecar, chat("chat"), &[("traceparent", incoming)]).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let sent = upstream.last_request().unwrap();
    let upstream_tp = sent.header("traceparent").unwrap().to_string();
    let parts: Vec<&str> = upstream_tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{upstream_tp}");
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1], "0af7651916cd43dd8448eb211c80319c", "same trace");
    assert_ne!(
        parts[2], "b7ad6b7169203331",
        "the sidecar's span is the new parent"
    );
    assert_eq!(parts[2].len(), 16);
    assert_eq!(parts[3], "01");

    // Without one, the sidecar starts a trace, and the log line names it.
    let r = post(
        &sidecar,
        chat("chat"),
        &[("x-request-id", "no-trace-given")],
    )
    .await;
    r.bytes().await.unwrap();
    let started = upstream.last_request().unwrap();
    let trace_id = started
        .header("traceparent")
        .unwrap()
        .split('-')
        .nth(1)
        .unwrap()
        .to_string();
    assert_eq!(trace_id.len(), 32);
    assert!(
        eventually(Duration::from_secs(5), || async {
            sidecar
                .log_events("request")
                .iter()
                .any(|e| e["request_id"] == "no-trace-given" && e["trace_id"] == trace_id.as_str())
        })
        .await,
        "{}",
        sidecar.logs()
    );
    assert!(sidecar
        .log_events("request")
        .iter()
        .any(|e| e["trace_id"] == "0af7651916cd43dd8448eb211c80319c"));
}

#[tokio::test]
async fn lines_logged_during_a_request_carry_its_trace_and_request_ids() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = Sidecar::start(&format!(
        "endpoints:
  - name: chat
    provider: openai-compatible
    baseUrl: {}
    model: upstream-model
    retry: {{maxAttempts: 1}}
    circuitBreaker: {{consecutiveFailures: 1, cooldown: 30s}}
",
        upstream.base_url()
    ));
    // The failure opens the breaker, which logs while the request is being served.
    let r = post(
        &sidecar,
        chat("chat"),
        &[
            (directives::STATUS, "500"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("x-request-id", "opens-the-breaker"),
        ],
    )
    .await;
    assert_eq!(r.status(), 500);
    assert!(
        sidecar
            .wait_for_log("circuit opened", Duration::from_secs(5))
            .await
    );
    let opened = sidecar.log_events("circuit opened: endpoint ejected");
    let request_span = &opened[0]["spans"][0];
    assert_eq!(
        request_span["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
        "{opened:?}"
    );
    assert_eq!(request_span["request_id"], "opens-the-breaker");
}

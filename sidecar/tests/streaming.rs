//! Streaming through the sidecar: chunk-by-chunk forwarding, cancellation when the app
//! goes away, clean ends when the upstream fails or stalls, and graceful shutdown.

mod common;

use std::time::{Duration, Instant};

use common::{client, Sidecar};
use llmesh_testkit::{directives, FakeUpstream};
use serde_json::{json, Value};

fn sidecar_for(upstream: &FakeUpstream, timeouts: &str) -> Sidecar {
    Sidecar::start(&format!(
        "endpoints:
  - name: chat
    provider: openai-compatible
    baseUrl: {}
    model: upstream-model
    timeouts: {timeouts}
",
        upstream.base_url()
    ))
}

fn stream_request(sidecar: &Sidecar, chunks: u32, interval_ms: u32) -> reqwest::RequestBuilder {
    client()
        .post(sidecar.url("/v1/chat/completions"))
        .header(directives::STREAM_CHUNKS, chunks.to_string())
        .header(directives::CHUNK_INTERVAL_MS, interval_ms.to_string())
        .json(&json!({"model": "chat", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
}

/// Reads the whole body, returning each network chunk with its arrival time.
async fn read_chunks(
    mut response: reqwest::Response,
) -> Result<Vec<(Instant, String)>, reqwest::Error> {
    let mut chunks = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        chunks.push((Instant::now(), String::from_utf8_lossy(&chunk).into_owned()));
    }
    Ok(chunks)
}

fn events(chunks: &[(Instant, String)]) -> Vec<String> {
    chunks
        .iter()
        .map(|(_, c)| c.as_str())
        .collect::<String>()
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn forwards_each_chunk_as_it_arrives() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_for(&upstream, "{}");
    let sent = Instant::now();
    let response = stream_request(&sidecar, 5, 200).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let chunks = read_chunks(response).await.unwrap();
    // Chunk i leaves the fake upstream at i * 200 ms; each must reach the app on its own,
    // at about that time, not gathered up at the end.
    let data_chunks: Vec<_> = chunks.iter().filter(|(_, c)| c.contains("tok")).collect();
    assert_eq!(
        data_chunks.len(),
        5,
        "one network chunk per event: {chunks:?}"
    );
    for (i, (at, _)) in data_chunks.iter().enumerate() {
        let offset = at.duration_since(sent).as_millis() as i64;
        let expected = i as i64 * 200;
        assert!(
            offset >= expected - 20 && offset < expected + 150,
            "chunk {i} arrived at {offset} ms, expected about {expected} ms"
        );
    }
    let events = events(&chunks);
    assert_eq!(events.len(), 6);
    assert_eq!(events[5], "data: [DONE]");
    let first: Value = serde_json::from_str(events[0].trim_start_matches("data: ")).unwrap();
    assert_eq!(first["model"], "upstream-model");
}

#[tokio::test]
async fn an_app_that_goes_away_cancels_the_upstream_stream() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_for(&upstream, "{}");
    let mut response = stream_request(&sidecar, 1000, 20).send().await.unwrap();
    for _ in 0..3 {
        response.chunk().await.unwrap().expect("a chunk");
    }
    drop(response);
    assert_eq!(
        upstream.wait_abandoned(1, Duration::from_secs(2)).await,
        1,
        "the upstream stream was not cancelled"
    );
    assert!(
        sidecar
            .wait_for_log("client_disconnected", Duration::from_secs(2))
            .await
    );
}

#[tokio::test]
async fn an_app_that_goes_away_before_the_first_byte_cancels_the_upstream_call() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_for(&upstream, "{}");
    let request = client()
        .post(sidecar.url("/v1/chat/completions"))
        .header(directives::DELAY_MS, "10000")
        .timeout(Duration::from_millis(300))
        .json(&json!({"model": "chat", "messages": []}))
        .send();
    assert!(request.await.unwrap_err().is_timeout());
    assert_eq!(
        upstream.wait_abandoned(1, Duration::from_secs(2)).await,
        1,
        "the upstream call was not cancelled"
    );
}

#[tokio::test]
async fn an_upstream_failing_mid_stream_ends_the_stream_with_an_error_event() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_for(&upstream, "{}");
    let response = stream_request(&sidecar, 10, 10)
        .header(directives::FAIL_AFTER_CHUNKS, "3")
        .send()
        .await
        .unwrap();
    let chunks = read_chunks(response)
        .await
        .expect("the stream ends cleanly, not with a transport error");
    let events = events(&chunks);
    assert_eq!(events.len(), 4, "{events:?}");
    let error: Value = serde_json::from_str(events[3].trim_start_matches("data: ")).unwrap();
    assert_eq!(error["error"]["code"], "upstream_stream_broken");
    assert!(
        sidecar
            .wait_for_log(
                "upstream response failed after it started",
                Duration::from_secs(2)
            )
            .await
    );
    assert!(
        sidecar
            .wait_for_log("upstream_failed", Duration::from_secs(2))
            .await
    );
}

#[tokio::test]
async fn a_silent_upstream_hits_the_idle_timeout() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_for(&upstream, "{idle: 300ms}");
    let started = Instant::now();
    let response = stream_request(&sidecar, 10, 10)
        .header(directives::STALL_AFTER_CHUNKS, "2")
        .send()
        .await
        .unwrap();
    let chunks = read_chunks(response).await.unwrap();
    let events = events(&chunks);
    assert_eq!(events.len(), 3, "{events:?}");
    let error: Value = serde_json::from_str(events[2].trim_start_matches("data: ")).unwrap();
    assert_eq!(error["error"]["code"], "upstream_timeout");
    assert_eq!(
        error["error"]["message"],
        "Endpoint 'chat': upstream did not send the next chunk within 300ms."
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
    assert_eq!(
        upstream.wait_abandoned(1, Duration::from_secs(2)).await,
        1,
        "the stalled upstream was released"
    );
}

#[tokio::test]
async fn the_total_deadline_cuts_a_long_stream() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_for(
        &upstream,
        "{connect: 100ms, firstByte: 500ms, total: 500ms}",
    );
    let response = stream_request(&sidecar, 100, 100).send().await.unwrap();
    let events = events(&read_chunks(response).await.unwrap());
    let last: Value =
        serde_json::from_str(events.last().unwrap().trim_start_matches("data: ")).unwrap();
    assert_eq!(
        last["error"]["message"],
        "Endpoint 'chat': upstream did not finish the response within 500ms."
    );
    assert!(
        (5..=7).contains(&events.len()),
        "about 5 chunks then the error: {}",
        events.len()
    );
}

#[tokio::test]
async fn sigterm_lets_streams_in_flight_finish_and_exits_zero() {
    let upstream = FakeUpstream::start().await.unwrap();
    let mut sidecar = sidecar_for(&upstream, "{}");
    let mut response = stream_request(&sidecar, 10, 100).send().await.unwrap();
    response.chunk().await.unwrap().expect("first chunk");
    sidecar.signal_term();
    assert!(
        sidecar
            .wait_for_log("shutting down", Duration::from_secs(2))
            .await
    );
    // Not ready any more, so the kubelet takes the pod out of rotation.
    let ready = client()
        .get(sidecar.admin_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(ready.json::<Value>().await.unwrap()["status"], "draining");
    // New connections are refused while the stream goes on.
    assert!(client()
        .get(sidecar.url("/v1/models"))
        .send()
        .await
        .is_err());
    let rest = read_chunks(response).await.expect("the stream finished");
    assert!(
        events(&rest).last().is_some_and(|e| e == "data: [DONE]"),
        "{rest:?}"
    );
    let status = sidecar
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("the sidecar exited");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn a_stream_still_open_when_the_grace_period_ends_gets_a_final_error_event() {
    let upstream = FakeUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "endpoints:\n  - {{name: chat, provider: openai-compatible, baseUrl: {}, model: m}}\n",
            upstream.base_url()
        ),
    )
    .unwrap();
    // The harness passes --shutdown-grace 10s; the test's flag comes later and wins.
    let mut sidecar = Sidecar::start_with(
        dir,
        &[
            "--config",
            path.to_str().unwrap(),
            "--shutdown-grace",
            "500ms",
        ],
    );
    let mut response = stream_request(&sidecar, 100, 200).send().await.unwrap();
    response.chunk().await.unwrap().expect("first chunk");
    sidecar.signal_term();
    let rest = read_chunks(response)
        .await
        .expect("the stream ended cleanly");
    let events = events(&rest);
    let last: Value =
        serde_json::from_str(events.last().expect("events").trim_start_matches("data: ")).unwrap();
    assert_eq!(last["error"]["code"], "shutting_down", "{events:?}");
    assert!(
        events.len() < 20,
        "cut at the grace period: {}",
        events.len()
    );
    let status = sidecar
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("the sidecar exited");
    assert_eq!(status.code(), Some(0));
    assert!(sidecar.logs().contains("shutdown_grace_over"));
}

//! HTTP/2 with prior knowledge (h2c) on the app port, as gRPC-style clients and some SDK
//! settings speak it: answers, streams frame by frame, and graceful shutdown, as over
//! HTTP/1.1 on the same port.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{client, Sidecar};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

fn mock_sidecar(mock: &str) -> Sidecar {
    Sidecar::start(&format!(
        "endpoints:
  - name: chat
    provider: mock
    model: mock-model
    mock: {mock}
"
    ))
}

/// A client that opens every connection with the HTTP/2 preface, without asking to upgrade.
fn h2c_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

async fn post_chat(sidecar: &Sidecar, body: Value) -> http::Response<Incoming> {
    let request = http::Request::post(sidecar.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = h2c_client().request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    response
}

/// Reads the body frame by frame, with the time each data frame arrived.
async fn read_frames(response: http::Response<Incoming>) -> Vec<(Instant, String)> {
    let mut body = response.into_body();
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            frames.push((Instant::now(), String::from_utf8_lossy(&data).into_owned()));
        }
    }
    frames
}

fn events(frames: &[(Instant, String)]) -> Vec<String> {
    frames
        .iter()
        .map(|(_, f)| f.as_str())
        .collect::<String>()
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .collect()
}

fn stream_body() -> Value {
    json!({"model": "chat", "stream": true, "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test]
async fn answers_a_chat_completion_over_h2c_and_http1_on_the_same_port() {
    let sidecar = mock_sidecar("{}");
    let response = post_chat(
        &sidecar,
        json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-request-id"));
    assert_eq!(response.headers()["x-llmesh-endpoint"], "chat");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["object"], "chat.completion");
    assert!(
        answer["choices"][0]["message"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty()),
        "{answer}"
    );

    let http1 = client()
        .post(sidecar.url("/v1/chat/completions"))
        .json(&json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(http1.version(), http::Version::HTTP_11);
    assert_eq!(http1.status(), 200);
}

#[tokio::test]
async fn streams_over_h2c_frame_by_frame() {
    let sidecar = mock_sidecar("{tokenInterval: 100ms, completionTokens: 6}");
    let sent = Instant::now();
    let response = post_chat(&sidecar, stream_body()).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let frames = read_frames(response).await;
    let events = events(&frames);
    assert!(events.iter().all(|e| e.starts_with("data: ")), "{events:?}");
    assert_eq!(events.last().map(String::as_str), Some("data: [DONE]"));
    let tokens: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e.trim_start_matches("data: ")).ok())
        .filter_map(|chunk| {
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert!(!tokens.is_empty(), "{events:?}");
    // Tokens came as they were made (one every 100 ms), not all at once at the end.
    assert!(frames.len() >= 6, "{} frames", frames.len());
    let first = frames[0].0.duration_since(sent);
    let last = frames[frames.len() - 1].0.duration_since(sent);
    assert!(
        last.saturating_sub(first) >= Duration::from_millis(400),
        "first frame after {first:?}, last after {last:?}"
    );
}

#[tokio::test]
async fn sigterm_lets_an_h2c_stream_finish_and_exits_zero() {
    let mut sidecar = mock_sidecar("{tokenInterval: 100ms, completionTokens: 15}");
    let response = post_chat(&sidecar, stream_body()).await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = body.frame().await.expect("a first frame").unwrap();
    assert!(first.is_data());
    sidecar.signal_term();
    assert!(
        sidecar
            .wait_for_log("shutting down", Duration::from_secs(2))
            .await
    );
    let mut rest = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("the stream finished").into_data() {
            rest.push((Instant::now(), String::from_utf8_lossy(&data).into_owned()));
        }
    }
    assert_eq!(
        events(&rest).last().map(String::as_str),
        Some("data: [DONE]"),
        "{rest:?}"
    );
    let status = sidecar
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("the sidecar exited");
    assert_eq!(status.code(), Some(0));
}

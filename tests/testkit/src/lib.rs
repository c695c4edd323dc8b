//! A fake OpenAI-style upstream for llmesh's tests and benchmarks.
//!
//! It answers `POST .../chat/completions` (and any other path) like a provider would, and
//! injects faults on request: each behaviour is chosen by an `x-fake-*` request header, which
//! the sidecar passes through untouched. It records every request it received (method, path,
//! headers, body) so tests can assert what the provider saw, and counts responses that were
//! abandoned before they were complete (to prove cancellation reaches the upstream).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{self, StreamExt};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

pub mod directives {
    //! Request headers that choose the fake upstream's behaviour.
    /// Answer with this status and an OpenAI error envelope.
    pub const STATUS: &str = "x-fake-status";
    /// Wait this many milliseconds before sending the response headers.
    pub const DELAY_MS: &str = "x-fake-delay-ms";
    /// Answer with a Server-Sent Events stream of this many chunks, then `[DONE]`.
    pub const STREAM_CHUNKS: &str = "x-fake-stream-chunks";
    /// Milliseconds between stream chunks.
    pub const CHUNK_INTERVAL_MS: &str = "x-fake-chunk-interval-ms";
    /// Reset the connection after this many chunks (a provider dying mid-stream).
    pub const FAIL_AFTER_CHUNKS: &str = "x-fake-fail-after-chunks";
    /// Stop sending (but keep the connection open) after this many chunks.
    pub const STALL_AFTER_CHUNKS: &str = "x-fake-stall-after-chunks";
    /// Close the connection without any response.
    pub const DROP_CONNECTION: &str = "x-fake-drop-connection";
    /// Apply the fault (`STATUS`, `DROP_CONNECTION`, `DELAY_MS`) only to the first N requests
    /// with the same `x-request-id` (retries of one call carry the same id), then answer
    /// normally: a burst of failures that a retry gets past.
    pub const FAIL_TIMES: &str = "x-fake-fail-times";
    /// `name: value`, added to the response (repeatable): `retry-after`, `x-ratelimit-*`.
    pub const RESPONSE_HEADER: &str = "x-fake-response-header";
}

/// One request as the fake upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Approximate size of a non-streamed completion body.
    pub body_bytes: usize,
    /// Keep every request for inspection (off for benchmarks, where it would grow forever).
    pub record: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            body_bytes: 1024,
            record: true,
        }
    }
}

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<Recorded>>,
    abandoned: AtomicUsize,
    seen_by_request_id: Mutex<std::collections::HashMap<String, u64>>,
}

pub struct FakeUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeUpstream {
    /// Starts on a free loopback port.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on(
            "127.0.0.1:0".parse().expect("literal address"),
            Options::default(),
        )
        .await
    }

    pub async fn start_on(addr: SocketAddr, options: Options) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let server = tokio::spawn(serve(listener, Arc::clone(&shared), options));
        Ok(Self {
            addr,
            shared,
            server,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// An OpenAI-style base URL (`http://127.0.0.1:PORT/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.shared
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    pub fn last_request(&self) -> Option<Recorded> {
        self.requests().pop()
    }

    /// Responses dropped before they were complete: the client (the sidecar) went away
    /// while the fake was still waiting or streaming.
    pub fn abandoned(&self) -> usize {
        self.shared.abandoned.load(Ordering::SeqCst)
    }

    /// Waits until `abandoned() >= n` or the timeout passes; returns the final count.
    pub async fn wait_abandoned(&self, n: usize, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.abandoned() < n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.abandoned()
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, options: Options) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(Arc::clone(&shared), options, req));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Counts a response as abandoned unless it was disarmed by finishing.
struct AbandonGuard {
    shared: Arc<Shared>,
    armed: bool,
}

impl AbandonGuard {
    fn new(shared: &Arc<Shared>) -> Self {
        Self {
            shared: Arc::clone(shared),
            armed: true,
        }
    }
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if self.armed {
            self.shared.abandoned.fetch_add(1, Ordering::SeqCst);
        }
    }
}

type FakeBody = UnsyncBoxBody<Bytes, std::io::Error>;

fn directive(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.parse().ok()
}

#[derive(Debug)]
struct DroppedOnPurpose;

impl std::fmt::Display for DroppedOnPurpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped on purpose")
    }
}

impl std::error::Error for DroppedOnPurpose {}

async fn handle(
    shared: Arc<Shared>,
    options: Options,
    request: Request<Incoming>,
) -> Result<Response<FakeBody>, DroppedOnPurpose> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let headers = parts.headers.clone();
    let json = serde_json::from_slice::<serde_json::Value>(&body).ok();
    let model = json
        .as_ref()
        .and_then(|v| v.get("model").and_then(|m| m.as_str()).map(str::to_string))
        .unwrap_or_else(|| "unknown".to_string());
    // Like OpenAI: a stream carries usage only when the request asks for it.
    let include_usage = json
        .as_ref()
        .and_then(|v| v.pointer("/stream_options/include_usage"))
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    if options.record {
        if let Ok(mut requests) = shared.requests.lock() {
            requests.push(Recorded {
                method: parts.method.to_string(),
                path_and_query: parts
                    .uri
                    .path_and_query()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                headers: parts.headers,
                body,
            });
        }
    }

    let faulty = match directive(&headers, directives::FAIL_TIMES) {
        None => true,
        Some(times) => {
            let id = headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let mut seen = shared
                .seen_by_request_id
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let count = seen.entry(id).or_insert(0);
            *count += 1;
            *count <= times
        }
    };
    let mut response = respond(&shared, options, &headers, &model, faulty, include_usage).await?;
    for value in headers.get_all(directives::RESPONSE_HEADER) {
        let Some((name, value)) = value.to_str().ok().and_then(|v| v.split_once(':')) else {
            continue;
        };
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.trim().as_bytes()),
            http::HeaderValue::from_str(value.trim()),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    Ok(response)
}

async fn respond(
    shared: &Arc<Shared>,
    options: Options,
    headers: &HeaderMap,
    model: &str,
    faulty: bool,
    include_usage: bool,
) -> Result<Response<FakeBody>, DroppedOnPurpose> {
    let headers = if faulty {
        headers.clone()
    } else {
        let mut kept = headers.clone();
        for fault in [
            directives::STATUS,
            directives::DROP_CONNECTION,
            directives::DELAY_MS,
        ] {
            kept.remove(fault);
        }
        kept
    };
    if let Some(ms) = directive(&headers, directives::DELAY_MS) {
        let mut guard = AbandonGuard::new(shared);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        guard.armed = false;
    }
    if headers.contains_key(directives::DROP_CONNECTION) {
        return Err(DroppedOnPurpose);
    }
    if let Some(status) = directive(&headers, directives::STATUS) {
        let status = u16::try_from(status)
            .ok()
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::json!({"error": {
            "message": format!("fake upstream error {}", status.as_u16()),
            "type": "fake_error",
            "param": null,
            "code": format!("fake_{}", status.as_u16()),
        }});
        return Ok(json_response(status, &body));
    }
    if let Some(chunks) = directive(&headers, directives::STREAM_CHUNKS) {
        return Ok(stream_response(
            shared,
            &headers,
            model,
            chunks,
            include_usage,
        ));
    }
    Ok(completion_response(model, options.body_bytes))
}

fn full(body: String) -> FakeBody {
    Full::new(Bytes::from(body))
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn completion_response(model: &str, body_bytes: usize) -> Response<FakeBody> {
    let overhead = 330 + model.len();
    let content = "x".repeat(body_bytes.saturating_sub(overhead).max(1));
    let body = serde_json::json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30},
    });
    json_response(StatusCode::OK, &body)
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<FakeBody> {
    let mut response = Response::new(full(body.to_string()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    headers.insert("x-fake-upstream", http::HeaderValue::from_static("1"));
    response
}

enum Step {
    Chunk(u64),
    Done,
    Fail,
    Stall,
    End,
}

fn stream_response(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
    model: &str,
    chunks: u64,
    include_usage: bool,
) -> Response<FakeBody> {
    let interval =
        Duration::from_millis(directive(headers, directives::CHUNK_INTERVAL_MS).unwrap_or(0));
    let fail_after = directive(headers, directives::FAIL_AFTER_CHUNKS);
    let stall_after = directive(headers, directives::STALL_AFTER_CHUNKS);
    let model = model.to_string();
    let guard = AbandonGuard::new(shared);
    let steps = stream::unfold((0u64, guard), move |(sent, mut guard)| {
        let model = model.clone();
        async move {
            let step = if fail_after == Some(sent) {
                Step::Fail
            } else if stall_after == Some(sent) {
                Step::Stall
            } else if sent < chunks {
                Step::Chunk(sent)
            } else if sent == chunks {
                Step::Done
            } else {
                Step::End
            };
            match step {
                Step::Chunk(i) => {
                    if i > 0 && !interval.is_zero() {
                        tokio::time::sleep(interval).await;
                    }
                    let event = serde_json::json!({
                        "id": "chatcmpl-fake",
                        "object": "chat.completion.chunk",
                        "created": 1_700_000_000,
                        "model": model,
                        "choices": [{"index": 0, "delta": {"content": format!("tok{i} ")}, "finish_reason": null}],
                    });
                    Some((
                        Ok(Frame::data(Bytes::from(format!("data: {event}\n\n")))),
                        (sent + 1, guard),
                    ))
                }
                Step::Done => {
                    guard.armed = false;
                    let mut tail = String::new();
                    if include_usage {
                        let usage = serde_json::json!({
                            "id": "chatcmpl-fake",
                            "object": "chat.completion.chunk",
                            "created": 1_700_000_000,
                            "model": model,
                            "choices": [],
                            "usage": {"prompt_tokens": 10, "completion_tokens": chunks, "total_tokens": 10 + chunks},
                        });
                        tail.push_str(&format!("data: {usage}\n\n"));
                    }
                    tail.push_str("data: [DONE]\n\n");
                    Some((Ok(Frame::data(Bytes::from(tail))), (sent + 1, guard)))
                }
                Step::Fail => {
                    // Let the chunks already written leave before the connection is cut.
                    tokio::time::sleep(interval.max(Duration::from_millis(20))).await;
                    guard.armed = false;
                    Some((
                        Err(std::io::Error::other("fake upstream failed mid-stream")),
                        (u64::MAX, guard),
                    ))
                }
                Step::Stall => {
                    std::future::pending::<()>().await;
                    None
                }
                Step::End => None,
            }
        }
    });
    let body = BodyExt::boxed_unsync(StreamBody::new(steps.boxed()));
    let mut response = Response::new(body);
    response.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("text/event-stream"),
    );
    response
        .headers_mut()
        .insert("x-fake-upstream", http::HeaderValue::from_static("1"));
    response
}

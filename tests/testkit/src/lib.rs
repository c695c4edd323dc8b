//! A fake LLM upstream for llmesh's tests and benchmarks: OpenAI's chat completions and
//! Anthropic's Messages API.
//!
//! It answers like a provider would, and injects faults on request: each behaviour is chosen
//! by an `x-fake-*` request header, which the sidecar passes through untouched. It records
//! every request it received (method, path, headers, body) so tests can assert what the
//! provider saw (over HTTP too: [`INSPECT_PATH`]), and counts responses that were abandoned
//! before they were complete (to prove cancellation reaches the upstream).
//!
//! Routes, by the end of the path:
//! - `.../messages`: Anthropic's Messages API (JSON or, with `"stream": true`, its event
//!   sequence), errors in Anthropic's envelope; like Anthropic it answers 401 without a key
//!   (`x-api-key` or `Authorization: Bearer`) and 400 without `anthropic-version`. `.../messages/count_tokens` counts.
//! - `.../responses`: 404, as from a server that only serves chat completions (llama.cpp).
//! - `.../completions` (not `.../chat/completions`): an OpenAI text completion (JSON, or
//!   `text_completion` chunks then `[DONE]`) with the same text and usage as a chat answer.
//! - `.../embeddings`: one 4-dimensional embedding per input, [`usage::PROMPT_TOKENS`] in.
//! - anything else: an OpenAI chat completion (JSON or SSE chunks then `[DONE]`).
//!
//! Both dialects answer a request that defines tools, and whose last message is not a tool
//! result, with tool calls: one per defined tool, at most two (parallel calls), with the
//! arguments [`tool_arguments`] gives. A request whose last message holds tool results is
//! answered with text that quotes them: `The tool said: <results joined by a space>`.
//!
//! Usage is fixed, so that tests can compare it with what the sidecar counted:
//! - chat JSON: [`usage::PROMPT_TOKENS`] in, [`usage::COMPLETION_TOKENS`] out;
//! - Anthropic JSON: [`usage::ANTHROPIC_INPUT_TOKENS`] in, [`usage::ANTHROPIC_OUTPUT_TOKENS`]
//!   out, plus [`usage::CACHE_CREATION_TOKENS`] and [`usage::CACHE_READ_TOKENS`];
//! - streams: the same input (and cache) counts, and as many output tokens as the stream has
//!   chunks: 5 for text by default, 2 for a reply to tool results, and for tool calls
//!   `1 + 3 × calls` chunks (chat) or `4 × calls` (Anthropic).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{self, StreamExt};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Body, Frame, Incoming};
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
    /// Answer with a Server-Sent Events stream of this many chunks, then `[DONE]`. A request
    /// with `"stream": true` and no such header gets a stream of 5 chunks, as from a provider.
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
    /// Comma-separated places where the fake echoes the credential it received, as a broken
    /// or hostile upstream (or a proxy in front of one) would. The credential is the value of
    /// `authorization` as received (`Bearer sk-...`), else of `x-api-key`, else of `api-key`;
    /// the raw key is that value without its `Bearer ` prefix. Without a credential nothing is
    /// echoed. Places:
    /// - `header`: response header [`ECHO_AUTHORIZATION`](super::ECHO_AUTHORIZATION) with the
    ///   value as received;
    /// - `www-authenticate`: `www-authenticate: Bearer realm="fake", error="invalid_token",
    ///   error_description="bad key <raw key>"`;
    /// - `body`: the response is a 401 with OpenAI's error envelope, the raw key in `message`
    ///   (`Incorrect API key provided: <raw key>. ...`) and the value as received in `param`;
    /// - `stream`: the response is an SSE chat-completion stream (`STREAM_CHUNKS` chunks, 3 by
    ///   default, then `[DONE]`) whose second chunk (the first if there is only one) has
    ///   `leaked <raw key> here` as its content; that event is sent as two frames split in the
    ///   middle of the key, 5 ms apart, so a proxy sees the key split across reads;
    /// - `ok-body`: a 200 completion whose `message.content` contains the raw key.
    ///
    /// `body` wins over `STATUS`, which wins over `stream`, then `STREAM_CHUNKS`, then `ok-body`.
    pub const ECHO_KEY_IN: &str = "x-fake-echo-key-in";
    /// Cut every body frame of the response (streamed or not) into frames of at most this many
    /// bytes, sent 1 ms apart: a drip, so that a parser meets every read boundary.
    pub const FRAME_BYTES: &str = "x-fake-frame-bytes";
    /// Streams carry no usage chunk, even when the request asks for
    /// `stream_options.include_usage` (llama.cpp and some vLLM settings behave so).
    pub const NO_USAGE: &str = "x-fake-no-usage";
    /// Like llama.cpp's server: answer 400 with an empty body when the request has an
    /// `x-request-id` that is not a UUID (8-4-4-4-12 hex digits).
    pub const UUID_REQUEST_ID: &str = "x-fake-require-uuid-request-id";
    /// Streams: after `data: [DONE]` keep the body open this many milliseconds before ending
    /// it, as some servers do.
    pub const FINISH_THEN_HOLD_MS: &str = "x-fake-finish-then-hold-ms";
}

/// The response header in which [`directives::ECHO_KEY_IN`]`: header` echoes the credential.
pub const ECHO_AUTHORIZATION: &str = "x-echo-authorization";

/// `GET` here answers the requests recorded so far (when recording is on), as a JSON array of
/// `{method, path, headers, body}`: `headers` maps each name to its values joined by `, `,
/// `body` is the JSON body (or null). Credentials are shown as their [`fingerprint`] (after
/// `Bearer ` when they had it), so that a test can check which key arrived without the key
/// appearing in its output. This request itself is not recorded.
pub const INSPECT_PATH: &str = "/_fake/requests";

/// The fixed token counts of the fake's answers (see the crate documentation for streams).
pub mod usage {
    pub const PROMPT_TOKENS: u64 = 10;
    pub const COMPLETION_TOKENS: u64 = 20;
    /// Input tokens outside the prompt cache, as Anthropic counts them.
    pub const ANTHROPIC_INPUT_TOKENS: u64 = 12;
    pub const ANTHROPIC_OUTPUT_TOKENS: u64 = 5;
    pub const CACHE_CREATION_TOKENS: u64 = 2;
    pub const CACHE_READ_TOKENS: u64 = 3;
}

/// Headers whose value is a credential, shown by [`INSPECT_PATH`] as a fingerprint.
const CREDENTIAL_HEADERS: [&str; 3] = ["authorization", "x-api-key", "api-key"];

/// `fnv1a64:` and the 16 hex digits of the key's 64-bit FNV-1a hash: enough to tell keys
/// apart in a test, and easy to compute in any language (no cryptographic claim).
pub fn fingerprint(key: &[u8]) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = key
        .iter()
        .fold(OFFSET, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME));
    format!("fnv1a64:{hash:016x}")
}

/// The arguments of the fake's call of the tool `name`: `{"city":"Paris","tool":name}`, so
/// that parallel calls can be told apart.
pub fn tool_arguments(name: &str) -> serde_json::Value {
    serde_json::json!({"city": "Paris", "tool": name})
}

/// Chunks of an `ECHO_KEY_IN: stream` response when the request does not set `STREAM_CHUNKS`.
const LEAK_STREAM_CHUNKS: u64 = 3;
/// Chunks of the stream that a request with `"stream": true` gets, like from a real provider,
/// when it sets no `STREAM_CHUNKS` (an unchanged SDK app cannot).
const DEFAULT_STREAM_CHUNKS: u64 = 5;
/// The pause between the two halves of the leaking event: long enough that they leave as
/// separate TCP segments and reach the proxy in separate reads.
const SPLIT_PAUSE: Duration = Duration::from_millis(5);
/// The pause between the pieces of a `FRAME_BYTES` drip.
const DRIP_PAUSE: Duration = Duration::from_millis(1);

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

/// What `ECHO_KEY_IN` asks to echo, and the credential the request carried.
#[derive(Debug, Clone, Default)]
struct Echo {
    header: bool,
    www_authenticate: bool,
    body: bool,
    stream: bool,
    ok_body: bool,
    /// The credential header's value as received (`Bearer sk-...`).
    as_received: Option<http::HeaderValue>,
    /// The key alone, without the `Bearer ` prefix.
    raw_key: Vec<u8>,
}

impl Echo {
    fn from_request(headers: &HeaderMap) -> Self {
        let Some(as_received) = ["authorization", "x-api-key", "api-key"]
            .iter()
            .find_map(|name| headers.get(*name))
        else {
            return Self::default();
        };
        let mut echo = Self {
            raw_key: strip_bearer(as_received.as_bytes()).to_vec(),
            as_received: Some(as_received.clone()),
            ..Self::default()
        };
        let places = headers
            .get_all(directives::ECHO_KEY_IN)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|place| place.trim().to_ascii_lowercase());
        for place in places {
            match place.as_str() {
                "header" => echo.header = true,
                "www-authenticate" => echo.www_authenticate = true,
                "body" => echo.body = true,
                "stream" => echo.stream = true,
                "ok-body" => echo.ok_body = true,
                _ => {}
            }
        }
        echo
    }

    fn raw_key_text(&self) -> String {
        String::from_utf8_lossy(&self.raw_key).into_owned()
    }

    fn as_received_text(&self) -> String {
        self.as_received
            .as_ref()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default()
    }

    fn add_headers(&self, response: &mut Response<FakeBody>) {
        let Some(as_received) = &self.as_received else {
            return;
        };
        if self.header {
            response
                .headers_mut()
                .insert(ECHO_AUTHORIZATION, as_received.clone());
        }
        if self.www_authenticate {
            let mut value =
                br#"Bearer realm="fake", error="invalid_token", error_description="bad key "#
                    .to_vec();
            value.extend_from_slice(&self.raw_key);
            value.push(b'"');
            // The key came in a header value, so it is valid in one.
            if let Ok(value) = http::HeaderValue::from_bytes(&value) {
                response
                    .headers_mut()
                    .insert(http::header::WWW_AUTHENTICATE, value);
            }
        }
    }
}

fn strip_bearer(value: &[u8]) -> &[u8] {
    const BEARER: &[u8] = b"bearer ";
    match value.get(..BEARER.len()) {
        Some(prefix) if prefix.eq_ignore_ascii_case(BEARER) => value[BEARER.len()..].trim_ascii(),
        _ => value.trim_ascii(),
    }
}

/// 8-4-4-4-12 hex digits, as llama.cpp's server requires of `x-request-id`.
fn is_uuid(id: &[u8]) -> bool {
    id.len() == 36
        && id.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

async fn handle(
    shared: Arc<Shared>,
    options: Options,
    request: Request<Incoming>,
) -> Result<Response<FakeBody>, DroppedOnPurpose> {
    let (parts, body) = request.into_parts();
    if parts.method == http::Method::GET && parts.uri.path() == INSPECT_PATH {
        return Ok(inspect(&shared));
    }
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let headers = parts.headers.clone();
    let json = serde_json::from_slice::<serde_json::Value>(&body).ok();
    let call = Call::read(parts.uri.path(), &headers, json.as_ref());
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
    let echo = Echo::from_request(&headers);
    let mut response = respond(&shared, options, &headers, &call, faulty, &echo).await?;
    echo.add_headers(&mut response);
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
    match directive(&headers, directives::FRAME_BYTES)
        .and_then(|n| usize::try_from(n).ok())
        .filter(|n| *n > 0)
    {
        Some(max) => Ok(drip(response, max)),
        None => Ok(response),
    }
}

/// The recorded requests as [`INSPECT_PATH`] shows them.
fn inspect(shared: &Shared) -> Response<FakeBody> {
    let requests = shared
        .requests
        .lock()
        .map(|r| r.iter().map(Recorded::inspected).collect::<Vec<_>>())
        .unwrap_or_default();
    json_response(StatusCode::OK, &serde_json::Value::Array(requests))
}

impl Recorded {
    fn inspected(&self) -> serde_json::Value {
        let mut headers = serde_json::Map::new();
        for name in self.headers.keys() {
            let values: Vec<String> = self
                .headers
                .get_all(name)
                .iter()
                .map(|v| shown_header(name.as_str(), v.as_bytes()))
                .collect();
            headers.insert(name.to_string(), values.join(", ").into());
        }
        serde_json::json!({
            "method": self.method,
            "path": self.path_and_query,
            "headers": headers,
            "body": self.json(),
        })
    }
}

fn shown_header(name: &str, value: &[u8]) -> String {
    if !CREDENTIAL_HEADERS.contains(&name) {
        return String::from_utf8_lossy(value).into_owned();
    }
    let key = strip_bearer(value);
    if key.len() == value.trim_ascii().len() {
        fingerprint(key)
    } else {
        format!("Bearer {}", fingerprint(key))
    }
}

/// Which API the request's path belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Chat completions, and every path the fake does not know.
    Chat,
    /// Anthropic's `POST /v1/messages`.
    Messages,
    /// Anthropic's `POST /v1/messages/count_tokens`.
    CountTokens,
    /// OpenAI's Responses API, which a chat-only server does not have.
    Responses,
    /// OpenAI's legacy `POST /v1/completions`.
    Completions,
    /// OpenAI's `POST /v1/embeddings`.
    Embeddings,
}

impl Route {
    fn of(path: &str) -> Self {
        let path = path.trim_end_matches('/');
        if path.ends_with("/messages") {
            Self::Messages
        } else if path.ends_with("/messages/count_tokens") {
            Self::CountTokens
        } else if path.ends_with("/responses") || path.contains("/responses/") {
            Self::Responses
        } else if path.ends_with("/completions") && !path.ends_with("/chat/completions") {
            Self::Completions
        } else if path.ends_with("/embeddings") {
            Self::Embeddings
        } else {
            Self::Chat
        }
    }

    fn is_anthropic(self) -> bool {
        matches!(self, Self::Messages | Self::CountTokens)
    }
}

/// What the answer says, chosen by the conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Text,
    /// Calls of these tools (at most two).
    ToolCalls(Vec<String>),
    /// Text quoting the tool results the last message carried.
    ToolResults(String),
}

/// The most tools the fake calls at once: two show parallel calls.
const MAX_TOOL_CALLS: usize = 2;

impl Reply {
    fn read(route: Route, json: Option<&serde_json::Value>) -> Self {
        let Some(json) = json else {
            return Self::Text;
        };
        let results = match route {
            Route::Messages => anthropic_tool_results(json),
            _ => chat_tool_results(json),
        };
        if let Some(results) = results {
            return Self::ToolResults(results);
        }
        let name_at = if route == Route::Messages {
            "/name"
        } else {
            "/function/name"
        };
        let names: Vec<String> = json
            .get("tools")
            .and_then(serde_json::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|tool| tool.pointer(name_at)?.as_str().map(str::to_string))
            .take(MAX_TOOL_CALLS)
            .collect();
        if names.is_empty() {
            Self::Text
        } else {
            Self::ToolCalls(names)
        }
    }
}

/// The contents of the tool messages that end a chat conversation, if it ends with any.
fn chat_tool_results(json: &serde_json::Value) -> Option<String> {
    let messages = json.get("messages")?.as_array()?;
    let results: Vec<String> = messages
        .iter()
        .rev()
        .take_while(|m| m.get("role").and_then(serde_json::Value::as_str) == Some("tool"))
        .map(|m| text_of(m.get("content")))
        .collect();
    (!results.is_empty()).then(|| results.into_iter().rev().collect::<Vec<_>>().join(" "))
}

/// The contents of the `tool_result` blocks of the last message, if it has any.
fn anthropic_tool_results(json: &serde_json::Value) -> Option<String> {
    let last = json.get("messages")?.as_array()?.last()?;
    let results: Vec<String> = last
        .get("content")?
        .as_array()?
        .iter()
        .filter(|b| b.get("type").and_then(serde_json::Value::as_str) == Some("tool_result"))
        .map(|b| text_of(b.get("content")))
        .collect();
    (!results.is_empty()).then(|| results.join(" "))
}

/// A content field's text: a string, or the `text` of each part of an array.
fn text_of(content: Option<&serde_json::Value>) -> String {
    match content {
        Some(serde_json::Value::String(text)) => text.clone(),
        Some(serde_json::Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(serde_json::Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// The request, as far as the shape of the answer goes.
struct Call {
    route: Route,
    model: String,
    /// How many inputs an embeddings request has.
    inputs: usize,
    ask: StreamAsk,
    reply: Reply,
}

impl Call {
    fn read(path: &str, headers: &HeaderMap, json: Option<&serde_json::Value>) -> Self {
        let route = Route::of(path);
        let model = json
            .and_then(|v| v.get("model").and_then(|m| m.as_str()).map(str::to_string))
            .unwrap_or_else(|| "unknown".to_string());
        let streamed = json
            .and_then(|v| v.get("stream"))
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false);
        // Like OpenAI: a stream carries usage only when the request asks for it.
        let include_usage = !headers.contains_key(directives::NO_USAGE)
            && json
                .and_then(|v| v.pointer("/stream_options/include_usage"))
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false);
        let inputs = match json.and_then(|v| v.get("input")) {
            Some(serde_json::Value::Array(items)) => items.len(),
            _ => 1,
        };
        Self {
            route,
            model,
            inputs,
            ask: StreamAsk {
                streamed,
                include_usage,
            },
            reply: Reply::read(route, json),
        }
    }
}

/// What the request body asks of the answer's form.
#[derive(Clone, Copy)]
struct StreamAsk {
    /// `"stream": true`
    streamed: bool,
    /// `stream_options.include_usage`
    include_usage: bool,
}

async fn respond(
    shared: &Arc<Shared>,
    options: Options,
    headers: &HeaderMap,
    call: &Call,
    faulty: bool,
    echo: &Echo,
) -> Result<Response<FakeBody>, DroppedOnPurpose> {
    if headers.contains_key(directives::UUID_REQUEST_ID) {
        if let Some(id) = headers.get("x-request-id") {
            if !is_uuid(id.as_bytes()) {
                let mut response = Response::new(full(String::new()));
                *response.status_mut() = StatusCode::BAD_REQUEST;
                response
                    .headers_mut()
                    .insert("x-fake-upstream", http::HeaderValue::from_static("1"));
                return Ok(response);
            }
        }
    }
    if call.route == Route::Responses {
        // llama.cpp's answer to a path it does not serve.
        let body = serde_json::json!({"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}});
        return Ok(json_response(StatusCode::NOT_FOUND, &body));
    }
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
    if call.route.is_anthropic() {
        if let Some(refusal) = anthropic_header_refusal(&headers) {
            return Ok(refusal);
        }
    }
    // Without a credential every echo place is off (`Echo::from_request`).
    if echo.body {
        if call.route.is_anthropic() {
            let message = format!("invalid x-api-key: {}", echo.raw_key_text());
            return Ok(anthropic_error(StatusCode::UNAUTHORIZED, &message));
        }
        let body = serde_json::json!({"error": {
            "message": format!(
                "Incorrect API key provided: {}. You can find your API key at https://platform.openai.com/account/api-keys.",
                echo.raw_key_text()
            ),
            "type": "invalid_request_error",
            "param": echo.as_received_text(),
            "code": "invalid_api_key",
        }});
        return Ok(json_response(StatusCode::UNAUTHORIZED, &body));
    }
    if let Some(status) = directive(&headers, directives::STATUS) {
        let status = u16::try_from(status)
            .ok()
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let message = format!("fake upstream error {}", status.as_u16());
        if call.route.is_anthropic() {
            return Ok(anthropic_error(status, &message));
        }
        let body = serde_json::json!({"error": {
            "message": message,
            "type": "fake_error",
            "param": null,
            "code": format!("fake_{}", status.as_u16()),
        }});
        return Ok(json_response(status, &body));
    }
    if call.route == Route::CountTokens {
        let body = serde_json::json!({"input_tokens": usage::ANTHROPIC_INPUT_TOKENS});
        return Ok(json_response(StatusCode::OK, &body));
    }
    if call.route == Route::Embeddings {
        return Ok(embeddings_response(&call.model, call.inputs));
    }
    let chunks = directive(&headers, directives::STREAM_CHUNKS);
    if chunks.is_some() || echo.stream || call.ask.streamed {
        let default = if echo.stream {
            LEAK_STREAM_CHUNKS
        } else {
            DEFAULT_STREAM_CHUNKS
        };
        let script = Script::for_call(call, echo.stream);
        let chunks = script.chunks().unwrap_or(chunks.unwrap_or(default));
        let plan = StreamPlan {
            chunks: if echo.stream { chunks.max(1) } else { chunks },
            interval: Duration::from_millis(
                directive(&headers, directives::CHUNK_INTERVAL_MS).unwrap_or(0),
            ),
            fail_after: directive(&headers, directives::FAIL_AFTER_CHUNKS),
            stall_after: directive(&headers, directives::STALL_AFTER_CHUNKS),
            script,
            leak: echo.stream.then(|| echo.raw_key_text()),
            hold: Duration::from_millis(
                directive(&headers, directives::FINISH_THEN_HOLD_MS).unwrap_or(0),
            ),
        };
        return Ok(stream_response(shared, plan));
    }
    if call.route == Route::Messages {
        let text = if echo.ok_body {
            format!("Your key is {}.", echo.raw_key_text())
        } else {
            default_text()
        };
        return Ok(anthropic_message(&call.model, &call.reply, text));
    }
    if echo.ok_body {
        let content = format!("Your key is {}.", echo.raw_key_text());
        return Ok(completion_response(&call.model, &call.reply, content));
    }
    let overhead = 330 + call.model.len();
    let content = "x".repeat(options.body_bytes.saturating_sub(overhead).max(1));
    if call.route == Route::Completions {
        return Ok(text_completion_response(&call.model, content));
    }
    Ok(completion_response(&call.model, &call.reply, content))
}

fn text_completion_response(model: &str, text: String) -> Response<FakeBody> {
    let body = serde_json::json!({
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": usage::PROMPT_TOKENS, "completion_tokens": usage::COMPLETION_TOKENS, "total_tokens": usage::PROMPT_TOKENS + usage::COMPLETION_TOKENS},
    });
    json_response(StatusCode::OK, &body)
}

/// One embedding per input; each input's vector differs, so answers can be told apart.
fn embeddings_response(model: &str, inputs: usize) -> Response<FakeBody> {
    let data: Vec<serde_json::Value> = (0..inputs.max(1))
        .map(|i| serde_json::json!({"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3, i]}))
        .collect();
    let body = serde_json::json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": usage::PROMPT_TOKENS, "total_tokens": usage::PROMPT_TOKENS},
    });
    json_response(StatusCode::OK, &body)
}

/// What Anthropic answers a request without a key (`x-api-key` or a bearer token) or version.
fn anthropic_header_refusal(headers: &HeaderMap) -> Option<Response<FakeBody>> {
    // Anthropic's SDKs send the key as a bearer token since their 2.x versions.
    if !headers.contains_key("x-api-key") && !headers.contains_key("authorization") {
        let message = "x-api-key header is required";
        return Some(anthropic_error(StatusCode::UNAUTHORIZED, message));
    }
    if !headers.contains_key("anthropic-version") {
        let message = "anthropic-version: header is required";
        return Some(anthropic_error(StatusCode::BAD_REQUEST, message));
    }
    None
}

/// An error in Anthropic's envelope, its `type` chosen by the status as Anthropic does.
fn anthropic_error(status: StatusCode, message: &str) -> Response<FakeBody> {
    let kind = match status.as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    };
    let body = serde_json::json!({"type": "error", "error": {"type": kind, "message": message}});
    json_response(status, &body)
}

/// The text of a non-streamed Anthropic answer: what the default stream's chunks add up to.
fn default_text() -> String {
    (0..DEFAULT_STREAM_CHUNKS).map(text_piece).collect()
}

fn text_piece(i: u64) -> String {
    format!("tok{i} ")
}

fn tool_reply_text(results: &str) -> [String; 2] {
    ["The tool said: ".to_string(), results.to_string()]
}

fn tool_call_id(route: Route, i: usize) -> String {
    match route {
        Route::Messages => format!("toolu_fake_{i}"),
        _ => format!("call_fake_{i}"),
    }
}

fn anthropic_usage(output_tokens: u64) -> serde_json::Value {
    serde_json::json!({
        "input_tokens": usage::ANTHROPIC_INPUT_TOKENS,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": usage::CACHE_CREATION_TOKENS,
        "cache_read_input_tokens": usage::CACHE_READ_TOKENS,
    })
}

fn anthropic_message(model: &str, reply: &Reply, text: String) -> Response<FakeBody> {
    let (content, stop_reason) = match reply {
        Reply::Text => (
            serde_json::json!([{"type": "text", "text": text}]),
            "end_turn",
        ),
        Reply::ToolResults(results) => {
            let text = tool_reply_text(results).concat();
            (
                serde_json::json!([{"type": "text", "text": text}]),
                "end_turn",
            )
        }
        Reply::ToolCalls(names) => {
            let calls = names
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    serde_json::json!({"type": "tool_use", "id": tool_call_id(Route::Messages, i), "name": name, "input": tool_arguments(name)})
                })
                .collect();
            (serde_json::Value::Array(calls), "tool_use")
        }
    };
    let body = serde_json::json!({
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": null,
        "usage": anthropic_usage(usage::ANTHROPIC_OUTPUT_TOKENS),
    });
    json_response(StatusCode::OK, &body)
}

fn full(body: String) -> FakeBody {
    Full::new(Bytes::from(body))
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn completion_response(model: &str, reply: &Reply, content: String) -> Response<FakeBody> {
    let (message, finish_reason) = match reply {
        Reply::Text => (
            serde_json::json!({"role": "assistant", "content": content}),
            "stop",
        ),
        Reply::ToolResults(results) => (
            serde_json::json!({"role": "assistant", "content": tool_reply_text(results).concat()}),
            "stop",
        ),
        Reply::ToolCalls(names) => {
            let calls: Vec<serde_json::Value> = names
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    serde_json::json!({"id": tool_call_id(Route::Chat, i), "type": "function", "function": {"name": name, "arguments": tool_arguments(name).to_string()}})
                })
                .collect();
            (
                serde_json::json!({"role": "assistant", "content": null, "tool_calls": calls}),
                "tool_calls",
            )
        }
    };
    let body = serde_json::json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": usage::PROMPT_TOKENS, "completion_tokens": usage::COMPLETION_TOKENS, "total_tokens": usage::PROMPT_TOKENS + usage::COMPLETION_TOKENS},
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

/// The response with each body frame cut into frames of at most `max` bytes, sent
/// [`DRIP_PAUSE`] apart. A body of known length keeps its `content-length`, as a provider's
/// JSON answer would, so only the pacing changes.
fn drip(response: Response<FakeBody>, max: usize) -> Response<FakeBody> {
    let (mut parts, body) = response.into_parts();
    if let Some(len) = body.size_hint().exact() {
        parts
            .headers
            .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    }
    let pieces = stream::unfold(
        (body.into_data_stream(), Bytes::new(), false),
        move |(mut frames, mut pending, mut started)| async move {
            loop {
                if !pending.is_empty() {
                    if started {
                        tokio::time::sleep(DRIP_PAUSE).await;
                    }
                    started = true;
                    let piece = pending.split_to(max.min(pending.len()));
                    return Some((Ok(Frame::data(piece)), (frames, pending, started)));
                }
                match frames.next().await? {
                    Ok(data) => pending = data,
                    Err(e) => return Some((Err(e), (frames, pending, started))),
                }
            }
        },
    );
    Response::from_parts(parts, BodyExt::boxed_unsync(StreamBody::new(pieces)))
}

/// What one SSE response sends.
struct StreamPlan {
    chunks: u64,
    interval: Duration,
    /// Reset the connection after this many chunks.
    fail_after: Option<u64>,
    /// Stop sending, connection open, after this many chunks.
    stall_after: Option<u64>,
    script: Script,
    /// A key to leak in one chunk, split across two frames.
    leak: Option<String>,
    /// How long the body stays open after the last event.
    hold: Duration,
}

impl StreamPlan {
    /// The chunk whose content leaks the key: the second, so that the stream has started
    /// normally before it, or the only one.
    fn leak_at(&self) -> Option<u64> {
        self.leak
            .as_ref()
            .map(|_| self.chunks.saturating_sub(1).min(1))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Chat,
    /// OpenAI's legacy text completions.
    Completion,
    Anthropic,
}

/// The events of a stream: its chunks, then a tail sent once they are all out (usage and
/// `[DONE]`, or Anthropic's closing events).
enum Script {
    /// Text, one piece per chunk: `pieces` when given, else `tok{i} `.
    Text {
        dialect: Dialect,
        model: String,
        include_usage: bool,
        pieces: Option<Vec<String>>,
    },
    /// Chunks written out in full (tool calls).
    Given { chunks: Vec<Bytes>, tail: Bytes },
}

impl Script {
    fn for_call(call: &Call, leaking: bool) -> Self {
        let dialect = match call.route {
            Route::Messages => Dialect::Anthropic,
            Route::Completions => Dialect::Completion,
            _ => Dialect::Chat,
        };
        let text = |pieces| Self::Text {
            dialect,
            model: call.model.clone(),
            include_usage: call.ask.include_usage,
            pieces,
        };
        match &call.reply {
            _ if leaking => text(None),
            Reply::Text => text(None),
            Reply::ToolResults(results) => text(Some(tool_reply_text(results).to_vec())),
            Reply::ToolCalls(names) => match dialect {
                Dialect::Chat => chat_tool_stream(&call.model, names, call.ask.include_usage),
                Dialect::Completion => text(None),
                Dialect::Anthropic => anthropic_tool_stream(&call.model, names),
            },
        }
    }

    /// How many chunks the stream has, when the script decides it.
    fn chunks(&self) -> Option<u64> {
        let len = match self {
            Self::Text { pieces: None, .. } => return None,
            Self::Text {
                pieces: Some(pieces),
                ..
            } => pieces.len(),
            Self::Given { chunks, .. } => chunks.len(),
        };
        u64::try_from(len).ok()
    }

    /// Chunk `i`, with `leak` as its text if given; `last` when no chunk follows it.
    fn chunk(&self, i: u64, last: bool, leak: Option<&str>) -> Bytes {
        let Self::Text {
            dialect,
            model,
            pieces,
            ..
        } = self
        else {
            let Self::Given { chunks, .. } = self else {
                return Bytes::new();
            };
            return usize::try_from(i)
                .ok()
                .and_then(|i| chunks.get(i).cloned())
                .unwrap_or_default();
        };
        let text = match (leak, pieces) {
            (Some(key), _) => format!("leaked {key} here"),
            (None, Some(pieces)) => usize::try_from(i)
                .ok()
                .and_then(|i| pieces.get(i).cloned())
                .unwrap_or_default(),
            (None, None) => text_piece(i),
        };
        match dialect {
            // Like OpenAI, the last chunk says why the answer ended.
            Dialect::Chat => chat_chunk(
                model,
                serde_json::json!({"content": text}),
                last.then_some("stop"),
            ),
            Dialect::Completion => text_completion_chunk(model, &text, last.then_some("stop")),
            Dialect::Anthropic => {
                let mut events = if i == 0 {
                    anthropic_text_start(model)
                } else {
                    String::new()
                };
                events.push_str(&anthropic_event(
                    "content_block_delta",
                    serde_json::json!({"index": 0, "delta": {"type": "text_delta", "text": text}}),
                ));
                Bytes::from(events)
            }
        }
    }

    /// What follows the last chunk, for a stream that had `chunks` of them.
    fn tail(&self, chunks: u64) -> Bytes {
        match self {
            Self::Given { tail, .. } => tail.clone(),
            Self::Text {
                dialect: dialect @ (Dialect::Chat | Dialect::Completion),
                model,
                include_usage,
                ..
            } => chat_tail(*dialect, model, chunks, *include_usage),
            Self::Text {
                dialect: Dialect::Anthropic,
                model,
                ..
            } => {
                let mut events = if chunks == 0 {
                    anthropic_text_start(model)
                } else {
                    String::new()
                };
                events.push_str(&anthropic_event(
                    "content_block_stop",
                    serde_json::json!({"index": 0}),
                ));
                events.push_str(&anthropic_end("end_turn", chunks));
                Bytes::from(events)
            }
        }
    }
}

fn chat_chunk(model: &str, delta: serde_json::Value, finish_reason: Option<&str>) -> Bytes {
    let event = serde_json::json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    });
    Bytes::from(format!("data: {event}\n\n"))
}

fn text_completion_chunk(model: &str, text: &str, finish_reason: Option<&str>) -> Bytes {
    let event = serde_json::json!({
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish_reason}],
    });
    Bytes::from(format!("data: {event}\n\n"))
}

/// The usage chunk (when asked for) and `[DONE]`.
fn chat_tail(dialect: Dialect, model: &str, chunks: u64, include_usage: bool) -> Bytes {
    let mut tail = String::new();
    if include_usage {
        let (id, object) = match dialect {
            Dialect::Completion => ("cmpl-fake", "text_completion"),
            _ => ("chatcmpl-fake", "chat.completion.chunk"),
        };
        let usage = serde_json::json!({
            "id": id,
            "object": object,
            "created": 1_700_000_000,
            "model": model,
            "choices": [],
            "usage": {"prompt_tokens": usage::PROMPT_TOKENS, "completion_tokens": chunks, "total_tokens": usage::PROMPT_TOKENS.saturating_add(chunks)},
        });
        tail.push_str(&format!("data: {usage}\n\n"));
    }
    tail.push_str("data: [DONE]\n\n");
    Bytes::from(tail)
}

/// A string split in two at its middle character, so that a reader must join the pieces.
fn halves(s: &str) -> (&str, &str) {
    let middle = s.chars().count() / 2;
    let at = s.char_indices().nth(middle).map_or(s.len(), |(at, _)| at);
    s.split_at(at)
}

/// Per call: its id and name, then its arguments in two pieces; then the finish reason.
fn chat_tool_stream(model: &str, names: &[String], include_usage: bool) -> Script {
    let mut chunks = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut header = serde_json::json!({"tool_calls": [{"index": i, "id": tool_call_id(Route::Chat, i), "type": "function", "function": {"name": name, "arguments": ""}}]});
        if i == 0 {
            header["role"] = "assistant".into();
            header["content"] = serde_json::Value::Null;
        }
        chunks.push(chat_chunk(model, header, None));
        let arguments = tool_arguments(name).to_string();
        let (first, second) = halves(&arguments);
        for piece in [first, second] {
            let delta =
                serde_json::json!({"tool_calls": [{"index": i, "function": {"arguments": piece}}]});
            chunks.push(chat_chunk(model, delta, None));
        }
    }
    chunks.push(chat_chunk(model, serde_json::json!({}), Some("tool_calls")));
    let count = u64::try_from(chunks.len()).unwrap_or(u64::MAX);
    Script::Given {
        tail: chat_tail(Dialect::Chat, model, count, include_usage),
        chunks,
    }
}

fn anthropic_event(kind: &str, mut data: serde_json::Value) -> String {
    data["type"] = kind.into();
    format!("event: {kind}\ndata: {data}\n\n")
}

fn anthropic_message_start(model: &str) -> String {
    anthropic_event(
        "message_start",
        serde_json::json!({"message": {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": null,
            "stop_sequence": null,
            "usage": anthropic_usage(1),
        }}),
    )
}

/// `message_start`, the text block's start and a `ping`, as Anthropic opens a text answer.
fn anthropic_text_start(model: &str) -> String {
    let mut events = anthropic_message_start(model);
    events.push_str(&anthropic_event(
        "content_block_start",
        serde_json::json!({"index": 0, "content_block": {"type": "text", "text": ""}}),
    ));
    events.push_str(&anthropic_event("ping", serde_json::json!({})));
    events
}

/// `message_delta` with the stop reason and output tokens, then `message_stop`.
fn anthropic_end(stop_reason: &str, output_tokens: u64) -> String {
    let mut events = anthropic_event(
        "message_delta",
        serde_json::json!({"delta": {"stop_reason": stop_reason, "stop_sequence": null}, "usage": {"output_tokens": output_tokens}}),
    );
    events.push_str(&anthropic_event("message_stop", serde_json::json!({})));
    events
}

/// Per call: its block's start, its input in two `input_json_delta` pieces, its block's stop.
fn anthropic_tool_stream(model: &str, names: &[String]) -> Script {
    let mut chunks = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut start = if i == 0 {
            let mut opening = anthropic_message_start(model);
            opening.push_str(&anthropic_event("ping", serde_json::json!({})));
            opening
        } else {
            String::new()
        };
        start.push_str(&anthropic_event(
            "content_block_start",
            serde_json::json!({"index": i, "content_block": {"type": "tool_use", "id": tool_call_id(Route::Messages, i), "name": name, "input": {}}}),
        ));
        chunks.push(Bytes::from(start));
        let input = tool_arguments(name).to_string();
        let (first, second) = halves(&input);
        for piece in [first, second] {
            chunks.push(Bytes::from(anthropic_event(
                "content_block_delta",
                serde_json::json!({"index": i, "delta": {"type": "input_json_delta", "partial_json": piece}}),
            )));
        }
        chunks.push(Bytes::from(anthropic_event(
            "content_block_stop",
            serde_json::json!({"index": i}),
        )));
    }
    let count = u64::try_from(chunks.len()).unwrap_or(u64::MAX);
    Script::Given {
        tail: Bytes::from(anthropic_end("tool_use", count)),
        chunks,
    }
}

enum Step {
    Chunk(u64),
    Done,
    Fail,
    Stall,
    End,
}

struct StreamState {
    sent: u64,
    guard: AbandonGuard,
    /// The second half of a split event, sent after [`SPLIT_PAUSE`].
    rest_of_split: Option<Bytes>,
}

fn stream_response(shared: &Arc<Shared>, plan: StreamPlan) -> Response<FakeBody> {
    let plan = Arc::new(plan);
    let state = StreamState {
        sent: 0,
        guard: AbandonGuard::new(shared),
        rest_of_split: None,
    };
    let steps = stream::unfold(state, move |mut state| {
        let plan = Arc::clone(&plan);
        async move {
            if let Some(rest) = state.rest_of_split.take() {
                tokio::time::sleep(SPLIT_PAUSE).await;
                return Some((Ok(Frame::data(rest)), state));
            }
            let sent = state.sent;
            let step = if plan.fail_after == Some(sent) {
                Step::Fail
            } else if plan.stall_after == Some(sent) {
                Step::Stall
            } else if sent < plan.chunks {
                Step::Chunk(sent)
            } else if sent == plan.chunks {
                Step::Done
            } else {
                Step::End
            };
            match step {
                Step::Chunk(i) => {
                    if i > 0 && !plan.interval.is_zero() {
                        tokio::time::sleep(plan.interval).await;
                    }
                    let leak = plan.leak.as_deref().filter(|_| plan.leak_at() == Some(i));
                    let last = i.saturating_add(1) == plan.chunks;
                    let mut event = plan.script.chunk(i, last, leak);
                    state.sent = sent.saturating_add(1);
                    if let Some(key) = leak {
                        // In the middle of the key as written (JSON escaping may move it).
                        let split = event
                            .windows(key.len().max(1))
                            .position(|w| w == key.as_bytes())
                            .map_or(event.len() / 2, |at| at + key.len() / 2);
                        state.rest_of_split = Some(event.split_off(split));
                    }
                    Some((Ok(Frame::data(event)), state))
                }
                Step::Done => {
                    state.guard.armed = false;
                    state.sent = sent.saturating_add(1);
                    Some((Ok(Frame::data(plan.script.tail(plan.chunks))), state))
                }
                Step::Fail => {
                    // Let the chunks already written leave before the connection is cut.
                    tokio::time::sleep(plan.interval.max(Duration::from_millis(20))).await;
                    state.guard.armed = false;
                    state.sent = u64::MAX;
                    Some((
                        Err(std::io::Error::other("fake upstream failed mid-stream")),
                        state,
                    ))
                }
                Step::Stall => {
                    std::future::pending::<()>().await;
                    None
                }
                Step::End => {
                    if !plan.hold.is_zero() {
                        tokio::time::sleep(plan.hold).await;
                    }
                    None
                }
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

#[cfg(test)]
mod tests;

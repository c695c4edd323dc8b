//! The built-in mock provider: deterministic OpenAI-format (and, in [`messages`],
//! Anthropic-format) answers with no network and no key, for local development, `dev`
//! environments that must spend nothing, and tests.
//!
//! The same prompt always gets the same text; `usage` counts what was sent and returned
//! the way a provider would (about four characters a token for prompts, one word a token
//! for completions).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use serde_json::{json, Value};
use tokio::time::Sleep;

use crate::config::MockConfig;
use crate::error::ProxyError;

mod messages;

const VOCABULARY: &[&str] = &[
    "the",
    "mesh",
    "routes",
    "every",
    "request",
    "through",
    "a",
    "local",
    "sidecar",
    "that",
    "adds",
    "credentials",
    "and",
    "streams",
    "tokens",
    "as",
    "they",
    "arrive",
    "while",
    "limits",
    "keep",
    "spend",
    "in",
    "check",
    "so",
    "apps",
    "never",
    "see",
    "keys",
    "model",
    "answers",
    "quickly",
    "with",
    "clear",
    "errors",
    "when",
    "something",
    "fails",
    "upstream",
    "retries",
    "only",
    "what",
    "is",
    "safe",
    "metrics",
    "show",
    "latency",
    "cost",
    "per",
    "endpoint",
    "pods",
    "call",
    "models",
    "from",
    "loopback",
    "this",
    "reply",
    "comes",
    "mock",
    "provider",
    "deterministic",
    "text",
    "for",
    "testing",
];

/// The answer to one mock request, before its latency has been waited out.
pub enum MockResponse {
    Json(Bytes),
    Stream(MockStream),
}

/// Answers `POST /v1{api_path}` with the request's JSON `body`; `model` is the endpoint's
/// upstream model, reported back as a provider would.
pub fn respond(
    api_path: &str,
    body: &[u8],
    model: &str,
    config: &MockConfig,
    request_id: &str,
) -> Result<MockResponse, ProxyError> {
    let request: Value =
        serde_json::from_slice(body).map_err(|e| ProxyError::MalformedJson(e.to_string()))?;
    let id_suffix: String = request_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(24)
        .collect();
    match api_path {
        "/chat/completions" => Ok(chat(
            &request,
            model,
            config,
            &format!("chatcmpl-{id_suffix}"),
        )),
        "/completions" => Ok(completion(
            &request,
            model,
            config,
            &format!("cmpl-{id_suffix}"),
        )),
        "/embeddings" => embeddings(&request, model, config),
        "/messages" => Ok(messages::message(
            &request,
            model,
            config,
            &format!("msg_{id_suffix}"),
        )),
        "/messages/count_tokens" => Ok(messages::count_tokens(&request)),
        other => Err(ProxyError::NotImplementedByMock(format!("/v1{other}"))),
    }
}

struct Reply {
    tokens: Vec<&'static str>,
    prompt_tokens: u64,
    finish_reason: &'static str,
}

fn reply_for(prompt: &str, prompt_tokens: u64, request: &Value, config: &MockConfig) -> Reply {
    let wanted = u64::from(config.completion_tokens);
    let max = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| request.get(k).and_then(Value::as_u64))
        .unwrap_or(wanted);
    let count = wanted.min(max.max(1));
    let mut rng = Rng::seeded(prompt);
    let tokens = (0..count)
        .map(|_| VOCABULARY[rng.below(VOCABULARY.len())])
        .collect();
    Reply {
        tokens,
        prompt_tokens,
        finish_reason: if count < wanted { "length" } else { "stop" },
    }
}

impl Reply {
    fn text(&self) -> String {
        self.tokens.join(" ")
    }

    fn usage(&self) -> Value {
        let completion = self.tokens.len() as u64;
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }

    /// Each token as it is streamed: the first bare, the others with their leading space.
    fn pieces(&self) -> impl Iterator<Item = String> + '_ {
        self.tokens.iter().enumerate().map(|(i, t)| {
            if i == 0 {
                (*t).to_string()
            } else {
                format!(" {t}")
            }
        })
    }
}

fn chat(request: &Value, model: &str, config: &MockConfig, id: &str) -> MockResponse {
    let messages = request
        .get("messages")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let mut prompt = String::new();
    // Per-message overhead as in OpenAI's accounting for chat formats.
    let mut prompt_tokens = 3;
    for message in messages {
        let text = content_text(message.get("content"));
        prompt_tokens += 4 + estimate_tokens(&text);
        prompt.push_str(&text);
        prompt.push('\n');
    }
    let reply = reply_for(&prompt, prompt_tokens, request, config);
    let created = unix_now();
    if !is_stream(request) {
        return MockResponse::Json(to_bytes(&json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": "llmesh-mock",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": reply.text(), "refusal": null},
                "logprobs": null,
                "finish_reason": reply.finish_reason,
            }],
            "usage": reply.usage(),
        })));
    }
    let include_usage = wants_usage(request);
    let chunk = |delta: Value, finish: Option<&str>| {
        let mut c = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "llmesh-mock",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
    events.extend(reply.pieces().map(|p| chunk(json!({"content": p}), None)));
    events.push(chunk(json!({}), Some(reply.finish_reason)));
    if include_usage {
        events.push(json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "llmesh-mock",
            "choices": [],
            "usage": reply.usage(),
        }));
    }
    MockResponse::Stream(MockStream::new(events, config.token_interval.get()))
}

fn completion(request: &Value, model: &str, config: &MockConfig, id: &str) -> MockResponse {
    let prompt = match request.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    };
    let reply = reply_for(&prompt, estimate_tokens(&prompt), request, config);
    let created = unix_now();
    if !is_stream(request) {
        return MockResponse::Json(to_bytes(&json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": "llmesh-mock",
            "choices": [{"index": 0, "text": reply.text(), "logprobs": null, "finish_reason": reply.finish_reason}],
            "usage": reply.usage(),
        })));
    }
    let chunk = |text: &str, finish: Option<&str>| {
        json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": "llmesh-mock",
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
        })
    };
    let mut events: Vec<Value> = reply.pieces().map(|p| chunk(&p, None)).collect();
    events.push(chunk("", Some(reply.finish_reason)));
    if wants_usage(request) {
        events.push(json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [], "usage": reply.usage(),
        }));
    }
    MockResponse::Stream(MockStream::new(events, config.token_interval.get()))
}

fn embeddings(
    request: &Value,
    model: &str,
    config: &MockConfig,
) -> Result<MockResponse, ProxyError> {
    let inputs: Vec<String> = match request.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        // Token arrays: one input of token ids, or many.
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
            vec![Value::Array(items.clone()).to_string()]
        }
        Some(Value::Array(items)) if items.iter().all(Value::is_array) => {
            items.iter().map(Value::to_string).collect()
        }
        _ => {
            return Err(ProxyError::MalformedJson(
                "'input' must be a string, an array of strings, or token arrays".into(),
            ))
        }
    };
    let dimensions = request
        .get("dimensions")
        .and_then(Value::as_u64)
        .filter(|d| (1..=16_384).contains(d))
        .unwrap_or(u64::from(config.embedding_dimensions)) as usize;
    let base64 = request.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let mut prompt_tokens = 0;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            prompt_tokens += estimate_tokens(input);
            let vector = embedding_vector(input, dimensions);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Ok(MockResponse::Json(to_bytes(&json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }))))
}

/// A unit vector determined by the text alone.
fn embedding_vector(text: &str, dimensions: usize) -> Vec<f32> {
    let mut rng = Rng::seeded(text);
    let raw: Vec<f32> = (0..dimensions).map(|_| rng.unit() * 2.0 - 1.0).collect();
    let norm = raw
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::MIN_POSITIVE);
    raw.iter().map(|x| x / norm).collect()
}

fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn estimate_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4)
}

fn is_stream(request: &Value) -> bool {
    request
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn wants_usage(request: &Value) -> bool {
    request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn to_bytes(value: &Value) -> Bytes {
    Bytes::from(value.to_string())
}

/// xorshift64*, seeded by FNV-1a of the text: small, fast, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn seeded(text: &str) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in text.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        Self(h | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// A paced Server-Sent Events body: one chunk per event, `interval` apart, then `[DONE]`.
pub struct MockStream {
    events: VecDeque<Bytes>,
    interval: Duration,
    pause: Option<Pin<Box<Sleep>>>,
}

impl MockStream {
    /// OpenAI's form: unnamed `data:` events, then `[DONE]`.
    fn new(chunks: Vec<Value>, interval: Duration) -> Self {
        let mut events: VecDeque<Bytes> = chunks
            .iter()
            .map(|c| Bytes::from(format!("data: {c}\n\n")))
            .collect();
        events.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        Self::of_events(events, interval)
    }

    /// Events already in their wire form.
    fn of_events(events: VecDeque<Bytes>, interval: Duration) -> Self {
        Self {
            events,
            interval,
            pause: None,
        }
    }
}

impl Body for MockStream {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(pause) = self.pause.as_mut() {
            if pause.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.pause = None;
        }
        let Some(event) = self.events.pop_front() else {
            return Poll::Ready(None);
        };
        // The role chunk goes at once; pacing applies between tokens, before [DONE] included.
        if !self.interval.is_zero() && !self.events.is_empty() {
            self.pause = Some(Box::pin(tokio::time::sleep(self.interval)));
        }
        Poll::Ready(Some(Ok(Frame::data(event))))
    }

    fn is_end_stream(&self) -> bool {
        self.events.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn json_of(response: MockResponse) -> Value {
        match response {
            MockResponse::Json(b) => serde_json::from_slice(&b).unwrap(),
            MockResponse::Stream(_) => panic!("expected JSON"),
        }
    }

    fn chat_request(extra: Value) -> Vec<u8> {
        let mut body = json!({"model": "x", "messages": [{"role": "user", "content": "Say hello to the mesh"}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body.to_string().into_bytes()
    }

    #[test]
    fn chat_is_deterministic_and_counts_usage() {
        let cfg = MockConfig::default();
        let a = json_of(
            respond(
                "/chat/completions",
                &chat_request(json!({})),
                "mock-1",
                &cfg,
                "r1",
            )
            .unwrap(),
        );
        let b = json_of(
            respond(
                "/chat/completions",
                &chat_request(json!({})),
                "mock-1",
                &cfg,
                "r2",
            )
            .unwrap(),
        );
        assert_eq!(
            a["choices"][0]["message"]["content"],
            b["choices"][0]["message"]["content"]
        );
        let text = a["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(text.split(' ').count(), 16);
        assert_eq!(a["model"], "mock-1");
        assert_eq!(a["usage"]["completion_tokens"], 16);
        // 3 + (4 + ceil(21 / 4)) for one 21-character message
        assert_eq!(a["usage"]["prompt_tokens"], 13);
        assert_eq!(a["usage"]["total_tokens"], 29);
        assert_eq!(a["choices"][0]["finish_reason"], "stop");
    }

    #[test]
    fn max_tokens_truncates_with_length_reason() {
        let cfg = MockConfig::default();
        let r = json_of(
            respond(
                "/chat/completions",
                &chat_request(json!({"max_tokens": 3})),
                "m",
                &cfg,
                "r",
            )
            .unwrap(),
        );
        assert_eq!(r["usage"]["completion_tokens"], 3);
        assert_eq!(r["choices"][0]["finish_reason"], "length");
    }

    #[tokio::test]
    async fn streams_one_event_per_token_then_usage_and_done() {
        let cfg = MockConfig::default();
        let body = chat_request(json!({"stream": true, "stream_options": {"include_usage": true}}));
        let MockResponse::Stream(mut stream) =
            respond("/chat/completions", &body, "m", &cfg, "r").unwrap()
        else {
            panic!("expected a stream");
        };
        let mut events = Vec::new();
        while let Some(frame) = stream.frame().await {
            events.push(String::from_utf8(frame.unwrap().into_data().unwrap().to_vec()).unwrap());
        }
        // role + 16 tokens + finish + usage + [DONE]
        assert_eq!(events.len(), 20);
        assert!(events
            .iter()
            .all(|e| e.starts_with("data: ") && e.ends_with("\n\n")));
        assert_eq!(events[19], "data: [DONE]\n\n");
        let usage: Value =
            serde_json::from_str(events[18].trim_start_matches("data: ").trim()).unwrap();
        assert_eq!(usage["usage"]["completion_tokens"], 16);
        let text: String = events[1..17]
            .iter()
            .map(|e| {
                let v: Value = serde_json::from_str(e.trim_start_matches("data: ").trim()).unwrap();
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        let full = json_of(
            respond(
                "/chat/completions",
                &chat_request(json!({})),
                "m",
                &cfg,
                "r",
            )
            .unwrap(),
        );
        assert_eq!(text, full["choices"][0]["message"]["content"]);
    }

    #[test]
    fn embeddings_are_unit_vectors_in_both_encodings() {
        let cfg = MockConfig::default();
        let body = json!({"model": "e", "input": ["a", "b"], "dimensions": 8}).to_string();
        let r = json_of(respond("/embeddings", body.as_bytes(), "e", &cfg, "r").unwrap());
        let v: Vec<f64> = serde_json::from_value(r["data"][0]["embedding"].clone()).unwrap();
        assert_eq!(v.len(), 8);
        assert!((v.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-3);
        let body =
            json!({"model": "e", "input": "a", "dimensions": 8, "encoding_format": "base64"})
                .to_string();
        let r = json_of(respond("/embeddings", body.as_bytes(), "e", &cfg, "r").unwrap());
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(r["data"][0]["embedding"].as_str().unwrap())
            .unwrap();
        let decoded: Vec<f32> = bytes
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(decoded.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(), v);
    }

    #[test]
    fn unsupported_paths_say_so() {
        let err = respond("/responses", b"{}", "m", &MockConfig::default(), "r")
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "The mock provider does not implement /v1/responses."
        );
    }
}

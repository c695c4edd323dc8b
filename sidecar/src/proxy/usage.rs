//! Reads `usage` (and the finish reasons) from a response as its frames pass by, without
//! holding the response back:
//! for Server-Sent Events, line by line across frame boundaries (an event split over two
//! reads is still seen whole); for JSON, from the body's tail, where providers put `usage`.

use std::sync::LazyLock;

use memchr::memmem::Finder;
use serde::Deserialize;

/// A streamed line longer than this is not inspected (it cannot be a usage event).
const MAX_SSE_LINE: usize = 256 * 1024;
/// How much of a JSON body's end is kept to find `usage` in.
const JSON_TAIL: usize = 8 * 1024;
/// Finish reasons kept per response (one per choice; `n` is rarely above a few).
const MAX_FINISH_REASONS: usize = 8;
/// Longer values are not finish reasons (OpenAI's are `stop`, `length`, `tool_calls`, ...).
const MAX_FINISH_REASON_LEN: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// All input tokens, cached or not.
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Input tokens read from the provider's prompt cache (included in `prompt_tokens`).
    pub cache_read_tokens: u64,
    /// Input tokens written to the prompt cache (Anthropic; included in `prompt_tokens`).
    pub cache_write_tokens: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// Every naming scheme: Chat Completions (`prompt_tokens`, `prompt_tokens_details`),
/// Responses (`input_tokens`, `input_tokens_details`) and Anthropic Messages (`input_tokens`
/// without the cached tokens, which it reports apart).
#[derive(Deserialize, Default)]
struct WireUsage {
    #[serde(alias = "input_tokens")]
    prompt_tokens: Option<u64>,
    #[serde(alias = "output_tokens")]
    completion_tokens: Option<u64>,
    total_tokens: Option<u64>,
    #[serde(alias = "input_tokens_details")]
    prompt_tokens_details: Option<CachedDetails>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
}

#[derive(Deserialize, Default)]
struct CachedDetails {
    cached_tokens: Option<u64>,
    /// What the sidecar's translation from Anthropic's usage puts here (and OpenAI's
    /// Responses API names so).
    cache_write_tokens: Option<u64>,
}

impl WireUsage {
    fn into_usage(self) -> Option<Usage> {
        self.merged_into(None)
    }

    /// This report over an earlier one of the same response: Anthropic's streams give the
    /// input in `message_start` and the output in `message_delta`.
    fn merged_into(self, earlier: Option<Usage>) -> Option<Usage> {
        let anthropic_cache = self
            .cache_read_input_tokens
            .unwrap_or(0)
            .saturating_add(self.cache_creation_input_tokens.unwrap_or(0));
        let prompt = match (self.prompt_tokens, earlier) {
            (Some(p), _) => p.saturating_add(anthropic_cache),
            (None, Some(e)) => e.prompt_tokens,
            (None, None) => return None,
        };
        let completion = self
            .completion_tokens
            .or_else(|| self.total_tokens.map(|t| t.saturating_sub(prompt)))
            .or(earlier.map(|e| e.completion_tokens))
            .unwrap_or(0);
        let details = self.prompt_tokens_details.unwrap_or_default();
        let cache_read = self.cache_read_input_tokens.or(details.cached_tokens);
        let cache_write = self
            .cache_creation_input_tokens
            .or(details.cache_write_tokens);
        Some(Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cache_read_tokens: cache_read
                .or(earlier.map(|e| e.cache_read_tokens))
                .unwrap_or(0),
            cache_write_tokens: cache_write
                .or(earlier.map(|e| e.cache_write_tokens))
                .unwrap_or(0),
        })
    }
}

pub enum UsageTap {
    Sse {
        line: Vec<u8>,
        skipping_long_line: bool,
        data_events: u64,
        usage: Option<Usage>,
        finish_reasons: Vec<String>,
        /// The stream's last event passed (`[DONE]`, or the Responses API's
        /// `response.completed`/`incomplete`/`failed`, Anthropic's `message_stop`): an app
        /// closing the connection after it is done, not gone.
        ended: bool,
    },
    Json {
        tail: Vec<u8>,
    },
}

impl UsageTap {
    pub fn new(sse: bool) -> Self {
        if sse {
            Self::Sse {
                line: Vec::new(),
                skipping_long_line: false,
                data_events: 0,
                usage: None,
                finish_reasons: Vec::new(),
                ended: false,
            }
        } else {
            Self::Json { tail: Vec::new() }
        }
    }

    pub fn is_sse(&self) -> bool {
        matches!(self, Self::Sse { .. })
    }

    pub fn observe(&mut self, data: &[u8]) {
        match self {
            Self::Json { tail } => {
                if data.len() >= JSON_TAIL {
                    tail.clear();
                    tail.extend_from_slice(&data[data.len() - JSON_TAIL..]);
                } else {
                    let overflow = (tail.len() + data.len()).saturating_sub(JSON_TAIL);
                    tail.drain(..overflow);
                    tail.extend_from_slice(data);
                }
            }
            Self::Sse {
                line,
                skipping_long_line,
                data_events,
                usage,
                finish_reasons,
                ended,
            } => {
                let mut rest = data;
                while let Some(newline) = memchr::memchr(b'\n', rest) {
                    if !*skipping_long_line {
                        line.extend_from_slice(&rest[..newline]);
                        *ended |= inspect_line(line, data_events, usage, finish_reasons);
                    }
                    line.clear();
                    *skipping_long_line = false;
                    rest = &rest[newline + 1..];
                }
                if !*skipping_long_line {
                    if line.len() + rest.len() > MAX_SSE_LINE {
                        line.clear();
                        *skipping_long_line = true;
                    } else {
                        line.extend_from_slice(rest);
                    }
                }
            }
        }
    }

    /// The usage the response reported, if it reported one.
    pub fn usage(&self) -> Option<Usage> {
        match self {
            Self::Sse { usage, .. } => *usage,
            Self::Json { tail } => usage_in_json_tail(tail),
        }
    }

    /// The choices' `finish_reason`s (`stop`, `length`, `tool_calls`, ...), in order seen.
    pub fn finish_reasons(&self) -> Vec<String> {
        match self {
            Self::Sse { finish_reasons, .. } => finish_reasons.clone(),
            Self::Json { tail } => {
                let mut found = Vec::new();
                collect_finish_reasons(tail, &mut found);
                found
            }
        }
    }

    /// Whether a stream's final event has passed.
    pub fn stream_ended(&self) -> bool {
        matches!(self, Self::Sse { ended: true, .. })
    }

    /// Data events seen in a stream: one per generated chunk, a fair estimate of completion
    /// tokens when the stream carries no usage.
    pub fn streamed_chunks(&self) -> Option<u64> {
        match self {
            Self::Sse { data_events, .. } => Some(*data_events),
            Self::Json { .. } => None,
        }
    }
}

/// Reads one SSE line; true if it is the stream's final event.
fn inspect_line(
    line: &[u8],
    data_events: &mut u64,
    usage: &mut Option<Usage>,
    finish_reasons: &mut Vec<String>,
) -> bool {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(payload) = line.strip_prefix(b"data:") else {
        return false;
    };
    let payload = payload.trim_ascii_start();
    if payload == b"[DONE]" || payload.starts_with(br#"{"type":"message_stop""#) {
        return true;
    }
    *data_events = data_events.saturating_add(1);
    collect_finish_reasons(payload, finish_reasons);
    if USAGE_KEY.find(payload).is_none() {
        return false;
    }
    #[derive(Deserialize)]
    struct Event {
        usage: Option<WireUsage>,
        /// The Responses API nests it: `{"type":"response.completed","response":{"usage":…}}`.
        response: Option<Nested>,
        /// Anthropic's `message_start`: `{"type":"message_start","message":{"usage":…}}`.
        message: Option<Nested>,
    }
    #[derive(Deserialize)]
    struct Nested {
        usage: Option<WireUsage>,
    }
    if let Ok(event) = serde_json::from_slice::<Event>(payload) {
        let found = event
            .usage
            .or(event.response.and_then(|r| r.usage))
            .or(event.message.and_then(|m| m.usage))
            .and_then(|u| u.merged_into(*usage));
        if found.is_some() {
            *usage = found;
        }
    }
    RESPONSES_END_EVENTS
        .iter()
        .any(|end| end.find(payload).is_some())
}

fn usage_in_json_tail(tail: &[u8]) -> Option<Usage> {
    let key = b"\"usage\"";
    let at = memchr::memmem::rfind(tail, key)?;
    let after_key = tail[at + key.len()..].trim_ascii_start();
    let value = after_key.strip_prefix(b":")?;
    let mut values = serde_json::Deserializer::from_slice(value).into_iter::<WireUsage>();
    values.next()?.ok()?.into_usage()
}

/// Every `"finish_reason":"…"` (Anthropic: `"stop_reason":"…"`) with a string value
/// (streams send `null` until the end).
fn collect_finish_reasons(json: &[u8], out: &mut Vec<String>) {
    collect_reasons(json, &FINISH_REASON_KEY, out);
    collect_reasons(json, &STOP_REASON_KEY, out);
}

fn collect_reasons(json: &[u8], key: &Finder<'_>, out: &mut Vec<String>) {
    let mut rest = json;
    while let Some(at) = key.find(rest) {
        rest = &rest[at + key.needle().len()..];
        let value = rest.trim_ascii_start();
        let Some(value) = value.strip_prefix(b"\"") else {
            continue;
        };
        let Some(end) = value.iter().position(|&b| b == b'"') else {
            return;
        };
        let reason = &value[..end];
        if reason.len() <= MAX_FINISH_REASON_LEN
            && reason
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'_')
            && out.len() < MAX_FINISH_REASONS
        {
            if let Ok(reason) = std::str::from_utf8(reason) {
                if !out.iter().any(|r| r == reason) {
                    out.push(reason.to_string());
                }
            }
        }
    }
}

// Substring searches built once: every event of every stream is searched for these, and a
// byte-by-byte window comparison cost more than forwarding the event.
pub(super) static USAGE_KEY: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"\"usage\""));
static FINISH_REASON_KEY: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"\"finish_reason\":"));
static STOP_REASON_KEY: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"\"stop_reason\":"));
/// The Responses API ends with one of three events.
static RESPONSES_END_EVENTS: LazyLock<[Finder<'static>; 3]> = LazyLock::new(|| {
    [
        b"\"type\":\"response.completed\"".as_slice(),
        b"\"type\":\"response.incomplete\"",
        b"\"type\":\"response.failed\"",
    ]
    .map(Finder::new)
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_from_the_last_stream_chunk_even_split_across_frames() {
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"!\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":2,\"total_tokens\":14}}\n\n",
            "data: [DONE]\n\n"
        )
        .as_bytes();
        for split in [1, 7, 50, 100, 150, stream.len() - 3] {
            let mut tap = UsageTap::new(true);
            tap.observe(&stream[..split]);
            tap.observe(&stream[split..]);
            assert_eq!(
                tap.usage(),
                Some(Usage {
                    prompt_tokens: 12,
                    completion_tokens: 2,
                    ..Default::default()
                }),
                "split at {split}"
            );
            assert_eq!(tap.streamed_chunks(), Some(3));
        }
    }

    #[test]
    fn streams_without_usage_count_their_chunks() {
        let mut tap = UsageTap::new(true);
        tap.observe(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\r\n\r\ndata: {\"choices\":[]}\n\ndata: [DONE]\n\n");
        assert_eq!(tap.usage(), None);
        assert_eq!(tap.streamed_chunks(), Some(2));
    }

    #[test]
    fn anthropic_usage_comes_in_two_events_and_counts_cached_input() {
        let stream = concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"usage\":{\"input_tokens\":10,\"cache_creation_input_tokens\":2,\"cache_read_input_tokens\":3,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
            "event: message_delta\n",
            "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":7}}\n\n",
            "event: message_stop\n",
            "data: {\"type\":\"message_stop\"}\n\n",
        );
        let mut tap = UsageTap::new(true);
        tap.observe(stream.as_bytes());
        assert_eq!(
            tap.usage(),
            Some(Usage {
                prompt_tokens: 15,
                completion_tokens: 7,
                cache_read_tokens: 3,
                cache_write_tokens: 2,
            })
        );
        assert!(tap.stream_ended());
        assert_eq!(tap.finish_reasons(), ["end_turn"]);

        let mut json = UsageTap::new(false);
        json.observe(br#"{"type":"message","stop_reason":"tool_use","usage":{"input_tokens":4,"cache_read_input_tokens":6,"output_tokens":2}}"#);
        assert_eq!(
            json.usage(),
            Some(Usage {
                prompt_tokens: 10,
                completion_tokens: 2,
                cache_read_tokens: 6,
                cache_write_tokens: 0,
            })
        );
    }

    #[test]
    fn openai_cached_tokens_are_part_of_the_prompt() {
        let mut tap = UsageTap::new(false);
        tap.observe(br#"{"usage":{"prompt_tokens":100,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":64}}}"#);
        assert_eq!(
            tap.usage(),
            Some(Usage {
                prompt_tokens: 100,
                completion_tokens: 5,
                cache_read_tokens: 64,
                cache_write_tokens: 0,
            })
        );
    }

    #[test]
    fn responses_api_usage_is_nested() {
        let mut tap = UsageTap::new(true);
        tap.observe(b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":7,\"total_tokens\":12}}}\n\n");
        assert_eq!(
            tap.usage(),
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 7,
                ..Default::default()
            })
        );
    }

    #[test]
    fn usage_from_a_large_json_body_tail() {
        let mut body = br#"{"object":"list","data":[{"embedding":["#.to_vec();
        for _ in 0..5000 {
            body.extend_from_slice(b"0.0123,");
        }
        body.extend_from_slice(br#"1.0]}],"usage":{"prompt_tokens":8,"total_tokens":8}}"#);
        let mut tap = UsageTap::new(false);
        for chunk in body.chunks(1000) {
            tap.observe(chunk);
        }
        assert_eq!(
            tap.usage(),
            Some(Usage {
                prompt_tokens: 8,
                completion_tokens: 0,
                ..Default::default()
            })
        );
    }

    #[test]
    fn no_usage_in_an_error_body() {
        let mut tap = UsageTap::new(false);
        tap.observe(br#"{"error":{"message":"bad","type":"invalid_request_error"}}"#);
        assert_eq!(tap.usage(), None);
    }

    #[test]
    fn finish_reasons_from_streams_and_bodies() {
        let mut tap = UsageTap::new(true);
        tap.observe(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"},\"finish_reason\":null}]}\n\n",
        );
        tap.observe(b"data: {\"choices\":[{\"delta\":{},\"finish_reason\": \"length\"}]}\n\ndata: [DONE]\n\n");
        assert_eq!(tap.finish_reasons(), ["length"]);

        let mut tap = UsageTap::new(false);
        tap.observe(br#"{"choices":[{"index":0,"message":{"content":"say \"finish_reason\":\"x\""},"finish_reason":"stop"},"#);
        tap.observe(br#"{"index":1,"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":1}}"#);
        assert_eq!(tap.finish_reasons(), ["stop", "tool_calls"]);
    }
}

#[cfg(test)]
mod proptests;

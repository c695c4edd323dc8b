//! Streams between OpenAI Chat Completions and Anthropic Messages, translated one upstream
//! event at a time: each event becomes its counterparts as soon as it is complete, and only
//! what later events need (ids, block indexes, token counts, the stop reason) is kept.
//!
//! Events the other dialect has no words for (pings, thinking, citations, reasoning text)
//! are dropped: they carry nothing an app of the other dialect could read. Events whose data
//! is not what the upstream's API documents are skipped rather than guessed at.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::envelope;
use super::sse::{write_event, write_json_event, SseEvent, StreamTranslator};
use super::stop_reason::{to_finish_reason, to_stop_reason};
use super::usage;

fn u64_at(value: &Value, key: &str) -> Option<u64> {
    value.get(key).and_then(Value::as_u64)
}

fn str_at<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

/// Upstream Anthropic Messages events → OpenAI chat.completion.chunk events for the app.
#[derive(Debug)]
pub struct MessagesToChatStream {
    created: u64,
    id: String,
    model: String,
    /// Anthropic's usage fields as reported so far.
    usage: Map<String, Value>,
    /// Anthropic content block index → the OpenAI `tool_calls` index of its tool_use block.
    tool_calls: HashMap<u64, u64>,
    next_tool_call: u64,
    ended: bool,
}

impl MessagesToChatStream {
    /// `created` is the chunks' `created` (Anthropic's events carry no time).
    pub fn new(created: u64) -> Self {
        Self {
            created,
            id: String::new(),
            model: String::new(),
            usage: Map::new(),
            tool_calls: HashMap::new(),
            next_tool_call: 0,
            ended: false,
        }
    }

    fn write_chunk(&self, out: &mut Vec<u8>, delta: Value, finish_reason: Option<&str>) {
        let chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
        });
        write_json_event(out, None, &chunk);
    }

    fn message_start(&mut self, data: &Value, out: &mut Vec<u8>) {
        let message = data.get("message").unwrap_or(&Value::Null);
        str_at(message, "id")
            .unwrap_or_default()
            .clone_into(&mut self.id);
        str_at(message, "model")
            .unwrap_or_default()
            .clone_into(&mut self.model);
        if let Some(usage) = message.get("usage") {
            usage::merge(&mut self.usage, usage);
        }
        self.write_chunk(out, json!({"role": "assistant", "content": ""}), None);
    }

    fn content_block_start(&mut self, data: &Value, out: &mut Vec<u8>) {
        let block = data.get("content_block").unwrap_or(&Value::Null);
        match str_at(block, "type") {
            Some("text") => match str_at(block, "text") {
                Some(text) if !text.is_empty() => {
                    self.write_chunk(out, json!({"content": text}), None);
                }
                _ => {}
            },
            Some("tool_use") => {
                let Some(index) = u64_at(data, "index") else {
                    return;
                };
                let call = self.next_tool_call;
                self.next_tool_call = call.saturating_add(1);
                self.tool_calls.insert(index, call);
                let tool_call = json!({
                    "index": call,
                    "id": str_at(block, "id").unwrap_or_default(),
                    "type": "function",
                    "function": {"name": str_at(block, "name").unwrap_or_default(), "arguments": ""},
                });
                self.write_chunk(out, json!({"tool_calls": [tool_call]}), None);
            }
            // thinking, redacted_thinking and server tools' blocks: the model's own
            // reasoning and the provider's tool runs, which Chat Completions cannot show.
            _ => {}
        }
    }

    fn content_block_delta(&self, data: &Value, out: &mut Vec<u8>) {
        let delta = data.get("delta").unwrap_or(&Value::Null);
        match str_at(delta, "type") {
            Some("text_delta") => match str_at(delta, "text") {
                Some(text) if !text.is_empty() => {
                    self.write_chunk(out, json!({"content": text}), None);
                }
                _ => {}
            },
            Some("input_json_delta") => {
                let call = u64_at(data, "index").and_then(|index| self.tool_calls.get(&index));
                match (call, str_at(delta, "partial_json")) {
                    (Some(call), Some(json)) if !json.is_empty() => {
                        let tool_call = json!({"index": call, "function": {"arguments": json}});
                        self.write_chunk(out, json!({"tool_calls": [tool_call]}), None);
                    }
                    // Input of a server tool's block, or nothing yet.
                    _ => {}
                }
            }
            // thinking_delta, signature_delta, citations_delta.
            _ => {}
        }
    }

    fn message_delta(&mut self, data: &Value, out: &mut Vec<u8>) {
        if let Some(usage) = data.get("usage") {
            usage::merge(&mut self.usage, usage);
        }
        let delta = data.get("delta").unwrap_or(&Value::Null);
        let stop_reason = str_at(delta, "stop_reason").unwrap_or("end_turn");
        self.write_chunk(out, json!({}), Some(to_finish_reason(stop_reason)));
    }

    /// The chunk OpenAI sends last when asked for `stream_options.include_usage`.
    fn message_stop(&mut self, out: &mut Vec<u8>) {
        let chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage::to_openai(&Value::Object(self.usage.clone())),
        });
        write_json_event(out, None, &chunk);
        write_event(out, None, b"[DONE]");
        self.ended = true;
    }
}

/// The OpenAI SDKs raise an `APIError` on a stream's data event that holds an `error`; the
/// Anthropic error type is kept as `type` and `code`.
fn write_openai_error(data: &str, out: &mut Vec<u8>) {
    let (message, kind) = envelope::read(data.as_bytes());
    let kind = kind.unwrap_or_else(|| "api_error".to_string());
    write_json_event(
        out,
        None,
        &envelope::openai(&message, &kind, None, Some(&kind)),
    );
}

impl StreamTranslator for MessagesToChatStream {
    fn event(&mut self, event: SseEvent<'_>, out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        let data = serde_json::from_str::<Value>(event.data).unwrap_or(Value::Null);
        // Anthropic names every event after its data's `type`; either will do.
        let kind = event.name.or_else(|| str_at(&data, "type"));
        if kind == Some("error") {
            // An error is passed on even when its data is not JSON: it must not be lost.
            write_openai_error(event.data, out);
            return;
        }
        if !data.is_object() {
            return;
        }
        match kind {
            Some("message_start") => self.message_start(&data, out),
            Some("content_block_start") => self.content_block_start(&data, out),
            Some("content_block_delta") => self.content_block_delta(&data, out),
            Some("message_delta") => self.message_delta(&data, out),
            Some("message_stop") => self.message_stop(out),
            // ping, content_block_stop (Chat Completions has no block ends) and event
            // types added later.
            _ => {}
        }
    }

    /// Everything was written as it came: a stream without its `message_stop` gets no
    /// `[DONE]`, so the app sees it was cut short.
    fn finish(&mut self, _out: &mut Vec<u8>) {}

    fn ended(&self) -> bool {
        self.ended
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockKind {
    Text,
    ToolUse,
}

/// A tool call of the upstream's, as an Anthropic tool_use block.
#[derive(Debug)]
struct ToolBlock {
    call_id: String,
    block: u64,
}

/// Upstream OpenAI chat chunks → Anthropic Messages events for the app.
///
/// OpenAI reports usage only at the end of a stream (and only when asked), so
/// `message_start` says 0 tokens and the final `message_delta` carries the real counts, as
/// Anthropic's SDKs read them from there.
#[derive(Debug, Default)]
pub struct ChatToMessagesStream {
    started: bool,
    next_block: u64,
    open: Option<(u64, BlockKind)>,
    /// OpenAI `tool_calls` index → the call it currently names.
    tool_calls: HashMap<u64, ToolBlock>,
    finish_reason: Option<String>,
    /// OpenAI's usage fields as reported so far.
    usage: Map<String, Value>,
    ended: bool,
}

/// Anthropic names each event after its data's `type`.
fn write_anthropic_event(out: &mut Vec<u8>, data: Value) {
    let name = str_at(&data, "type").unwrap_or_default();
    write_json_event(out, Some(name), &data);
}

/// The Anthropic error type closest to an OpenAI error's `type` or `code`.
fn anthropic_error_type(openai: &Value) -> &'static str {
    let error = openai.get("error").unwrap_or(&Value::Null);
    for kind in [str_at(error, "type"), str_at(error, "code")]
        .into_iter()
        .flatten()
    {
        match kind {
            "invalid_request_error" => return "invalid_request_error",
            "authentication_error" | "invalid_api_key" => return "authentication_error",
            "permission_error" => return "permission_error",
            "not_found_error" | "model_not_found" => return "not_found_error",
            "rate_limit_error" | "rate_limit_exceeded" | "requests" | "tokens" => {
                return "rate_limit_error"
            }
            "overloaded_error" => return "overloaded_error",
            _ => {}
        }
    }
    "api_error"
}

impl ChatToMessagesStream {
    pub fn new() -> Self {
        Self::default()
    }

    fn start_message(&mut self, chunk: &Value, out: &mut Vec<u8>) {
        if std::mem::replace(&mut self.started, true) {
            return;
        }
        let id = str_at(chunk, "id").unwrap_or_default();
        let id = if id.starts_with("msg_") {
            id.to_string()
        } else {
            format!("msg_{id}")
        };
        let message = json!({
            "id": id,
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": str_at(chunk, "model").unwrap_or_default(),
            "stop_reason": null,
            "stop_sequence": null,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        });
        write_anthropic_event(out, json!({"type": "message_start", "message": message}));
    }

    fn open_block(&mut self, kind: BlockKind, content_block: Value, out: &mut Vec<u8>) -> u64 {
        self.close_block(out);
        let index = self.next_block;
        self.next_block = index.saturating_add(1);
        self.open = Some((index, kind));
        write_anthropic_event(
            out,
            json!({"type": "content_block_start", "index": index, "content_block": content_block}),
        );
        index
    }

    fn close_block(&mut self, out: &mut Vec<u8>) {
        if let Some((index, _)) = self.open.take() {
            write_anthropic_event(out, json!({"type": "content_block_stop", "index": index}));
        }
    }

    fn text(&mut self, text: &str, out: &mut Vec<u8>) {
        let index = match self.open {
            Some((index, BlockKind::Text)) => index,
            _ => self.open_block(BlockKind::Text, json!({"type": "text", "text": ""}), out),
        };
        write_anthropic_event(
            out,
            json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}),
        );
    }

    /// `position` stands in for the call's `index` where a server leaves it out.
    fn tool_call(&mut self, call: &Value, position: usize, out: &mut Vec<u8>) {
        let key = u64_at(call, "index")
            .or_else(|| u64::try_from(position).ok())
            .unwrap_or(u64::MAX);
        let function = call.get("function").unwrap_or(&Value::Null);
        let block = match (str_at(call, "id"), self.tool_calls.get(&key)) {
            // Some servers repeat the id on every fragment of a call.
            (Some(id), Some(known)) if known.call_id == id => known.block,
            (Some(id), _) => self.start_tool_call(key, id, function, out),
            (None, Some(known)) => known.block,
            // A fragment of a call that was never started has no block to go to.
            (None, None) => return,
        };
        if let Some(arguments) = str_at(function, "arguments").filter(|a| !a.is_empty()) {
            write_anthropic_event(
                out,
                json!({"type": "content_block_delta", "index": block, "delta": {"type": "input_json_delta", "partial_json": arguments}}),
            );
        }
    }

    fn start_tool_call(&mut self, key: u64, id: &str, function: &Value, out: &mut Vec<u8>) -> u64 {
        let content_block = json!({
            "type": "tool_use",
            "id": id,
            "name": str_at(function, "name").unwrap_or_default(),
            "input": {},
        });
        let block = self.open_block(BlockKind::ToolUse, content_block, out);
        let call_id = id.to_string();
        self.tool_calls.insert(key, ToolBlock { call_id, block });
        block
    }

    fn choice(&mut self, choice: &Value, out: &mut Vec<u8>) {
        let delta = choice.get("delta").unwrap_or(&Value::Null);
        if let Some(text) = str_at(delta, "content").filter(|t| !t.is_empty()) {
            self.text(text, out);
        }
        if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
            for (position, call) in calls.iter().enumerate() {
                self.tool_call(call, position, out);
            }
        }
        if let Some(reason) = str_at(choice, "finish_reason").filter(|r| !r.is_empty()) {
            self.finish_reason = Some(reason.to_string());
            self.close_block(out);
        }
    }

    /// `data` is the chunk's text, for an error's message.
    fn chunk(&mut self, chunk: &Value, data: &str, out: &mut Vec<u8>) {
        if chunk.get("error").is_some_and(|e| !e.is_null()) {
            let (message, _) = envelope::read(data.as_bytes());
            let error_type = anthropic_error_type(chunk);
            write_anthropic_event(out, envelope::anthropic(error_type, &message));
            return;
        }
        self.start_message(chunk, out);
        if let Some(usage) = chunk.get("usage") {
            usage::merge(&mut self.usage, usage);
        }
        // Only the first choice: an Anthropic message has one (n > 1 is not translated).
        let choices = chunk.get("choices").and_then(Value::as_array);
        let first = choices
            .into_iter()
            .flatten()
            .find(|c| u64_at(c, "index").unwrap_or(0) == 0);
        if let Some(choice) = first {
            self.choice(choice, out);
        }
    }

    fn end_message(&mut self, out: &mut Vec<u8>) {
        self.ended = true;
        if !self.started {
            return;
        }
        self.close_block(out);
        let finish_reason = self.finish_reason.as_deref().unwrap_or("stop");
        let message_delta = json!({
            "type": "message_delta",
            "delta": {"stop_reason": to_stop_reason(finish_reason), "stop_sequence": null},
            "usage": usage::to_anthropic(&Value::Object(self.usage.clone())),
        });
        write_anthropic_event(out, message_delta);
        write_anthropic_event(out, json!({"type": "message_stop"}));
    }
}

impl StreamTranslator for ChatToMessagesStream {
    fn event(&mut self, event: SseEvent<'_>, out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        if event.data.trim() == "[DONE]" {
            self.end_message(out);
            return;
        }
        match serde_json::from_str::<Value>(event.data) {
            Ok(chunk) if chunk.is_object() => self.chunk(&chunk, event.data, out),
            _ => {}
        }
    }

    /// Some servers end the body without `[DONE]`: a stream that reached its finish_reason
    /// is complete all the same and is closed (and counts as ended); one that did not was
    /// cut short and gets no closing events.
    fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.ended && self.finish_reason.is_some() {
            self.end_message(out);
        }
    }

    fn ended(&self) -> bool {
        self.ended
    }
}

#[cfg(test)]
mod tests {
    use super::super::sse::{SseParser, TranslatingStream};
    use super::*;

    const CREATED: u64 = 1_700_000_000;

    struct Fixture {
        name: &'static str,
        input: &'static str,
        expected: &'static str,
        /// Whether the upstream's stream reached its end.
        ended: bool,
    }

    macro_rules! fixture {
        ($name:literal, ended: $ended:literal) => {
            Fixture {
                name: $name,
                input: include_str!(concat!("fixtures/anthropic_stream/", $name, ".sse")),
                expected: include_str!(concat!("fixtures/anthropic_stream/", $name, ".expected")),
                ended: $ended,
            }
        };
    }

    /// Upstream Anthropic streams, for MessagesToChatStream.
    const MESSAGES: [Fixture; 4] = [
        fixture!("messages_text", ended: true),
        fixture!("messages_tools", ended: true),
        fixture!("messages_error", ended: false),
        fixture!("messages_cut", ended: false),
    ];

    /// Upstream OpenAI streams, for ChatToMessagesStream.
    const CHATS: [Fixture; 5] = [
        fixture!("chat_text", ended: true),
        fixture!("chat_tools", ended: true),
        fixture!("chat_error", ended: false),
        fixture!("chat_no_done", ended: true),
        fixture!("chat_cut", ended: false),
    ];

    fn messages_to_chat() -> TranslatingStream {
        TranslatingStream::new(Box::new(MessagesToChatStream::new(CREATED)))
    }

    fn chat_to_messages() -> TranslatingStream {
        TranslatingStream::new(Box::new(ChatToMessagesStream::new()))
    }

    fn all_fixtures() -> impl Iterator<Item = (&'static Fixture, fn() -> TranslatingStream)> {
        let messages = MESSAGES.iter().map(|f| (f, messages_to_chat as fn() -> _));
        messages.chain(CHATS.iter().map(|f| (f, chat_to_messages as fn() -> _)))
    }

    /// The whole output for an input fed in the given pieces, and whether the stream ended.
    fn translate(mut stream: TranslatingStream, pieces: &[&[u8]]) -> (String, bool) {
        let mut out = Vec::new();
        for piece in pieces {
            out.extend(stream.push(piece).unwrap());
        }
        out.extend(stream.finish());
        (String::from_utf8(out).unwrap(), stream.ended())
    }

    /// Events with their data parsed (`[DONE]` as a string), so that comparisons do not
    /// depend on the order serde_json writes keys in.
    fn events(output: &str) -> Vec<(Option<String>, Value)> {
        let mut seen = Vec::new();
        let mut parser = SseParser::default();
        let mut on = |e: SseEvent<'_>| {
            let data = match e.data {
                "[DONE]" => Value::from("[DONE]"),
                data => serde_json::from_str(data).unwrap(),
            };
            seen.push((e.name.map(str::to_string), data));
        };
        parser.push(output.as_bytes(), &mut on).unwrap();
        parser.finish(&mut on);
        seen
    }

    #[test]
    fn golden_fixtures() {
        for (fixture, new) in all_fixtures() {
            let (output, ended) = translate(new(), &[fixture.input.as_bytes()]);
            assert_eq!(
                events(&output),
                events(fixture.expected),
                "{}",
                fixture.name
            );
            assert_eq!(ended, fixture.ended, "{}", fixture.name);
        }
    }

    #[test]
    fn every_split_of_the_input_gives_the_same_output() {
        for (fixture, new) in all_fixtures() {
            let input = fixture.input.as_bytes();
            let whole = translate(new(), &[input]);
            for cut in 0..=input.len() {
                let (a, b) = input.split_at(cut);
                assert_eq!(
                    translate(new(), &[a, b]),
                    whole,
                    "{} cut at {cut}",
                    fixture.name
                );
            }
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            assert_eq!(
                translate(new(), &bytes),
                whole,
                "{} byte by byte",
                fixture.name
            );
        }
    }

    #[test]
    fn anthropic_events_are_named_after_their_type_and_come_in_order() {
        let (output, _) = translate(chat_to_messages(), &[CHATS[1].input.as_bytes()]);
        let events = events(&output);
        let types: Vec<&str> = events
            .iter()
            .map(|(name, data)| {
                assert_eq!(name.as_deref(), data["type"].as_str());
                match data["type"].as_str().unwrap() {
                    "content_block_delta" => "delta",
                    "content_block_start" => "start",
                    "content_block_stop" => "stop",
                    other => other,
                }
            })
            .collect();
        assert_eq!(
            types,
            [
                "message_start",
                "start",
                "delta",
                "stop",
                "start",
                "delta",
                "stop",
                "start",
                "delta",
                "delta",
                "delta",
                "stop",
                "message_delta",
                "message_stop"
            ]
        );
    }

    #[test]
    fn openai_chunks_are_unnamed_and_end_with_usage_then_done() {
        let (output, _) = translate(messages_to_chat(), &[MESSAGES[0].input.as_bytes()]);
        let events = events(&output);
        assert!(events.iter().all(|(name, _)| name.is_none()));
        let [.., (_, usage), (_, done)] = &events[..] else {
            panic!("too few events");
        };
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 2140);
        assert_eq!(done, "[DONE]");
    }

    /// What an OpenAI stream says, gathered: text, each call's id, name and arguments, the
    /// finish reason and usage.
    fn gather_chat(output: &str) -> (String, Vec<[String; 3]>, String, Value) {
        let (mut text, mut calls, mut finish, mut usage) = Default::default();
        for (_, chunk) in events(output) {
            if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
                usage = json!({
                    "prompt": u["prompt_tokens"],
                    "completion": u["completion_tokens"],
                    "cached": u["prompt_tokens_details"]["cached_tokens"],
                });
            }
            let Some(choice) = chunk["choices"].get(0) else {
                continue;
            };
            if let Some(reason) = choice["finish_reason"].as_str() {
                finish = reason.to_string();
            }
            text += choice["delta"]["content"].as_str().unwrap_or("");
            for call in choice["delta"]["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let index = call["index"].as_u64().unwrap() as usize;
                let calls: &mut Vec<[String; 3]> = &mut calls;
                if calls.len() <= index {
                    calls.resize(index + 1, Default::default());
                }
                let [id, name, arguments] = &mut calls[index];
                *id += call["id"].as_str().unwrap_or("");
                *name += call["function"]["name"].as_str().unwrap_or("");
                *arguments += call["function"]["arguments"].as_str().unwrap_or("");
            }
        }
        (text, calls, finish, usage)
    }

    #[test]
    fn chat_through_messages_and_back_keeps_text_calls_finish_and_usage() {
        for fixture in &CHATS[..2] {
            let (messages, _) = translate(chat_to_messages(), &[fixture.input.as_bytes()]);
            let (chat, ended) = translate(messages_to_chat(), &[messages.as_bytes()]);
            assert!(ended);
            let original = gather_chat(fixture.input);
            assert_eq!(gather_chat(&chat), original, "{}", fixture.name);
            assert!(!original.0.is_empty());
        }
        let (_, calls, ..) = gather_chat(CHATS[1].input);
        assert_eq!(calls[0][2], r#"{"location": "San Francisco, CA"}"#);
        assert_eq!(calls[1][2], r#"{"tz": "PST"}"#);
    }

    fn chat_stream(chunks: &[Value]) -> String {
        let mut input = String::new();
        for chunk in chunks {
            input += &format!("data: {chunk}\n\n");
        }
        input + "data: [DONE]\n\n"
    }

    #[test]
    fn tool_calls_without_index_or_with_repeated_ids_keep_their_blocks() {
        let call = |id: &str, arguments: &str| json!({"choices": [{"delta": {"tool_calls": [{"id": id, "function": {"name": "f", "arguments": arguments}}]}}]});
        let input = chat_stream(&[call("a", "{"), call("a", "}"), call("b", "[]")]);
        let (output, _) = translate(chat_to_messages(), &[input.as_bytes()]);
        let events = events(&output);
        let blocks: Vec<(u64, &str)> = events
            .iter()
            .filter(|(name, _)| name.as_deref() == Some("content_block_delta"))
            .map(|(_, data)| {
                let json = data["delta"]["partial_json"].as_str().unwrap();
                (data["index"].as_u64().unwrap(), json)
            })
            .collect();
        assert_eq!(blocks, [(0, "{"), (0, "}"), (1, "[]")]);
    }

    #[test]
    fn openai_errors_get_the_closest_anthropic_type() {
        let input = chat_stream(&[
            json!({"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}}),
        ]);
        let (output, ended) = translate(chat_to_messages(), &[input.as_bytes()]);
        assert_eq!(
            events(&output),
            [(
                Some("error".to_string()),
                json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}})
            )]
        );
        // The [DONE] after it ends the stream, but no message was started to close.
        assert!(ended);
    }

    #[test]
    fn an_anthropic_error_that_is_not_json_is_still_an_error() {
        let (output, _) = translate(
            messages_to_chat(),
            &[b"event: error\ndata: upstream exploded\n\n"],
        );
        assert_eq!(
            events(&output),
            [(
                None,
                json!({"error": {"message": "upstream exploded", "type": "api_error", "param": null, "code": "api_error"}})
            )]
        );
    }

    #[test]
    fn nothing_is_written_after_the_end() {
        let tail = b"data: {\"id\":\"x\",\"choices\":[{\"delta\":{\"content\":\"late\"}}]}\n\n";
        let (output, _) = translate(chat_to_messages(), &[CHATS[0].input.as_bytes(), tail]);
        assert_eq!(events(&output), events(CHATS[0].expected));
        let tail = b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let (output, _) = translate(messages_to_chat(), &[MESSAGES[0].input.as_bytes(), tail]);
        assert_eq!(events(&output), events(MESSAGES[0].expected));
    }

    #[test]
    fn hostile_events_do_not_panic() {
        let huge = u64::MAX;
        let anthropic = [
            "event: message_start\ndata: not json".to_string(),
            "event: message_start\ndata: {\"message\": 5}".to_string(),
            "data: [1, 2]".to_string(),
            "event: surprise\ndata: {}".to_string(),
            format!("event: content_block_start\ndata: {{\"index\": {huge}, \"content_block\": {{\"type\": \"tool_use\", \"id\": 5, \"name\": []}}}}"),
            format!("event: content_block_delta\ndata: {{\"index\": {huge}, \"delta\": {{\"type\": \"input_json_delta\", \"partial_json\": 7}}}}"),
            "event: content_block_delta\ndata: {\"index\": -1, \"delta\": {\"type\": \"input_json_delta\", \"partial_json\": \"x\"}}".to_string(),
            "event: content_block_delta\ndata: {\"index\": 1e300, \"delta\": \"text_delta\"}".to_string(),
            "event: content_block_start\ndata: {\"content_block\": {\"type\": \"text\", \"text\": {}}}".to_string(),
            format!("event: message_delta\ndata: {{\"delta\": [], \"usage\": {{\"input_tokens\": {huge}, \"cache_read_input_tokens\": {huge}, \"output_tokens\": {huge}}}}}"),
            "event: error\ndata: {\"error\": 3}".to_string(),
            "event: message_stop\ndata: {\"type\": \"message_stop\"}".to_string(),
        ];
        let chat = [
            "data: not json".to_string(),
            "data: 42".to_string(),
            "data: {\"id\": 3, \"model\": {}, \"choices\": {}}".to_string(),
            "data: {\"choices\": [5, null, {\"delta\": 4}, {\"delta\": {\"content\": 9, \"tool_calls\": 1}}]}".to_string(),
            format!("data: {{\"choices\": [{{\"delta\": {{\"tool_calls\": [{{\"index\": {huge}, \"id\": \"c\", \"function\": {{\"arguments\": \"{{\"}}}}]}}}}]}}"),
            format!("data: {{\"choices\": [{{\"delta\": {{\"tool_calls\": [{{\"index\": {huge}, \"function\": {{\"arguments\": \"}}\"}}}}, 3, {{\"index\": -1}}]}}}}]}}"),
            "data: {\"choices\": [{\"index\": 1e300, \"delta\": {\"content\": \"x\"}, \"finish_reason\": 5}]}".to_string(),
            format!("data: {{\"choices\": [], \"usage\": {{\"prompt_tokens\": 1, \"completion_tokens\": {huge}, \"prompt_tokens_details\": {{\"cached_tokens\": {huge}}}}}}}"),
            "data: {\"error\": [1]}".to_string(),
            "data: {\"choices\": [{\"finish_reason\": \"stop\"}]}".to_string(),
        ];
        for (events_in, new) in [
            (&anthropic[..], messages_to_chat as fn() -> _),
            (&chat[..], chat_to_messages),
        ] {
            let all: String = events_in.iter().map(|e| format!("{e}\n\n")).collect();
            let (output, _) = translate(new(), &[all.as_bytes()]);
            events(&output); // every event written is valid JSON
            for event in events_in {
                translate(new(), &[event.as_bytes()]);
            }
        }
    }
}

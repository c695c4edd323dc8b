//! A streamed chat completion as the Responses API's stream: named events, each with its
//! `type` and a `sequence_number` counting from 0.
//!
//! The first chunk opens the response (`response.created`, `response.in_progress`). Text
//! becomes a message item whose deltas are `response.output_text.delta`; each chat tool call
//! (by its `index`, parallel ones too) becomes a `function_call` item whose arguments arrive
//! as `response.function_call_arguments.delta`. A message item ends when a tool call starts;
//! everything still open ends at `[DONE]`, followed by `response.completed` (or
//! `response.incomplete` when the answer was cut at the token limit) with the whole Response,
//! built as a non-streamed one is.
//!
//! An upstream error chunk becomes an `error` event. The fields the API reference documents
//! (`code`, `message`, `param`) are at its top level, and they are also nested under `error`,
//! as OpenAI's live API sends them: the Python SDK raises `APIError` only for an event with
//! an `error` object, and would otherwise hand the app an event it may never look at.

use serde_json::{json, Value};

use super::responses::{
    call_id, chat_id, function_call_id, message_id, message_item, output_text, usage, Echo,
    FunctionCall, Outcome, Parts,
};
use super::sse::{write_json_event, SseEvent, StreamTranslator};

pub struct ChatToResponsesStream {
    echo: Echo,
    created_at: u64,
    next_sequence: u64,
    /// The first chunk's id, on which every id of the response is built.
    chat_id: Option<String>,
    model: Option<String>,
    /// The output items by output index; an item is null until it is done.
    output: Vec<Value>,
    text: Option<OpenText>,
    calls: Vec<OpenCall>,
    finish_reason: Option<String>,
    usage: Option<Value>,
    /// `[DONE]` was seen.
    upstream_ended: bool,
    /// The response was closed or failed: nothing more is sent.
    over: bool,
}

struct OpenText {
    output_index: usize,
    text: String,
}

struct OpenCall {
    /// The chat tool call's `index`.
    key: u64,
    output_index: usize,
    call: FunctionCall,
}

impl ChatToResponsesStream {
    /// `request` is the app's Responses request, whose settings the Response echoes;
    /// `created_at` is unix seconds.
    pub fn new(request: &Value, created_at: u64) -> Self {
        Self {
            echo: Echo::of(request),
            created_at,
            next_sequence: 0,
            chat_id: None,
            model: None,
            output: Vec::new(),
            text: None,
            calls: Vec::new(),
            finish_reason: None,
            usage: None,
            upstream_ended: false,
            over: false,
        }
    }

    fn emit(&mut self, out: &mut Vec<u8>, kind: &str, mut event: Value) {
        if let Some(fields) = event.as_object_mut() {
            fields.insert("type".into(), kind.into());
            fields.insert("sequence_number".into(), self.next_sequence.into());
        }
        self.next_sequence = self.next_sequence.saturating_add(1);
        write_json_event(out, Some(kind), &event);
    }

    fn chat_id(&self) -> &str {
        self.chat_id.as_deref().unwrap_or_default()
    }

    fn response(&self, outcome: Outcome, output: Vec<Value>, usage: Value) -> Value {
        self.echo.response(Parts {
            chat_id: self.chat_id(),
            model: self.model.as_deref(),
            created_at: self.created_at,
            outcome,
            output,
            usage,
        })
    }

    /// Opens the response on the first chunk (or at `[DONE]` when there was none).
    fn start(&mut self, chunk: &Value, out: &mut Vec<u8>) {
        if self.chat_id.is_some() {
            return;
        }
        self.chat_id = Some(chat_id(chunk, self.created_at));
        self.model = chunk
            .get("model")
            .and_then(Value::as_str)
            .map(str::to_string);
        let response = self.response(Outcome::InProgress, Vec::new(), Value::Null);
        self.emit(out, "response.created", json!({"response": response}));
        let response = self.response(Outcome::InProgress, Vec::new(), Value::Null);
        self.emit(out, "response.in_progress", json!({"response": response}));
    }

    fn chunk(&mut self, chunk: &Value, out: &mut Vec<u8>) {
        if let Some(error) = chunk.get("error").filter(|e| !e.is_null()) {
            return self.fail(error, out);
        }
        self.start(chunk, out);
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(usage.clone());
        }
        // The request never asks for more than one choice.
        let Some(choice) = chunk.get("choices").and_then(|c| c.get(0)) else {
            return;
        };
        if let Some(delta) = choice.get("delta") {
            if let Some(text) = delta.get("content").and_then(Value::as_str) {
                self.text_delta(text, out);
            }
            if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
                for (position, call) in calls.iter().enumerate() {
                    self.tool_call_delta(position, call, out);
                }
            }
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish_reason = Some(reason.to_string());
        }
    }

    fn new_item(&mut self) -> usize {
        self.output.push(Value::Null);
        self.output.len().saturating_sub(1)
    }

    fn text_delta(&mut self, delta: &str, out: &mut Vec<u8>) {
        if delta.is_empty() {
            return;
        }
        let output_index = match &self.text {
            Some(open) => open.output_index,
            None => self.open_text(out),
        };
        if let Some(open) = &mut self.text {
            open.text.push_str(delta);
        }
        let item_id = message_id(self.chat_id(), output_index);
        self.emit(
            out,
            "response.output_text.delta",
            json!({
                "item_id": item_id,
                "output_index": output_index,
                "content_index": 0,
                "delta": delta,
                "logprobs": [],
            }),
        );
    }

    fn open_text(&mut self, out: &mut Vec<u8>) -> usize {
        let output_index = self.new_item();
        let item_id = message_id(self.chat_id(), output_index);
        let item = message_item(&item_id, "in_progress", Vec::new());
        self.emit(
            out,
            "response.output_item.added",
            json!({"output_index": output_index, "item": item}),
        );
        self.emit(
            out,
            "response.content_part.added",
            json!({
                "item_id": item_id,
                "output_index": output_index,
                "content_index": 0,
                "part": output_text(""),
            }),
        );
        self.text = Some(OpenText {
            output_index,
            text: String::new(),
        });
        output_index
    }

    fn close_text(&mut self, outcome: Outcome, out: &mut Vec<u8>) {
        let Some(OpenText { output_index, text }) = self.text.take() else {
            return;
        };
        let item_id = message_id(self.chat_id(), output_index);
        self.emit(
            out,
            "response.output_text.done",
            json!({
                "item_id": item_id,
                "output_index": output_index,
                "content_index": 0,
                "text": text,
                "logprobs": [],
            }),
        );
        let part = output_text(&text);
        self.emit(
            out,
            "response.content_part.done",
            json!({
                "item_id": item_id,
                "output_index": output_index,
                "content_index": 0,
                "part": part,
            }),
        );
        let status = outcome.item_status(self.is_last(output_index));
        let item = message_item(&item_id, status, vec![part]);
        self.item_done(output_index, item, out);
    }

    fn is_last(&self, output_index: usize) -> bool {
        output_index.saturating_add(1) == self.output.len()
    }

    fn item_done(&mut self, output_index: usize, item: Value, out: &mut Vec<u8>) {
        if let Some(slot) = self.output.get_mut(output_index) {
            *slot = item.clone();
        }
        self.emit(
            out,
            "response.output_item.done",
            json!({"output_index": output_index, "item": item}),
        );
    }

    fn tool_call_delta(&mut self, position: usize, delta: &Value, out: &mut Vec<u8>) {
        let key = self.call_key(position, delta);
        let function = delta.get("function");
        let name = function.and_then(|f| f.get("name")).and_then(Value::as_str);
        let open = match self.calls.iter().position(|c| c.key == key) {
            Some(open) => open,
            None => self.open_call(key, delta.get("id"), name, out),
        };
        let Some(call) = self.calls.get_mut(open) else {
            return;
        };
        // Some servers repeat the name in every chunk: only a missing one is taken.
        if let Some(name) = name.filter(|_| call.call.name.is_empty()) {
            call.call.name = name.to_string();
        }
        let Some(arguments) = function
            .and_then(|f| f.get("arguments"))
            .and_then(Value::as_str)
            .filter(|a| !a.is_empty())
        else {
            return;
        };
        call.call.arguments.push_str(arguments);
        let output_index = call.output_index;
        let item_id = function_call_id(self.chat_id(), output_index);
        self.emit(
            out,
            "response.function_call_arguments.delta",
            json!({"item_id": item_id, "output_index": output_index, "delta": arguments}),
        );
    }

    /// The chat tool call a delta belongs to: its `index`, or, from a server that leaves the
    /// index out and sends each call whole, its id (else its place in the chunk).
    fn call_key(&self, position: usize, delta: &Value) -> u64 {
        if let Some(index) = delta.get("index").and_then(Value::as_u64) {
            return index;
        }
        let Some(id) = delta.get("id").and_then(Value::as_str) else {
            return u64::try_from(position).unwrap_or(u64::MAX);
        };
        match self.calls.iter().find(|c| c.call.call_id == id) {
            Some(open) => open.key,
            None => self
                .calls
                .iter()
                .map(|c| c.key.saturating_add(1))
                .max()
                .unwrap_or(0),
        }
    }

    /// Starts a function call item (ending the text before it); gives its place in `calls`.
    fn open_call(
        &mut self,
        key: u64,
        id: Option<&Value>,
        name: Option<&str>,
        out: &mut Vec<u8>,
    ) -> usize {
        self.close_text(Outcome::Completed, out);
        let output_index = self.new_item();
        let call = FunctionCall {
            call_id: call_id(id, self.chat_id(), output_index),
            name: name.unwrap_or_default().to_string(),
            arguments: String::new(),
        };
        let item = call.item(
            &function_call_id(self.chat_id(), output_index),
            "in_progress",
        );
        self.emit(
            out,
            "response.output_item.added",
            json!({"output_index": output_index, "item": item}),
        );
        self.calls.push(OpenCall {
            key,
            output_index,
            call,
        });
        self.calls.len().saturating_sub(1)
    }

    /// Ends what is open and sends the whole Response.
    fn close(&mut self, out: &mut Vec<u8>) {
        let outcome = Outcome::from_finish_reason(self.finish_reason.as_deref());
        self.close_text(outcome, out);
        for OpenCall {
            output_index, call, ..
        } in std::mem::take(&mut self.calls)
        {
            let item_id = function_call_id(self.chat_id(), output_index);
            self.emit(
                out,
                "response.function_call_arguments.done",
                json!({
                    "item_id": item_id,
                    "output_index": output_index,
                    "arguments": call.arguments,
                }),
            );
            let item = call.item(&item_id, outcome.item_status(self.is_last(output_index)));
            self.item_done(output_index, item, out);
        }
        let output = std::mem::take(&mut self.output);
        let usage = usage(self.usage.as_ref());
        let response = self.response(outcome, output, usage);
        let kind = match outcome {
            Outcome::Incomplete(_) => "response.incomplete",
            _ => "response.completed",
        };
        self.emit(out, kind, json!({"response": response}));
        self.over = true;
    }

    /// An upstream error (or an event that cannot be read) ends the stream with `error`.
    fn fail(&mut self, error: &Value, out: &mut Vec<u8>) {
        let body = serde_json::to_vec(&json!({"error": error})).unwrap_or_default();
        let (message, kind) = super::envelope::read(&body);
        let code = error
            .get("code")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or(kind.clone())
            .unwrap_or_else(|| "server_error".to_string());
        let kind = kind.unwrap_or_else(|| "server_error".to_string());
        self.emit(
            out,
            "error",
            json!({
                "code": code,
                "message": message,
                "param": null,
                "error": {"type": kind, "code": code, "message": message, "param": null},
            }),
        );
        self.over = true;
    }
}

impl StreamTranslator for ChatToResponsesStream {
    fn event(&mut self, event: SseEvent<'_>, out: &mut Vec<u8>) {
        let data = event.data.trim();
        if data == "[DONE]" {
            self.upstream_ended = true;
            if !self.over {
                self.start(&Value::Null, out);
                self.close(out);
            }
            return;
        }
        if self.over || data.is_empty() {
            return;
        }
        match serde_json::from_str::<Value>(data) {
            Ok(chunk) if chunk.is_object() => self.chunk(&chunk, out),
            _ => {
                let message = "the upstream sent an event that is not a chat completion chunk";
                self.fail(&json!({"message": message, "type": "server_error"}), out);
            }
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        // A server that ends its body without `[DONE]` but after saying why it stopped has
        // finished its answer; one cut short has not, and is not made to look complete.
        if !self.over && self.finish_reason.is_some() {
            self.close(out);
        }
    }

    fn ended(&self) -> bool {
        self.upstream_ended || (self.over && self.finish_reason.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::super::sse::{SseParser, TranslatingStream};
    use super::*;

    const CREATED_AT: u64 = 1_750_000_000;

    fn request() -> Value {
        json!({
            "model": "qwen",
            "input": "What is the weather in Paris and Rome?",
            "stream": true,
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        })
    }

    fn translate_whole(upstream: &[u8]) -> (Vec<u8>, bool) {
        let mut stream =
            TranslatingStream::new(Box::new(ChatToResponsesStream::new(&request(), CREATED_AT)));
        let mut out = stream.push(upstream).unwrap();
        out.extend(stream.finish());
        (out, stream.ended())
    }

    /// The events, as (name, JSON), so that key order does not matter.
    fn events(bytes: &[u8]) -> Vec<(Option<String>, Value)> {
        let mut parser = SseParser::default();
        let mut seen = Vec::new();
        let mut on = |e: SseEvent<'_>| {
            seen.push((
                e.name.map(str::to_string),
                serde_json::from_str(e.data).unwrap(),
            ));
        };
        parser.push(bytes, &mut on).unwrap();
        parser.finish(&mut on);
        seen
    }

    fn check_golden(upstream: &str, expected: &str) {
        let (out, ended) = translate_whole(upstream.as_bytes());
        let got = events(&out);
        assert_eq!(
            got,
            events(expected.as_bytes()),
            "{}",
            String::from_utf8_lossy(&out)
        );
        assert!(ended);
        for (index, (name, event)) in got.iter().enumerate() {
            assert_eq!(event["sequence_number"], index);
            assert_eq!(name.as_deref(), event["type"].as_str());
        }
        // Split anywhere, the upstream's bytes give the same bytes out.
        let bytes = upstream.as_bytes();
        for cut in 0..bytes.len() {
            let mut stream = TranslatingStream::new(Box::new(ChatToResponsesStream::new(
                &request(),
                CREATED_AT,
            )));
            let mut split = stream.push(&bytes[..cut]).unwrap();
            split.extend(stream.push(&bytes[cut..]).unwrap());
            split.extend(stream.finish());
            assert_eq!(split, out, "cut at {cut}");
        }
        let mut stream =
            TranslatingStream::new(Box::new(ChatToResponsesStream::new(&request(), CREATED_AT)));
        let mut bytewise = Vec::new();
        for byte in bytes {
            bytewise.extend(stream.push(std::slice::from_ref(byte)).unwrap());
        }
        bytewise.extend(stream.finish());
        assert_eq!(bytewise, out);
    }

    #[test]
    fn streamed_text_with_usage() {
        check_golden(
            include_str!("fixtures/responses/stream_text.chat.sse"),
            include_str!("fixtures/responses/stream_text.responses.sse"),
        );
    }

    #[test]
    fn streamed_text_then_parallel_tool_calls() {
        check_golden(
            include_str!("fixtures/responses/stream_tools.chat.sse"),
            include_str!("fixtures/responses/stream_tools.responses.sse"),
        );
    }

    #[test]
    fn a_stream_cut_at_the_token_limit_ends_incomplete() {
        check_golden(
            include_str!("fixtures/responses/stream_length.chat.sse"),
            include_str!("fixtures/responses/stream_length.responses.sse"),
        );
    }

    #[test]
    fn the_completed_response_is_the_non_streamed_one() {
        let upstream = include_str!("fixtures/responses/stream_tools.chat.sse");
        let (out, _) = translate_whole(upstream.as_bytes());
        let completed = events(&out).pop().unwrap().1;
        let chat = json!({
            "id": "chatcmpl-7",
            "model": "qwen2.5-7b-instruct",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant",
                "content": "Let me check both.",
                "tool_calls": [
                    {"id": "call_paris", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "call_rome", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}},
                ],
            }}],
            "usage": {"prompt_tokens": 80, "completion_tokens": 30, "total_tokens": 110},
        });
        let whole =
            super::super::responses::chat_response_to_responses(&chat, &request(), CREATED_AT)
                .unwrap();
        assert_eq!(completed["response"], whole);
    }

    #[test]
    fn an_upstream_error_becomes_an_error_event_the_sdk_raises_on() {
        let upstream = "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n\
             data: {\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\",\"code\":500}}\n\n\
             data: [DONE]\n\n";
        let (out, ended) = translate_whole(upstream.as_bytes());
        let events = events(&out);
        let (name, error) = events.last().unwrap();
        assert_eq!(name.as_deref(), Some("error"));
        assert_eq!(
            error,
            &json!({
                "type": "error", "sequence_number": 5, "code": "server_error", "message": "out of memory", "param": null,
                "error": {"type": "server_error", "code": "server_error", "message": "out of memory", "param": null},
            })
        );
        assert!(ended);
    }

    #[test]
    fn a_stream_cut_short_is_not_completed_but_one_without_done_after_its_finish_is() {
        let cut = "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n";
        let (out, ended) = translate_whole(cut.as_bytes());
        let names: Vec<_> = events(&out)
            .into_iter()
            .map(|(name, _)| name.unwrap())
            .collect();
        assert_eq!(
            names.last().map(String::as_str),
            Some("response.output_text.delta")
        );
        assert!(!ended);

        let no_done = format!("{cut}data: {{\"id\":\"c\",\"choices\":[{{\"delta\":{{}},\"finish_reason\":\"stop\"}}]}}\n\n");
        let (out, ended) = translate_whole(no_done.as_bytes());
        let (_, completed) = events(&out).pop().unwrap();
        assert_eq!(completed["type"], "response.completed");
        assert_eq!(
            completed["response"]["output"][0]["content"][0]["text"],
            "Hi"
        );
        assert!(ended);
    }

    #[test]
    fn an_empty_stream_completes_with_no_output() {
        let (out, ended) = translate_whole(b"data: [DONE]\n\n");
        let names: Vec<_> = events(&out)
            .into_iter()
            .map(|(name, _)| name.unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "response.created",
                "response.in_progress",
                "response.completed"
            ]
        );
        assert!(ended);
    }

    #[test]
    fn tool_calls_without_an_index_are_told_apart_by_id() {
        let upstream = "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"tool_calls\":[{\"id\":\"a\",\"function\":{\"name\":\"f\",\"arguments\":\"{}\"}}]}}]}\n\n\
             data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"tool_calls\":[{\"id\":\"b\",\"function\":{\"name\":\"g\",\"arguments\":\"{}\"}}]}}]}\n\n\
             data: [DONE]\n\n";
        let (out, _) = translate_whole(upstream.as_bytes());
        let (_, completed) = events(&out).pop().unwrap();
        let output = completed["response"]["output"].as_array().unwrap();
        let names: Vec<_> = output
            .iter()
            .map(|item| (item["call_id"].clone(), item["name"].clone()))
            .collect();
        assert_eq!(names, [(json!("a"), json!("f")), (json!("b"), json!("g"))]);
    }

    #[test]
    fn hostile_chunks_do_not_panic() {
        let hostile = [
            "not json",
            "[1,2]",
            "{}",
            "{\"choices\":null}",
            "{\"choices\":[null]}",
            "{\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":18446744073709551615,\"function\":{\"arguments\":\"x\"}}]}}]}",
            "{\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":-1},{\"id\":5},null]}}]}",
            "{\"choices\":[{\"delta\":{\"content\":[1]}, \"finish_reason\":7}]}",
            "{\"id\":null,\"model\":{},\"usage\":{\"prompt_tokens\":18446744073709551615,\"completion_tokens\":18446744073709551615}}",
            "{\"choices\":[{\"finish_reason\":\"length\"}]}",
            "{\"error\":[]}",
            "{\"error\":\"plain\"}",
        ];
        for first in hostile {
            for second in hostile {
                let upstream = format!("data: {first}\n\ndata: {second}\n\ndata: [DONE]\n\n");
                let mut stream = ChatToResponsesStream::new(&request(), CREATED_AT);
                let mut out = Vec::new();
                let mut parser = SseParser::default();
                parser
                    .push(upstream.as_bytes(), &mut |e| stream.event(e, &mut out))
                    .unwrap();
                stream.finish(&mut out);
                // Whatever came in, what goes out is well-formed events.
                let _ = events(&out);
            }
        }
    }
}

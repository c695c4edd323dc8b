//! What the cache stores and serves: one JSON answer per entry, the object a non-streamed call
//! returns. A streamed answer is folded into that object as it passes to the app, and a hit
//! for an app that asked for a stream is written back out as chunks.
//!
//! Only what both forms carry is kept. A stream whose choice carries anything a JSON answer
//! could not be rebuilt from (logprobs, audio, annotations, reasoning text) is not stored, and
//! a stored answer holding such things is not turned into a stream: the caller treats either
//! as a miss, so an app never gets less from a hit than from the provider.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::dialect::sse::{write_event, write_json_event, SseEvent, SseParser};

/// The longest piece of text or tool arguments in one synthesized chunk: a word longer than
/// this is cut, as a tokenizer would, so that no chunk carries a whole paragraph.
const MAX_PIECE_BYTES: usize = 16;
/// Short words are joined until a piece is this long, so that the number of chunks (each
/// ~200 bytes of envelope) stays proportional to the answer's size, whatever its words.
const MIN_PIECE_BYTES: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

impl Kind {
    fn of(route: &str) -> Option<Kind> {
        match route {
            "/chat/completions" => Some(Kind::Chat),
            "/completions" => Some(Kind::Completion),
            _ => None,
        }
    }

    fn object(self) -> &'static str {
        match self {
            Kind::Chat => "chat.completion",
            Kind::Completion => "text_completion",
        }
    }

    fn chunk_object(self) -> &'static str {
        match self {
            Kind::Chat => "chat.completion.chunk",
            // The legacy completions API names its chunks like its answers.
            Kind::Completion => "text_completion",
        }
    }
}

/// A stream that cannot be stored, or a stored answer that cannot be streamed.
struct Unusable;

/// null, or an empty string, array or object: a field that says nothing.
fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Bool(_) | Value::Number(_) => false,
    }
}

/// A string field: None when absent or null, Unusable when of another type.
fn str_field<'a>(map: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, Unusable> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(Unusable),
    }
}

/// The one choice an answer may have: index 0 (or none given), and no logprobs.
fn check_only_choice(choice: &Map<String, Value>) -> Result<(), Unusable> {
    let index_zero = match choice.get("index") {
        None | Some(Value::Null) => true,
        Some(index) => index.as_u64() == Some(0),
    };
    let no_logprobs = choice.get("logprobs").is_none_or(is_empty);
    if index_zero && no_logprobs {
        Ok(())
    } else {
        Err(Unusable)
    }
}

#[derive(Default)]
struct ToolCall {
    id: String,
    kind: Option<String>,
    name: String,
    arguments: String,
}

impl ToolCall {
    /// One fragment of the call as a stream carries it.
    fn fragment(&mut self, call: &Map<String, Value>) -> Result<(), Unusable> {
        if let Some(id) = str_field(call, "id")? {
            // Some servers repeat the id on every fragment; another id under the same index
            // would be two calls mixed up.
            if self.id.is_empty() {
                id.clone_into(&mut self.id);
            } else if self.id != id {
                return Err(Unusable);
            }
        }
        if let Some(kind) = str_field(call, "type")? {
            self.kind.get_or_insert_with(|| kind.to_string());
        }
        let function = match call.get("function") {
            None | Some(Value::Null) => return Ok(()),
            Some(Value::Object(function)) => function,
            Some(_) => return Err(Unusable),
        };
        if let Some(name) = str_field(function, "name")? {
            // The name comes whole in the first fragment; later copies add nothing.
            if self.name.is_empty() {
                name.clone_into(&mut self.name);
            }
        }
        if let Some(arguments) = str_field(function, "arguments")? {
            self.arguments.push_str(arguments);
        }
        Ok(())
    }

    fn into_json(self) -> Value {
        json!({
            "id": self.id,
            "type": self.kind.unwrap_or_else(|| "function".to_string()),
            "function": {"name": self.name, "arguments": self.arguments},
        })
    }
}

/// Everything the chunks said so far.
#[derive(Default)]
struct Answer {
    id: Option<Value>,
    created: Option<Value>,
    model: Option<Value>,
    /// Kept when any chunk had the field, even as null, so that a stored answer's null
    /// comes back as null.
    system_fingerprint: Option<Value>,
    service_tier: Option<Value>,
    usage: Option<Value>,
    /// The chat message's content, or a completion's text; None until a chunk carried one.
    content: Option<String>,
    refusal: Option<String>,
    /// By the `index` the stream gives each call, which is also their order in the answer.
    tool_calls: BTreeMap<u64, ToolCall>,
    finish_reason: Option<String>,
}

/// Keeps the first non-null value.
fn keep_first(slot: &mut Option<Value>, value: Option<&Value>) {
    if let Some(value) = value.filter(|v| !v.is_null()) {
        slot.get_or_insert_with(|| value.clone());
    }
}

/// Keeps the last value seen, null only while nothing else was.
fn keep_seen(slot: &mut Option<Value>, value: Option<&Value>) {
    if let Some(value) = value {
        if slot.is_none() || !value.is_null() {
            *slot = Some(value.clone());
        }
    }
}

/// Appends a piece of text; null adds nothing.
fn append(slot: &mut Option<String>, piece: &Value) -> Result<(), Unusable> {
    match piece {
        Value::Null => Ok(()),
        Value::String(piece) => {
            slot.get_or_insert_with(String::new).push_str(piece);
            Ok(())
        }
        _ => Err(Unusable),
    }
}

impl Answer {
    fn chunk(&mut self, kind: Kind, chunk: &Map<String, Value>) -> Result<(), Unusable> {
        // A chunk of another API than the route's would fold into an empty answer.
        if str_field(chunk, "object")?.is_some_and(|object| object != kind.chunk_object()) {
            return Err(Unusable);
        }
        keep_first(&mut self.id, chunk.get("id"));
        keep_first(&mut self.created, chunk.get("created"));
        keep_first(&mut self.model, chunk.get("model"));
        keep_seen(
            &mut self.system_fingerprint,
            chunk.get("system_fingerprint"),
        );
        keep_seen(&mut self.service_tier, chunk.get("service_tier"));
        // Most servers send usage once, in a last chunk; some repeat a running total.
        if let Some(usage) = chunk.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some(usage.clone());
        }
        let choices = match chunk.get("choices") {
            None | Some(Value::Null) => return Ok(()),
            Some(Value::Array(choices)) => choices,
            Some(_) => return Err(Unusable),
        };
        for choice in choices {
            let Value::Object(choice) = choice else {
                return Err(Unusable);
            };
            self.choice(kind, choice)?;
        }
        Ok(())
    }

    fn choice(&mut self, kind: Kind, choice: &Map<String, Value>) -> Result<(), Unusable> {
        check_only_choice(choice)?;
        if let Some(reason) = str_field(choice, "finish_reason")? {
            self.finish_reason = Some(reason.to_string());
        }
        match kind {
            Kind::Chat => match choice.get("delta") {
                None | Some(Value::Null) => Ok(()),
                Some(Value::Object(delta)) => self.delta(delta),
                Some(_) => Err(Unusable),
            },
            Kind::Completion => match choice.get("text") {
                Some(text) => append(&mut self.content, text),
                None => Ok(()),
            },
        }
    }

    fn delta(&mut self, delta: &Map<String, Value>) -> Result<(), Unusable> {
        for (field, value) in delta {
            match field.as_str() {
                "role" => {}
                "content" => append(&mut self.content, value)?,
                "refusal" => append(&mut self.refusal, value)?,
                "tool_calls" => self.tool_calls(value)?,
                // A field the answer has no place for is harmless only while empty.
                _ if is_empty(value) => {}
                _ => return Err(Unusable),
            }
        }
        Ok(())
    }

    fn tool_calls(&mut self, calls: &Value) -> Result<(), Unusable> {
        let calls = match calls {
            Value::Null => return Ok(()),
            Value::Array(calls) => calls,
            _ => return Err(Unusable),
        };
        for (position, call) in calls.iter().enumerate() {
            let Value::Object(call) = call else {
                return Err(Unusable);
            };
            // Where a server leaves `index` out, a call's place in the list stands in for it.
            let index = match call.get("index") {
                None | Some(Value::Null) => u64::try_from(position).map_err(|_| Unusable)?,
                Some(index) => index.as_u64().ok_or(Unusable)?,
            };
            self.tool_calls.entry(index).or_default().fragment(call)?;
        }
        Ok(())
    }

    /// The non-streamed answer; None when no chunk said why the answer ended.
    fn into_json(self, kind: Kind) -> Option<Value> {
        let finish_reason = self.finish_reason?;
        let choice = match kind {
            Kind::Chat => {
                let refusal = self.refusal.filter(|r| !r.is_empty());
                let has_tool_calls = !self.tool_calls.is_empty();
                // The first chunk's `content: ""` is not an answer's content when the model
                // refused or only called tools: a non-streamed answer has null there.
                let content = self
                    .content
                    .filter(|c| !c.is_empty() || (refusal.is_none() && !has_tool_calls));
                let mut message =
                    json!({"role": "assistant", "content": content, "refusal": refusal});
                if has_tool_calls {
                    let calls = self.tool_calls.into_values().map(ToolCall::into_json);
                    message["tool_calls"] = Value::Array(calls.collect());
                }
                json!({"index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason})
            }
            Kind::Completion => json!({
                "text": self.content.unwrap_or_default(),
                "index": 0,
                "logprobs": null,
                "finish_reason": finish_reason,
            }),
        };
        let mut answer = Map::new();
        answer.insert("id".into(), self.id.unwrap_or(Value::Null));
        answer.insert("object".into(), kind.object().into());
        answer.insert("created".into(), self.created.unwrap_or(Value::Null));
        answer.insert("model".into(), self.model.unwrap_or(Value::Null));
        if let Some(fingerprint) = self.system_fingerprint {
            answer.insert("system_fingerprint".into(), fingerprint);
        }
        if let Some(tier) = self.service_tier {
            answer.insert("service_tier".into(), tier);
        }
        answer.insert("choices".into(), json!([choice]));
        answer.insert("usage".into(), self.usage.unwrap_or(Value::Null));
        Some(Value::Object(answer))
    }
}

/// What the events of one stream built, apart from the parser that reads them.
struct Assembly {
    kind: Kind,
    answer: Answer,
    done: bool,
}

impl Assembly {
    fn event(&mut self, event: SseEvent<'_>) -> Result<(), Unusable> {
        if self.done {
            return Ok(());
        }
        if event.name == Some("error") {
            return Err(Unusable);
        }
        if event.data.trim() == "[DONE]" {
            self.done = true;
            return Ok(());
        }
        let Ok(Value::Object(chunk)) = serde_json::from_str::<Value>(event.data) else {
            return Err(Unusable);
        };
        if chunk.get("error").is_some_and(|e| !e.is_null()) {
            return Err(Unusable);
        }
        self.answer.chunk(self.kind, &chunk)
    }
}

struct Recording {
    parser: SseParser,
    assembly: Assembly,
}

impl Recording {
    /// Feeds `bytes` (or, with None, the end of the stream) to the parser and the assembly.
    fn feed(&mut self, bytes: Option<&[u8]>) -> Result<(), Unusable> {
        let mut usable = true;
        let assembly = &mut self.assembly;
        let mut on_event = |event: SseEvent<'_>| {
            if usable && assembly.event(event).is_err() {
                usable = false;
            }
        };
        match bytes {
            Some(bytes) => self
                .parser
                .push(bytes, &mut on_event)
                .map_err(|_| Unusable)?,
            None => self.parser.finish(&mut on_event),
        }
        if usable {
            Ok(())
        } else {
            Err(Unusable)
        }
    }
}

/// Builds the JSON answer of a streamed response as it passes, without holding the stream:
/// chat.completion.chunk events (and text_completion chunks) are folded into the object a
/// non-streamed call would have returned.
pub struct StreamRecorder {
    limit: usize,
    taken: usize,
    /// None once the stream turned out not to be storable: nothing more is parsed or kept.
    recording: Option<Recording>,
}

impl StreamRecorder {
    /// `route`: "/chat/completions" or "/completions" (any other route records nothing);
    /// `limit`: the most bytes of stream to take in (beyond it the recorder gives up).
    pub fn new(route: &str, limit: usize) -> Self {
        let recording = Kind::of(route).map(|kind| Recording {
            parser: SseParser::default(),
            assembly: Assembly {
                kind,
                answer: Answer::default(),
                done: false,
            },
        });
        Self {
            limit,
            taken: 0,
            recording,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.taken = self.taken.saturating_add(bytes.len());
        if self.taken > self.limit {
            self.recording = None;
        }
        if let Some(recording) = &mut self.recording {
            if recording.feed(Some(bytes)).is_err() {
                self.recording = None;
            }
        }
    }

    /// The assembled JSON body, or None when the stream did not end with `[DONE]`, carried an
    /// error event, had more than one choice, exceeded the limit, or was not parsable.
    pub fn finish(self) -> Option<Bytes> {
        let mut recording = self.recording?;
        recording.feed(None).ok()?;
        let assembly = recording.assembly;
        if !assembly.done {
            return None;
        }
        let answer = assembly.answer.into_json(assembly.kind)?;
        serde_json::to_vec(&answer).ok().map(Bytes::from)
    }
}

/// Word-sized pieces of `text`: words with the whitespace before them, short ones joined
/// until a piece has MIN_PIECE_BYTES, a word longer than MAX_PIECE_BYTES cut there; joined
/// they give `text` back.
fn pieces(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut after_word = false;
    for (at, c) in text.char_indices() {
        let long_enough = at.saturating_sub(start) >= MIN_PIECE_BYTES;
        let word_starts = c.is_whitespace() && after_word && long_enough;
        let too_long = at.saturating_sub(start) >= MAX_PIECE_BYTES;
        if word_starts || too_long {
            pieces.extend(text.get(start..at).filter(|p| !p.is_empty()));
            start = at;
        }
        after_word = !c.is_whitespace();
    }
    pieces.extend(text.get(start..).filter(|p| !p.is_empty()));
    pieces
}

/// Writes the chunks of one stored answer.
struct ChunkWriter {
    /// The fields every chunk repeats.
    template: Map<String, Value>,
    events: Vec<Bytes>,
}

impl ChunkWriter {
    fn new(kind: Kind, answer: &Map<String, Value>, include_usage: bool) -> Self {
        let mut template = Map::new();
        for field in ["id", "created", "model"] {
            let value = answer.get(field).cloned().unwrap_or(Value::Null);
            template.insert(field.into(), value);
        }
        template.insert("object".into(), kind.chunk_object().into());
        for field in ["system_fingerprint", "service_tier"] {
            if let Some(value) = answer.get(field) {
                template.insert(field.into(), value.clone());
            }
        }
        if include_usage {
            // As OpenAI does: every chunk but the last says its usage is yet to come.
            template.insert("usage".into(), Value::Null);
        }
        Self {
            template,
            events: Vec::new(),
        }
    }

    fn chunk(&mut self, choices: Value, usage: Option<&Value>) {
        let mut chunk = self.template.clone();
        chunk.insert("choices".into(), choices);
        if let Some(usage) = usage {
            chunk.insert("usage".into(), usage.clone());
        }
        let mut event = Vec::new();
        write_json_event(&mut event, None, &Value::Object(chunk));
        self.events.push(Bytes::from(event));
    }

    fn delta(&mut self, delta: Value, finish_reason: Option<&str>) {
        let choice =
            json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason});
        self.chunk(json!([choice]), None);
    }

    fn text(&mut self, text: &str, finish_reason: Option<&str>) {
        let choice =
            json!({"text": text, "index": 0, "logprobs": null, "finish_reason": finish_reason});
        self.chunk(json!([choice]), None);
    }

    fn done(mut self) -> Vec<Bytes> {
        let mut event = Vec::new();
        write_event(&mut event, None, b"[DONE]");
        self.events.push(Bytes::from(event));
        self.events
    }
}

/// A stored tool call, checked.
struct StoredCall<'a> {
    id: &'a str,
    kind: &'a str,
    name: &'a str,
    arguments: &'a str,
}

fn stored_calls(message: &Map<String, Value>) -> Result<Vec<StoredCall<'_>>, Unusable> {
    let calls = match message.get("tool_calls") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(calls)) => calls,
        Some(_) => return Err(Unusable),
    };
    calls
        .iter()
        .map(|call| {
            let Value::Object(call) = call else {
                return Err(Unusable);
            };
            let Some(Value::Object(function)) = call.get("function") else {
                return Err(Unusable);
            };
            Ok(StoredCall {
                id: str_field(call, "id")?.unwrap_or_default(),
                kind: str_field(call, "type")?.unwrap_or("function"),
                name: str_field(function, "name")?.unwrap_or_default(),
                arguments: str_field(function, "arguments")?.unwrap_or_default(),
            })
        })
        .collect()
}

fn chat_chunks(
    writer: &mut ChunkWriter,
    message: &Map<String, Value>,
    finish_reason: &str,
) -> Result<(), Unusable> {
    let known = ["role", "content", "refusal", "tool_calls"];
    if message
        .iter()
        .any(|(field, value)| !known.contains(&field.as_str()) && !is_empty(value))
    {
        return Err(Unusable);
    }
    let content = str_field(message, "content")?;
    let refusal = str_field(message, "refusal")?;
    let calls = stored_calls(message)?;
    // The role chunk says `content: ""` where the answer has text, null where it has none.
    let first_content = content.map(|_| "");
    writer.delta(
        json!({"role": "assistant", "content": first_content, "refusal": null}),
        None,
    );
    for piece in pieces(content.unwrap_or_default()) {
        writer.delta(json!({"content": piece}), None);
    }
    for piece in pieces(refusal.unwrap_or_default()) {
        writer.delta(json!({"refusal": piece}), None);
    }
    for (index, call) in calls.iter().enumerate() {
        let opening = json!({
            "index": index,
            "id": call.id,
            "type": call.kind,
            "function": {"name": call.name, "arguments": ""},
        });
        writer.delta(json!({"tool_calls": [opening]}), None);
        for piece in pieces(call.arguments) {
            let fragment = json!({"index": index, "function": {"arguments": piece}});
            writer.delta(json!({"tool_calls": [fragment]}), None);
        }
    }
    writer.delta(json!({}), Some(finish_reason));
    Ok(())
}

fn completion_chunks(
    writer: &mut ChunkWriter,
    choice: &Map<String, Value>,
    finish_reason: &str,
) -> Result<(), Unusable> {
    let text = str_field(choice, "text")?.ok_or(Unusable)?;
    for piece in pieces(text) {
        writer.text(piece, None);
    }
    writer.text("", Some(finish_reason));
    Ok(())
}

fn stream_events(kind: Kind, json: &[u8], include_usage: bool) -> Result<Vec<Bytes>, Unusable> {
    let Ok(Value::Object(answer)) = serde_json::from_slice::<Value>(json) else {
        return Err(Unusable);
    };
    if str_field(&answer, "object")?.is_some_and(|object| object != kind.object()) {
        return Err(Unusable);
    }
    let Some(Value::Array(choices)) = answer.get("choices") else {
        return Err(Unusable);
    };
    let [Value::Object(choice)] = choices.as_slice() else {
        return Err(Unusable);
    };
    check_only_choice(choice)?;
    let finish_reason = str_field(choice, "finish_reason")?.ok_or(Unusable)?;
    let mut writer = ChunkWriter::new(kind, &answer, include_usage);
    match kind {
        Kind::Chat => {
            let Some(Value::Object(message)) = choice.get("message") else {
                return Err(Unusable);
            };
            chat_chunks(&mut writer, message, finish_reason)?;
        }
        Kind::Completion => completion_chunks(&mut writer, choice, finish_reason)?,
    }
    let usage = answer.get("usage").filter(|u| !u.is_null());
    if let (true, Some(usage)) = (include_usage, usage) {
        writer.chunk(json!([]), Some(usage));
    }
    Ok(writer.done())
}

/// A stored JSON answer (chat.completion or text_completion) as a Server-Sent Events stream,
/// for an app that asked for one: realistic chunks (a role chunk, the text in word-sized
/// pieces with their leading spaces, tool calls as a provider streams them: first the id,
/// type, name and empty arguments, then the arguments in pieces), a last chunk with the
/// finish_reason, the usage chunk when `include_usage` (choices [] + usage), then `[DONE]`.
/// Each returned Bytes is one event. None if the JSON is not such an answer.
pub fn to_stream(route: &str, json: &[u8], include_usage: bool) -> Option<Vec<Bytes>> {
    stream_events(Kind::of(route)?, json, include_usage).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT: &str = "/chat/completions";
    const COMPLETIONS: &str = "/completions";
    const LIMIT: usize = 1 << 20;

    /// Stored answers, each served as a stream and recorded back.
    const ANSWERS: [(&str, &str, &str); 6] = [
        (CHAT, "chat_text", include_str!("fixtures/chat_text.json")),
        (CHAT, "chat_tools", include_str!("fixtures/chat_tools.json")),
        (
            CHAT,
            "chat_text_and_tool",
            include_str!("fixtures/chat_text_and_tool.json"),
        ),
        (
            CHAT,
            "chat_refusal",
            include_str!("fixtures/chat_refusal.json"),
        ),
        (
            CHAT,
            "chat_length_no_usage",
            include_str!("fixtures/chat_length_no_usage.json"),
        ),
        (
            COMPLETIONS,
            "completion",
            include_str!("fixtures/completion.json"),
        ),
    ];

    /// A stream as OpenAI sends it, and the object its non-streamed call returns.
    const OPENAI_STREAM: &str = include_str!("fixtures/openai_tools_stream.sse");
    const OPENAI_ANSWER: &str = include_str!("fixtures/openai_tools_stream.json");

    fn record(route: &str, pieces: &[&[u8]]) -> Option<Value> {
        let mut recorder = StreamRecorder::new(route, LIMIT);
        for piece in pieces {
            recorder.push(piece);
        }
        recorder
            .finish()
            .map(|bytes| serde_json::from_slice(&bytes).unwrap())
    }

    fn parse(json: &str) -> Value {
        serde_json::from_str(json).unwrap()
    }

    /// The data of each event, parsed (`[DONE]` as a string).
    fn chunks(events: &[Bytes]) -> Vec<Value> {
        events
            .iter()
            .map(|event| {
                let mut seen = Vec::new();
                let mut parser = SseParser::default();
                let mut on = |e: SseEvent<'_>| seen.push(e.data.to_string());
                parser.push(event, &mut on).unwrap();
                assert_eq!(seen.len(), 1, "one event per Bytes");
                match seen[0].as_str() {
                    "[DONE]" => Value::from("[DONE]"),
                    data => serde_json::from_str(data).unwrap(),
                }
            })
            .collect()
    }

    #[test]
    fn stored_answers_come_back_from_their_own_stream() {
        for (route, name, json) in ANSWERS {
            for include_usage in [false, true] {
                let events = to_stream(route, json.as_bytes(), include_usage).unwrap();
                let stream: Vec<u8> = events.concat();
                let mut expected = parse(json);
                if !include_usage {
                    expected["usage"] = Value::Null;
                }
                assert_eq!(record(route, &[&stream]), Some(expected), "{name}");
            }
        }
    }

    #[test]
    fn an_openai_stream_split_anywhere_gives_the_non_streamed_answer() {
        let expected = parse(OPENAI_ANSWER);
        let stream = OPENAI_STREAM.as_bytes();
        assert_eq!(record(CHAT, &[stream]), Some(expected.clone()));
        for cut in 0..stream.len() {
            let (a, b) = stream.split_at(cut);
            assert_eq!(
                record(CHAT, &[a, b]),
                Some(expected.clone()),
                "cut at {cut}"
            );
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(record(CHAT, &bytes), Some(expected.clone()));
        let crlf = OPENAI_STREAM.replace('\n', "\r\n");
        assert_eq!(record(CHAT, &[crlf.as_bytes()]), Some(expected));
    }

    #[test]
    fn synthesized_chunks_look_like_a_providers() {
        let json = include_str!("fixtures/chat_text_and_tool.json");
        let stored = parse(json);
        let chunks = chunks(&to_stream(CHAT, json.as_bytes(), true).unwrap());
        let (last, chunks) = chunks.split_last().unwrap();
        assert_eq!(last, "[DONE]");
        for chunk in chunks {
            for field in ["id", "created", "model", "system_fingerprint"] {
                assert_eq!(chunk[field], stored[field], "{field}");
            }
            assert_eq!(chunk["object"], "chat.completion.chunk");
        }
        let (usage, chunks) = chunks.split_last().unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"], stored["usage"]);
        let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["delta"]).collect();
        assert_eq!(
            deltas[0],
            &json!({"role": "assistant", "content": "", "refusal": null})
        );
        let texts: Vec<&str> = deltas
            .iter()
            .filter_map(|d| d["content"].as_str())
            .collect();
        assert_eq!(texts, ["", "Let me check", " the weather."]);
        let calls: Vec<&Value> = deltas.iter().filter_map(|d| d.get("tool_calls")).collect();
        assert_eq!(
            calls[0],
            &json!([{"index": 0, "id": "call_w1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}])
        );
        let arguments: String = calls[1..]
            .iter()
            .map(|c| c[0]["function"]["arguments"].as_str().unwrap())
            .collect();
        assert_eq!(
            arguments,
            r#"{"location": "Paris, France", "unit": "celsius"}"#
        );
        assert!(calls[1..].iter().all(|c| c[0].get("id").is_none()));
        for chunk in chunks {
            assert_eq!(chunk["choices"][0]["logprobs"], Value::Null);
            assert_eq!(chunk["usage"], Value::Null);
        }
        let finish: Vec<&Value> = chunks
            .iter()
            .map(|c| &c["choices"][0]["finish_reason"])
            .collect();
        let (last_finish, others) = finish.split_last().unwrap();
        assert_eq!(*last_finish, "tool_calls");
        assert!(others.iter().all(|f| f.is_null()));
    }

    #[test]
    fn completion_chunks_carry_text_and_no_usage_unless_asked() {
        let json = include_str!("fixtures/completion.json");
        let chunks = chunks(&to_stream(COMPLETIONS, json.as_bytes(), false).unwrap());
        assert_eq!(chunks.last().unwrap(), "[DONE]");
        let chunks = &chunks[..chunks.len() - 1];
        assert!(chunks
            .iter()
            .all(|c| c["object"] == "text_completion" && c.get("usage").is_none()));
        let text: String = chunks
            .iter()
            .map(|c| c["choices"][0]["text"].as_str().unwrap())
            .collect();
        assert_eq!(text, parse(json)["choices"][0]["text"]);
        assert_eq!(
            chunks.last().unwrap()["choices"][0]["finish_reason"],
            "stop"
        );
    }

    #[test]
    fn pieces_keep_leading_whitespace_and_cut_long_words() {
        assert_eq!(
            pieces("Hello, big  world\n\nBye"),
            ["Hello, big", "  world\n\nBye"]
        );
        // However short the words, there are at most about one piece per MIN_PIECE_BYTES.
        let tiny_words = "a ".repeat(10_000);
        assert!(pieces(&tiny_words).len() <= tiny_words.len() / MIN_PIECE_BYTES + 1);
        assert_eq!(pieces("  lead"), ["  lead"]);
        assert!(pieces("").is_empty());
        let long = "é".repeat(20);
        let cut = pieces(&long);
        assert!(cut.len() > 1 && cut.iter().all(|p| p.len() <= MAX_PIECE_BYTES + 1));
        assert_eq!(cut.concat(), long);
    }

    fn chat_stream(chunks: &[Value], done: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in chunks {
            write_json_event(&mut out, None, chunk);
        }
        if done {
            write_event(&mut out, None, b"[DONE]");
        }
        out
    }

    fn chunk(choice: Value) -> Value {
        json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]})
    }

    fn finished() -> Value {
        chunk(json!({"index": 0, "delta": {}, "finish_reason": "stop"}))
    }

    #[test]
    fn unfinished_failed_or_multi_choice_streams_are_not_stored() {
        let text = chunk(json!({"index": 0, "delta": {"content": "hi"}}));
        let good = chat_stream(&[text.clone(), finished()], true);
        assert!(record(CHAT, &[&good]).is_some());
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("no [DONE]", chat_stream(&[text.clone(), finished()], false)),
            (
                "no finish_reason",
                chat_stream(std::slice::from_ref(&text), true),
            ),
            (
                "error chunk",
                chat_stream(
                    &[text.clone(), json!({"error": {"message": "x"}}), finished()],
                    true,
                ),
            ),
            (
                "second choice",
                chat_stream(
                    &[
                        chunk(json!({"index": 1, "delta": {"content": "b"}})),
                        finished(),
                    ],
                    true,
                ),
            ),
            (
                "logprobs",
                chat_stream(
                    &[
                        chunk(
                            json!({"index": 0, "delta": {"content": "a"}, "logprobs": {"content": [{"token": "a"}]}}),
                        ),
                        finished(),
                    ],
                    true,
                ),
            ),
            (
                "annotations",
                chat_stream(
                    &[
                        chunk(
                            json!({"index": 0, "delta": {"annotations": [{"type": "url_citation"}]}}),
                        ),
                        finished(),
                    ],
                    true,
                ),
            ),
            (
                "reasoning",
                chat_stream(
                    &[
                        chunk(json!({"index": 0, "delta": {"reasoning_content": "hmm"}})),
                        finished(),
                    ],
                    true,
                ),
            ),
            ("not json", [b"data: {nope\n\n".as_slice(), &good].concat()),
            (
                "named error",
                [b"event: error\ndata: {}\n\n".as_slice(), &good].concat(),
            ),
        ];
        for (name, stream) in cases {
            assert_eq!(record(CHAT, &[&stream]), None, "{name}");
        }
        let empty_extras = chunk(
            json!({"index": 0, "delta": {"content": "a", "reasoning_content": null, "annotations": []}}),
        );
        assert!(record(CHAT, &[&chat_stream(&[empty_extras, finished()], true)]).is_some());
        assert_eq!(record("/embeddings", &[&good]), None);
    }

    #[test]
    fn the_limit_bounds_what_is_taken_in() {
        let stream = chat_stream(
            &[
                chunk(json!({"index": 0, "delta": {"content": "hi"}})),
                finished(),
            ],
            true,
        );
        let mut at_limit = StreamRecorder::new(CHAT, stream.len());
        at_limit.push(&stream);
        assert!(at_limit.finish().is_some());
        let mut over = StreamRecorder::new(CHAT, stream.len() - 1);
        for byte in stream.chunks(1) {
            over.push(byte);
        }
        assert!(over.finish().is_none());
    }

    #[test]
    fn tool_call_fragments_without_index_or_with_repeated_ids_join_up() {
        let stream = chat_stream(
            &[
                chunk(json!({"delta": {"tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{\"x\""}},
                    {"id": "b", "function": {"name": "g", "arguments": ""}}]}})),
                chunk(json!({"delta": {"tool_calls": [
                    {"id": "a", "function": {"name": "f", "arguments": ":1}"}},
                    {"index": 1, "function": {"arguments": "{}"}}]}})),
                chunk(json!({"delta": {}, "finish_reason": "tool_calls"})),
            ],
            true,
        );
        let answer = record(CHAT, &[&stream]).unwrap();
        assert_eq!(
            answer["choices"][0]["message"],
            json!({"role": "assistant", "content": null, "refusal": null, "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}},
                {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]})
        );
        let mixed = chat_stream(
            &[
                chunk(json!({"delta": {"tool_calls": [{"index": 0, "id": "a"}]}})),
                chunk(json!({"delta": {"tool_calls": [{"index": 0, "id": "b"}]}})),
                finished(),
            ],
            true,
        );
        assert_eq!(record(CHAT, &[&mixed]), None);
    }

    #[test]
    fn chunks_of_another_api_are_not_stored() {
        let chat_chunks = concat!(
            "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",",
            "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"},\"finish_reason\":\"stop\"}]}\n\n",
            "data: [DONE]\n\n"
        );
        let mut as_completion = StreamRecorder::new("/completions", LIMIT);
        as_completion.push(chat_chunks.as_bytes());
        assert!(as_completion.finish().is_none());
        let mut as_chat = StreamRecorder::new(CHAT, LIMIT);
        as_chat.push(chat_chunks.as_bytes());
        assert!(as_chat.finish().is_some());
    }

    #[test]
    fn answers_that_cannot_be_streamed_are_refused() {
        let text = parse(include_str!("fixtures/chat_text.json"));
        let mut two_choices = text.clone();
        two_choices["choices"] = json!([text["choices"][0], text["choices"][0]]);
        let mut logprobs = text.clone();
        logprobs["choices"][0]["logprobs"] = json!({"content": []});
        let mut audio = text.clone();
        audio["choices"][0]["message"]["audio"] = json!({"id": "a"});
        let mut no_finish = text.clone();
        no_finish["choices"][0]["finish_reason"] = Value::Null;
        let mut bad_call = text.clone();
        bad_call["choices"][0]["message"]["tool_calls"] = json!([{"id": "x", "function": "f"}]);
        let mut wrong_object = text.clone();
        wrong_object["object"] = json!("text_completion");
        for bad in [
            two_choices,
            logprobs,
            audio,
            no_finish,
            bad_call,
            wrong_object,
        ] {
            assert_eq!(
                to_stream(CHAT, &serde_json::to_vec(&bad).unwrap(), true),
                None,
                "{bad}"
            );
        }
        let mut empty_extras = text.clone();
        empty_extras["choices"][0]["message"]["annotations"] = json!([]);
        assert!(to_stream(CHAT, &serde_json::to_vec(&empty_extras).unwrap(), true).is_some());
        for junk in [
            "",
            "[]",
            "{}",
            "null",
            r#"{"choices":{}}"#,
            r#"{"choices":[1]}"#,
        ] {
            assert_eq!(to_stream(CHAT, junk.as_bytes(), false), None);
            assert_eq!(to_stream(COMPLETIONS, junk.as_bytes(), false), None);
        }
        assert_eq!(
            to_stream("/embeddings", text.to_string().as_bytes(), false),
            None
        );
        assert_eq!(
            to_stream(COMPLETIONS, text.to_string().as_bytes(), false),
            None
        );
    }

    /// A small deterministic generator: the tests need varied bytes, not good randomness.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn hostile_streams_do_not_panic() {
        let weird = [
            r#"{"choices":"x"}"#,
            r#"{"choices":[1]}"#,
            r#"{"choices":[{"index":-1}]}"#,
            r#"{"choices":[{"index":1e30}]}"#,
            r#"{"choices":[{"delta":5}]}"#,
            r#"{"choices":[{"delta":{"content":5}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":{}}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":18446744073709551615,"function":{"arguments":"x"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":-3}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"function":{"arguments":7}}]}}]}"#,
            r#"{"choices":[{"finish_reason":3}]}"#,
            r#"{"choices":[{"text":[]}]}"#,
            r#"[1,2]"#,
            r#""[DONE]""#,
        ];
        for data in weird {
            let stream = format!("data: {data}\n\ndata: [DONE]\n\n");
            for route in [CHAT, COMPLETIONS] {
                let _ = record(route, &[stream.as_bytes()]);
            }
        }
        let mut state = 0x9e37_79b9_7f4a_7c15;
        let alphabet = b"data: {}[]\",:\n\r choices delta content [DONE] \xff\xfe";
        for _ in 0..200 {
            let len = (xorshift(&mut state) % 400) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[(xorshift(&mut state) % alphabet.len() as u64) as usize])
                .collect();
            for route in [CHAT, COMPLETIONS] {
                let _ = record(route, &[&bytes]);
                let _ = to_stream(route, &bytes, true);
            }
        }
    }
}

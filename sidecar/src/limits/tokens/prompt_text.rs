//! Reading what counts from a request body: its prompt text, fixed costs (images, message
//! framing, tool schemas) and output bounds.
//!
//! Members are read in the order the body has them, and a duplicate member counts each
//! time (a tree kept the last one and walked its keys sorted): the count of a prompt can
//! differ from one read that way by a token or two, which the response's usage settles.
//!
//! Read with no JSON tree: the top level is split into raw fields, and the prompt's fields
//! are walked by a reader that appends strings straight to the prompt's text. Building a
//! `serde_json::Value` of the body instead (a map and a string for every field of every
//! message) cost more than all the rest of admitting a request.

use std::borrow::Cow;

use super::{Prompt, IMAGE_TOKENS, MESSAGE_OVERHEAD_TOKENS};
#[cfg(test)]
use crate::proxy::json::RequestJson;

/// The fields whose strings are prompt text, in the order they are read.
const TEXT_FIELDS: [&str; 5] = ["messages", "prompt", "input", "instructions", "system"];
/// Fields sent to the model as JSON text: a quarter of their compact size in tokens.
const SCHEMA_FIELDS: [&str; 3] = ["tools", "functions", "response_format"];
const MAX_OUTPUT_FIELDS: [&str; 3] = ["max_completion_tokens", "max_tokens", "max_output_tokens"];
/// Fields of a message or content part whose strings are text the model reads.
const TEXT_MEMBERS: [&str; 6] = ["content", "text", "input", "arguments", "output", "name"];
/// Fields of a message whose strings all count, wherever they are nested.
const NESTED_TEXT_MEMBERS: [&str; 2] = ["tool_calls", "function_call"];

impl Prompt {
    /// Reads what counts from a chat, completions, responses or embeddings body, given its
    /// top-level fields as raw JSON (`field(name)`: the field's last occurrence), as the
    /// proxy has already split them.
    pub fn from_fields<'a>(field: impl Fn(&str) -> Option<&'a str>) -> Prompt {
        let number = |name: &str| field(name).and_then(|v| v.parse::<u64>().ok());
        let mut prompt = Prompt {
            choices: number("n").unwrap_or(1).max(1),
            max_output: MAX_OUTPUT_FIELDS.iter().find_map(|name| number(name)),
            ..Prompt::default()
        };
        for name in TEXT_FIELDS {
            if let Some(raw) = field(name) {
                // The text is at most the field's JSON: one allocation, not one per doubling.
                prompt.text.reserve(raw.len());
                let mode = if name == "messages" {
                    Mode::Messages
                } else {
                    Mode::Text
                };
                let mut reader = Reader {
                    json: raw,
                    pos: 0,
                    prompt: &mut prompt,
                };
                // The proxy's split checks a field's syntax but not all of its content: a lone
                // surrogate escape in the prompt's text, or text nested deeper than the walk
                // goes, stops it here. What follows must still be reserved, so the whole field
                // is estimated on top of what was read: more than its share, never less.
                if reader.value(mode, 0).is_err() {
                    prompt.fixed_tokens = prompt
                        .fixed_tokens
                        .saturating_add(super::estimate_bytes(raw.len()));
                }
            }
        }
        for name in SCHEMA_FIELDS {
            if let Some(raw) = field(name) {
                prompt.fixed_tokens += compact_json_len(raw) as u64 / 4;
            }
        }
        prompt
    }

    /// [`Self::from_fields`] of a whole body; a body that is not a JSON object counts as text.
    #[cfg(test)]
    pub fn from_request(body: &[u8]) -> Prompt {
        let Ok(json) = RequestJson::parse(body) else {
            return Prompt {
                text: String::from_utf8_lossy(body).into_owned(),
                choices: 1,
                ..Prompt::default()
            };
        };
        Prompt::from_fields(|name| json.get(name))
    }

    fn push_piece(&mut self, text: &str) {
        self.text.push_str(text);
        self.text.push('\n');
        self.piece_ends.push(self.text.len());
    }
}

/// The length `json` would have serialized without white space between tokens.
fn compact_json_len(json: &str) -> usize {
    let mut len = 0;
    let (mut in_string, mut escaped) = (false, false);
    for byte in json.bytes() {
        if in_string {
            len += 1;
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
        } else if !byte.is_ascii_whitespace() {
            len += 1;
            in_string = byte == b'"';
        }
    }
    len
}

/// How [`Reader::value`] reads a value.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Prompt text: each string a piece of its own; each number a token (pre-tokenized
    /// input); in an object, the text members only (an image part, whatever its members,
    /// costs [`IMAGE_TOKENS`] instead).
    Text,
    /// `messages`: [`Mode::Text`], each element also costing its framing.
    Messages,
    /// Every string, nested or not, keys aside, with no piece boundaries (tool calls).
    AllStrings,
}

/// Nesting of the prompt's own text deeper than this stops the walk, which recurses into it
/// (the split accepts any depth): a hostile body cannot exhaust the stack.
const MAX_DEPTH: usize = 128;

/// JSON the walk cannot read: a lone surrogate escape, nesting past [`MAX_DEPTH`], or (not
/// expected after the split's check) bad syntax.
struct Stop;

/// Appends a field's prompt text to `prompt`, reading the field's JSON by hand.
///
/// The proxy's split has already checked the whole body's syntax, so strings are found with
/// a SIMD search for their closing quote and taken as they are; only a string the prompt uses
/// (or a member's name) with escapes is decoded (by serde_json), and members it does not use
/// are stepped over unread. Walking the field with serde_json's reader instead checked each
/// string's bytes a second and third time, a few instructions per byte, and was the largest
/// part of admitting a request with a token limit.
struct Reader<'j, 'p> {
    json: &'j str,
    pos: usize,
    prompt: &'p mut Prompt,
}

impl<'j> Reader<'j, '_> {
    fn peek(&self) -> Option<u8> {
        self.json.as_bytes().get(self.pos).copied()
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.pos += 1;
        }
    }

    /// Skips white space and then `byte`, which must come next.
    fn expect(&mut self, byte: u8) -> Result<(), Stop> {
        self.skip_whitespace();
        if self.peek() != Some(byte) {
            return Err(Stop);
        }
        self.pos += 1;
        Ok(())
    }

    /// After an element or member: true if another follows, false at `close`.
    fn more(&mut self, close: u8) -> Result<bool, Stop> {
        self.skip_whitespace();
        match self.peek() {
            Some(b',') => {
                self.pos += 1;
                Ok(true)
            }
            Some(byte) if byte == close => {
                self.pos += 1;
                Ok(false)
            }
            _ => Err(Stop),
        }
    }

    /// Steps into the container at the cursor, `depth` deep: whether it has members (if not,
    /// its `close` is stepped over too).
    fn open(&mut self, close: u8, depth: usize) -> Result<bool, Stop> {
        if depth > MAX_DEPTH {
            return Err(Stop);
        }
        self.pos += 1;
        self.skip_whitespace();
        if self.peek() == Some(close) {
            self.pos += 1;
            return Ok(false);
        }
        Ok(true)
    }

    /// The string at the cursor (white space skipped), decoded only if it has escapes.
    fn string(&mut self) -> Result<Cow<'j, str>, Stop> {
        let (start, escaped) = self.step_over_string()?;
        self.decode(start, escaped)
    }

    /// The string from `start` to the cursor, quotes included, as its text.
    fn decode(&self, start: usize, escaped: bool) -> Result<Cow<'j, str>, Stop> {
        // Between the quotes, and with them for serde_json to decode the escapes.
        let quoted = self.json.get(start..self.pos).ok_or(Stop)?;
        if !escaped {
            return quoted
                .get(1..quoted.len().saturating_sub(1))
                .map(Cow::Borrowed)
                .ok_or(Stop);
        }
        serde_json::from_str(quoted).map_err(|_| Stop)
    }

    /// Steps over the string at the cursor (white space skipped) without reading it: where
    /// its opening quote was, and whether it has escapes.
    fn step_over_string(&mut self) -> Result<(usize, bool), Stop> {
        self.skip_whitespace();
        let start = self.pos;
        self.expect(b'"')?;
        let mut escaped = false;
        loop {
            let rest = self.json.as_bytes().get(self.pos..).ok_or(Stop)?;
            self.pos += memchr::memchr2(b'"', b'\\', rest).ok_or(Stop)?;
            if self.peek() == Some(b'"') {
                self.pos += 1;
                return Ok((start, escaped));
            }
            // A backslash and the character it escapes (a `\u` escape's hex digits hold no
            // quote or backslash).
            escaped = true;
            self.pos += 2;
        }
    }

    /// Steps over a number or a literal (`true`, `false`, `null`).
    fn scalar(&mut self) {
        while matches!(
            self.peek(),
            Some(b'0'..=b'9' | b'a'..=b'z' | b'E' | b'+' | b'-' | b'.')
        ) {
            self.pos += 1;
        }
    }

    /// Reads the value at the cursor for its prompt text, as `mode` says.
    fn value(&mut self, mode: Mode, depth: usize) -> Result<(), Stop> {
        self.skip_whitespace();
        match self.peek() {
            Some(b'"') => {
                let text = self.string()?;
                match mode {
                    Mode::AllStrings => self.prompt.text.push_str(&text),
                    Mode::Text | Mode::Messages => self.prompt.push_piece(&text),
                }
            }
            Some(b'[') => self.array(mode, depth + 1)?,
            Some(b'{') if mode == Mode::AllStrings => self.all_strings_object(depth + 1)?,
            Some(b'{') => self.text_object(depth + 1)?,
            Some(b'-' | b'0'..=b'9') => {
                self.scalar();
                if mode != Mode::AllStrings {
                    self.prompt.fixed_tokens += 1;
                }
            }
            Some(b't' | b'f' | b'n') => self.scalar(),
            _ => return Err(Stop),
        }
        Ok(())
    }

    fn array(&mut self, mode: Mode, depth: usize) -> Result<(), Stop> {
        if !self.open(b']', depth)? {
            return Ok(());
        }
        let item_mode = match mode {
            Mode::Messages => Mode::Text,
            mode => mode,
        };
        loop {
            self.value(item_mode, depth)?;
            if mode == Mode::Messages {
                self.prompt.fixed_tokens += MESSAGE_OVERHEAD_TOKENS;
            }
            if !self.more(b']')? {
                return Ok(());
            }
        }
    }

    fn all_strings_object(&mut self, depth: usize) -> Result<(), Stop> {
        if !self.open(b'}', depth)? {
            return Ok(());
        }
        loop {
            self.step_over_string()?;
            self.expect(b':')?;
            self.value(Mode::AllStrings, depth)?;
            if !self.more(b'}')? {
                return Ok(());
            }
        }
    }

    /// A message or content part: its text members only, or an image's fixed cost.
    fn text_object(&mut self, depth: usize) -> Result<(), Stop> {
        if !self.open(b'}', depth)? {
            return Ok(());
        }
        // The part's `type` may come after its text: read on, and take the text back out
        // if the part turns out to be an image.
        let (text_len, pieces, fixed) = (
            self.prompt.text.len(),
            self.prompt.piece_ends.len(),
            self.prompt.fixed_tokens,
        );
        let mut image = false;
        loop {
            let key = self.string()?;
            self.expect(b':')?;
            self.skip_whitespace();
            if key == "type" {
                // A `type` that is not a string is skipped like any other value.
                if self.peek() == Some(b'"') {
                    // One that cannot be decoded (a lone surrogate) names no image.
                    let (start, escaped) = self.step_over_string()?;
                    image |= self
                        .decode(start, escaped)
                        .is_ok_and(|kind| kind.contains("image"));
                } else {
                    self.skip()?;
                }
            } else if TEXT_MEMBERS.contains(&key.as_ref()) {
                self.value(Mode::Text, depth)?;
            } else if NESTED_TEXT_MEMBERS.contains(&key.as_ref()) {
                self.value(Mode::AllStrings, depth)?;
            } else {
                self.skip()?;
            }
            if !self.more(b'}')? {
                break;
            }
        }
        if image {
            self.prompt.text.truncate(text_len);
            self.prompt.piece_ends.truncate(pieces);
            self.prompt.fixed_tokens = fixed + IMAGE_TOKENS;
        }
        Ok(())
    }

    /// Steps over the value at the cursor, reading nothing from it: its strings are not
    /// decoded and its nesting is counted, not walked (the split has checked its syntax), so
    /// nothing in a member the prompt does not use can stop the walk.
    fn skip(&mut self) -> Result<(), Stop> {
        self.skip_whitespace();
        let mut depth: u64 = 0;
        loop {
            match self.peek().ok_or(Stop)? {
                b'"' => {
                    self.step_over_string()?;
                }
                b'[' | b'{' => {
                    depth = depth.checked_add(1).ok_or(Stop)?;
                    self.pos += 1;
                }
                b']' | b'}' => {
                    depth = depth.checked_sub(1).ok_or(Stop)?;
                    self.pos += 1;
                }
                b',' | b':' | b' ' | b'\n' | b'\r' | b'\t' if depth > 0 => self.pos += 1,
                _ => {
                    let before = self.pos;
                    self.scalar();
                    if self.pos == before {
                        return Err(Stop);
                    }
                }
            }
            if depth == 0 {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(body: serde_json::Value) -> Prompt {
        Prompt::from_request(body.to_string().as_bytes())
    }

    #[test]
    fn messages_text_framing_images_and_tool_calls() {
        let prompt = read(json!({
            "model": "m", "n": 2, "max_tokens": 50,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"content": [
                    {"text": "look at this", "type": "text"},
                    {"image_url": {"url": "data:image/png;base64,AAAA"}, "type": "image_url"},
                ], "role": "user"},
                {"role": "assistant", "content": null, "name": "helper",
                 "tool_calls": [{"id": "c1", "function": {"name": "lookup", "arguments": "{\"q\":1}"}}]},
                {"role": "tool", "content": "42"},
            ],
        }));
        assert_eq!(prompt.choices, 2);
        assert_eq!(prompt.max_output, Some(50));
        // json! sorts members: the tool call's strings come as `function` {arguments, name}, `id`.
        assert_eq!(
            prompt.text,
            "Be brief.\nlook at this\nhelper\n{\"q\":1}lookupc142\n"
        );
        assert_eq!(prompt.piece_ends.len(), 4);
        assert_eq!(
            prompt.fixed_tokens,
            4 * MESSAGE_OVERHEAD_TOKENS + IMAGE_TOKENS
        );
    }

    #[test]
    fn fields_are_read_in_a_fixed_order_and_the_last_duplicate_wins() {
        let body = br#"{"system":"s","input":"i","prompt":"old","prompt":"p","instructions":"x","max_output_tokens":7,"max_tokens":9}"#;
        let prompt = Prompt::from_request(body);
        assert_eq!(prompt.text, "p\ni\nx\ns\n");
        assert_eq!(
            prompt.max_output,
            Some(9),
            "max_tokens is read before max_output_tokens"
        );
        assert_eq!(prompt.choices, 1);
    }

    #[test]
    fn token_arrays_count_a_token_a_number() {
        let prompt = read(json!({"input": [[1, 2, 3], [4, 5]], "n": 0}));
        assert_eq!(prompt.fixed_tokens, 5);
        assert_eq!(
            prompt.choices, 1,
            "n = 0 still generates one choice's worth"
        );
    }

    #[test]
    fn tool_schemas_cost_a_quarter_of_their_compact_size() {
        let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
        let compact = tools.to_string();
        let spaced = format!(
            "{{\"tools\": {}}}",
            serde_json::to_string_pretty(&tools).unwrap()
        );
        let prompt = Prompt::from_request(spaced.as_bytes());
        assert_eq!(prompt.fixed_tokens, compact.len() as u64 / 4);
        assert_eq!(
            compact_json_len(r#" { "a" : "x \" y" } "#),
            r#"{"a":"x \" y"}"#.len()
        );
    }

    #[test]
    fn anything_else_is_text_and_nothing_panics() {
        for body in [
            &b"not json"[..],
            b"[1,2]",
            b"{\"messages\":",
            b"\xff\xfe",
            b"",
            b"{}{}",
        ] {
            let prompt = Prompt::from_request(body);
            assert_eq!(prompt.text, String::from_utf8_lossy(body));
            assert_eq!(prompt.choices, 1);
        }
        // A field the walk cannot finish (a lone surrogate, nesting past serde_json's limit)
        // is estimated whole, on top of what was read before the stop.
        let long = "word ".repeat(20_000);
        for stopper in [
            r#""\ud800""#.to_string(),
            format!("{}1{}", "[".repeat(200), "]".repeat(200)),
        ] {
            let body =
                format!(r#"{{"messages":[{{"content":{stopper}}},{{"content":"{long}"}}]}}"#);
            let json = RequestJson::parse(body.as_bytes()).expect("the split accepts it");
            let prompt = Prompt::from_fields(|name| json.get(name));
            assert!(
                prompt.fixed_tokens >= long.len() as u64 / 4,
                "{stopper:.20}: {}",
                prompt.fixed_tokens
            );
        }
        // What a member the prompt does not use holds cannot stop the walk: it is stepped
        // over, not decoded or walked.
        let deep = format!("{}1{}", "[".repeat(300), "]".repeat(300));
        for unused in [r#""\ud800""#, deep.as_str()] {
            let body = format!(
                r#"{{"messages":[{{"content":"hi","x":{unused}}},{{"type":"\ud800","text":"yo"}}]}}"#
            );
            let prompt = Prompt::from_request(body.as_bytes());
            assert_eq!(prompt.text, "hi\nyo\n", "{unused:.20}");
            assert_eq!(
                prompt.fixed_tokens,
                2 * MESSAGE_OVERHEAD_TOKENS,
                "{unused:.20}"
            );
        }
        // Odd shapes inside an object are read as far as they make sense.
        let prompt = read(
            json!({"messages": [1, "two", [3], {"content": {"text": true}}, null], "n": "x", "max_tokens": -1}),
        );
        assert_eq!(prompt.text, "two\n");
        assert_eq!(prompt.choices, 1);
        assert_eq!(prompt.max_output, None);
    }
}

#[cfg(test)]
mod proptests;

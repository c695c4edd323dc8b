//! Reading what counts from a request body: its prompt text, fixed costs (images, message
//! framing, tool schemas) and output bounds.
//!
//! Members are read in the order the body has them, and a duplicate member counts each
//! time (a tree kept the last one and walked its keys sorted): the count of a prompt can
//! differ from one read that way by a token or two, which the response's usage settles.
//!
//! Read in one pass over the bytes, with no JSON tree: the top level is split into raw
//! fields, and the prompt's fields are walked by visitors that append strings straight to
//! the prompt's text. Building a `serde_json::Value` of the body instead (a map and a
//! string for every field of every message) cost more than all the rest of admitting a
//! request.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::{Prompt, IMAGE_TOKENS, MESSAGE_OVERHEAD_TOKENS};
use crate::proxy::json::Key;
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
    pub fn from_fields<'a>(field: impl Fn(&str) -> Option<&'a RawValue>) -> Prompt {
        let number = |name: &str| field(name).and_then(|v| v.get().parse::<u64>().ok());
        let mut prompt = Prompt {
            choices: number("n").unwrap_or(1).max(1),
            max_output: MAX_OUTPUT_FIELDS.iter().find_map(|name| number(name)),
            ..Prompt::default()
        };
        for name in TEXT_FIELDS {
            if let Some(raw) = field(name) {
                // The text is at most the field's JSON: one allocation, not one per doubling.
                prompt.text.reserve(raw.get().len());
                let mut reader = serde_json::Deserializer::from_str(raw.get());
                let collect = Walk {
                    prompt: &mut prompt,
                    mode: if name == "messages" {
                        Mode::Messages
                    } else {
                        Mode::Text
                    },
                };
                // The proxy's split checks a field's syntax but not all of its content: a lone
                // surrogate escape or nesting deeper than serde_json's limit stops the walk
                // here. What follows must still be reserved, so the whole field is estimated on
                // top of what was read: more than its share, never less.
                if collect.deserialize(&mut reader).is_err() {
                    prompt.fixed_tokens = prompt
                        .fixed_tokens
                        .saturating_add(super::estimate_bytes(raw.get().len()));
                }
            }
        }
        for name in SCHEMA_FIELDS {
            if let Some(raw) = field(name) {
                prompt.fixed_tokens += compact_json_len(raw.get()) as u64 / 4;
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

/// How [`Walk`] reads a value.
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

/// Appends a value's prompt text to `prompt`, as `mode` says.
struct Walk<'p> {
    prompt: &'p mut Prompt,
    mode: Mode,
}

impl Walk<'_> {
    fn nested(&mut self, mode: Mode) -> Walk<'_> {
        Walk {
            prompt: &mut *self.prompt,
            mode,
        }
    }

    fn number<E>(self) -> Result<(), E> {
        if self.mode != Mode::AllStrings {
            self.prompt.fixed_tokens += 1;
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("prompt text")
    }

    fn visit_str<E>(self, text: &str) -> Result<(), E> {
        match self.mode {
            Mode::AllStrings => self.prompt.text.push_str(text),
            Mode::Text | Mode::Messages => self.prompt.push_piece(text),
        }
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        self.number()
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        self.number()
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        self.number()
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut items: A) -> Result<(), A::Error> {
        let item_mode = match self.mode {
            Mode::Messages => Mode::Text,
            mode => mode,
        };
        while items.next_element_seed(self.nested(item_mode))?.is_some() {
            if self.mode == Mode::Messages {
                self.prompt.fixed_tokens += MESSAGE_OVERHEAD_TOKENS;
            }
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut members: A) -> Result<(), A::Error> {
        if self.mode == Mode::AllStrings {
            while members.next_key::<IgnoredAny>()?.is_some() {
                members.next_value_seed(self.nested(Mode::AllStrings))?;
            }
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
        while let Some(Key(key)) = members.next_key::<Key<'de>>()? {
            if key == "type" {
                // Raw, so that a `type` that is not a string is skipped like any other value.
                let kind = members.next_value::<&'de RawValue>()?;
                image |= serde_json::from_str::<Key<'_>>(kind.get())
                    .is_ok_and(|Key(kind)| kind.contains("image"));
            } else if TEXT_MEMBERS.contains(&key.as_ref()) {
                members.next_value_seed(self.nested(Mode::Text))?;
            } else if NESTED_TEXT_MEMBERS.contains(&key.as_ref()) {
                members.next_value_seed(self.nested(Mode::AllStrings))?;
            } else {
                members.next_value::<IgnoredAny>()?;
            }
        }
        if image {
            self.prompt.text.truncate(text_len);
            self.prompt.piece_ends.truncate(pieces);
            self.prompt.fixed_tokens = fixed + IMAGE_TOKENS;
        }
        Ok(())
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
        // Odd shapes inside an object are read as far as they make sense.
        let prompt = read(
            json!({"messages": [1, "two", [3], {"content": {"text": true}}, null], "n": "x", "max_tokens": -1}),
        );
        assert_eq!(prompt.text, "two\n");
        assert_eq!(prompt.choices, 1);
        assert_eq!(prompt.max_output, None);
    }
}

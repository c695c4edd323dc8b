//! The hand-written reader against the rules it implements, written over a JSON tree: any
//! value in any prompt field, strings with any characters (so with escapes), reads to the
//! same text, pieces and fixed costs.

use proptest::prelude::*;
use serde_json::{Map, Value};

use super::{Mode, Prompt, NESTED_TEXT_MEMBERS, TEXT_FIELDS, TEXT_MEMBERS};
use crate::limits::tokens::{IMAGE_TOKENS, MESSAGE_OVERHEAD_TOKENS};

/// What the reader should make of `value`, read as `mode`.
fn expected(value: &Value, mode: Mode, prompt: &mut Prompt) {
    match value {
        Value::String(text) if mode == Mode::AllStrings => prompt.text.push_str(text),
        Value::String(text) => prompt.push_piece(text),
        Value::Number(_) if mode != Mode::AllStrings => prompt.fixed_tokens += 1,
        Value::Number(_) | Value::Bool(_) | Value::Null => {}
        Value::Array(items) => {
            let item_mode = if mode == Mode::Messages {
                Mode::Text
            } else {
                mode
            };
            for item in items {
                expected(item, item_mode, prompt);
                if mode == Mode::Messages {
                    prompt.fixed_tokens += MESSAGE_OVERHEAD_TOKENS;
                }
            }
        }
        Value::Object(members) if mode == Mode::AllStrings => {
            for member in members.values() {
                expected(member, Mode::AllStrings, prompt);
            }
        }
        Value::Object(members) => {
            let image = members
                .get("type")
                .and_then(Value::as_str)
                .is_some_and(|kind| kind.contains("image"));
            if image {
                prompt.fixed_tokens += IMAGE_TOKENS;
                return;
            }
            for (key, member) in members {
                if TEXT_MEMBERS.contains(&key.as_str()) {
                    expected(member, Mode::Text, prompt);
                } else if NESTED_TEXT_MEMBERS.contains(&key.as_str()) {
                    expected(member, Mode::AllStrings, prompt);
                }
            }
        }
    }
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "content",
            "text",
            "type",
            "name",
            "tool_calls",
            "function_call",
            "role",
            "image_url",
        ])
        .prop_map(str::to_string),
        any::<String>(),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<String>().prop_map(Value::String),
        prop::sample::select(vec!["image_url", "input_image", "text"])
            .prop_map(|kind| Value::String(kind.to_string())),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        any::<bool>().prop_map(Value::Bool),
        Just(Value::Null),
    ];
    leaf.prop_recursive(5, 48, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..5)
                .prop_map(|members| Value::Object(members.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

proptest! {
    #![proptest_config(crate::proptest_config::config())]

    #[test]
    fn reads_what_the_rules_say(value in json_value(), field in prop::sample::select(TEXT_FIELDS.to_vec())) {
        let mut want = Prompt { choices: 1, ..Prompt::default() };
        let mode = if field == "messages" { Mode::Messages } else { Mode::Text };
        expected(&value, mode, &mut want);
        let mut body = Map::new();
        body.insert(field.to_string(), value);
        for pretty in [false, true] {
            let json = if pretty {
                serde_json::to_string_pretty(&body)
            } else {
                serde_json::to_string(&body)
            };
            let got = Prompt::from_request(json.expect("a tree serializes").as_bytes());
            prop_assert_eq!(&got, &want);
        }
    }
}

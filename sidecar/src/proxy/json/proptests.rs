//! The body rewrite sees every app's JSON: whatever it holds, parsing must not panic, and
//! the rewrite must change `model` and nothing else.

use proptest::collection::vec;
use proptest::prelude::*;

use super::*;

/// Whitespace JSON allows around values.
fn ws() -> impl Strategy<Value = String> {
    "[ \t\r\n]{0,2}"
}

/// `text` as a JSON string literal, each character written plainly or escaped at random
/// (`\uXXXX`, surrogate pairs, short escapes): a key or value must be compared by what it
/// says, not by how it was written.
fn string_literal(text: impl Strategy<Value = String>) -> impl Strategy<Value = (String, String)> {
    text.prop_flat_map(|s| {
        let n = s.chars().count();
        (Just(s), vec(0u8..4, n))
    })
    .prop_map(|(s, modes)| {
        let mut literal = String::from("\"");
        for (c, mode) in s.chars().zip(modes) {
            escape_into(&mut literal, c, mode);
        }
        literal.push('"');
        (s, literal)
    })
}

fn escape_into(out: &mut String, c: char, mode: u8) {
    let mut unicode_escape = |c: char| {
        let mut units = [0u16; 2];
        for unit in c.encode_utf16(&mut units) {
            out.push_str(&format!("\\u{unit:04x}"));
        }
    };
    match (c, mode) {
        (_, 0) => unicode_escape(c),
        ('"', _) => out.push_str("\\\""),
        ('\\', _) => out.push_str("\\\\"),
        ('\n', _) => out.push_str("\\n"),
        ('\t', _) => out.push_str("\\t"),
        ('\r', _) => out.push_str("\\r"),
        ('\u{8}', _) => out.push_str("\\b"),
        ('\u{c}', _) => out.push_str("\\f"),
        (c, _) if c < ' ' => unicode_escape(c),
        ('/', 1) => out.push_str("\\/"),
        (c, _) => out.push(c),
    }
}

/// Any JSON value as text, numbers beyond f64's range and odd spacing included.
fn value_text() -> BoxedStrategy<String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        Just("true".to_string()),
        Just("false".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(|f| serde_json::to_string(&f).unwrap()),
        "-?(0|[1-9][0-9]{0,40})(\\.[0-9]{1,20})?([eE][+-]?[0-9]{1,3})?",
        string_literal(any::<String>()).prop_map(|(_, literal)| literal),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            vec((ws(), inner.clone(), ws()), 0..4).prop_map(|items| {
                let items: Vec<String> = items.into_iter().map(|(a, v, b)| a + &v + &b).collect();
                format!("[{}]", items.join(","))
            }),
            vec((string_literal(key_text()), ws(), inner), 0..4).prop_map(|fields| {
                let fields: Vec<String> = fields
                    .into_iter()
                    .map(|((_, key), space, value)| format!("{key}:{space}{value}"))
                    .collect();
                format!("{{{}}}", fields.join(","))
            }),
        ]
    })
    .boxed()
}

/// Mostly the fields the rewrite touches and other request fields (and near misses), so
/// that duplicates are common.
fn key_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just("model".to_string()),
        1 => Just("messages".to_string()),
        1 => Just("stream".to_string()),
        2 => Just("stream_options".to_string()),
        1 => Just("include_usage".to_string()),
        1 => Just("Model".to_string()),
        1 => Just("model ".to_string()),
        1 => Just("model\u{0}".to_string()),
        2 => any::<String>(),
    ]
}

/// A request body: its top-level fields (decoded key, value text) and its text.
#[derive(Debug, Clone)]
struct Body {
    fields: Vec<(String, String)>,
    text: String,
}

fn body() -> impl Strategy<Value = Body> {
    (
        vec((ws(), string_literal(key_text()), ws(), value_text()), 0..6),
        ws(),
    )
        .prop_map(|(fields, tail)| {
            let mut text = String::from("{");
            let mut decoded = Vec::new();
            for (i, (space, (key, key_literal), colon_space, value)) in
                fields.into_iter().enumerate()
            {
                if i > 0 {
                    text.push(',');
                }
                text.push_str(&format!("{space}{key_literal}{colon_space}:{value}"));
                decoded.push((key, value));
            }
            text.push_str(&tail);
            text.push('}');
            Body {
                fields: decoded,
                text,
            }
        })
}

/// serde_json's split of `text` (the reader `RequestJson::parse` falls back to), as owned text.
fn serde_split(text: &str) -> Option<Vec<(String, String)>> {
    let mut de = serde_json::Deserializer::from_str(text);
    let fields = de
        .deserialize_map(FieldsVisitor)
        .and_then(|fields| de.end().map(|()| fields))
        .ok()?;
    Some(
        fields
            .into_iter()
            .map(|(key, value)| (key.into_owned(), value.get().to_string()))
            .collect(),
    )
}

/// The fast scan's split of `text`, as owned text.
fn scan_split(text: &str) -> Option<Vec<(String, String)>> {
    scan::object_members(text).map(|fields| {
        fields
            .into_iter()
            .map(|(key, value)| (key.into_owned(), value.to_string()))
            .collect()
    })
}

/// Bytes that move a JSON scanner from one state to another, for damaging bodies.
const SYNTAX_BYTES: &[u8] = b"\"\\{}[],: \t\n\x01\x1f0123456789-+.eEtrufalsn/bx";

fn model_keys(json: &RequestJson<'_>) -> usize {
    json.fields.iter().filter(|(k, _)| k == "model").count()
}

/// The edges of RFC 8259 a hand-written scanner gets wrong: each answered as serde_json
/// answers, and the valid ones by the scan itself.
#[test]
fn the_scan_knows_the_grammar_edges() {
    let deep = format!("{{\"x\":{}1{}}}", "[".repeat(129), "]".repeat(129));
    let cases: &[(&str, bool)] = &[
        (r#"{"x":[[],{},[{}],{"a":[]}]}"#, true),
        (" \t\r\n{ \"a\" : 1 , \"b\":[ 1 , 2 ] } \n", true),
        (r#"{"x":-0.5e+10,"y":0,"z":-1E-2,"w":10}"#, true),
        (r#"{"x":"\u00e9\n\/\"\\\b\f\r\t"}"#, true),
        (r#"{"x":true,"y":false,"z":null}"#, true),
        ("{\"x\":\"a\u{1}b\"}", false),
        ("{\"x\":\"a\u{1f}b\"}", false),
        ("{\"x\u{1}\":1}", false),
        (r#"{"x":01}"#, false),
        (r#"{"x":1.}"#, false),
        (r#"{"x":.5}"#, false),
        (r#"{"x":-}"#, false),
        (r#"{"x":1e}"#, false),
        (r#"{"x":+1}"#, false),
        (r#"{"x":tru}"#, false),
        (r#"{"x":nul}"#, false),
        (r#"{"x":[1,]}"#, false),
        (r#"{"x":1,}"#, false),
        (r#"{"x":{"a":1,}}"#, false),
        (r#"{"x":{"a"}}"#, false),
        (r#"{"x":{1:2}}"#, false),
        (r#"{"x":[1}"#, false),
        (r#"{"x":"\x"}"#, false),
        (r#"{"x":"\u12G4"}"#, false),
        (r#"{"\ud800":1}"#, false),
        (r#"{"x":1} x"#, false),
        (r#"{"x":1}{}"#, false),
        (r#"{"x" 1}"#, false),
        (r#"{"x":"open}"#, false),
        ("", false),
        ("[]", false),
    ];
    for (text, valid) in cases {
        let serde = serde_split(text);
        assert_eq!(
            serde.is_some(),
            *valid,
            "{text:?}: serde_json disagrees with the table"
        );
        assert_eq!(scan_split(text), serde, "{text:?}");
    }
    // Nesting deeper than the scan tracks is left to serde_json, which accepts it.
    assert_eq!(scan_split(&deep), None);
    assert!(serde_split(&deep).is_some());
    assert!(RequestJson::parse(deep.as_bytes()).is_ok());
}

#[test]
fn deep_nesting_is_parsed_without_recursion() {
    let depth = 200_000;
    let body = format!(
        "{{\"model\":\"m\",\"x\":{}{}}}",
        "[".repeat(depth),
        "]".repeat(depth)
    );
    let json = RequestJson::parse(body.as_bytes()).unwrap();
    assert_eq!(json.fields.len(), 2);
}

/// Found by a first draft of `rewrite_changes_model_and_nothing_else`: a body with no
/// `model` (endpoint chosen by header or as the default) went upstream with none, and one
/// with two went with two.
#[test]
fn rewrite_leaves_exactly_one_model_key() {
    for body in [r#"{}"#, r#"{"model":null,"model":null}"#, r#"{"x":1}"#] {
        let json = RequestJson::parse(body.as_bytes()).unwrap();
        let out = json.with_model("m", false, body.len());
        let rewritten = RequestJson::parse(&out).unwrap();
        assert_eq!(
            model_keys(&rewritten),
            1,
            "{body} became {}",
            String::from_utf8_lossy(&out)
        );
    }
}

/// Found by `rewrite_changes_model_and_nothing_else`: asking for usage once re-serialized
/// `stream_options` through `serde_json::Value`, moving floats by a unit in the last place
/// and dropping an object holding a number beyond f64. Its other options are now copied as
/// sent.
#[test]
fn rewritten_stream_options_keep_their_values() {
    for (body, kept) in [
        (
            r#"{"stream_options":{"x":[2.008636581883621e-172]}}"#,
            r#""x":[2.008636581883621e-172]"#,
        ),
        (r#"{"stream_options":{"x":1e400}}"#, r#""x":1e400"#),
    ] {
        let out = RequestJson::parse(body.as_bytes())
            .unwrap()
            .with_model("m", true, body.len());
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains(kept), "{body} became {out}");
    }
}

proptest! {
    #![proptest_config(crate::proptest_config::config())]

    #[test]
    fn any_bytes_parse_or_fail_cleanly(bytes in vec(any::<u8>(), 0..512)) {
        if let Ok(json) = RequestJson::parse(&bytes) {
            let out = json.with_model("m", true, bytes.len());
            prop_assert!(serde_json::from_slice::<serde::de::IgnoredAny>(&out).is_ok());
        }
    }

    #[test]
    fn damaged_bodies_parse_or_fail_cleanly(
        body in body(),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut bytes = body.text.into_bytes();
        let at = flip.index(bytes.len());
        bytes[at] = byte;
        bytes.truncate(cut.index(bytes.len() + 1));
        if let Ok(json) = RequestJson::parse(&bytes) {
            let out = json.with_model("m", true, bytes.len());
            prop_assert!(serde_json::from_slice::<serde::de::IgnoredAny>(&out).is_ok());
        }
    }

    #[test]
    fn the_scan_splits_as_serde_json_does(body in body()) {
        let scanned = scan_split(&body.text);
        prop_assert!(scanned.is_some(), "{:?} left to serde_json", body.text);
        prop_assert_eq!(scanned, serde_split(&body.text));
    }

    /// The scan accepts only what serde_json accepts, damaged in any of the ways that change
    /// a scanner's state; and it gives up on nothing serde_json accepts (but deep nesting).
    #[test]
    fn the_scan_refuses_what_serde_json_refuses(
        body in body(),
        edits in vec((any::<prop::sample::Index>(), prop::sample::select(SYNTAX_BYTES), 0u8..3), 1..4),
    ) {
        let mut bytes = body.text.into_bytes();
        for (at, byte, how) in edits {
            let at = at.index(bytes.len() + 1);
            match how {
                0 if at < bytes.len() => bytes[at] = byte,
                1 if at < bytes.len() => { bytes.remove(at); }
                _ => bytes.insert(at, byte),
            }
        }
        let Ok(text) = std::str::from_utf8(&bytes) else {
            return Ok(());
        };
        prop_assert_eq!(scan_split(text), serde_split(text), "{:?}", text);
    }

    #[test]
    fn rewrite_changes_model_and_nothing_else(
        body in body(),
        model in any::<String>(),
        ask_usage in any::<bool>(),
    ) {
        let json = RequestJson::parse(body.text.as_bytes());
        prop_assert!(json.is_ok(), "{:?} rejected: {:?}", body.text, json.err());
        let json = json.unwrap();
        let out = json.with_model(&model, ask_usage, body.text.len());

        let rewritten = RequestJson::parse(&out);
        prop_assert!(rewritten.is_ok(), "output {:?} rejected", String::from_utf8_lossy(&out));
        let rewritten = rewritten.unwrap();
        let has_options = body.fields.iter().any(|(k, _)| k == "stream_options");
        let added_options = usize::from(ask_usage && !has_options);
        let others_in: Vec<_> = body.fields.iter().filter(|(k, _)| k != "model").collect();
        let others_out: Vec<_> = rewritten.fields.iter().filter(|(k, _)| k != "model").collect();
        prop_assert_eq!(others_out.len(), others_in.len() + added_options);
        for ((key, value), (out_key, out_value)) in others_in.iter().zip(&others_out) {
            prop_assert_eq!(key, out_key);
            if ask_usage && key == "stream_options" {
                let options = RequestJson::parse(out_value.as_bytes());
                prop_assert!(options.is_ok());
                let options = options.unwrap();
                prop_assert_eq!(options.get("include_usage"), Some("true"));
                // The other options, byte for byte.
                if let Ok(sent) = RequestJson::parse(value.as_bytes()) {
                    for (k, v) in sent.fields.iter().filter(|(k, _)| k != "include_usage") {
                        prop_assert!(
                            options.fields.iter().any(|(ok, ov)| ok == k && ov == v),
                            "{} lost from {}", k, value
                        );
                    }
                }
            } else {
                // Byte for byte: numbers beyond f64, escapes and spacing inside values survive.
                prop_assert_eq!(value.trim_matches(|c| " \t\r\n".contains(c)), *out_value);
            }
        }
        if added_options == 1 {
            let (key, value) = &rewritten.fields[rewritten.fields.len() - 1];
            prop_assert_eq!(key, "stream_options");
            prop_assert_eq!(*value, r#"{"include_usage":true}"#);
        }
        prop_assert_eq!(model_keys(&rewritten), 1);
        prop_assert_eq!(
            rewritten.model().ok().flatten().map(|m| m.into_owned()),
            Some(model.clone())
        );

        // What a provider's parser sees: the input with `model` replaced (and usage asked
        // for), the last of duplicate keys winning on both sides.
        if let Ok(mut expected) = serde_json::from_str::<serde_json::Value>(&body.text) {
            if let Some(fields) = expected.as_object_mut() {
                fields.insert("model".to_string(), serde_json::Value::String(model.clone()));
            }
            let actual = serde_json::from_slice::<serde_json::Value>(&out);
            prop_assert!(actual.is_ok());
            let mut actual = actual.unwrap();
            if ask_usage {
                // Checked field by field above.
                for value in [&mut expected, &mut actual] {
                    if let Some(fields) = value.as_object_mut() {
                        fields.remove("stream_options");
                    }
                }
            }
            prop_assert_eq!(actual, expected);
        }
    }

    #[test]
    fn model_of_every_type_is_replaced(model_value in value_text(), model in any::<String>()) {
        let text = format!("{{\"messages\":[],\"model\":{model_value},\"stream\":true}}");
        let json = RequestJson::parse(text.as_bytes()).unwrap();
        let out: serde_json::Value = serde_json::from_slice(&json.with_model(&model, false, text.len())).unwrap();
        prop_assert_eq!(out, serde_json::json!({"messages": [], "model": model, "stream": true}));
    }
}

//! A request body's top-level JSON fields, parsed without building a tree: values stay raw
//! slices of the original bytes, so rewriting `model` costs one copy, not a parse and a
//! re-serialization of a possibly multi-megabyte prompt.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::ProxyError;
use crate::json_string::push_json_string;

mod scan;

pub struct RequestJson<'a> {
    /// The top-level members: key, and the value's JSON text as sent.
    fields: Vec<(Cow<'a, str>, &'a str)>,
}

/// A key or string, borrowed from the body unless it has escapes.
#[derive(Deserialize)]
pub(crate) struct Key<'a>(#[serde(borrow)] pub(crate) Cow<'a, str>);

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Vec<(Cow<'de, str>, &'de RawValue)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
        while let Some((Key(key), value)) = map.next_entry::<Key<'de>, &'de RawValue>()? {
            fields.push((key, value));
        }
        Ok(fields)
    }
}

impl<'a> RequestJson<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ProxyError> {
        // Checked as UTF-8 once, whole: read from bytes, serde_json would check each key and
        // each raw value again.
        let text = std::str::from_utf8(bytes)
            .map_err(|e| ProxyError::MalformedJson(format!("the body is not UTF-8: {e}")))?;
        if let Some(fields) = scan::object_members(text) {
            return Ok(Self { fields });
        }
        let mut de = serde_json::Deserializer::from_str(text);
        match de
            .deserialize_map(FieldsVisitor)
            .and_then(|fields| de.end().map(|()| fields))
        {
            Ok(fields) => Ok(Self {
                fields: fields.into_iter().map(|(k, v)| (k, v.get())).collect(),
            }),
            Err(e) if e.classify() == serde_json::error::Category::Data => {
                Err(ProxyError::BodyNotAnObject)
            }
            Err(e) => Err(ProxyError::MalformedJson(e.to_string())),
        }
    }

    pub fn get(&self, name: &str) -> Option<&'a str> {
        // The last occurrence wins, as in most JSON parsers (and so at the provider).
        self.fields
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| *v)
    }

    /// The `model` field: None when absent or null; an error when it is not a string, which
    /// would otherwise silently select the default endpoint.
    pub fn model(&self) -> Result<Option<Cow<'a, str>>, ProxyError> {
        let Some(text) = self.get("model") else {
            return Ok(None);
        };
        match text.as_bytes().first() {
            // As a `Key`: borrowed from the body unless escaped (a plain `Cow` would copy).
            Some(b'"') => serde_json::from_str::<Key<'a>>(text)
                .map(|Key(model)| Some(model))
                .map_err(|_| ProxyError::ModelNotAString("an invalid string")),
            Some(b'n') => Ok(None),
            Some(b'{') => Err(ProxyError::ModelNotAString("an object")),
            Some(b'[') => Err(ProxyError::ModelNotAString("an array")),
            Some(b't' | b'f') => Err(ProxyError::ModelNotAString("a boolean")),
            _ => Err(ProxyError::ModelNotAString("a number")),
        }
    }

    /// `"stream": true`
    pub fn streams(&self) -> bool {
        self.get("stream").is_some_and(|v| v == "true")
    }

    /// A stream whose request did not ask for usage (`stream_options.include_usage`).
    pub fn streams_without_usage(&self) -> bool {
        self.streams()
            && !self.get("stream_options").is_some_and(|raw| {
                RequestJson::parse(raw.as_bytes())
                    .ok()
                    .and_then(|options| options.get("include_usage"))
                    .is_some_and(|v| v == "true")
            })
    }

    /// The body again with `model` set to `model`, once (where the app's last `model` was,
    /// else at the end: an endpoint chosen by header or as the default still gets its
    /// model), and with `ask_usage`, `stream_options.include_usage` set. All other bytes are
    /// kept as sent.
    pub fn with_model(&self, model: &str, ask_usage: bool, size_hint: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(size_hint + model.len() + 64);
        out.push(b'{');
        let last_model = self.fields.iter().rposition(|(k, _)| k == "model");
        let mut has_stream_options = false;
        let mut first = true;
        let mut field = |out: &mut Vec<u8>, key: &str| {
            if !std::mem::take(&mut first) {
                out.push(b',');
            }
            push_json_string(out, key);
            out.push(b':');
        };
        for (i, (key, value)) in self.fields.iter().enumerate() {
            if key == "model" {
                if Some(i) == last_model {
                    field(&mut out, key);
                    push_json_string(&mut out, model);
                }
            } else if ask_usage && key == "stream_options" {
                has_stream_options = true;
                field(&mut out, key);
                write_options_with_usage(&mut out, value);
            } else {
                field(&mut out, key);
                out.extend_from_slice(value.as_bytes());
            }
        }
        if last_model.is_none() {
            field(&mut out, "model");
            push_json_string(&mut out, model);
        }
        if ask_usage && !has_stream_options {
            field(&mut out, "stream_options");
            out.extend_from_slice(br#"{"include_usage":true}"#);
        }
        out.push(b'}');
        out
    }
}

/// `stream_options` with `include_usage: true`, its other options kept as sent; anything
/// but an object (null, a wrong type) counts as empty.
fn write_options_with_usage(out: &mut Vec<u8>, raw: &str) {
    out.push(b'{');
    if let Ok(options) = RequestJson::parse(raw.as_bytes()) {
        for (key, value) in options.fields.iter().filter(|(k, _)| k != "include_usage") {
            push_json_string(out, key);
            out.push(b':');
            out.extend_from_slice(value.as_bytes());
            out.push(b',');
        }
    }
    out.extend_from_slice(br#""include_usage":true}"#);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_model_and_keeps_everything_else() {
        let body = br#"{"model":"fast","messages":[{"role":"user","content":"hi \"there\""}],"stream":true,"n":1}"#;
        let json = RequestJson::parse(body).unwrap();
        assert_eq!(json.model().unwrap().as_deref(), Some("fast"));
        let out = json.with_model("gpt-4o-mini", false, body.len());
        let expected: serde_json::Value = serde_json::from_slice(
            br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi \"there\""}],"stream":true,"n":1}"#,
        )
        .unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&out).unwrap(),
            expected
        );
    }

    #[test]
    fn escaped_keys_and_values_survive() {
        let body = "{\"mo\\u0064el\":\"a\\u00e9\",\"x\":\"\u{1F600}\"}".as_bytes();
        let json = RequestJson::parse(body).unwrap();
        assert_eq!(json.model().unwrap().as_deref(), Some("a\u{e9}"));
        let out: serde_json::Value =
            serde_json::from_slice(&json.with_model("m\"q", false, 0)).unwrap();
        assert_eq!(out, serde_json::json!({"model": "m\"q", "x": "\u{1F600}"}));
    }

    #[test]
    fn usage_is_asked_for_only_where_a_stream_lacks_it() {
        let cases = [
            (r#"{"model":"m","stream":true}"#, true),
            (r#"{"model":"m","stream":true,"stream_options":null}"#, true),
            (
                r#"{"model":"m","stream":true,"stream_options":{"include_usage":false,"x":1}}"#,
                true,
            ),
            (
                r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#,
                false,
            ),
            (r#"{"model":"m","stream":false}"#, false),
            (r#"{"model":"m"}"#, false),
        ];
        for (body, expected) in cases {
            let json = RequestJson::parse(body.as_bytes()).unwrap();
            assert_eq!(json.streams_without_usage(), expected, "{body}");
            let out: serde_json::Value =
                serde_json::from_slice(&json.with_model("up", expected, 0)).unwrap();
            assert_eq!(out["model"], "up");
            if expected {
                assert_eq!(out["stream_options"]["include_usage"], true, "{body}");
            }
        }
        let json = RequestJson::parse(br#"{"stream":true,"stream_options":{"x":1}}"#).unwrap();
        let out: serde_json::Value =
            serde_json::from_slice(&json.with_model("up", true, 0)).unwrap();
        assert_eq!(
            out["stream_options"],
            serde_json::json!({"x": 1, "include_usage": true})
        );
    }

    #[test]
    fn distinguishes_malformed_from_non_objects() {
        assert!(matches!(
            RequestJson::parse(b"{\"model\":"),
            Err(ProxyError::MalformedJson(_))
        ));
        assert!(matches!(
            RequestJson::parse(b"{} trailing"),
            Err(ProxyError::MalformedJson(_))
        ));
        assert!(matches!(
            RequestJson::parse(b"{\"model\":\"\xff\"}"),
            Err(ProxyError::MalformedJson(m)) if m.contains("not UTF-8")
        ));
        assert!(matches!(
            RequestJson::parse(b"[1,2]"),
            Err(ProxyError::BodyNotAnObject)
        ));
        assert!(matches!(
            RequestJson::parse(b"\"text\""),
            Err(ProxyError::BodyNotAnObject)
        ));
    }

    #[test]
    fn a_model_that_is_not_a_string_is_an_error() {
        for (body, kind) in [
            (&br#"{"model":42}"#[..], "a number"),
            (br#"{"model":-1.5e3}"#, "a number"),
            (br#"{"model":["gpt-4o"]}"#, "an array"),
            (br#"{"model":{"name":"x"}}"#, "an object"),
            (br#"{"model":true}"#, "a boolean"),
        ] {
            let json = RequestJson::parse(body).unwrap();
            match json.model() {
                Err(ProxyError::ModelNotAString(k)) => assert_eq!(k, kind),
                other => panic!(
                    "{}: {:?}",
                    String::from_utf8_lossy(body),
                    other.map(|m| m.map(|m| m.to_string()))
                ),
            }
        }
        assert!(matches!(
            RequestJson::parse(br#"{"model":null}"#).unwrap().model(),
            Ok(None)
        ));
        assert!(matches!(
            RequestJson::parse(br#"{"x":1}"#).unwrap().model(),
            Ok(None)
        ));
    }
}

#[cfg(test)]
mod proptests;

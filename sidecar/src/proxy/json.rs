//! A request body's top-level JSON fields, parsed without building a tree: values stay raw
//! slices of the original bytes, so rewriting `model` costs one copy, not a parse and a
//! re-serialization of a possibly multi-megabyte prompt.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::error::ProxyError;

pub struct RequestJson<'a> {
    fields: Vec<(Cow<'a, str>, &'a RawValue)>,
}

#[derive(Deserialize)]
struct Key<'a>(#[serde(borrow)] Cow<'a, str>);

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
        let mut de = serde_json::Deserializer::from_slice(bytes);
        match de
            .deserialize_map(FieldsVisitor)
            .and_then(|fields| de.end().map(|()| fields))
        {
            Ok(fields) => Ok(Self { fields }),
            Err(e) if e.classify() == serde_json::error::Category::Data => {
                Err(ProxyError::BodyNotAnObject)
            }
            Err(e) => Err(ProxyError::MalformedJson(e.to_string())),
        }
    }

    fn get(&self, name: &str) -> Option<&'a RawValue> {
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
        let Some(raw) = self.get("model") else {
            return Ok(None);
        };
        let text = raw.get();
        match text.as_bytes().first() {
            Some(b'"') => serde_json::from_str::<Cow<'a, str>>(text)
                .map(Some)
                .map_err(|_| ProxyError::ModelNotAString("an invalid string")),
            Some(b'n') => Ok(None),
            Some(b'{') => Err(ProxyError::ModelNotAString("an object")),
            Some(b'[') => Err(ProxyError::ModelNotAString("an array")),
            Some(b't' | b'f') => Err(ProxyError::ModelNotAString("a boolean")),
            _ => Err(ProxyError::ModelNotAString("a number")),
        }
    }

    /// A stream whose request did not ask for usage (`stream_options.include_usage`).
    pub fn streams_without_usage(&self) -> bool {
        self.get("stream").is_some_and(|v| v.get() == "true")
            && !self.get("stream_options").is_some_and(|raw| {
                stream_options(raw).get("include_usage") == Some(&Value::Bool(true))
            })
    }

    /// The body again, with every `model` field replaced and, with `ask_usage`,
    /// `stream_options.include_usage` set; all other bytes are kept as sent.
    pub fn with_model(&self, model: &str, ask_usage: bool, size_hint: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(size_hint + model.len() + 48);
        out.push(b'{');
        let mut has_stream_options = false;
        for (i, (key, value)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_json_string(&mut out, key);
            out.push(b':');
            if key == "model" {
                write_json_string(&mut out, model);
            } else if ask_usage && key == "stream_options" {
                has_stream_options = true;
                let mut options = stream_options(value);
                options.insert("include_usage".to_string(), Value::Bool(true));
                // Writing a map of JSON values into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut out, &options);
            } else {
                out.extend_from_slice(value.get().as_bytes());
            }
        }
        if ask_usage && !has_stream_options {
            if !self.fields.is_empty() {
                out.push(b',');
            }
            out.extend_from_slice(br#""stream_options":{"include_usage":true}"#);
        }
        out.push(b'}');
        out
    }
}

/// `stream_options` as an object; anything else (null, a wrong type) counts as empty.
fn stream_options(raw: &RawValue) -> serde_json::Map<String, Value> {
    match serde_json::from_str::<Value>(raw.get()) {
        Ok(Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    }
}

fn write_json_string(out: &mut Vec<u8>, s: &str) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
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

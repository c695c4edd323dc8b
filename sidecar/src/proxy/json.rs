//! A request body's top-level JSON fields, parsed without building a tree: values stay raw
//! slices of the original bytes, so rewriting `model` costs one copy, not a parse and a
//! re-serialization of a possibly multi-megabyte prompt.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

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

    /// The `model` field if it is a string.
    pub fn model(&self) -> Option<Cow<'a, str>> {
        let raw = self.get("model")?;
        serde_json::from_str::<Cow<'a, str>>(raw.get()).ok()
    }

    /// The body again, with every `model` field replaced; all other bytes are kept as sent.
    pub fn with_model(&self, model: &str, size_hint: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(size_hint + model.len() + 16);
        out.push(b'{');
        for (i, (key, value)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_json_string(&mut out, key);
            out.push(b':');
            if key == "model" {
                write_json_string(&mut out, model);
            } else {
                out.extend_from_slice(value.get().as_bytes());
            }
        }
        out.push(b'}');
        out
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
        assert_eq!(json.model().as_deref(), Some("fast"));
        let out = json.with_model("gpt-4o-mini", body.len());
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
        assert_eq!(json.model().as_deref(), Some("a\u{e9}"));
        let out: serde_json::Value = serde_json::from_slice(&json.with_model("m\"q", 0)).unwrap();
        assert_eq!(out, serde_json::json!({"model": "m\"q", "x": "\u{1F600}"}));
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
    fn non_string_model_is_no_model() {
        let json = RequestJson::parse(br#"{"model":42}"#).unwrap();
        assert_eq!(json.model(), None);
    }
}

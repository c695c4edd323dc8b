//! How a span's fields are kept for the JSON format: as a JSON object, written directly.
//!
//! `tracing_subscriber`'s own JSON field formatter serializes through `serde` and a
//! `fmt::Write` adaptor, which costs more than the rest of creating the span; and the
//! sidecar creates one span per request (its `request_id` and `trace_id` then label every
//! line logged inside it). The output is the same JSON object, so the event formatter,
//! which parses it back to list the spans, reads it alike.

use std::fmt::{self, Write};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FormatFields, FormattedFields};

#[derive(Debug, Default)]
pub struct JsonSpanFields;

impl<'w> FormatFields<'w> for JsonSpanFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut object = ObjectWriter::default();
        fields.record(&mut object);
        writer.write_char('{')?;
        writer.write_str(&object.members)?;
        writer.write_char('}')
    }

    /// Fields recorded after the span was created join its object.
    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let mut object = ObjectWriter::default();
        fields.record(&mut object);
        if object.members.is_empty() {
            return Ok(());
        }
        match current.fields.pop() {
            Some('}') => {
                if current.fields.len() > 1 {
                    current.fields.push(',');
                }
            }
            _ => current.fields = "{".to_string(),
        }
        current.fields.push_str(&object.members);
        current.fields.push('}');
        Ok(())
    }
}

/// The members of a JSON object (`"a":1,"b":"x"`), as fields are visited.
struct ObjectWriter {
    members: String,
}

impl Default for ObjectWriter {
    fn default() -> Self {
        Self {
            members: String::with_capacity(96),
        }
    }
}

impl ObjectWriter {
    fn member(&mut self, field: &Field, value: impl FnOnce(&mut String)) {
        if !self.members.is_empty() {
            self.members.push(',');
        }
        push_json_string(&mut self.members, field.name());
        self.members.push(':');
        value(&mut self.members);
    }
}

impl Visit for ObjectWriter {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.member(field, |out| push_json_string(out, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.member(field, |out| push_json_string(out, &format!("{value:?}")));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.member(field, |out| push_display(out, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.member(field, |out| push_display(out, value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.member(field, |out| push_display(out, value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.member(field, |out| {
            if value.is_finite() {
                push_display(out, value);
            } else {
                out.push_str("null");
            }
        });
    }
}

fn push_display(out: &mut String, value: impl fmt::Display) {
    // Writing into a String cannot fail.
    let _ = write!(out, "{value}");
}

/// `text` as a JSON string, escaped as `serde_json` escapes: runs of bytes that need no
/// escape are copied whole.
fn push_json_string(out: &mut String, text: &str) {
    out.reserve(text.len() + 2);
    out.push('"');
    // Ids and names rarely need an escape: one quick pass to find out.
    if !text.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        out.push_str(text);
        out.push('"');
        return;
    }
    let mut copied = 0;
    for (at, byte) in text.bytes().enumerate() {
        let escape = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..0x20 => "",
            _ => continue,
        };
        // Escapes are all ASCII, so `at` is a character boundary.
        out.push_str(text.get(copied..at).unwrap_or_default());
        if escape.is_empty() {
            let _ = write!(out, "\\u{byte:04x}");
        } else {
            out.push_str(escape);
        }
        copied = at + 1;
    }
    out.push_str(text.get(copied..).unwrap_or_default());
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let samples = [
            "plain",
            "quote \" and backslash \\",
            "controls \n\r\t\u{08}\u{0c}\u{01}\u{1f} and DEL \u{7f}",
            "unicode é ✓ 🦀",
            "",
        ];
        for sample in samples {
            let mut ours = String::new();
            push_json_string(&mut ours, sample);
            assert_eq!(ours, serde_json::to_string(sample).unwrap());
        }
    }

    #[test]
    fn span_fields_make_a_json_object_and_later_fields_join_it() {
        let capture = crate::test_support::CapturedLog::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .fmt_fields(JsonSpanFields)
            .with_writer(capture.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let id = "req \"1\"";
            let span = tracing::info_span!("request", request_id = id, trace_id = %"ab12", n = 3u64, late = tracing::field::Empty);
            span.record("late", true);
            span.in_scope(|| tracing::warn!(endpoint = "chat", "circuit opened"));
        });
        let out = capture.bytes();
        let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let span = &line["spans"][0];
        assert_eq!(span["request_id"], "req \"1\"", "{line}");
        assert_eq!(span["trace_id"], "ab12");
        assert_eq!(span["n"], 3);
        assert_eq!(span["late"], true);
        assert_eq!(span["name"], "request");
        assert_eq!(line["endpoint"], "chat");
    }
}

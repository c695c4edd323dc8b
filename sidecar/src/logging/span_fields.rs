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

use crate::json_string::push_json_string;

#[derive(Debug, Default)]
pub struct JsonSpanFields;

impl<'w> FormatFields<'w> for JsonSpanFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut object = ObjectWriter::default();
        fields.record(&mut object);
        object.json.push('}');
        // One write: the span's string starts empty, and three would grow it three times.
        writer.write_str(&object.json)
    }

    /// Fields recorded after the span was created join its object.
    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let mut object = ObjectWriter::default();
        fields.record(&mut object);
        if object.members().is_empty() {
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
        current.fields.push_str(object.members());
        current.fields.push('}');
        Ok(())
    }
}

/// A JSON object being written as fields are visited: `{` and the members so far
/// (`"a":1,"b":"x"`), without the closing brace.
struct ObjectWriter {
    json: String,
}

impl Default for ObjectWriter {
    fn default() -> Self {
        let mut json = String::with_capacity(96);
        json.push('{');
        Self { json }
    }
}

impl ObjectWriter {
    fn members(&self) -> &str {
        &self.json[1..]
    }

    fn member(&mut self, field: &Field, value: impl FnOnce(&mut String)) {
        if self.json.len() > 1 {
            self.json.push(',');
        }
        push_json_string(&mut self.json, field.name());
        self.json.push(':');
        value(&mut self.json);
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

#[cfg(test)]
mod tests {
    use super::*;

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

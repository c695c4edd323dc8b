//! A JSON log line built by hand, in the shape `tracing_subscriber`'s JSON format gives
//! every other line (`timestamp`, `level`, `message`, the fields, `target`), for the one
//! line written per request: built field by field into one buffer, with no visitor, no
//! `Display` round trip and no per-field allocation, it costs a fraction of a `tracing`
//! event.

use std::cell::Cell;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::json_string::{needs_escape, push_json_string};

pub struct JsonLine {
    buf: Vec<u8>,
}

impl JsonLine {
    /// A line at `level` ("INFO", ...) whose `message` is `message` (no escaping needed).
    pub fn new(level: &'static str, message: &'static str) -> Self {
        let mut buf = Vec::with_capacity(512);
        buf.extend_from_slice(b"{\"timestamp\":\"");
        write_rfc3339_micros(&mut buf, SystemTime::now());
        buf.extend_from_slice(b"\",\"level\":\"");
        buf.extend_from_slice(level.as_bytes());
        buf.extend_from_slice(b"\",\"message\":\"");
        buf.extend_from_slice(message.as_bytes());
        buf.push(b'"');
        Self { buf }
    }

    fn key(&mut self, key: &'static str) {
        // Keys are this crate's own identifiers: nothing to escape.
        self.buf.extend_from_slice(b",\"");
        self.buf.extend_from_slice(key.as_bytes());
        self.buf.extend_from_slice(b"\":");
    }

    /// A string field, escaped (values may come from the app: ids, paths, model names).
    pub fn str(&mut self, key: &'static str, value: &str) {
        self.key(key);
        push_json_string(&mut self.buf, value);
    }

    pub fn u64(&mut self, key: &'static str, value: u64) {
        self.key(key);
        self.buf
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    /// A number as `serde_json` writes it (shortest round-trip form; NaN and infinities as null).
    pub fn f64(&mut self, key: &'static str, value: f64) {
        self.key(key);
        let _ = serde_json::to_writer(&mut self.buf, &value);
    }

    /// A duration in milliseconds with two decimals, as [`Self::f64`] writes the number
    /// (`0.07`, `12.5`, `3.0`), from whole hundredths: formatting a float costs ten times more.
    pub fn millis(&mut self, key: &'static str, duration: Duration) {
        let Ok(hundredths) = u64::try_from(hundredths_of_a_millisecond(duration)) else {
            return self.f64(key, duration.as_secs_f64() * 1000.0);
        };
        // Below 10^12 hundredths (115 days) a float is fine enough that its shortest form is
        // the two-decimal one; beyond, the float's own form.
        if hundredths >= 1_000_000_000_000 {
            return self.f64(key, hundredths as f64 / 100.0);
        }
        self.key(key);
        write_padded(&mut self.buf, hundredths / 100, 1);
        self.buf.push(b'.');
        let fraction = hundredths % 100;
        if fraction % 10 == 0 {
            self.buf.push(b'0' + (fraction / 10) as u8);
        } else {
            write_padded(&mut self.buf, fraction, 2);
        }
    }

    /// A string this crate made, known to need no escape (hex ids, methods, its own names).
    pub fn plain(&mut self, key: &'static str, value: &str) {
        debug_assert!(!value.bytes().any(needs_escape), "{value:?} needs escaping");
        self.key(key);
        self.buf.push(b'"');
        self.buf.extend_from_slice(value.as_bytes());
        self.buf.push(b'"');
    }

    pub fn bool(&mut self, key: &'static str, value: bool) {
        self.key(key);
        self.buf
            .extend_from_slice(if value { b"true" } else { b"false" });
    }

    /// The finished line, newline included.
    pub fn finish(mut self, target: &'static str) -> Vec<u8> {
        self.plain("target", target);
        self.buf.extend_from_slice(b"}\n");
        self.buf
    }
}

/// `duration` in hundredths of a millisecond, rounded to the nearest (halves up): how every
/// log format gives a duration.
pub fn hundredths_of_a_millisecond(duration: Duration) -> u128 {
    duration.as_nanos().saturating_add(5_000) / 10_000
}

/// The length of `2026-11-30T17:36:06.`, the part of a timestamp that changes once a second.
const SECOND_PREFIX_LEN: usize = 20;

thread_local! {
    /// The second last written by this thread, and its timestamp up to the microseconds:
    /// lines come many a second, and the date's arithmetic is most of a timestamp's cost.
    static LAST_SECOND: Cell<(u64, [u8; SECOND_PREFIX_LEN])> = const { Cell::new((u64::MAX, [0; SECOND_PREFIX_LEN])) };
}

/// `2026-11-30T17:36:06.117764Z`: UTC with microseconds, as `tracing_subscriber` writes it.
fn write_rfc3339_micros(out: &mut Vec<u8>, now: SystemTime) {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (cached_secs, cached_prefix) = LAST_SECOND.get();
    let prefix = if cached_secs == secs {
        cached_prefix
    } else {
        let prefix = second_prefix(secs);
        LAST_SECOND.set((secs, prefix));
        prefix
    };
    out.extend_from_slice(&prefix);
    write_padded(out, u64::from(since_epoch.subsec_micros()), 6);
    out.push(b'Z');
}

/// `2026-11-30T17:36:06.` for `secs` since the epoch.
fn second_prefix(secs: u64) -> [u8; SECOND_PREFIX_LEN] {
    let (year, month, day) = civil_from_days(secs / 86_400);
    let of_day = secs % 86_400;
    let fields = [
        (u64::from(month), 2, b'-'),
        (u64::from(day), 2, b'T'),
        (of_day / 3600, 2, b':'),
        (of_day % 3600 / 60, 2, b':'),
        (of_day % 60, 2, b'.'),
    ];
    let mut text = Vec::with_capacity(SECOND_PREFIX_LEN);
    // Four digits until the year 10000, when the prefix would no longer fit: cut, not wrong
    // in length, so that no line ever fails to be written.
    write_padded(&mut text, year.min(9999), 4);
    text.push(b'-');
    for (value, width, after) in fields {
        write_padded(&mut text, value, width);
        text.push(after);
    }
    let mut prefix = [b'0'; SECOND_PREFIX_LEN];
    for (to, from) in prefix.iter_mut().zip(text) {
        *to = from;
    }
    prefix
}

fn write_padded(out: &mut Vec<u8>, value: u64, width: usize) {
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(value);
    out.extend(std::iter::repeat_n(
        b'0',
        width.saturating_sub(digits.len()),
    ));
    out.extend_from_slice(digits.as_bytes());
}

/// The proleptic Gregorian date of a day count since 1970-01-01, by eras of 400 years
/// (Howard Hinnant's `civil_from_days`), for days on or after the epoch.
fn civil_from_days(days: u64) -> (u64, u32, u32) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn timestamp(secs: u64, micros: u64) -> String {
        let mut out = Vec::new();
        let at = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros);
        write_rfc3339_micros(&mut out, at);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        assert_eq!(timestamp(0, 0), "1970-01-01T00:00:00.000000Z");
        // 2026-11-30T17:36:06.117764Z
        assert_eq!(
            timestamp(1_796_060_166, 117_764),
            "2026-11-30T17:36:06.117764Z"
        );
        // A leap day, and the last second of a leap year.
        assert_eq!(timestamp(951_782_400, 5), "2000-02-29T00:00:00.000005Z");
        assert_eq!(
            timestamp(1_735_689_599, 999_999),
            "2024-12-31T23:59:59.999999Z"
        );
    }

    #[test]
    fn every_day_for_four_centuries_follows_the_previous_one() {
        let mut previous = civil_from_days(0);
        for days in 1..146_097 {
            let (y, m, d) = civil_from_days(days);
            let next_day = (previous.0, previous.1, previous.2 + 1);
            let next_month = (previous.0, previous.1 + 1, 1);
            let next_year = (previous.0 + 1, 1, 1);
            assert!(
                [next_day, next_month, next_year].contains(&(y, m, d)),
                "{previous:?} then {:?}",
                (y, m, d)
            );
            previous = (y, m, d);
        }
        assert_eq!(previous, (2369, 12, 31));
    }

    #[test]
    fn a_line_has_the_shape_tracing_gives_the_same_event() {
        let capture = crate::test_support::CapturedLog::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(capture.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(
                id = "a\"b",
                status = 200u64,
                ms = 0.07,
                ok = true,
                "request"
            );
        });
        let from_tracing: serde_json::Value = serde_json::from_slice(&capture.bytes()).unwrap();

        let mut line = JsonLine::new("INFO", "request");
        line.str("id", "a\"b");
        line.u64("status", 200);
        line.f64("ms", 0.07);
        line.bool("ok", true);
        let ours: serde_json::Value = serde_json::from_slice(&line.finish(module_path!())).unwrap();

        let without_time = |v: &serde_json::Value| {
            let mut v = v.clone();
            let time = v.as_object_mut().unwrap().remove("timestamp").unwrap();
            (v, time.as_str().unwrap().len())
        };
        assert_eq!(without_time(&ours), without_time(&from_tracing));
    }

    #[test]
    fn millis_read_as_the_float_of_their_hundredths() {
        let float_text =
            |hundredths: u64| serde_json::to_string(&(hundredths as f64 / 100.0)).unwrap();
        let samples = (0..100_000)
            .chain((0..40).map(|shift| (1u64 << shift) + 7))
            .chain([999_999_999_999, 1_000_000_000_000, 123_456_789_012_345]);
        for hundredths in samples {
            let mut line = JsonLine { buf: Vec::new() };
            line.millis("ms", Duration::from_micros(hundredths * 10));
            let written = String::from_utf8(line.buf).unwrap();
            assert_eq!(
                written,
                format!(",\"ms\":{}", float_text(hundredths)),
                "{hundredths}"
            );
        }
        // Rounded to the nearest hundredth, halves up.
        for (nanos, expected) in [(1_234_567, "1.23"), (35_000, "0.04"), (34_999, "0.03")] {
            let mut line = JsonLine { buf: Vec::new() };
            line.millis("ms", Duration::from_nanos(nanos));
            assert_eq!(line.buf, format!(",\"ms\":{expected}").as_bytes());
        }
    }

    #[test]
    fn the_cached_second_serves_its_second_only() {
        for (secs, micros, expected) in [
            (1_796_060_166, 1, "2026-11-30T17:36:06.000001Z"),
            (1_796_060_166, 999_999, "2026-11-30T17:36:06.999999Z"),
            (1_796_060_167, 0, "2026-11-30T17:36:07.000000Z"),
            (1_796_060_166, 5, "2026-11-30T17:36:06.000005Z"),
            (1_796_060_166 + 86_400, 5, "2026-12-01T17:36:06.000005Z"),
        ] {
            assert_eq!(timestamp(secs, micros), expected);
        }
    }

    #[test]
    fn fields_are_escaped_and_the_line_parses() {
        let mut line = JsonLine::new("INFO", "request");
        line.str("path", "/v1/\"quoted\"\n\u{1}é");
        line.u64("status", 200);
        line.f64("latency_ms", 0.07);
        line.f64("nan", f64::NAN);
        line.bool("usage_estimated", false);
        let bytes = line.finish("llmesh_sidecar::proxy::log");
        assert_eq!(bytes.last(), Some(&b'\n'));
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value["message"], "request");
        assert_eq!(value["level"], "INFO");
        assert_eq!(value["path"], "/v1/\"quoted\"\n\u{1}é");
        assert_eq!(value["status"], 200);
        assert_eq!(value["latency_ms"], 0.07);
        assert!(value["nan"].is_null());
        assert_eq!(value["usage_estimated"], false);
        assert_eq!(value["target"], "llmesh_sidecar::proxy::log");
        assert!(value["timestamp"].as_str().unwrap().ends_with('Z'));
    }
}

//! W3C Trace Context: the trace an app's request belongs to, continued to the upstream.
//!
//! The app's `traceparent` is kept when it is valid (same trace id and sampling flag, and
//! the sidecar's own span as the new parent); otherwise the sidecar starts a trace. The
//! upstream gets the result, so the provider's (or a self-hosted model server's) spans join
//! the app's trace, and every log line of the request carries the trace id.

use http::{HeaderMap, HeaderName, HeaderValue};

pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Sampled: a trace the sidecar starts is one worth keeping, since nothing upstream of it
/// decided otherwise.
const FLAG_SAMPLED: u8 = 0x01;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    /// The sidecar's span: the parent of the upstream's.
    pub span_id: u64,
    /// The app's span, when the app sent a valid `traceparent`.
    pub parent_span_id: Option<u64>,
    pub flags: u8,
}

impl TraceContext {
    /// Continues the app's trace, or starts one.
    pub fn from_request(headers: &HeaderMap) -> Self {
        let incoming = headers
            .get(&TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse);
        let span_id = loop {
            let id = fastrand::u64(..);
            if id != 0 {
                break id;
            }
        };
        match incoming {
            Some((trace_id, parent_span_id, flags)) => Self {
                trace_id,
                span_id,
                parent_span_id: Some(parent_span_id),
                flags,
            },
            None => Self {
                trace_id: fastrand::u128(1..),
                span_id,
                parent_span_id: None,
                flags: FLAG_SAMPLED,
            },
        }
    }

    pub fn trace_id_hex(&self) -> String {
        let mut out = [0u8; 32];
        push_hex(&mut out, &self.trace_id.to_be_bytes());
        // Only hex digits: always UTF-8.
        String::from_utf8_lossy(&out).into_owned()
    }

    pub fn header_value(&self) -> HeaderValue {
        // Written digit by digit: `format!` with padded hex costs several times more, and
        // this runs on every request.
        let mut value = [0u8; 55];
        value[..3].copy_from_slice(b"00-");
        push_hex(&mut value[3..35], &self.trace_id.to_be_bytes());
        value[35] = b'-';
        push_hex(&mut value[36..52], &self.span_id.to_be_bytes());
        value[52] = b'-';
        push_hex(&mut value[53..55], &[self.flags]);
        // Only hex digits and dashes: always a valid header value.
        HeaderValue::from_bytes(&value).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

/// `bytes` as lowercase hex, two digits a byte, into `out` (twice as long).
fn push_hex(out: &mut [u8], bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0xf)];
    }
}

/// `version-traceid-parentid-flags`; returns the trace id, parent id and flags. Versions above 00 may
/// append fields, which are ignored as the spec asks; version ff and all-zero ids are invalid.
fn parse(value: &str) -> Option<(u128, u64, u8)> {
    let mut fields = value.trim().split('-');
    let version = fields.next()?;
    let trace_id = fields.next()?;
    let parent_id = fields.next()?;
    let flags = fields.next()?;
    let rest_allowed = version != "00";
    if fields.next().is_some() && !rest_allowed {
        return None;
    }
    let is_hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    if !is_hex(version, 2)
        || version == "ff"
        || !is_hex(trace_id, 32)
        || !is_hex(parent_id, 16)
        || !is_hex(flags, 2)
    {
        return None;
    }
    let trace_id = u128::from_str_radix(trace_id, 16).ok()?;
    let parent_id = u64::from_str_radix(parent_id, 16).ok()?;
    if trace_id == 0 || parent_id == 0 {
        return None;
    }
    Some((trace_id, parent_id, u8::from_str_radix(flags, 16).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(&TRACEPARENT, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn ids_are_written_as_padded_lowercase_hex() {
        for (trace_id, span_id, flags) in [(1, 1, 0), (u128::MAX, u64::MAX, 0xff), (0xabc, 0x10, 1)]
        {
            let ctx = TraceContext {
                trace_id,
                span_id,
                parent_span_id: None,
                flags,
            };
            assert_eq!(ctx.trace_id_hex(), format!("{trace_id:032x}"));
            assert_eq!(
                ctx.header_value(),
                format!("00-{trace_id:032x}-{span_id:016x}-{flags:02x}").as_str()
            );
        }
    }

    #[test]
    fn continues_a_valid_trace_under_a_new_span() {
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let ctx = TraceContext::from_request(&with(incoming));
        assert_eq!(ctx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.flags, 0, "the app's sampling decision is kept");
        assert_ne!(ctx.span_id, 0x00f0_67aa_0ba9_02b7);
        assert_eq!(ctx.parent_span_id, Some(0x00f0_67aa_0ba9_02b7));
        let out = ctx.header_value();
        let out = out.to_str().unwrap();
        assert!(
            out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{out}"
        );
        assert!(out.ends_with("-00"));
        assert_eq!(out.len(), 55);
    }

    #[test]
    fn starts_a_sampled_trace_when_there_is_none_or_it_is_invalid() {
        for headers in [
            HeaderMap::new(),
            with("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            with("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
            with("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            with("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
            with("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"),
            with("garbage"),
        ] {
            let ctx = TraceContext::from_request(&headers);
            assert_ne!(ctx.trace_id, 0);
            assert_ne!(ctx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_eq!(ctx.flags, FLAG_SAMPLED);
        }
    }

    #[test]
    fn a_later_version_with_more_fields_is_understood() {
        let ctx = TraceContext::from_request(&with(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next",
        ));
        assert_eq!(ctx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }
}

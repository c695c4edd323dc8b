//! When to retry and how long to wait: status classes, full-jitter backoff, and the
//! provider's own `Retry-After` / `retry-after-ms` hints.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};

use crate::config::RetryConfig;
use crate::wait;

/// Why an attempt is retried; also the `reason` label of the retry metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    RateLimited,
    ServerError,
    ConnectFailed,
    Reset,
    Timeout,
}

impl RetryReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::ServerError => "server_error",
            Self::ConnectFailed => "connect_failed",
            Self::Reset => "reset",
            Self::Timeout => "timeout",
        }
    }

    /// Answers that say nothing about the provider's health (it is busy, not broken).
    pub fn counts_against_breaker(self) -> bool {
        self != Self::RateLimited
    }

    /// What the endpoint did, for an app told that its circuit is open.
    pub fn describe(self) -> &'static str {
        match self {
            Self::RateLimited => "was rate limited (429)",
            Self::ServerError => "answered with server errors (5xx)",
            Self::ConnectFailed => "could not be reached",
            Self::Reset => "closed connections before answering",
            Self::Timeout => "timed out",
        }
    }

    /// A compact code for atomics (0 is reserved for "none").
    pub fn code(self) -> u8 {
        match self {
            Self::RateLimited => 1,
            Self::ServerError => 2,
            Self::ConnectFailed => 3,
            Self::Reset => 4,
            Self::Timeout => 5,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        [
            Self::RateLimited,
            Self::ServerError,
            Self::ConnectFailed,
            Self::Reset,
            Self::Timeout,
        ]
        .into_iter()
        .find(|r| r.code() == code)
    }
}

/// The statuses worth another attempt: the provider is busy (429) or had a transient fault.
/// Every other status, 4xx above all, would fail the same way again and cost quota doing so.
pub fn retryable_status(status: StatusCode) -> Option<RetryReason> {
    match status.as_u16() {
        429 => Some(RetryReason::RateLimited),
        // 529: Anthropic's `overloaded_error`.
        500 | 502 | 503 | 504 | 529 => Some(RetryReason::ServerError),
        _ => None,
    }
}

/// The wait before retry number `retry` (1 for the first retry): uniform in
/// `[0, min(max, base * 2^(retry-1))]`.
pub fn backoff(config: &RetryConfig, retry: u32) -> Duration {
    let base = config.backoff_base.get();
    let cap = config.backoff_max.get();
    let exponent = retry.saturating_sub(1).min(20);
    let ceiling = base.saturating_mul(1 << exponent).min(cap);
    ceiling.mul_f64(fastrand::f64())
}

/// The provider's requested wait: `retry-after-ms` (OpenAI, Azure) or `Retry-After` in
/// seconds or as an HTTP date; at most [`wait::MAX_WAIT`], whatever the provider sends.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(ms) = header_str(headers, "retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        if let Some(wait) = wait::from_secs_f64(ms / 1000.0) {
            return Some(wait);
        }
    }
    let value = header_str(headers, "retry-after")?;
    if let Ok(seconds) = value.parse::<f64>() {
        return wait::from_secs_f64(seconds);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(wait::clamp(
        at.duration_since(now).unwrap_or(Duration::ZERO),
    ))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn only_transient_statuses_are_retried() {
        for code in [429, 500, 502, 503, 504, 529] {
            assert!(
                retryable_status(StatusCode::from_u16(code).unwrap()).is_some(),
                "{code}"
            );
        }
        for code in [200, 400, 401, 403, 404, 408, 409, 413, 422, 501] {
            assert!(
                retryable_status(StatusCode::from_u16(code).unwrap()).is_none(),
                "{code}"
            );
        }
    }

    #[test]
    fn backoff_is_jittered_below_an_exponential_cap() {
        let config = RetryConfig {
            backoff_base: crate::config::Duration::from_millis(100),
            backoff_max: crate::config::Duration::from_millis(350),
            ..RetryConfig::default()
        };
        for _ in 0..200 {
            assert!(backoff(&config, 1) <= Duration::from_millis(100));
            assert!(backoff(&config, 2) <= Duration::from_millis(200));
            assert!(backoff(&config, 3) <= Duration::from_millis(350));
            assert!(backoff(&config, 30) <= Duration::from_millis(350));
        }
        let spread: Vec<_> = (0..50).map(|_| backoff(&config, 3)).collect();
        assert!(spread.iter().any(|d| *d < Duration::from_millis(175)));
        assert!(spread.iter().any(|d| *d > Duration::from_millis(175)));
    }

    #[test]
    fn retry_after_in_every_form() {
        let now = httpdate::parse_http_date("Tue, 24 Nov 2026 10:00:00 GMT").unwrap();
        assert_eq!(
            retry_after(&headers(&[("retry-after", "7")]), now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "1.5")]), now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            retry_after(
                &headers(&[("retry-after", "Tue, 24 Nov 2026 10:00:30 GMT")]),
                now
            ),
            Some(Duration::from_secs(30))
        );
        // A date in the past means "now".
        assert_eq!(
            retry_after(
                &headers(&[("retry-after", "Tue, 24 Nov 2026 09:00:00 GMT")]),
                now
            ),
            Some(Duration::ZERO)
        );
        // The millisecond form is more precise and wins.
        assert_eq!(
            retry_after(
                &headers(&[("retry-after", "1"), ("retry-after-ms", "250")]),
                now
            ),
            Some(Duration::from_millis(250))
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")]), now), None);
        // Values that would overflow a Duration or an Instant are capped, never a panic.
        for (name, huge) in [
            ("retry-after", "10000000000000000000"),
            ("retry-after", "1e300"),
            ("retry-after", "inf"),
            ("retry-after-ms", "1e300"),
            ("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT"),
        ] {
            assert_eq!(
                retry_after(&headers(&[(name, huge)]), now),
                Some(wait::MAX_WAIT),
                "{name}: {huge}"
            );
        }
        assert_eq!(retry_after(&headers(&[("retry-after", "NaN")]), now), None);
        assert_eq!(retry_after(&headers(&[("retry-after", "-3")]), now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }
}

#[cfg(test)]
mod proptests;

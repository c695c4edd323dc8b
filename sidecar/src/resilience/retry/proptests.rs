//! `Retry-After` and `retry-after-ms` come from any upstream: whatever they hold, and
//! whatever the clock says, the wait must not panic (release builds abort on a panic) nor
//! exceed `MAX_WAIT`.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;

use super::retry_after;
use crate::wait::MAX_WAIT;

/// 9999-12-31T23:59:59Z, the last instant an HTTP date can name.
const LAST_HTTP_DATE_SECS: u64 = 253_402_300_799;

/// The values that aborted the process before the waits were clamped (issue 13).
const KNOWN_HOSTILE: &[(&str, &str)] = &[
    ("retry-after", "10000000000000000000"),
    ("retry-after", "1e300"),
    ("retry-after", "inf"),
    ("retry-after", "-inf"),
    ("retry-after", "NaN"),
    ("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT"),
    ("retry-after", "Thu, 01 Jan 1970 00:00:00 GMT"),
    ("retry-after-ms", "1e300"),
    ("retry-after-ms", "1.8e308"),
    ("retry-after-ms", "18446744073709551615000"),
    ("retry-after-ms", "-0"),
];

fn http_date() -> impl Strategy<Value = String> {
    (0..=LAST_HTTP_DATE_SECS).prop_map(|secs| {
        httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
    })
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        any::<f64>().prop_map(|f| f.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        "-?[0-9]{1,40}(\\.[0-9]{0,20})?([eE][+-]?[0-9]{1,4})?",
        http_date(),
    ]
}

/// `now` anywhere from before the Unix epoch to past the last HTTP date.
fn now() -> impl Strategy<Value = SystemTime> {
    prop_oneof![
        (0..=LAST_HTTP_DATE_SECS * 2).prop_map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s)),
        (0..=LAST_HTTP_DATE_SECS).prop_map(|s| SystemTime::UNIX_EPOCH - Duration::from_secs(s)),
        Just(SystemTime::now()),
    ]
}

/// The headers a provider could send; values that are not valid header bytes are left out,
/// as hyper would never deliver them.
fn headers(retry_after: Option<String>, retry_after_ms: Option<String>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("retry-after", retry_after),
        ("retry-after-ms", retry_after_ms),
    ] {
        if let Some(value) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
            headers.insert(name, value);
        }
    }
    headers
}

#[test]
fn known_hostile_values_are_bounded() {
    for (name, value) in KNOWN_HOSTILE {
        let mut headers = HeaderMap::new();
        headers.insert(*name, HeaderValue::from_static(value));
        for now in [SystemTime::UNIX_EPOCH, SystemTime::now()] {
            if let Some(wait) = retry_after(&headers, now) {
                assert!(wait <= MAX_WAIT, "{name}: {value} gave {wait:?}");
            }
        }
    }
}

proptest! {
    #![proptest_config(crate::proptest_config::config())]

    #[test]
    fn any_header_values_are_bounded(
        retry_after_value in proptest::option::of(value()),
        retry_after_ms in proptest::option::of(value()),
        now in now(),
    ) {
        let headers = headers(retry_after_value, retry_after_ms);
        if let Some(wait) = retry_after(&headers, now) {
            prop_assert!(wait <= MAX_WAIT, "{:?} at {:?} gave {:?}", headers, now, wait);
        }
    }

    #[test]
    fn a_date_means_the_time_until_it(date_secs in 0..=LAST_HTTP_DATE_SECS, now in now()) {
        let date = SystemTime::UNIX_EPOCH + Duration::from_secs(date_secs);
        let headers = headers(Some(httpdate::fmt_http_date(date)), None);
        let expected = date.duration_since(now).unwrap_or(Duration::ZERO).min(MAX_WAIT);
        let wait = retry_after(&headers, now).unwrap();
        prop_assert_eq!(wait, expected);
    }
}

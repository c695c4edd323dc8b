//! `x-ratelimit-reset-*` values come from any upstream: whatever they hold, parsing them
//! must not panic (release builds abort on a panic) nor ask for a wait beyond `MAX_WAIT`.

use proptest::prelude::*;

use super::parse_reset;
use crate::wait::MAX_WAIT;

/// The values that aborted the process before the waits were clamped (issue 13).
const KNOWN_HOSTILE: &[&str] = &[
    "1e300",
    "9300000000000000000",
    "10000000000000000000",
    "inf",
    "NaN",
    "-1",
    "1e300h",
    "99999999999999999999h99999999999999999999m",
    "1.5e300s",
    "0.0.0s",
    "1h1h1h",
    "ms",
    "1",
    "",
];

/// Strings shaped like reset values (OpenAI's `6m0s`, `1.5s`, `20ms`), with any numbers and
/// some wrong units and separators.
fn reset_like() -> impl Strategy<Value = String> {
    let number = prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| f.to_string()),
        "[0-9]{1,40}(\\.[0-9]{0,20})?",
        "[0-9.]{1,8}",
    ];
    let unit = prop_oneof![
        Just("h"),
        Just("m"),
        Just("s"),
        Just("ms"),
        Just(""),
        Just("d"),
        Just("us"),
        Just(" "),
        Just("e9"),
    ];
    proptest::collection::vec((number, unit), 1..5).prop_map(|parts| {
        parts
            .into_iter()
            .map(|(number, unit)| format!("{number}{unit}"))
            .collect()
    })
}

#[test]
fn known_hostile_values_are_bounded() {
    for value in KNOWN_HOSTILE {
        if let Some(wait) = parse_reset(value) {
            assert!(wait <= MAX_WAIT, "{value:?} gave {wait:?}");
        }
    }
}

proptest! {
    #![proptest_config(crate::proptest_config::config())]

    #[test]
    fn any_string_is_bounded(value in any::<String>()) {
        if let Some(wait) = parse_reset(&value) {
            prop_assert!(wait <= MAX_WAIT, "{:?} gave {:?}", value, wait);
        }
    }

    #[test]
    fn reset_like_strings_are_bounded(value in reset_like()) {
        if let Some(wait) = parse_reset(&value) {
            prop_assert!(wait <= MAX_WAIT, "{:?} gave {:?}", value, wait);
        }
    }

    #[test]
    fn well_formed_values_mean_what_they_say(
        h in 0u64..200, m in 0u64..200, s in 0u64..200, ms in 0u64..2000,
    ) {
        let expected = std::time::Duration::from_millis(((h * 60 + m) * 60 + s) * 1000 + ms)
            .min(MAX_WAIT);
        let parsed = parse_reset(&format!("{h}h{m}m{s}s{ms}ms")).unwrap();
        // Float arithmetic on the way: equal to within a microsecond.
        prop_assert!(parsed.abs_diff(expected) < std::time::Duration::from_micros(1),
            "{:?} != {:?}", parsed, expected);
    }
}

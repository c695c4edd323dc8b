//! A duration written the way Kubernetes users write them ("250ms", "30s", "5m", "1h").
//!
//! Hand-written rather than `humantime-serde` because the JSON Schema (and later the CRD)
//! needs a precise `pattern`, and the accepted grammar must match that pattern exactly.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::Duration as StdDuration;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The grammar of a [`Duration`], shared by the parser and the published schema.
pub const DURATION_PATTERN: &str = "^[0-9]+(ms|s|m|h)$";

/// The longest duration accepted: 30 days, far above any timeout or cooldown, and small
/// enough that adding it to any instant cannot overflow.
const MAX_MILLIS: u64 = 30 * 24 * 3_600_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(StdDuration);

impl Duration {
    pub const fn from_millis(ms: u64) -> Self {
        Self(StdDuration::from_millis(ms))
    }

    pub const fn from_secs(secs: u64) -> Self {
        Self(StdDuration::from_secs(secs))
    }

    pub fn get(self) -> StdDuration {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl From<Duration> for StdDuration {
    fn from(d: Duration) -> Self {
        d.0
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {0:?}: expected a whole number followed by ms, s, m or h (e.g. \"30s\"), at most 720h")]
pub struct ParseDurationError(String);

impl FromStr for Duration {
    type Err = ParseDurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || ParseDurationError(s.to_string());
        let digits_end = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(invalid)?;
        let (number, unit) = s.split_at(digits_end);
        if number.is_empty() {
            return Err(invalid());
        }
        let n: u64 = number.parse().map_err(|_| invalid())?;
        let ms_per_unit: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return Err(invalid()),
        };
        let ms = n
            .checked_mul(ms_per_unit)
            .filter(|ms| *ms <= MAX_MILLIS)
            .ok_or_else(invalid)?;
        Ok(Self::from_millis(ms))
    }
}

impl fmt::Display for Duration {
    /// Prints the largest unit that represents the value exactly, so that a value
    /// read from a file prints back the way it was written.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in [("h", 3_600_000u128), ("m", 60_000), ("s", 1_000)] {
            if ms.is_multiple_of(size) {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "description": "A duration: a whole number followed by ms, s, m or h, e.g. \"250ms\", \"30s\", \"5m\"."
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!("250ms".parse(), Ok(Duration::from_millis(250)));
        assert_eq!("30s".parse(), Ok(Duration::from_secs(30)));
        assert_eq!("5m".parse(), Ok(Duration::from_secs(300)));
        assert_eq!("2h".parse(), Ok(Duration::from_secs(7200)));
        assert_eq!("0s".parse(), Ok(Duration::from_millis(0)));
        assert_eq!("720h".parse(), Ok(Duration::from_secs(30 * 24 * 3600)));
    }

    #[test]
    fn rejects_what_the_pattern_rejects() {
        for bad in [
            "",
            "s",
            "30",
            "1.5s",
            "-1s",
            " 30s",
            "30 s",
            "30sec",
            "1d",
            "99999999999999999999h",
            "721h",
            "5124095576030431h",
        ] {
            assert!(
                bad.parse::<Duration>().is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn prints_back_as_written() {
        for text in ["250ms", "30s", "5m", "2h", "1500ms", "90s", "0s"] {
            let d: Duration = text.parse().unwrap();
            assert_eq!(d.to_string(), text);
        }
    }
}

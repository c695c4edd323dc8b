//! Waits and deadlines built from values the sidecar does not choose: a provider's
//! `Retry-After`, `retry-after-ms` or `x-ratelimit-reset-*`, a reply from Redis, a wait
//! derived from an app's `max_tokens`.
//!
//! `Duration::from_secs_f64` panics on values too large or not finite, and `Instant + Duration`
//! panics on overflow; release builds abort on a panic, which would end every stream in the
//! pod. So such values are only turned into waits here: parsed fallibly, clamped to
//! [`MAX_WAIT`], and added to instants without overflow.

use std::time::Duration;

use tokio::time::Instant;

/// The longest wait taken from outside: a provider asking for more than an hour is treated
/// as asking for an hour. Every request has its own deadline (`timeouts.total`), which cuts
/// any wait shorter still, so the cap only bounds arithmetic and memory of timers.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

/// How far "never" is when an instant cannot be represented: farther than any deadline or
/// wait the sidecar computes, near enough that adding it cannot overflow.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `seconds` as a wait: None when negative or not a number, at most [`MAX_WAIT`].
pub fn from_secs_f64(seconds: f64) -> Option<Duration> {
    if seconds.is_nan() || seconds < 0.0 {
        return None;
    }
    if seconds >= MAX_WAIT.as_secs_f64() {
        return Some(MAX_WAIT);
    }
    Duration::try_from_secs_f64(seconds).ok()
}

/// `wait` capped at [`MAX_WAIT`].
pub fn clamp(wait: Duration) -> Duration {
    wait.min(MAX_WAIT)
}

/// `now + wait`, or a far future instant when that cannot be represented.
pub fn after(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_seconds_become_bounded_waits() {
        assert_eq!(from_secs_f64(1.5), Some(Duration::from_millis(1500)));
        assert_eq!(from_secs_f64(0.0), Some(Duration::ZERO));
        for huge in [1e300, 1e19, 9.3e18, f64::INFINITY, f64::MAX] {
            assert_eq!(from_secs_f64(huge), Some(MAX_WAIT), "{huge}");
        }
        for invalid in [-1.0, -0.001, f64::NAN, f64::NEG_INFINITY] {
            assert_eq!(from_secs_f64(invalid), None, "{invalid}");
        }
    }

    #[test]
    fn instants_never_overflow() {
        let now = Instant::now();
        assert_eq!(
            after(now, Duration::from_secs(2)),
            now + Duration::from_secs(2)
        );
        assert!(after(now, Duration::MAX) > now + MAX_WAIT);
        assert!(after(now, Duration::from_secs(u64::MAX / 2)) > now);
    }
}

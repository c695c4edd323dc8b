//! The circuit breaker of one endpoint: closed while attempts succeed, open for a cooldown
//! after `consecutiveFailures` failures in a row, then half-open for one probe attempt whose
//! result closes or reopens it.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::retry::RetryReason;
use crate::config::CircuitBreakerConfig;
use crate::logging::request_scope;
use crate::wait;

pub struct CircuitBreaker {
    config: CircuitBreakerConfig,
    endpoint: String,
    state: Mutex<State>,
    /// What the last failure was (a [`RetryReason`] code, 0 for none), so that an app turned
    /// away is told why the endpoint was ejected.
    last_failure: AtomicU8,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is out; if it never reports (its request was cancelled), another is let
    /// through after a cooldown.
    HalfOpen {
        probe_started: Instant,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    /// The circuit is open; it may let a probe through after this long.
    Rejected {
        retry_after: Duration,
        /// What the failures that opened it were, when known.
        cause: Option<RetryReason>,
    },
}

impl CircuitBreaker {
    pub fn new(endpoint: &str, config: CircuitBreakerConfig) -> Self {
        Self {
            config,
            endpoint: endpoint.to_string(),
            state: Mutex::new(State::Closed { failures: 0 }),
            last_failure: AtomicU8::new(0),
        }
    }

    /// A failed attempt that counts against the endpoint, with its reason.
    pub fn record_failure(&self, reason: RetryReason) {
        self.last_failure.store(reason.code(), Ordering::Relaxed);
        self.record(false);
    }

    fn cause(&self) -> Option<RetryReason> {
        RetryReason::from_code(self.last_failure.load(Ordering::Relaxed))
    }

    fn enabled(&self) -> bool {
        self.config.consecutive_failures > 0
    }

    /// Whether an attempt may go to this endpoint now.
    pub fn admit(&self) -> Admission {
        if !self.enabled() {
            return Admission::Allowed;
        }
        let Ok(mut state) = self.state.lock() else {
            return Admission::Allowed;
        };
        let now = Instant::now();
        let cooldown = self.config.cooldown.get();
        match *state {
            State::Closed { .. } => Admission::Allowed,
            State::Open { until } if now < until => Admission::Rejected {
                retry_after: until - now,
                cause: self.cause(),
            },
            State::HalfOpen { probe_started } if now < wait::after(probe_started, cooldown) => {
                Admission::Rejected {
                    retry_after: wait::after(probe_started, cooldown) - now,
                    cause: self.cause(),
                }
            }
            State::Open { .. } | State::HalfOpen { .. } => {
                request_scope::span().in_scope(|| tracing::info!(endpoint = %self.endpoint, "circuit half-open: sending one probe request"));
                *state = State::HalfOpen { probe_started: now };
                Admission::Allowed
            }
        }
    }

    /// The result of an attempt that `admit` allowed.
    pub fn record(&self, healthy: bool) {
        if !self.enabled() {
            return;
        }
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let threshold = self.config.consecutive_failures;
        let open = State::Open {
            until: wait::after(Instant::now(), self.config.cooldown.get()),
        };
        *state = match (*state, healthy) {
            (State::Closed { .. }, true) => State::Closed { failures: 0 },
            (State::Closed { failures }, false) if failures + 1 >= threshold => {
                request_scope::span().in_scope(|| tracing::warn!(endpoint = %self.endpoint, failures = failures + 1, cooldown = %self.config.cooldown, "circuit opened: endpoint ejected"));
                open
            }
            (State::Closed { failures }, false) => State::Closed {
                failures: failures + 1,
            },
            (State::HalfOpen { .. }, true) => {
                request_scope::span().in_scope(
                    || tracing::info!(endpoint = %self.endpoint, "circuit closed: probe succeeded"),
                );
                State::Closed { failures: 0 }
            }
            (State::HalfOpen { .. }, false) => {
                request_scope::span().in_scope(|| tracing::warn!(endpoint = %self.endpoint, cooldown = %self.config.cooldown, "circuit reopened: probe failed"));
                open
            }
            // An attempt admitted before the circuit opened reports late; it changes nothing.
            (open @ State::Open { .. }, _) => open,
        };
    }

    pub fn is_open(&self) -> bool {
        self.state
            .lock()
            .map(|s| !matches!(*s, State::Closed { .. }))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(failures: u32, cooldown_ms: u64) -> CircuitBreaker {
        CircuitBreaker::new(
            "chat",
            CircuitBreakerConfig {
                consecutive_failures: failures,
                cooldown: crate::config::Duration::from_millis(cooldown_ms),
            },
        )
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_a_probe_closes_it() {
        let b = breaker(3, 1000);
        b.record(false);
        b.record(false);
        b.record(true); // a success in between resets the count
        b.record(false);
        b.record(false);
        assert_eq!(b.admit(), Admission::Allowed);
        b.record(false);
        assert!(b.is_open());
        assert_eq!(
            b.admit(),
            Admission::Rejected {
                retry_after: Duration::from_millis(1000),
                cause: None,
            }
        );

        tokio::time::advance(Duration::from_millis(1000)).await;
        assert_eq!(b.admit(), Admission::Allowed, "one probe");
        assert!(
            matches!(b.admit(), Admission::Rejected { .. }),
            "only one probe at a time"
        );
        b.record(true);
        assert!(!b.is_open());
        assert_eq!(b.admit(), Admission::Allowed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_another_cooldown() {
        let b = breaker(1, 500);
        b.record(false);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(b.admit(), Admission::Allowed);
        b.record(false);
        assert_eq!(
            b.admit(),
            Admission::Rejected {
                retry_after: Duration::from_millis(500),
                cause: None,
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_probe_does_not_keep_the_circuit_open_forever() {
        let b = breaker(1, 500);
        b.record(false);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(b.admit(), Admission::Allowed); // this probe never reports
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(b.admit(), Admission::Allowed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejection_names_what_opened_the_circuit() {
        let b = breaker(2, 500);
        b.record_failure(RetryReason::ServerError);
        b.record_failure(RetryReason::Timeout);
        assert_eq!(
            b.admit(),
            Admission::Rejected {
                retry_after: Duration::from_millis(500),
                cause: Some(RetryReason::Timeout),
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn zero_failures_turns_it_off() {
        let b = breaker(0, 500);
        for _ in 0..100 {
            b.record(false);
        }
        assert_eq!(b.admit(), Admission::Allowed);
    }
}

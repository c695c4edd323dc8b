//! Retries, circuit breaking and rate limits of one endpoint.
//!
//! Every field has a default, and the defaults are chosen for the smallest paid or free
//! tier: few attempts, a retry budget so that an outage cannot multiply load, and waits that
//! honour the provider's `Retry-After`.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Duration;

/// Retries of one request on the same endpoint, before its fallbacks are tried.
///
/// Retried: 429, 500, 502, 503, 504, connection failures and timeouts before the response
/// headers. Never retried: other statuses (400, 401, 403, 404, 422, ...), or anything once a
/// byte of the response has reached the app.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts per request on this endpoint, the first included; 1 turns retries off.
    #[serde(default = "RetryConfig::default_max_attempts")]
    #[schemars(range(min = 1, max = 10))]
    pub max_attempts: u32,
    /// The first backoff's upper bound; each later one doubles, up to `backoffMax`. The wait is
    /// drawn uniformly below that bound ("full jitter") so that clients do not retry in step.
    #[serde(default = "RetryConfig::default_backoff_base")]
    pub backoff_base: Duration,
    #[serde(default = "RetryConfig::default_backoff_max")]
    pub backoff_max: Duration,
    #[serde(default)]
    pub budget: RetryBudgetConfig,
}

impl RetryConfig {
    fn default_max_attempts() -> u32 {
        3
    }
    fn default_backoff_base() -> Duration {
        Duration::from_millis(500)
    }
    fn default_backoff_max() -> Duration {
        Duration::from_secs(30)
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: Self::default_max_attempts(),
            backoff_base: Self::default_backoff_base(),
            backoff_max: Self::default_backoff_max(),
            budget: RetryBudgetConfig::default(),
        }
    }
}

/// Caps retries at a share of recent requests, so that during an outage the sidecar adds at
/// most that share of load on top of the apps' own calls.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudgetConfig {
    /// Retries allowed per request over the last 10 seconds (0.2: one retry per five requests).
    #[serde(default = "RetryBudgetConfig::default_ratio")]
    #[schemars(range(min = 0.0, max = 10.0))]
    pub ratio: f64,
    /// Retries per second always allowed, so that an endpoint with little traffic still retries.
    #[serde(default = "RetryBudgetConfig::default_min_per_second")]
    #[schemars(range(min = 0, max = 1000))]
    pub min_per_second: u32,
}

impl RetryBudgetConfig {
    fn default_ratio() -> f64 {
        0.2
    }
    fn default_min_per_second() -> u32 {
        1
    }
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        Self {
            ratio: Self::default_ratio(),
            min_per_second: Self::default_min_per_second(),
        }
    }
}

/// Ejects an endpoint that keeps failing, so that requests go straight to a fallback (or fail
/// fast) instead of waiting on a provider that is down.
///
/// Failures are 5xx answers, connection failures and timeouts; a 4xx (429 included) is an
/// answer from a healthy provider and resets the count.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// Consecutive failed attempts that open the circuit; 0 turns the breaker off.
    #[serde(default = "CircuitBreakerConfig::default_consecutive_failures")]
    #[schemars(range(min = 0, max = 1000))]
    pub consecutive_failures: u32,
    /// How long an open circuit rejects requests before one probe request is let through.
    #[serde(default = "CircuitBreakerConfig::default_cooldown")]
    pub cooldown: Duration,
}

impl CircuitBreakerConfig {
    fn default_consecutive_failures() -> u32 {
        5
    }
    fn default_cooldown() -> Duration {
        Duration::from_secs(30)
    }
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: Self::default_consecutive_failures(),
            cooldown: Self::default_cooldown(),
        }
    }
}

/// Request and token rate limits and a concurrency cap. Unset limits are not enforced
/// locally; the provider's own `x-ratelimit-*` headers are always followed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitsConfig {
    /// Requests admitted per minute. Refilled continuously, like providers' own limiters, so a
    /// full minute's worth may be used at once and then one request every 60s/limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub requests_per_minute: Option<u64>,
    /// Prompt plus completion tokens per minute. Each request reserves its prompt (counted with
    /// the model's tokenizer) plus its `max_tokens` up front, and settles with the real
    /// `usage` when its response ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens_per_minute: Option<u64>,
    /// Requests in flight at once (a stream counts until it ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_concurrent: Option<u32>,
    /// The completion tokens reserved for a request that sets no `max_tokens`.
    #[serde(default = "LimitsConfig::default_default_max_tokens")]
    #[schemars(range(min = 1))]
    pub default_max_tokens: u32,
    /// How long a request over a limit waits, in arrival order, before it gets a 429.
    #[serde(default = "LimitsConfig::default_queue_timeout")]
    pub queue_timeout: Duration,
    /// Requests that may wait at once; more get a 429 immediately.
    #[serde(default = "LimitsConfig::default_max_queued")]
    #[schemars(range(min = 0))]
    pub max_queued: u32,
    /// `local`: each sidecar enforces the limits on its own (N pods may use N times them).
    /// `global`: all sidecars of this endpoint share them through Redis.
    #[serde(default)]
    pub scope: LimitScope,
    /// Required when `scope` is `global`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisConfig>,
}

impl LimitsConfig {
    fn default_default_max_tokens() -> u32 {
        1024
    }
    fn default_queue_timeout() -> Duration {
        Duration::from_secs(30)
    }
    fn default_max_queued() -> u32 {
        1000
    }

    /// True when a request may have to wait for something configured here.
    pub fn any_limit(&self) -> bool {
        self.requests_per_minute.is_some()
            || self.tokens_per_minute.is_some()
            || self.max_concurrent.is_some()
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            requests_per_minute: None,
            tokens_per_minute: None,
            max_concurrent: None,
            default_max_tokens: Self::default_default_max_tokens(),
            queue_timeout: Self::default_queue_timeout(),
            max_queued: Self::default_max_queued(),
            scope: LimitScope::default(),
            redis: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum LimitScope {
    #[default]
    Local,
    Global,
}

/// The Redis that sidecars share their limits through.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[USER@]HOST:PORT[/DB]`. A password may be written in the URL too, but then
    /// it sits in plain config: prefer `passwordFile`.
    pub url: String,
    /// A file holding the Redis password (a mounted Secret key), so that the password is in
    /// neither the config nor the URL. It is read at each connect, so a rotated password is
    /// used from the next reconnect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// What to do while Redis cannot be reached. `failOpen`: keep serving under a local share
    /// of each limit (the limit divided by the sidecars last seen). `failClosed`: refuse
    /// requests with a 503.
    #[serde(default)]
    pub on_unavailable: RedisFailurePolicy,
    /// The longest a Redis call may take before Redis counts as unreachable.
    #[serde(default = "RedisConfig::default_timeout")]
    pub timeout: Duration,
    /// Prefix of the Redis keys; endpoints of the same name that must not share a budget
    /// (two namespaces, two clusters) need different prefixes.
    #[serde(default = "RedisConfig::default_key_prefix")]
    pub key_prefix: String,
}

impl RedisConfig {
    fn default_key_prefix() -> String {
        "llmesh".to_string()
    }
    fn default_timeout() -> Duration {
        Duration::from_millis(250)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RedisFailurePolicy {
    #[default]
    FailOpen,
    FailClosed,
}

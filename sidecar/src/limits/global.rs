//! Limits shared by every sidecar of an endpoint, through one token bucket per dimension kept
//! in Redis and changed only by a Lua script (so each change is atomic).
//!
//! A request must not wait on Redis: each sidecar leases a slice of the bucket (about a
//! second's worth) ahead of need, spends it locally, and gives back what it has not used
//! after a short idle time. Leased units have left the shared bucket, so the sidecars
//! together cannot admit more than the bucket holds; the only overshoot is tokens a response
//! used beyond its reservation, which are charged after the fact (see `docs/resilience.md`).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use redis::Script;
use tokio::time::Instant;

use crate::config::{RedisConfig, RedisFailurePolicy};
use crate::logging::request_scope;
use crate::redis_link::{RedisLink, RedisLinkError};

/// A sidecar that has not leased for this long no longer counts as a peer; the count sets
/// each sidecar's local share of the limit while Redis is unreachable.
const PEER_TTL_MS: u64 = 30_000;
/// How often an unreachable Redis is tried again, and how long a reachable one may go
/// without a call before it is probed: a sidecar living on a large lease would otherwise not
/// notice an outage until it needs the next one.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Refills the bucket to Redis's own clock (so sidecars' clocks need not agree), adds back
/// what the caller returns, then grants up to `want` whole units (a partial grant when fewer
/// are there) and reports when the rest will be, and how many sidecars lease from it.
const LEASE_SCRIPT: &str = r"
local capacity = tonumber(ARGV[1])
local per_ms = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local give = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'level', 'ts')
local level = tonumber(state[1])
local ts = tonumber(state[2])
if level == nil or ts == nil then
  level = capacity
  ts = now
end
level = math.min(capacity, level + math.max(0, now - ts) * per_ms + give)
local grant = 0
if want > 0 and level >= 1 then
  grant = math.min(want, math.floor(level))
end
level = level - grant
redis.call('HSET', KEYS[1], 'level', tostring(level), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / per_ms) + 60000)
redis.call('ZADD', KEYS[2], now, ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[6]))
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[6]))
local wait = 0
if grant < want then
  wait = math.ceil((want - grant - level) / per_ms)
end
return {grant, wait, redis.call('ZCARD', KEYS[2])}
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    Requests,
    Tokens,
}

impl Dim {
    fn suffix(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Grant {
    pub granted: f64,
    /// When the part not granted should be there.
    pub retry_after: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SharedLimitError {
    #[error(transparent)]
    Link(#[from] RedisLinkError),
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis call failed: {0}")]
    Call(String),
}

/// One endpoint's link to its shared buckets.
pub struct SharedBudget {
    endpoint: String,
    config: RedisConfig,
    link: RedisLink,
    script: Script,
    key_prefix: String,
    member: String,
    available: AtomicBool,
    peers: AtomicU32,
    /// When the last call to Redis ended, whatever its outcome.
    last_call: Mutex<Option<Instant>>,
}

impl SharedBudget {
    pub fn new(endpoint: &str, config: &RedisConfig) -> Self {
        // The URL was validated at load; a client that still cannot be built stays
        // "unavailable" and the endpoint follows its failure policy, like a Redis that is down.
        Self {
            endpoint: endpoint.to_string(),
            config: config.clone(),
            link: RedisLink::new(
                &config.url,
                config.password_file.clone(),
                config.timeout.get(),
            ),
            script: Script::new(LEASE_SCRIPT),
            key_prefix: format!("{}:{endpoint}", config.key_prefix),
            member: uuid::Uuid::new_v4().to_string(),
            available: AtomicBool::new(true),
            peers: AtomicU32::new(1),
            last_call: Mutex::new(None),
        }
    }

    pub fn policy(&self) -> RedisFailurePolicy {
        self.config.on_unavailable
    }

    pub fn is_available(&self) -> bool {
        self.available.load(Ordering::Relaxed)
    }

    /// Sidecars seen leasing in the last 30 s, this one included.
    pub fn peers(&self) -> u32 {
        self.peers.load(Ordering::Relaxed).max(1)
    }

    /// True when Redis is marked unreachable and it is time to try it again.
    pub fn due_for_reconnect(&self, now: Instant) -> bool {
        !self.is_available() && self.quiet_for_a_while(now)
    }

    fn quiet_for_a_while(&self, now: Instant) -> bool {
        self.last_call
            .lock()
            .map(|t| t.is_none_or(|at| now.saturating_duration_since(at) >= CHECK_INTERVAL))
            .unwrap_or(true)
    }

    /// PINGs a Redis marked reachable that has not been called for a second, so that an
    /// outage switches the endpoint to its failure policy even while it lives on a lease.
    /// Only a lease (see `due_for_reconnect`) marks Redis reachable again: a Redis that answers
    /// PING but cannot run the script (read-only, out of memory) stays unreachable instead of
    /// flapping. Returns true when the probe found Redis gone.
    pub async fn probe_if_due(&self, now: Instant) -> bool {
        if !self.is_available() || !self.quiet_for_a_while(now) {
            return false;
        }
        self.bounded(self.ping()).await.is_err()
    }

    /// Takes up to `want` units of `dim` from the shared bucket and returns `give` unused
    /// ones, in one atomic step.
    pub async fn lease(
        &self,
        dim: Dim,
        per_minute: f64,
        want: f64,
        give: f64,
    ) -> Result<Grant, SharedLimitError> {
        let outcome = self.bounded(self.call(dim, per_minute, want, give)).await;
        if outcome.is_ok() {
            self.mark_available();
        }
        outcome
    }

    /// Runs one call to Redis within `redis.timeout` and marks Redis unreachable if it fails.
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, SharedLimitError>>,
    ) -> Result<T, SharedLimitError> {
        let timeout = self.config.timeout.get();
        let outcome = match tokio::time::timeout(timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(SharedLimitError::Timeout(timeout)),
        };
        if let Ok(mut at) = self.last_call.lock() {
            *at = Some(Instant::now());
        }
        if let Err(error) = &outcome {
            self.link.forget_connection();
            self.mark_unavailable(error);
        }
        outcome
    }

    async fn ping(&self) -> Result<(), SharedLimitError> {
        let mut connection = self.link.connection().await?;
        redis::cmd("PING")
            .query_async::<()>(&mut connection)
            .await
            .map_err(|e| SharedLimitError::Call(e.to_string()))
    }

    async fn call(
        &self,
        dim: Dim,
        per_minute: f64,
        want: f64,
        give: f64,
    ) -> Result<Grant, SharedLimitError> {
        let mut connection = self.link.connection().await?;
        let (granted, wait_ms, peers): (i64, i64, i64) = self
            .script
            .key(format!("{}:{}", self.key_prefix, dim.suffix()))
            .key(format!("{}:sidecars", self.key_prefix))
            .arg(per_minute.max(1.0))
            .arg(per_minute.max(1.0) / 60_000.0)
            .arg(want.max(0.0).ceil() as u64)
            .arg(give.max(0.0).floor() as u64)
            .arg(&self.member)
            .arg(PEER_TTL_MS)
            .invoke_async(&mut connection)
            .await
            .map_err(|e| SharedLimitError::Call(e.to_string()))?;
        self.peers
            .store(u32::try_from(peers).unwrap_or(u32::MAX), Ordering::Relaxed);
        Ok(Grant {
            granted: granted.max(0) as f64,
            retry_after: Duration::from_millis(wait_ms.max(0) as u64),
        })
    }

    fn mark_available(&self) {
        if !self.available.swap(true, Ordering::Relaxed) {
            request_scope::span().in_scope(|| tracing::info!(endpoint = %self.endpoint, "Redis is reachable again: shared limits resumed"));
        }
    }

    fn mark_unavailable(&self, error: &SharedLimitError) {
        if self.available.swap(false, Ordering::Relaxed) {
            let policy = match self.policy() {
                RedisFailurePolicy::FailOpen => {
                    "failOpen: limiting locally to a share of each limit"
                }
                RedisFailurePolicy::FailClosed => "failClosed: refusing requests",
            };
            request_scope::span().in_scope(|| tracing::warn!(endpoint = %self.endpoint, %error, peers = self.peers(), policy, "Redis is unreachable"));
        }
    }
}

//! Admission control of one endpoint: requests per minute, tokens per minute, requests in
//! flight, and what the provider's `x-ratelimit-*` headers say is left.
//!
//! A request over a limit waits in one first-in-first-out queue (only the head may be
//! admitted, so a large request is not starved by small ones behind it) for at most
//! `queueTimeout`, then gets a 429 naming the limit. Tokens are reserved before the call
//! (prompt plus `max_tokens`) and settled with the response's `usage`.

mod bucket;
mod global;
pub mod tokens;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::{LimitScope, LimitsConfig, RedisFailurePolicy};
use crate::wait;
use bucket::Bucket;
use global::{Dim, SharedBudget};

// Built once: a name given as a string is parsed again on every lookup, and every response
// is looked at.
static REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
static RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
static REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
static RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");
static ANTHROPIC_REMAINING_REQUESTS: HeaderName =
    HeaderName::from_static("anthropic-ratelimit-requests-remaining");
static ANTHROPIC_RESET_REQUESTS: HeaderName =
    HeaderName::from_static("anthropic-ratelimit-requests-reset");
static ANTHROPIC_REMAINING_TOKENS: HeaderName =
    HeaderName::from_static("anthropic-ratelimit-tokens-remaining");
static ANTHROPIC_RESET_TOKENS: HeaderName =
    HeaderName::from_static("anthropic-ratelimit-tokens-reset");

/// Give back leased units not used for this long, so that other sidecars may use them.
const LEASE_IDLE_RETURN: Duration = Duration::from_secs(2);

/// The limit that stopped a request; named in the 429 and in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    RequestsPerMinute,
    TokensPerMinute,
    Concurrency,
    /// The provider's `x-ratelimit-remaining-requests` reached 0.
    UpstreamRequests,
    /// The provider's `x-ratelimit-remaining-tokens` is below the request's reservation.
    UpstreamTokens,
    Queue,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RequestsPerMinute => "requests_per_minute",
            Self::TokensPerMinute => "tokens_per_minute",
            Self::Concurrency => "max_concurrent",
            Self::UpstreamRequests => "upstream_requests",
            Self::UpstreamTokens => "upstream_tokens",
            Self::Queue => "max_queued",
        }
    }

    /// OpenAI's `error.type` for rate limits: `requests` or `tokens`.
    pub fn openai_type(self) -> &'static str {
        match self {
            Self::TokensPerMinute | Self::UpstreamTokens => "tokens",
            _ => "requests",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::RequestsPerMinute => "requests per minute",
            Self::TokensPerMinute => "tokens per minute",
            Self::Concurrency => "concurrent requests",
            Self::UpstreamRequests => {
                "requests remaining at the provider (x-ratelimit-remaining-requests)"
            }
            Self::UpstreamTokens => {
                "tokens remaining at the provider (x-ratelimit-remaining-tokens)"
            }
            Self::Queue => "requests waiting in the queue",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("limit {} reached", limit.as_str())]
    RateLimited {
        limit: LimitKind,
        /// The configured value, when the limit is one of ours.
        value: Option<u64>,
        retry_after: Duration,
    },
    #[error("the shared rate limiter (Redis) is unreachable and the endpoint fails closed")]
    SharedUnavailable,
}

pub struct Limiter {
    endpoint: String,
    config: LimitsConfig,
    state: Mutex<State>,
    /// Wakes waiters whenever admission may have become possible (a slot freed, tokens
    /// returned, a lease granted, the head left).
    changed: Notify,
    shared: Option<SharedBudget>,
    janitor_started: std::sync::atomic::AtomicBool,
}

struct State {
    requests: Option<Dimension>,
    tokens: Option<Dimension>,
    in_flight: u32,
    queue: VecDeque<u64>,
    next_ticket: u64,
    upstream_requests: Option<Allowance>,
    upstream_tokens: Option<Allowance>,
}

enum Dimension {
    Local(Bucket),
    Shared(Pool),
}

/// Units of a shared bucket leased by this sidecar, plus the bucket used instead while Redis
/// is unreachable (failOpen).
struct Pool {
    dim: Dim,
    per_minute: f64,
    units: f64,
    lease_pending: bool,
    lease_again_at: Option<Instant>,
    last_take: Instant,
    fallback: Option<Bucket>,
}

/// What the provider said is left until its window resets.
#[derive(Debug, Clone, Copy)]
struct Allowance {
    remaining: f64,
    reset_at: Instant,
}

enum Check {
    Admit,
    Wait {
        limit: LimitKind,
        /// None: until something changes (a slot frees, a lease arrives).
        after: Option<Duration>,
        lease: Option<Dim>,
    },
    Refuse(LimitError),
}

/// Tokens a request reserves: its prompt, and the most it may generate.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reservation {
    pub prompt: u64,
    pub output: u64,
}

/// A request's admission: holds its concurrency slot and token reservation until the
/// response ends.
pub struct Permit {
    limiter: Arc<Limiter>,
    reserved_tokens: u64,
    /// The prompt's share of the reservation, for estimating use when no `usage` comes.
    prompt_tokens: u64,
    settled: bool,
}

impl Limiter {
    pub fn new(endpoint: &str, config: &LimitsConfig) -> Arc<Self> {
        let now = Instant::now();
        let shared = match (config.scope, &config.redis) {
            (LimitScope::Global, Some(redis)) => Some(SharedBudget::new(endpoint, redis)),
            _ => None,
        };
        let dimension = |dim: Dim, limit: Option<u64>| {
            limit.map(|limit| {
                let per_minute = limit as f64;
                if shared.is_some() {
                    Dimension::Shared(Pool {
                        dim,
                        per_minute,
                        units: 0.0,
                        lease_pending: false,
                        lease_again_at: None,
                        last_take: now,
                        fallback: None,
                    })
                } else {
                    Dimension::Local(Bucket::per_minute(per_minute, now))
                }
            })
        };
        Arc::new(Self {
            endpoint: endpoint.to_string(),
            state: Mutex::new(State {
                requests: dimension(Dim::Requests, config.requests_per_minute),
                tokens: dimension(Dim::Tokens, config.tokens_per_minute),
                in_flight: 0,
                queue: VecDeque::new(),
                next_ticket: 0,
                upstream_requests: None,
                upstream_tokens: None,
            }),
            config: config.clone(),
            changed: Notify::new(),
            shared,
            janitor_started: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// True when admission needs the request's token count.
    pub fn counts_tokens(&self) -> bool {
        self.config.tokens_per_minute.is_some()
    }

    pub fn default_max_tokens(&self) -> u32 {
        self.config.default_max_tokens
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the counters half-updated in a way
        // that matters more than refusing all traffic would, so keep going.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits for admission of a request that reserves `tokens`, until `deadline` at the latest.
    pub async fn acquire(
        self: &Arc<Self>,
        tokens: u64,
        deadline: Instant,
    ) -> Result<Permit, LimitError> {
        self.acquire_for(
            Reservation {
                prompt: 0,
                output: tokens,
            },
            deadline,
        )
        .await
    }

    /// Waits for admission of a request that reserves its prompt plus its possible output.
    pub async fn acquire_for(
        self: &Arc<Self>,
        reservation: Reservation,
        deadline: Instant,
    ) -> Result<Permit, LimitError> {
        let tokens = reservation.prompt.saturating_add(reservation.output);
        let prompt = reservation.prompt;
        let now = Instant::now();
        let give_up_at = wait::after(now, self.config.queue_timeout.get()).min(deadline);
        let ticket = {
            let mut state = self.lock();
            if state.queue.is_empty() {
                match self.check(&mut state, tokens, now) {
                    Check::Admit => return Ok(self.admit(&mut state, tokens, prompt)),
                    Check::Refuse(e) => return Err(e),
                    Check::Wait {
                        limit,
                        after,
                        lease,
                    } => {
                        if let Some(dim) = lease {
                            self.start_lease(&mut state, dim, tokens);
                        }
                        // A wait that is already known to outlast the queue is refused now.
                        if let Some(after) = after.filter(|a| wait::after(now, *a) > give_up_at) {
                            return Err(self.rate_limited(limit, after));
                        }
                    }
                }
            }
            if state.queue.len() >= self.config.max_queued as usize {
                return Err(self.rate_limited(LimitKind::Queue, Duration::from_secs(1)));
            }
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            state.queue.push_back(ticket);
            ticket
        };
        let mut waiting = QueuedTicket {
            limiter: self,
            ticket,
        };
        let mut last_limit = LimitKind::Concurrency;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before the state is read, so a change in between is not missed.
            notified.as_mut().enable();
            let now = Instant::now();
            let wake_at = {
                let mut state = self.lock();
                if state.queue.front() == Some(&ticket) {
                    match self.check(&mut state, tokens, now) {
                        Check::Admit => {
                            state.queue.pop_front();
                            waiting.ticket = u64::MAX;
                            let permit = self.admit(&mut state, tokens, prompt);
                            drop(state);
                            self.changed.notify_waiters();
                            return Ok(permit);
                        }
                        Check::Refuse(e) => return Err(e),
                        Check::Wait {
                            limit,
                            after,
                            lease,
                        } => {
                            last_limit = limit;
                            if let Some(dim) = lease {
                                self.start_lease(&mut state, dim, tokens);
                            }
                            after.map(|a| wait::after(now, a))
                        }
                    }
                } else {
                    None
                }
            };
            if now >= give_up_at {
                let retry_after = Duration::from_secs(1);
                return Err(self.rate_limited(last_limit, retry_after));
            }
            let sleep_until = wake_at.map_or(give_up_at, |at| at.min(give_up_at));
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(sleep_until) => {}
            }
        }
    }

    fn rate_limited(&self, limit: LimitKind, retry_after: Duration) -> LimitError {
        let value = match limit {
            LimitKind::RequestsPerMinute => self.config.requests_per_minute,
            LimitKind::TokensPerMinute => self.config.tokens_per_minute,
            LimitKind::Concurrency => self.config.max_concurrent.map(u64::from),
            LimitKind::Queue => Some(u64::from(self.config.max_queued)),
            LimitKind::UpstreamRequests | LimitKind::UpstreamTokens => None,
        };
        LimitError::RateLimited {
            limit,
            value,
            retry_after,
        }
    }

    /// Whether the request could be admitted now; changes nothing but refills.
    fn check(&self, state: &mut State, tokens: u64, now: Instant) -> Check {
        let wait = |limit, after| Check::Wait {
            limit,
            after,
            lease: None,
        };
        if let Some(max) = self.config.max_concurrent {
            if state.in_flight >= max {
                return wait(LimitKind::Concurrency, None);
            }
        }
        let tokens = tokens as f64;
        for (allowance, cost, limit) in [
            (
                &mut state.upstream_requests,
                1.0,
                LimitKind::UpstreamRequests,
            ),
            (
                &mut state.upstream_tokens,
                tokens,
                LimitKind::UpstreamTokens,
            ),
        ] {
            if let Some(a) = allowance {
                if now >= a.reset_at {
                    *allowance = None;
                } else if a.remaining < cost {
                    return wait(limit, Some(a.reset_at - now));
                }
            }
        }
        let shared_down = self.shared.as_ref().is_some_and(|s| !s.is_available());
        if shared_down
            && self
                .shared
                .as_ref()
                .is_some_and(|s| s.policy() == RedisFailurePolicy::FailClosed)
        {
            return Check::Refuse(LimitError::SharedUnavailable);
        }
        let peers = self.shared.as_ref().map_or(1, |s| s.peers());
        for (dimension, cost, limit) in [
            (&mut state.requests, 1.0, LimitKind::RequestsPerMinute),
            (&mut state.tokens, tokens, LimitKind::TokensPerMinute),
        ] {
            match dimension {
                None => {}
                Some(Dimension::Local(bucket)) => {
                    let after = bucket.wait(cost, now);
                    if !after.is_zero() {
                        return wait(limit, Some(after));
                    }
                }
                Some(Dimension::Shared(pool)) if shared_down => {
                    let share = pool.per_minute / f64::from(peers);
                    let bucket = pool
                        .fallback
                        .get_or_insert_with(|| Bucket::per_minute(share, now));
                    let after = bucket.wait(cost, now);
                    if !after.is_zero() {
                        return wait(limit, Some(after));
                    }
                }
                Some(Dimension::Shared(pool)) => {
                    pool.fallback = None;
                    if pool.units < cost.min(pool.per_minute) {
                        let after = pool
                            .lease_again_at
                            .map(|at| at.saturating_duration_since(now));
                        let lease = (!pool.lease_pending
                            && pool.lease_again_at.is_none_or(|at| now >= at))
                        .then_some(pool.dim);
                        return Check::Wait {
                            limit,
                            after,
                            lease,
                        };
                    }
                }
            }
        }
        Check::Admit
    }

    fn admit(self: &Arc<Self>, state: &mut State, tokens: u64, prompt_tokens: u64) -> Permit {
        let now = Instant::now();
        state.in_flight += 1;
        let cost = tokens as f64;
        if let Some(a) = &mut state.upstream_requests {
            a.remaining -= 1.0;
        }
        if let Some(a) = &mut state.upstream_tokens {
            a.remaining -= cost;
        }
        let mut prefetch = Vec::new();
        for (dimension, cost) in [(&mut state.requests, 1.0), (&mut state.tokens, cost)] {
            match dimension {
                None => {}
                Some(Dimension::Local(bucket)) => bucket.take(cost),
                Some(Dimension::Shared(pool)) => match &mut pool.fallback {
                    Some(bucket) => bucket.take(cost),
                    None => {
                        pool.units -= cost;
                        pool.last_take = now;
                        // Lease the next slice while this one lasts, so requests do not wait.
                        if pool.units < slice(pool.per_minute) / 2.0 && !pool.lease_pending {
                            prefetch.push(pool.dim);
                        }
                    }
                },
            }
        }
        for dim in prefetch {
            self.start_lease(state, dim, 0);
        }
        Permit {
            limiter: Arc::clone(self),
            reserved_tokens: tokens,
            prompt_tokens,
            settled: false,
        }
    }

    /// Leases more of a shared bucket in the background; the result wakes the waiters.
    fn start_lease(self: &Arc<Self>, state: &mut State, dim: Dim, tokens: u64) {
        let Some(pool) = state.pool_mut(dim) else {
            return;
        };
        if pool.lease_pending {
            return;
        }
        pool.lease_pending = true;
        let cost = match dim {
            Dim::Requests => 1.0,
            Dim::Tokens => tokens as f64,
        };
        let want = slice(pool.per_minute).max(cost - pool.units);
        let per_minute = pool.per_minute;
        self.start_janitor();
        let limiter = Arc::clone(self);
        tokio::spawn(async move {
            let Some(shared) = &limiter.shared else {
                return;
            };
            let result = shared.lease(dim, per_minute, want, 0.0).await;
            {
                let mut state = limiter.lock();
                if let Some(pool) = state.pool_mut(dim) {
                    pool.lease_pending = false;
                    match result {
                        Ok(grant) => {
                            pool.units += grant.granted;
                            pool.lease_again_at = (grant.granted < want).then(|| {
                                let pause = wait::clamp(grant.retry_after);
                                wait::after(Instant::now(), pause.max(Duration::from_millis(5)))
                            });
                        }
                        Err(_) => pool.lease_again_at = None,
                    }
                }
            }
            limiter.changed.notify_waiters();
        });
    }

    /// Returns idle leases to Redis and checks that Redis is still there (or back), for as
    /// long as this limiter is in use (a config reload drops it and the task ends).
    fn start_janitor(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.shared.is_none() || self.janitor_started.swap(true, Ordering::Relaxed) {
            return;
        }
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_millis(500));
            loop {
                ticker.tick().await;
                let Some(limiter) = weak.upgrade() else {
                    return;
                };
                limiter.tidy_leases().await;
            }
        });
    }

    async fn tidy_leases(&self) {
        let Some(shared) = &self.shared else {
            return;
        };
        let now = Instant::now();
        let mut returns = Vec::new();
        {
            let mut state = self.lock();
            let State {
                requests, tokens, ..
            } = &mut *state;
            for dimension in [requests, tokens] {
                if let Some(Dimension::Shared(pool)) = dimension {
                    let idle = now.saturating_duration_since(pool.last_take) >= LEASE_IDLE_RETURN;
                    if idle && pool.units >= 1.0 && !pool.lease_pending {
                        returns.push((pool.dim, pool.per_minute, pool.units.floor()));
                        pool.units -= pool.units.floor();
                    }
                }
            }
            if returns.is_empty() && shared.due_for_reconnect(now) {
                if let Some(Dimension::Shared(pool)) =
                    state.requests.as_ref().or(state.tokens.as_ref())
                {
                    returns.push((pool.dim, pool.per_minute, 0.0));
                }
            }
        }
        let mut changed = false;
        for (dim, per_minute, units) in returns {
            if shared.lease(dim, per_minute, 0.0, units).await.is_err() && units > 0.0 {
                // Redis is gone; keep the units rather than lose them.
                if let Some(pool) = self.lock().pool_mut(dim) {
                    pool.units += units;
                }
            }
            changed = true;
        }
        // After the returns, which count as a call: a busy sidecar is not probed on top.
        if shared.probe_if_due(Instant::now()).await {
            changed = true;
        }
        if changed {
            self.changed.notify_waiters();
        }
    }

    /// Tightens admission to what the provider says is left (`x-ratelimit-remaining-*` and
    /// `x-ratelimit-reset-*`, as OpenAI and Azure send them), so that the sidecar slows
    /// down before the provider starts refusing.
    pub fn observe_upstream(&self, headers: &HeaderMap) {
        let now = Instant::now();
        let read = |remaining: &HeaderName,
                    reset: &HeaderName,
                    parse_reset: &dyn Fn(&str) -> Option<Duration>|
         -> Option<Allowance> {
            let remaining = headers
                .get(remaining)?
                .to_str()
                .ok()?
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|r| r.is_finite())?;
            let reset = headers.get(reset)?.to_str().ok().and_then(parse_reset)?;
            Some(Allowance {
                remaining,
                reset_at: wait::after(now, reset),
            })
        };
        let anthropic_reset = |value: &str| parse_reset_at(value, SystemTime::now());
        let requests = read(&REMAINING_REQUESTS, &RESET_REQUESTS, &parse_reset).or_else(|| {
            read(
                &ANTHROPIC_REMAINING_REQUESTS,
                &ANTHROPIC_RESET_REQUESTS,
                &anthropic_reset,
            )
        });
        let tokens = read(&REMAINING_TOKENS, &RESET_TOKENS, &parse_reset).or_else(|| {
            read(
                &ANTHROPIC_REMAINING_TOKENS,
                &ANTHROPIC_RESET_TOKENS,
                &anthropic_reset,
            )
        });
        if requests.is_none() && tokens.is_none() {
            return;
        }
        let mut state = self.lock();
        if requests.is_some() {
            state.upstream_requests = requests;
        }
        if tokens.is_some() {
            state.upstream_tokens = tokens;
        }
    }

    fn release(&self, reserved: u64, used: u64) {
        let now = Instant::now();
        {
            let mut state = self.lock();
            state.in_flight = state.in_flight.saturating_sub(1);
            let refund = reserved as f64 - used as f64;
            if refund != 0.0 {
                if let Some(a) = &mut state.upstream_tokens {
                    a.remaining += refund;
                }
                match &mut state.tokens {
                    None => {}
                    Some(Dimension::Local(bucket)) => {
                        if refund > 0.0 {
                            bucket.give_back(refund, now);
                        } else {
                            bucket.take(-refund);
                        }
                    }
                    Some(Dimension::Shared(pool)) => match &mut pool.fallback {
                        Some(bucket) if refund > 0.0 => bucket.give_back(refund, now),
                        Some(bucket) => bucket.take(-refund),
                        // Units over the reservation become a debt the next lease pays.
                        None => pool.units += refund,
                    },
                }
            }
        }
        self.changed.notify_waiters();
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

impl State {
    fn pool_mut(&mut self, dim: Dim) -> Option<&mut Pool> {
        let dimension = match dim {
            Dim::Requests => &mut self.requests,
            Dim::Tokens => &mut self.tokens,
        };
        match dimension {
            Some(Dimension::Shared(pool)) => Some(pool),
            _ => None,
        }
    }
}

/// About a second's worth of a per-minute limit, at least one unit: small enough that the
/// sidecars holding slices keep little from each other, large enough that most requests
/// never wait for Redis.
fn slice(per_minute: f64) -> f64 {
    (per_minute / 60.0).ceil().max(1.0)
}

/// OpenAI's reset durations: `1s`, `6m0s`, `20ms`, `1h2m3.5s`; a bare number is seconds.
/// At most [`wait::MAX_WAIT`], whatever the provider sends.
pub fn parse_reset(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<f64>() {
        return wait::from_secs_f64(seconds);
    }
    let mut total = 0.0;
    let mut rest = value;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|&i| i > 0)?;
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            _ => return None,
        };
        total += number * factor;
        rest = &rest[unit_len..];
    }
    wait::from_secs_f64(total)
}

/// Anthropic's reset times: the RFC 3339 instant the allowance is full again, as a wait from
/// `now` (zero if it is past). At most [`wait::MAX_WAIT`].
pub fn parse_reset_at(value: &str, now: SystemTime) -> Option<Duration> {
    let at =
        time::OffsetDateTime::parse(value.trim(), &time::format_description::well_known::Rfc3339)
            .ok()?;
    let since_epoch = Duration::from_secs(u64::try_from(at.unix_timestamp()).ok()?);
    let at = std::time::UNIX_EPOCH.checked_add(since_epoch)?;
    let wait = at.duration_since(now).unwrap_or(Duration::ZERO);
    Some(wait.min(wait::MAX_WAIT))
}

/// A waiter's place in the queue; leaving early (timeout, the app went away) gives it up.
struct QueuedTicket<'a> {
    limiter: &'a Limiter,
    ticket: u64,
}

impl Drop for QueuedTicket<'_> {
    fn drop(&mut self) {
        if self.ticket == u64::MAX {
            return;
        }
        let mut state = self.limiter.lock();
        state.queue.retain(|t| *t != self.ticket);
        drop(state);
        self.limiter.changed.notify_waiters();
    }
}

impl Permit {
    /// The request's prompt as counted (or estimated) at admission.
    pub fn prompt_tokens(&self) -> u64 {
        self.prompt_tokens
    }

    /// Ends the admission: `used` is the tokens the call really cost (from `usage`, or an
    /// estimate), or None to keep the reservation as charged.
    pub fn settle(mut self, used: Option<u64>) {
        self.settled = true;
        let used = used.unwrap_or(self.reserved_tokens);
        self.limiter.release(self.reserved_tokens, used);
    }

    /// Settles from what the response said: its `usage`; else, for a stream, the prompt plus
    /// one token per chunk; else the reservation as charged. An error answer without usage
    /// generated nothing and returns the whole reservation.
    pub fn settle_from_response(
        self,
        usage: Option<u64>,
        streamed_chunks: Option<u64>,
        success: bool,
    ) {
        let used = match (usage, streamed_chunks) {
            (Some(used), _) => Some(used),
            _ if !success => Some(0),
            (None, Some(chunks)) => Some(self.prompt_tokens.saturating_add(chunks)),
            (None, None) => None,
        };
        self.settle(used);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.settled {
            // The call ended without an answer (an error before the response): nothing was
            // generated, so the whole reservation comes back.
            self.limiter.release(self.reserved_tokens, 0);
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;

//! An exact-match response cache, per endpoint and opt-in (`cache:` in the endpoint's config;
//! docs/cache.md). A request the cache may answer is keyed by a hash of the endpoint, its
//! key's fingerprint, the upstream model and the canonical body ([`key`]); its answer is
//! looked up in the pod's memory, then in a Redis shared by the endpoint's sidecars. A miss
//! goes upstream as usual, and its answer, JSON or stream, is stored as it passes ([`record`]).
//! A hit spends no rate-limit budget and no provider tokens.

mod entry;
mod inflight;
pub mod key;
mod memory;
mod record;
mod shared;

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::CacheConfig;
pub use entry::to_stream;
use inflight::InFlight;
pub use inflight::{wait, Fetching, Turn};
use key::{key_for, CacheKey, KeyInput};
use memory::MemoryLevel;
pub use record::Recording;
use shared::SharedLevel;

/// Request: `no-cache` (answer from the provider, store the answer) or `no-store` (neither
/// look up nor store). Response: what the cache did.
pub static LLMESH_CACHE: HeaderName = HeaderName::from_static("x-llmesh-cache");

/// The longest an identical request waits for the one fetching its answer before it calls
/// the provider itself: the first request's app may read its stream slowly, or not at all,
/// and a waiting request must not be held up by it for the whole deadline.
pub const MAX_COALESCED_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// What the cache did for one request: its response header, log field and `cache` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheOutcome {
    /// The endpoint has no cache.
    #[default]
    Off,
    /// The request may not use the cache (it samples, asks for several choices, says
    /// `no-store`, or its route is not cached).
    Bypass,
    Miss,
    HitMemory,
    HitShared,
}

impl CacheOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Bypass => "bypass",
            Self::Miss => "miss",
            Self::HitMemory => "hit-memory",
            Self::HitShared => "hit-shared",
        }
    }

    pub fn header_value(self) -> Option<HeaderValue> {
        match self {
            Self::Off => None,
            other => Some(HeaderValue::from_static(other.as_str())),
        }
    }
}

/// One endpoint's cache: it outlives config reloads that leave its settings alone.
pub struct EndpointCache {
    config: CacheConfig,
    memory: MemoryLevel,
    shared: Option<Arc<SharedLevel>>,
    inflight: Arc<InFlight>,
}

impl EndpointCache {
    pub fn new(endpoint: &str, config: &CacheConfig) -> Self {
        Self {
            config: config.clone(),
            memory: MemoryLevel::new(config.memory.max_bytes, config.max_entry_bytes),
            shared: config
                .shared
                .as_ref()
                .map(|shared| Arc::new(SharedLevel::new(endpoint, shared))),
            inflight: Arc::new(InFlight::default()),
        }
    }

    /// The previous snapshot's cache when the settings are the same (what it holds stays
    /// valid: the key covers the model and the credential), else a new one.
    pub fn carried_over(
        previous: Option<&Arc<EndpointCache>>,
        endpoint: &str,
        config: &CacheConfig,
    ) -> Arc<Self> {
        match previous {
            Some(previous) if previous.config == *config => Arc::clone(previous),
            _ => Arc::new(Self::new(endpoint, config)),
        }
    }

    /// The stored answer and the level that had it.
    pub async fn get(&self, key: &CacheKey) -> Option<(Bytes, CacheOutcome)> {
        if let Some(body) = self.memory.get(key) {
            return Some((body, CacheOutcome::HitMemory));
        }
        let (body, left) = self.shared.as_ref()?.get(key).await?;
        // Kept in memory for what is left of its time, not a whole new one.
        self.memory.put(*key, body.clone(), left);
        Some((body, CacheOutcome::HitShared))
    }

    /// Stores an answer in memory now and in the shared level in the background.
    pub fn put(&self, key: CacheKey, body: Bytes) {
        if body.len() as u64 > self.config.max_entry_bytes {
            return;
        }
        let ttl = self.config.ttl.get();
        self.memory.put(key, body.clone(), ttl);
        if let Some(shared) = &self.shared {
            let shared = Arc::clone(shared);
            tokio::spawn(async move { shared.put(&key, &body, ttl).await });
        }
    }

    pub fn turn(&self, key: CacheKey) -> Turn {
        self.inflight.turn(key)
    }

    pub fn bytes_held(&self) -> u64 {
        self.memory.bytes()
    }

    pub fn max_entry_bytes(&self) -> usize {
        usize::try_from(self.config.max_entry_bytes).unwrap_or(usize::MAX)
    }
}

/// How one request uses its endpoint's cache.
pub enum Use {
    Off,
    /// The request may not use the cache (see [`key::Bypass`], or `x-llmesh-cache: no-store`).
    Bypass,
    Cached {
        cache: Arc<EndpointCache>,
        key: CacheKey,
        /// False with `x-llmesh-cache: no-cache`: the answer is fetched, then stored.
        lookup: bool,
    },
}

/// Where the key of a request comes from.
pub struct Request<'a> {
    pub endpoint: &'a str,
    pub credential_fingerprint: &'a str,
    pub upstream_model: &'a str,
    pub route: &'a str,
    pub body: &'a [u8],
    pub headers: &'a HeaderMap,
}

pub fn plan(cache: Option<&Arc<EndpointCache>>, request: &Request<'_>) -> Use {
    let Some(cache) = cache else {
        return Use::Off;
    };
    let directive = request
        .headers
        .get(&LLMESH_CACHE)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    if directive.is_some_and(|d| d.eq_ignore_ascii_case("no-store")) {
        return Use::Bypass;
    }
    let key = key_for(&KeyInput {
        endpoint: request.endpoint,
        credential: request.credential_fingerprint,
        model: request.upstream_model,
        route: request.route,
        body: request.body,
        allow_sampling: cache.config.allow_sampling,
    });
    match key {
        Ok(key) => Use::Cached {
            cache: Arc::clone(cache),
            key,
            lookup: !directive.is_some_and(|d| d.eq_ignore_ascii_case("no-cache")),
        },
        Err(_) => Use::Bypass,
    }
}

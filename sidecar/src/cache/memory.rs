//! The cache's first level: answers held in the pod's memory, bounded in bytes, each served
//! until its time to live runs out.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quick_cache::sync::Cache;
use quick_cache::{OptionsBuilder, Weighter};
use tokio::time::Instant;

use super::key::CacheKey;

/// What the memory level holds for one key.
#[derive(Clone)]
struct Held {
    body: Bytes,
    expires_at: Instant,
}

/// An answer's weight is its size: the bound is on bytes, not on entries.
#[derive(Clone)]
struct BodySize;

impl Weighter<CacheKey, Held> for BodySize {
    fn weight(&self, _key: &CacheKey, held: &Held) -> u64 {
        // Never zero: a zero weight would never be evicted.
        (held.body.len() as u64).max(1)
    }
}

pub struct MemoryLevel {
    entries: Arc<Cache<CacheKey, Held, BodySize>>,
}

/// The answers a level of this size is expected to hold, to size its tables: a typical chat
/// answer is a few kilobytes.
const TYPICAL_ANSWER_BYTES: u64 = 4 * 1024;

/// The memory is split into shards that each hold a part of it: few enough that a shard
/// holds at least this many of the largest answers allowed.
const LARGEST_ANSWERS_PER_SHARD: u64 = 4;
const MAX_SHARDS: u64 = 16;

impl MemoryLevel {
    pub fn new(max_bytes: u64, max_entry_bytes: u64) -> Self {
        let expected = usize::try_from(max_bytes / TYPICAL_ANSWER_BYTES)
            .unwrap_or(usize::MAX)
            .clamp(16, 1 << 20);
        let shards =
            (max_bytes / max_entry_bytes.max(1) / LARGEST_ANSWERS_PER_SHARD).clamp(1, MAX_SHARDS);
        let built = OptionsBuilder::new()
            .estimated_items_capacity(expected)
            .weight_capacity(max_bytes)
            .shards(usize::try_from(shards).unwrap_or(1))
            .build();
        let entries = match built {
            Ok(options) => {
                Cache::with_options(options, BodySize, Default::default(), Default::default())
            }
            Err(_) => Cache::with_weighter(expected, max_bytes, BodySize),
        };
        Self {
            entries: Arc::new(entries),
        }
    }

    pub fn get(&self, key: &CacheKey) -> Option<Bytes> {
        let held = self.entries.get(key)?;
        if Instant::now() >= held.expires_at {
            self.entries.remove(key);
            return None;
        }
        Some(held.body)
    }

    /// Stores `body` for `ttl` (an answer larger than the whole level is not kept).
    pub fn put(&self, key: CacheKey, body: Bytes, ttl: Duration) {
        let expires_at = crate::wait::after(Instant::now(), ttl);
        self.entries.insert(key, Held { body, expires_at });
    }

    /// Bytes of answers held now (expired ones included until they are evicted).
    pub fn bytes(&self) -> u64 {
        self.entries.weight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::key::{key_for, KeyInput};

    fn key(prompt: &str) -> CacheKey {
        let body = format!(r#"{{"input":"{prompt}"}}"#);
        key_for(&KeyInput {
            endpoint: "e",
            credential: "",
            model: "m",
            route: "/embeddings",
            body: body.as_bytes(),
            allow_sampling: false,
        })
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn answers_expire_after_their_ttl() {
        let level = MemoryLevel::new(1 << 20, 1 << 16);
        level.put(
            key("a"),
            Bytes::from_static(b"answer"),
            Duration::from_secs(60),
        );
        assert_eq!(level.get(&key("a")).as_deref(), Some(&b"answer"[..]));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(level.get(&key("a")), None);
    }

    #[test]
    fn the_byte_bound_evicts() {
        let level = MemoryLevel::new(10_000, 1_000);
        for i in 0..100 {
            level.put(
                key(&i.to_string()),
                Bytes::from(vec![b'x'; 1_000]),
                Duration::from_secs(60),
            );
        }
        assert!(level.bytes() <= 10_000, "{}", level.bytes());
        let kept = (0..100)
            .filter(|i| level.get(&key(&i.to_string())).is_some())
            .count();
        assert!((1..=10).contains(&kept), "{kept}");
    }

    #[test]
    fn the_largest_allowed_answer_is_kept() {
        // 32 MiB and 1 MiB answers: the defaults.
        let level = MemoryLevel::new(32 << 20, 1 << 20);
        level.put(
            key("big"),
            Bytes::from(vec![b'x'; 1 << 20]),
            Duration::from_secs(60),
        );
        assert!(level.get(&key("big")).is_some());
    }
}

//! The cache's second level: a Redis shared by all the endpoint's sidecars. Redis being slow
//! or gone is a miss (and a store not made), never an error for the app; it is logged when it
//! starts and when it ends, not on every request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use redis::AsyncCommands;

use super::key::CacheKey;
use crate::config::SharedCacheConfig;
use crate::logging::request_scope;
use crate::redis_link::{RedisLink, RedisLinkError};

#[derive(Debug, thiserror::Error)]
enum SharedCacheError {
    #[error(transparent)]
    Link(#[from] RedisLinkError),
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis call failed: {0}")]
    Call(#[from] redis::RedisError),
}

pub struct SharedLevel {
    endpoint: String,
    key_prefix: String,
    link: RedisLink,
    available: AtomicBool,
    /// When a call last failed: while Redis is down it is tried at most once per
    /// RETRY_INTERVAL, so that requests do not each wait for its timeout.
    failed_at: Mutex<Option<Instant>>,
}

const RETRY_INTERVAL: Duration = Duration::from_secs(1);

impl SharedLevel {
    pub fn new(endpoint: &str, config: &SharedCacheConfig) -> Self {
        Self {
            endpoint: endpoint.to_string(),
            key_prefix: format!("{}:{endpoint}", config.key_prefix),
            link: RedisLink::new(
                &config.url,
                config.password_file.clone(),
                config.timeout.get(),
            ),
            available: AtomicBool::new(true),
            failed_at: Mutex::new(None),
        }
    }

    fn redis_key(&self, key: &CacheKey) -> String {
        format!("{}:{}", self.key_prefix, key.hex())
    }

    /// The stored answer and how long it has left to live.
    pub async fn get(&self, key: &CacheKey) -> Option<(Bytes, Duration)> {
        let redis_key = self.redis_key(key);
        let (value, left_ms) = self
            .bounded(async {
                let mut connection = self.link.connection().await?;
                let found: (Option<Vec<u8>>, i64) = redis::pipe()
                    .get(&redis_key)
                    .pttl(&redis_key)
                    .query_async(&mut connection)
                    .await?;
                Ok(found)
            })
            .await?;
        // PTTL is negative when the key has no expiry or is gone (it expired in between).
        let left = Duration::from_millis(u64::try_from(left_ms).ok()?);
        Some((Bytes::from(value?), left))
    }

    pub async fn put(&self, key: &CacheKey, body: &Bytes, ttl: Duration) {
        let redis_key = self.redis_key(key);
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let _ = self
            .bounded(async {
                let mut connection = self.link.connection().await?;
                let () = connection
                    .pset_ex(&redis_key, body.as_ref(), millis)
                    .await?;
                Ok(())
            })
            .await;
    }

    /// Runs one call within the timeout; a failure marks Redis unavailable (logged once).
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, SharedCacheError>>,
    ) -> Option<T> {
        if !self.available.load(Ordering::Relaxed) {
            let recently = self
                .failed_at
                .lock()
                .ok()
                .and_then(|at| *at)
                .is_some_and(|at| at.elapsed() < RETRY_INTERVAL);
            if recently {
                return None;
            }
        }
        let timeout = self.link.timeout();
        let outcome = match tokio::time::timeout(timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(SharedCacheError::Timeout(timeout)),
        };
        match outcome {
            Ok(value) => {
                if !self.available.swap(true, Ordering::Relaxed) {
                    request_scope::span().in_scope(|| tracing::info!(endpoint = %self.endpoint, "the shared cache's Redis is reachable again"));
                }
                Some(value)
            }
            Err(error) => {
                self.link.forget_connection();
                if let Ok(mut at) = self.failed_at.lock() {
                    *at = Some(Instant::now());
                }
                if self.available.swap(false, Ordering::Relaxed) {
                    request_scope::span().in_scope(|| tracing::warn!(endpoint = %self.endpoint, %error, "the shared cache's Redis is unreachable: its lookups are misses until it is back"));
                }
                None
            }
        }
    }
}

//! Coalescing: while one request is fetching an answer that will be stored, identical
//! requests wait for it instead of calling the provider too, and are then answered from the
//! cache. If the first request fails or its answer is not stored, they go on their own way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::key::CacheKey;

#[derive(Default)]
pub struct InFlight {
    fetching: Mutex<HashMap<CacheKey, watch::Receiver<()>>>,
}

/// Held by the request that fetches the answer; dropping it (stored or not) releases the
/// requests waiting for it.
pub struct Fetching {
    key: CacheKey,
    owner: Arc<InFlight>,
    _done: watch::Sender<()>,
}

impl Drop for Fetching {
    fn drop(&mut self) {
        if let Ok(mut fetching) = self.owner.fetching.lock() {
            fetching.remove(&self.key);
        }
    }
}

pub enum Turn {
    /// Nobody is fetching this answer: this request does.
    Fetch(Fetching),
    /// Another request is: wait for it with [`wait`].
    Wait(watch::Receiver<()>),
}

impl InFlight {
    pub fn turn(self: &Arc<Self>, key: CacheKey) -> Turn {
        let Ok(mut fetching) = self.fetching.lock() else {
            // A poisoned map only loses coalescing: fetch.
            let (done, _) = watch::channel(());
            return Turn::Fetch(Fetching {
                key,
                owner: Arc::clone(self),
                _done: done,
            });
        };
        if let Some(waiting) = fetching.get(&key) {
            return Turn::Wait(waiting.clone());
        }
        let (done, waiting) = watch::channel(());
        fetching.insert(key, waiting);
        Turn::Fetch(Fetching {
            key,
            owner: Arc::clone(self),
            _done: done,
        })
    }
}

/// Waits until the fetching request is done, or `at_most`.
pub async fn wait(mut waiting: watch::Receiver<()>, at_most: Duration) {
    // The sender is never used to send: `changed` returns when it is dropped.
    let _ = tokio::time::timeout(at_most, waiting.changed()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::key::{key_for, KeyInput};

    fn key() -> CacheKey {
        key_for(&KeyInput {
            endpoint: "e",
            credential: "",
            model: "m",
            route: "/embeddings",
            body: br#"{"input":"x"}"#,
            allow_sampling: false,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn the_second_request_waits_for_the_first() {
        let inflight = Arc::new(InFlight::default());
        let Turn::Fetch(first) = inflight.turn(key()) else {
            panic!("the first request fetches");
        };
        let Turn::Wait(waiting) = inflight.turn(key()) else {
            panic!("the second one waits");
        };
        let waiter = tokio::spawn(wait(waiting, Duration::from_secs(10)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(first);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        // Done: the next request fetches again.
        assert!(matches!(inflight.turn(key()), Turn::Fetch(_)));
    }
}

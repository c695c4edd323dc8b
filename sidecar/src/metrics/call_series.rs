//! The series a finished model call is counted in, resolved once per label combination and
//! worker thread, then reused: `with_label_values` hashes every label value with SipHash and
//! takes the vector's lock, and a call touches up to six vectors.
//!
//! Label values come from the config and from fixed sets, so the combinations are few; the
//! cache is emptied if it ever grows past [`MAX_CACHED`] anyway.

use std::cell::{OnceCell, RefCell};
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::rc::Rc;

use prometheus::{Counter, Histogram, IntCounter};

/// endpoint, model, operation, provider, status, cache, error_type.
pub type CallLabels<'a> = [&'a str; 7];

/// Series are created on first use only, so that `/metrics` lists no series that never
/// had a sample (a time to first chunk for an endpoint that never streamed, say).
pub struct CallSeries {
    pub requests: IntCounter,
    pub duration: Histogram,
    pub first_chunk: OnceCell<Histogram>,
    /// Input and output tokens, as reported by the provider.
    pub reported_tokens: OnceCell<[Histogram; 2]>,
    /// Input and output tokens, as estimated when the response had no usage.
    pub estimated_tokens: OnceCell<[Histogram; 2]>,
    pub cost: OnceCell<Counter>,
}

const MAX_CACHED: usize = 4096;

thread_local! {
    static CACHE: RefCell<SeriesCache> = RefCell::new(SeriesCache::default());
}

type Entry = (u64, [String; 7], Rc<CallSeries>);

#[derive(Default)]
struct SeriesCache {
    hasher: foldhash::fast::RandomState,
    by_hash: HashMap<u64, Vec<Entry>, foldhash::fast::RandomState>,
    len: usize,
}

/// The series of `labels` in the metrics numbered `metrics_id`, from this thread's cache
/// or from `resolve`.
pub fn series(
    metrics_id: u64,
    labels: CallLabels<'_>,
    resolve: impl FnOnce() -> CallSeries,
) -> Rc<CallSeries> {
    CACHE.with_borrow_mut(|cache| {
        let hash = cache.hasher.hash_one((metrics_id, labels));
        let same = |(id, known, _): &&Entry| {
            *id == metrics_id && known.iter().zip(labels).all(|(a, b)| a == b)
        };
        if let Some((_, _, series)) = cache.by_hash.get(&hash).and_then(|e| e.iter().find(same)) {
            return Rc::clone(series);
        }
        if cache.len >= MAX_CACHED {
            cache.by_hash.clear();
            cache.len = 0;
        }
        let series = Rc::new(resolve());
        let owned = labels.map(str::to_string);
        cache
            .by_hash
            .entry(hash)
            .or_default()
            .push((metrics_id, owned, Rc::clone(&series)));
        cache.len += 1;
        series
    })
}

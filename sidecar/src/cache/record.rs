//! Storing an answer as it passes to the app, without delaying it: a JSON body is kept up to
//! the entry limit; a stream is folded into the JSON answer it stands for. Only an answer
//! that ended well is stored.

use std::sync::Arc;

use bytes::Bytes;

use super::entry::StreamRecorder;
use super::inflight::Fetching;
use super::key::CacheKey;
use super::EndpointCache;

pub struct Recording {
    cache: Arc<EndpointCache>,
    key: CacheKey,
    body: Body,
    /// Released when the recording ends, so that identical requests waiting for this one
    /// look the answer up.
    _fetching: Option<Fetching>,
}

enum Body {
    Json { bytes: Vec<u8>, over_limit: bool },
    Stream(Box<StreamRecorder>),
}

impl Recording {
    /// `sse`: the answer is a stream of `route`'s chunks.
    pub fn new(
        cache: Arc<EndpointCache>,
        key: CacheKey,
        route: &str,
        sse: bool,
        fetching: Option<Fetching>,
    ) -> Self {
        let limit = cache.max_entry_bytes();
        let body = if sse {
            // A stream's events weigh more than the answer they fold into.
            Body::Stream(Box::new(StreamRecorder::new(
                route,
                limit.saturating_mul(4),
            )))
        } else {
            Body::Json {
                bytes: Vec::new(),
                over_limit: false,
            }
        };
        Self {
            cache,
            key,
            body,
            _fetching: fetching,
        }
    }

    pub fn observe(&mut self, data: &[u8]) {
        let limit = self.cache.max_entry_bytes();
        match &mut self.body {
            Body::Json { bytes, over_limit } => {
                if *over_limit {
                    return;
                }
                if bytes.len().saturating_add(data.len()) > limit {
                    *over_limit = true;
                    *bytes = Vec::new();
                    return;
                }
                bytes.extend_from_slice(data);
            }
            Body::Stream(recorder) => recorder.push(data),
        }
    }

    /// The answer ended: stored if it ended well (`complete`).
    pub fn finish(self, complete: bool) {
        if !complete {
            return;
        }
        let answer = match self.body {
            Body::Json { bytes, over_limit } if !over_limit && !bytes.is_empty() => {
                Some(Bytes::from(bytes))
            }
            Body::Json { .. } => None,
            Body::Stream(recorder) => recorder.finish(),
        };
        if let Some(answer) = answer {
            self.cache.put(self.key, answer);
        }
    }
}

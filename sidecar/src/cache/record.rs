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
    route: String,
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
            route: route.to_string(),
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
            Body::Json { bytes, over_limit }
                if !over_limit && is_an_answer(&self.route, &bytes) =>
            {
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

/// A 2xx body is stored only if it is what its route answers: some gateways and servers
/// answer errors with a 200, which must not be served again for the whole time to live.
fn is_an_answer(route: &str, body: &[u8]) -> bool {
    let Ok(serde_json::Value::Object(answer)) = serde_json::from_slice(body) else {
        return false;
    };
    if answer.get("error").is_some_and(|e| !e.is_null()) {
        return false;
    }
    match route {
        "/embeddings" => answer.get("data").is_some_and(serde_json::Value::is_array),
        _ => answer
            .get("choices")
            .and_then(serde_json::Value::as_array)
            .is_some_and(|choices| {
                !choices.is_empty()
                    && choices.iter().all(|c| {
                        c.get("finish_reason")
                            .is_some_and(serde_json::Value::is_string)
                    })
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::is_an_answer;

    #[test]
    fn only_complete_answers_are_stored() {
        let chat = br#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#;
        assert!(is_an_answer("/chat/completions", chat));
        assert!(is_an_answer(
            "/embeddings",
            br#"{"object":"list","data":[{"embedding":[0.1]}]}"#
        ));
        for not_one in [
            &br#"{"error":{"message":"overloaded"}}"#[..],
            br#"{"choices":[]}"#,
            br#"{"choices":[{"message":{"content":"cut"},"finish_reason":null}]}"#,
            br#"[1,2]"#,
            b"not json",
        ] {
            assert!(!is_an_answer("/chat/completions", not_one));
        }
        assert!(!is_an_answer("/embeddings", br#"{"object":"list"}"#));
    }
}

//! The ids of the request being served, for the few lines logged while serving it (a
//! circuit opening, a retry, Redis going away).
//!
//! A `tracing` span per request gave those lines their ids, but making it (its fields
//! written as JSON and kept in the subscriber's registry) and entering it at every poll
//! cost about 3,600 instructions a request (4%), for lines that almost no request logs. The ids
//! are kept in a task-local instead, and a line logged inside a request makes the span
//! then, so the line reads as before: `"spans":[{"name":"request","request_id":…,
//! "trace_id":…}]` in JSON, `request{request_id=… trace_id=…}:` for people.

use std::future::Future;
use std::sync::Arc;

tokio::task_local! {
    static CURRENT: Arc<RequestIds>;
}

#[derive(Debug)]
pub struct RequestIds {
    pub request_id: String,
    /// As logs and spans show it: 32 lowercase hex digits.
    pub trace_id: String,
}

/// `future`, serving the request of `ids` whenever it is polled.
pub fn serve<F: Future>(ids: Arc<RequestIds>, future: F) -> impl Future<Output = F::Output> {
    CURRENT.scope(ids, future)
}

/// `f`, serving the request of `ids`: for work done after the handler returned, such as
/// settling the request's admission when its response ends.
pub fn within<R>(ids: Arc<RequestIds>, f: impl FnOnce() -> R) -> R {
    CURRENT.sync_scope(ids, f)
}

/// A span naming the request being served, to enter around a line logged while serving
/// it; a disabled one outside any request.
pub fn span() -> tracing::Span {
    CURRENT
        .try_with(|ids| {
            tracing::info_span!(
                "request",
                request_id = ids.request_id.as_str(),
                trace_id = ids.trace_id.as_str()
            )
        })
        .unwrap_or_else(|_| tracing::Span::none())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::CapturedLog;

    fn json_subscriber(capture: &CapturedLog) -> impl tracing::Subscriber {
        tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .fmt_fields(super::super::span_fields::JsonSpanFields)
            .with_writer(capture.clone())
            .finish()
    }

    fn lines(capture: &CapturedLog) -> Vec<serde_json::Value> {
        String::from_utf8(capture.bytes())
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    fn ids(request_id: &str) -> Arc<RequestIds> {
        Arc::new(RequestIds {
            request_id: request_id.to_string(),
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".to_string(),
        })
    }

    #[tokio::test]
    async fn a_line_logged_while_serving_names_the_request_and_one_outside_does_not() {
        let capture = CapturedLog::default();
        let _default = tracing::subscriber::set_default(json_subscriber(&capture));
        serve(ids("req-1"), async {
            tokio::task::yield_now().await;
            let _request = span().entered();
            tracing::warn!("inside");
        })
        .await;
        within(ids("req-2"), || {
            let _request = span().entered();
            tracing::warn!("settling");
        });
        {
            let _request = span().entered();
            tracing::warn!("outside");
        }
        let lines = lines(&capture);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(lines[0]["spans"][0]["name"], "request");
        assert_eq!(lines[0]["spans"][0]["request_id"], "req-1");
        assert_eq!(
            lines[0]["spans"][0]["trace_id"],
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(lines[1]["spans"][0]["request_id"], "req-2");
        assert!(lines[2].get("spans").is_none(), "{:?}", lines[2]);
    }
}

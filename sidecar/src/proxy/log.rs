//! What is recorded of each request when it ends, however it ends: one log line and its
//! metrics. A request the app abandons before any response is recorded too (on drop).

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use tokio::time::Instant;

use crate::metrics::{self, CallLabels, FinishedRequest, Metrics, TokenCount};
use crate::snapshot::Endpoint;
use crate::trace::TraceContext;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    ClientDisconnected,
    UpstreamFailed,
    UpstreamTimedOut,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::ClientDisconnected => "client_disconnected",
            Self::UpstreamFailed => "upstream_failed",
            Self::UpstreamTimedOut => "upstream_timed_out",
        }
    }
}

/// The status recorded for a request the app gave up on before any response (nginx's
/// convention), so that it is counted rather than lost.
const CLIENT_CLOSED: &str = "499";

pub struct RequestLog {
    pub request_id: String,
    pub trace: TraceContext,
    pub method: Method,
    pub path: String,
    pub operation: &'static str,
    /// The endpoint that served (or was chosen to serve) the request.
    pub endpoint: Option<Arc<Endpoint>>,
    /// The model the app asked for, as sent (not the rewritten upstream model).
    pub model: Option<String>,
    /// 0 until response headers are ready.
    pub status: u16,
    /// The sidecar's own error code, when the sidecar answered with an error.
    pub error_code: Option<&'static str>,
    pub started: Instant,
    pub headers_sent_after: Option<Duration>,
    pub first_chunk_after: Option<Duration>,
    pub streamed: bool,
    pub attempts: u32,
    pub tokens: Option<TokenCount>,
    metrics: Option<Arc<Metrics>>,
    written: bool,
}

impl RequestLog {
    pub fn new(
        request_id: String,
        trace: TraceContext,
        method: Method,
        path: String,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        if let Some(m) = &metrics {
            m.request_started();
        }
        let operation = metrics::operation(path.strip_prefix("/v1").unwrap_or(""));
        Self {
            request_id,
            trace,
            method,
            path,
            operation,
            endpoint: None,
            model: None,
            status: 0,
            error_code: None,
            started: Instant::now(),
            headers_sent_after: None,
            first_chunk_after: None,
            streamed: false,
            attempts: 0,
            tokens: None,
            metrics,
            written: false,
        }
    }

    pub fn finish(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.written, true) {
            return;
        }
        let took = self.started.elapsed();
        self.record_metrics(outcome, took);
        let millis = |d: Duration| (d.as_secs_f64() * 100_000.0).round() / 100.0;
        let trace_id = self.trace.trace_id_hex();
        tracing::info!(
            request_id = %self.request_id,
            trace_id = %trace_id,
            method = %self.method,
            path = %self.path,
            endpoint = self.endpoint.as_ref().map_or("-", |e| e.name()),
            model = self.model.as_deref().unwrap_or("-"),
            status = self.status,
            latency_ms = millis(took),
            headers_ms = self.headers_sent_after.map(millis),
            first_chunk_ms = self.first_chunk_after.map(millis),
            attempts = self.attempts,
            prompt_tokens = self.tokens.map(|t| t.input),
            completion_tokens = self.tokens.map(|t| t.output),
            usage_estimated = self.tokens.map(|t| !t.reported),
            outcome = outcome.as_str(),
            "request"
        );
    }

    fn record_metrics(&self, outcome: Outcome, took: Duration) {
        let Some(metrics) = &self.metrics else {
            return;
        };
        let status = StatusCode::from_u16(self.status).ok();
        let status_label = status.as_ref().map_or(CLIENT_CLOSED, StatusCode::as_str);
        let failed_mid_response = match outcome {
            Outcome::UpstreamFailed => Some("upstream_failed"),
            Outcome::UpstreamTimedOut => Some("upstream_timeout"),
            Outcome::Completed | Outcome::ClientDisconnected => None,
        };
        let error_type = self.error_code.or(failed_mid_response).or_else(|| {
            if status.is_none() {
                Some("client_closed")
            } else {
                None
            }
        });
        let error_type = match (error_type, status) {
            (Some(code), _) => Some(code),
            (None, Some(s)) if !s.is_success() => Some(status_label),
            _ => None,
        };
        let (endpoint, model, provider, price) = match &self.endpoint {
            Some(e) => (
                e.name(),
                metrics.model_label(&e.config.model),
                e.config.provider.as_str(),
                e.config.price,
            ),
            None => ("", "", "", None),
        };
        let success = error_type.is_none();
        metrics.request_finished(&FinishedRequest {
            call: CallLabels {
                endpoint,
                model,
                operation: self.operation,
                provider,
            },
            status: status_label,
            error_type,
            seconds: took.as_secs_f64(),
            first_chunk_seconds: self
                .first_chunk_after
                .filter(|_| self.streamed && success)
                .map(|d| d.as_secs_f64()),
            tokens: self.tokens.filter(|_| success),
            price,
        });
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        self.finish(Outcome::ClientDisconnected);
    }
}

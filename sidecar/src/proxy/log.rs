//! What is recorded of each request when it ends, however it ends: one log line and its
//! metrics. A request the app abandons before any response is recorded too (on drop).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Method, StatusCode};
use opentelemetry::{Array, KeyValue, StringValue, Value};
use tokio::time::Instant;

use crate::cache::CacheOutcome;
use crate::logging::request_scope::RequestIds;
use crate::logging::{hundredths_of_a_millisecond, JsonLine};
use crate::metrics::{self, CallLabels, FinishedRequest, Metrics, TokenCount};
use crate::otlp::{RequestSpan, SpanSink};
use crate::snapshot::Endpoint;
use crate::trace::TraceContext;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    ClientDisconnected,
    UpstreamFailed,
    UpstreamTimedOut,
    /// The sidecar's shutdown grace period ran out mid-response.
    ShutdownGraceOver,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::ClientDisconnected => "client_disconnected",
            Self::UpstreamFailed => "upstream_failed",
            Self::UpstreamTimedOut => "upstream_timed_out",
            Self::ShutdownGraceOver => "shutdown_grace_over",
        }
    }
}

/// The status recorded for a request the app gave up on before any response (nginx's
/// convention), so that it is counted rather than lost.
const CLIENT_CLOSED: &str = "499";

pub struct RequestLog {
    /// The request and trace ids, shared with lines logged while the request is served.
    pub ids: Arc<RequestIds>,
    /// The id sent upstream instead, when the app's is not a UUID (servers such as
    /// llama.cpp's refuse any other).
    pub upstream_request_id: Option<String>,
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
    pub cache: CacheOutcome,
    /// Filled only when spans are exported (`wants_finish_reasons`).
    pub finish_reasons: Vec<String>,
    started_at: SystemTime,
    metrics: Option<Arc<Metrics>>,
    spans: Option<Arc<SpanSink>>,
    written: bool,
}

/// Where a finished request is reported besides the log.
#[derive(Clone, Default)]
pub struct Observers {
    pub metrics: Option<Arc<Metrics>>,
    pub spans: Option<Arc<SpanSink>>,
}

/// What the metrics and the span say about a finished request.
struct Summary<'a> {
    status: &'a str,
    error_type: Option<&'a str>,
    endpoint: &'a str,
    upstream_model: &'a str,
    provider: &'a str,
}

impl RequestLog {
    pub fn new(
        request_id: String,
        trace: TraceContext,
        method: Method,
        path: String,
        observers: Observers,
    ) -> Self {
        if let Some(m) = &observers.metrics {
            m.request_started();
        }
        let operation = metrics::operation(path.strip_prefix("/v1").unwrap_or(""));
        Self {
            ids: Arc::new(RequestIds {
                request_id,
                trace_id: trace.trace_id_hex(),
            }),
            upstream_request_id: None,
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
            cache: CacheOutcome::Off,
            finish_reasons: Vec::new(),
            started_at: SystemTime::now(),
            metrics: observers.metrics,
            spans: observers.spans,
            written: false,
        }
    }

    pub fn wants_finish_reasons(&self) -> bool {
        self.spans.is_some()
    }

    pub fn finish(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.written, true) {
            return;
        }
        let took = self.started.elapsed();
        if self.metrics.is_some() || self.spans.is_some() {
            let status = StatusCode::from_u16(self.status).ok();
            let status_label = status.as_ref().map_or(CLIENT_CLOSED, StatusCode::as_str);
            let summary = self.summary(outcome, status, status_label);
            self.record_metrics(&summary, took);
            self.export_span(&summary);
        }
        if !tracing::enabled!(tracing::Level::INFO) {
            return;
        }
        if crate::logging::is_json() {
            crate::logging::write_line(&self.json_line(outcome, took));
        } else {
            self.log_with_tracing(outcome, took);
        }
    }

    /// The request's line in the JSON format, written by hand: this line is logged for
    /// every request, and a `tracing` event costs several times more (see docs/benchmarks.md).
    /// The same fields as [`Self::log_with_tracing`]'s, absent ones left out alike.
    fn json_line(&self, outcome: Outcome, took: Duration) -> Vec<u8> {
        let mut line = JsonLine::new("INFO", "request");
        line.str("request_id", &self.ids.request_id);
        if let Some(id) = &self.upstream_request_id {
            line.str("upstream_request_id", id);
        }
        line.plain("trace_id", &self.ids.trace_id);
        // A method is an HTTP token: no quote, backslash or control character.
        line.plain("method", self.method.as_str());
        line.str("path", &self.path);
        line.str("endpoint", self.endpoint.as_ref().map_or("-", |e| e.name()));
        line.str("model", self.model.as_deref().unwrap_or("-"));
        line.u64("status", u64::from(self.status));
        line.millis("latency_ms", took);
        let optional_times = [
            ("headers_ms", self.headers_sent_after),
            ("first_chunk_ms", self.first_chunk_after),
        ];
        for (key, time) in optional_times {
            if let Some(time) = time {
                line.millis(key, time);
            }
        }
        line.u64("attempts", u64::from(self.attempts));
        if self.cache != CacheOutcome::Off {
            line.plain("cache", self.cache.as_str());
        }
        if let Some(tokens) = self.tokens {
            line.u64("prompt_tokens", tokens.input);
            line.u64("completion_tokens", tokens.output);
            line.bool("usage_estimated", !tokens.reported);
        }
        line.plain("outcome", outcome.as_str());
        line.finish(module_path!())
    }

    fn log_with_tracing(&self, outcome: Outcome, took: Duration) {
        tracing::info!(
            request_id = %self.ids.request_id,
            upstream_request_id = self.upstream_request_id.as_deref(),
            trace_id = %self.ids.trace_id,
            method = %self.method,
            path = %self.path,
            endpoint = self.endpoint.as_ref().map_or("-", |e| e.name()),
            model = self.model.as_deref().unwrap_or("-"),
            status = self.status,
            latency_ms = millis(took),
            headers_ms = self.headers_sent_after.map(millis),
            first_chunk_ms = self.first_chunk_after.map(millis),
            attempts = self.attempts,
            cache = (self.cache != CacheOutcome::Off).then(|| self.cache.as_str()),
            prompt_tokens = self.tokens.map(|t| t.input),
            completion_tokens = self.tokens.map(|t| t.output),
            usage_estimated = self.tokens.map(|t| !t.reported),
            outcome = outcome.as_str(),
            "request"
        );
    }

    fn summary<'a>(
        &'a self,
        outcome: Outcome,
        status: Option<StatusCode>,
        status_label: &'a str,
    ) -> Summary<'a> {
        let failed_mid_response = match outcome {
            Outcome::UpstreamFailed => Some("upstream_failed"),
            Outcome::UpstreamTimedOut => Some("upstream_timeout"),
            Outcome::ShutdownGraceOver => Some("shutting_down"),
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
        let (endpoint, upstream_model, provider) = match &self.endpoint {
            Some(e) => (
                e.name(),
                e.config.model.as_str(),
                e.config.provider.as_str(),
            ),
            None => ("", "", ""),
        };
        Summary {
            status: status_label,
            error_type,
            endpoint,
            upstream_model,
            provider,
        }
    }

    fn record_metrics(&self, summary: &Summary<'_>, took: Duration) {
        let Some(metrics) = &self.metrics else {
            return;
        };
        let success = summary.error_type.is_none();
        metrics.request_finished(&FinishedRequest {
            call: CallLabels {
                endpoint: summary.endpoint,
                model: metrics.model_label(summary.upstream_model),
                operation: self.operation,
                provider: summary.provider,
            },
            status: summary.status,
            cache: self.cache.as_str(),
            error_type: summary.error_type,
            seconds: took.as_secs_f64(),
            first_chunk_seconds: self
                .first_chunk_after
                .filter(|_| self.streamed && success)
                .map(|d| d.as_secs_f64()),
            tokens: self.tokens.filter(|_| success),
            price: self.endpoint.as_ref().and_then(|e| e.config.price),
        });
    }

    /// The request's span, with OpenTelemetry's GenAI attributes.
    fn export_span(&self, summary: &Summary<'_>) {
        let Some(spans) = &self.spans else {
            return;
        };
        let model = self.model.as_deref().unwrap_or(summary.upstream_model);
        let mut attributes = vec![
            KeyValue::new("gen_ai.operation.name", self.operation),
            KeyValue::new("http.request.method", self.method.to_string()),
            KeyValue::new("url.path", self.path.clone()),
            KeyValue::new("llmesh.request_id", self.ids.request_id.clone()),
            KeyValue::new("llmesh.attempts", i64::from(self.attempts)),
        ];
        if self.status != 0 {
            attributes.push(KeyValue::new(
                "http.response.status_code",
                i64::from(self.status),
            ));
        }
        if let Some(model) = &self.model {
            attributes.push(KeyValue::new("gen_ai.request.model", model.clone()));
        }
        if !summary.endpoint.is_empty() {
            attributes.extend([
                KeyValue::new("gen_ai.provider.name", summary.provider.to_string()),
                KeyValue::new("llmesh.endpoint", summary.endpoint.to_string()),
                KeyValue::new("llmesh.upstream_model", summary.upstream_model.to_string()),
            ]);
        }
        if let Some(tokens) = self.tokens {
            attributes.extend([
                KeyValue::new("gen_ai.usage.input_tokens", tokens.input as i64),
                KeyValue::new("gen_ai.usage.output_tokens", tokens.output as i64),
                KeyValue::new("llmesh.usage_estimated", !tokens.reported),
            ]);
        }
        if !self.finish_reasons.is_empty() {
            let reasons: Vec<StringValue> = self
                .finish_reasons
                .iter()
                .map(|r| StringValue::from(r.clone()))
                .collect();
            attributes.push(KeyValue::new(
                "gen_ai.response.finish_reasons",
                Value::Array(Array::String(reasons)),
            ));
        }
        if let Some(error_type) = summary.error_type {
            attributes.push(KeyValue::new("error.type", error_type.to_string()));
        }
        spans.submit(RequestSpan {
            trace: self.trace,
            name: format!("{} {model}", self.operation),
            start: self.started_at,
            end: SystemTime::now(),
            attributes,
            error: summary.error_type.map(str::to_string),
        });
    }
}

/// Milliseconds with two decimals, as the log gives durations (and as [`JsonLine::millis`]
/// writes them).
fn millis(d: Duration) -> f64 {
    hundredths_of_a_millisecond(d) as f64 / 100.0
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        self.finish(Outcome::ClientDisconnected);
    }
}

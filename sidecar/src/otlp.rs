//! Optional export of one span per request to an OpenTelemetry collector (OTLP over HTTP,
//! JSON encoding), off unless `--otlp-endpoint` is given.
//!
//! The span is the sidecar's own: the span id it sent upstream in `traceparent`, the app's
//! span as its parent, and the GenAI attributes (model, tokens, finish reasons). The data
//! path only hands a finished span to a bounded queue; a task on the control runtime sends
//! batches, so a slow or absent collector never delays a request (spans are dropped instead,
//! and that is logged).

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use opentelemetry_sdk::Resource;
use tokio::sync::{mpsc, watch};

use crate::trace::TraceContext;

/// Spans waiting for export; more are dropped.
const QUEUE: usize = 4096;
const MAX_BATCH: usize = 512;
/// A span waits at most this long before it is sent.
const BATCH_DELAY: Duration = Duration::from_secs(1);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("--otlp-endpoint {0:?} must be an http:// URL (the collector's OTLP/HTTP port)")]
    InvalidEndpoint(String),
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(String),
}

/// Where finished request spans go.
pub struct SpanSink {
    queue: mpsc::Sender<SpanData>,
    scope: InstrumentationScope,
    dropping: AtomicBool,
}

/// A finished request, as its span tells it.
pub struct RequestSpan {
    pub trace: TraceContext,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<KeyValue>,
    pub error: Option<String>,
}

impl SpanSink {
    /// The sink, and the export task to run until `shutdown` (it sends what is queued then).
    pub fn start(
        endpoint: &str,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(Self, impl std::future::Future<Output = ()>), OtlpError> {
        let base = endpoint.trim_end_matches('/');
        if !base.starts_with("http://") || base.len() <= "http://".len() {
            return Err(OtlpError::InvalidEndpoint(endpoint.to_string()));
        }
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpJson)
            .with_endpoint(format!("{base}/v1/traces"))
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| OtlpError::Exporter(e.to_string()))?;
        exporter.set_resource(
            &Resource::builder_empty()
                .with_attributes([
                    KeyValue::new("service.name", "llmesh-sidecar"),
                    KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                ])
                .build(),
        );
        let (queue, receiver) = mpsc::channel(QUEUE);
        let sink = Self {
            queue,
            scope: InstrumentationScope::builder("llmesh-sidecar")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
            dropping: AtomicBool::new(false),
        };
        Ok((sink, export_loop(exporter, receiver, shutdown)))
    }

    /// Queues the span of a sampled request; never waits.
    pub fn submit(&self, span: RequestSpan) {
        let trace = span.trace;
        if trace.flags & TraceFlags::SAMPLED.to_u8() == 0 {
            return;
        }
        let data = SpanData {
            span_context: SpanContext::new(
                TraceId::from(trace.trace_id),
                SpanId::from(trace.span_id),
                TraceFlags::new(trace.flags),
                false,
                TraceState::default(),
            ),
            parent_span_id: trace.parent_span_id.map_or(SpanId::INVALID, SpanId::from),
            parent_span_is_remote: trace.parent_span_id.is_some(),
            span_kind: SpanKind::Client,
            name: Cow::Owned(span.name),
            start_time: span.start,
            end_time: span.end,
            attributes: span.attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: match span.error {
                Some(description) => Status::error(description),
                None => Status::Unset,
            },
            instrumentation_scope: self.scope.clone(),
        };
        match self.queue.try_send(data) {
            Ok(()) => {
                if self.dropping.swap(false, Ordering::Relaxed) {
                    tracing::info!("OTLP export keeps up again");
                }
            }
            Err(_) => {
                if !self.dropping.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        queue = QUEUE,
                        "OTLP export is behind (collector slow or unreachable); dropping spans"
                    );
                }
            }
        }
    }
}

async fn export_loop(
    exporter: opentelemetry_otlp::SpanExporter,
    mut receiver: mpsc::Receiver<SpanData>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut failing = false;
    loop {
        let mut batch = Vec::new();
        let stopping = tokio::select! {
            first = receiver.recv() => match first {
                Some(span) => {
                    batch.push(span);
                    let until = tokio::time::Instant::now() + BATCH_DELAY;
                    while batch.len() < MAX_BATCH {
                        match tokio::time::timeout_at(until, receiver.recv()).await {
                            Ok(Some(span)) => batch.push(span),
                            Ok(None) | Err(_) => break,
                        }
                    }
                    false
                }
                None => true,
            },
            _ = shutdown.changed() => {
                while let Ok(span) = receiver.try_recv() {
                    batch.push(span);
                }
                true
            }
        };
        if !batch.is_empty() {
            let spans = batch.len();
            match exporter.export(batch).await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("OTLP export works again");
                }
                Ok(()) => {}
                Err(error) => {
                    if !failing {
                        tracing::warn!(%error, spans, "OTLP export failed; spans dropped");
                    }
                    failing = true;
                }
            }
        }
        if stopping {
            return;
        }
    }
}

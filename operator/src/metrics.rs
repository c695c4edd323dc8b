//! The operator's Prometheus metrics and its admin endpoints (`/healthz`, `/readyz`,
//! `/metrics`), served apart from the controller.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub reconciles: IntCounterVec,
    pub reconcile_duration: HistogramVec,
    /// Every create, apply, status write and delete the controller sends: a resync that
    /// finds nothing changed must leave it unchanged.
    pub api_writes: IntCounterVec,
    pub leader: IntGauge,
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "llmesh_operator_reconciles_total",
                "Reconciles by kind and result (success, error).",
            ),
            &["kind", "result"],
        )?;
        let reconcile_duration = HistogramVec::new(
            HistogramOpts::new(
                "llmesh_operator_reconcile_duration_seconds",
                "Time to reconcile one object.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["kind"],
        )?;
        let api_writes = IntCounterVec::new(
            Opts::new(
                "llmesh_operator_api_writes_total",
                "Writes sent to the Kubernetes API, by resource kind.",
            ),
            &["kind"],
        )?;
        let leader = IntGauge::new(
            "llmesh_operator_leader",
            "1 while this replica holds the leader lease.",
        )?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(api_writes.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Self {
            registry,
            reconciles,
            reconcile_duration,
            api_writes,
            leader,
        })
    }

    pub fn observe_reconcile(&self, kind: &str, ok: bool, took: Duration) {
        self.reconciles
            .with_label_values(&[kind, if ok { "success" } else { "error" }])
            .inc();
        self.reconcile_duration
            .with_label_values(&[kind])
            .observe(took.as_secs_f64());
    }

    pub fn count_write(&self, kind: &str) {
        self.api_writes.with_label_values(&[kind]).inc();
    }

    fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

pub async fn admin<B>(metrics: Arc<Metrics>, request: Request<B>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz" | "/readyz") => (StatusCode::OK, "text/plain", b"ok\n".to_vec()),
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(),
        ),
        _ => (StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = http::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
    }
    response
}

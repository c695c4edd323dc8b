//! The operator's Prometheus metrics and its admin endpoints (`/healthz`, `/readyz`,
//! `/metrics`), served apart from the controller.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use kube::runtime::reflector::Store;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::crd::LlmEndpoint;
use crate::webhook::skipped::{without_sidecar, PodIndex};

pub struct Metrics {
    registry: Registry,
    pub reconciles: IntCounterVec,
    pub reconcile_duration: HistogramVec,
    /// Every create, apply, status write and delete the controller sends: a resync that
    /// finds nothing changed must leave it unchanged.
    pub api_writes: IntCounterVec,
    pub leader: IntGauge,
    /// Pods the injection webhook answered, by what it decided.
    pub admissions: IntCounterVec,
    /// The webhook's own time per admission, from the request body read to the answer.
    pub admission_duration: Histogram,
    /// When the served webhook certificate expires (unix seconds), when the operator
    /// manages it.
    pub certificate_expiry: IntGauge,
    /// 1 once the webhook answers (certificate and LlmEndpoint index loaded), 0 while it
    /// starts; absent from `/readyz`'s concern when this replica serves no webhook.
    pub webhook_serving: IntGauge,
    webhook_enabled: std::sync::atomic::AtomicBool,
    endpoints: IntGaugeVec,
    /// The controller's cache of LlmEndpoints (set while this replica leads), counted at
    /// scrape time so that deleted objects drop out without bookkeeping.
    endpoint_store: Mutex<Option<Store<LlmEndpoint>>>,
    pods_without_sidecar: IntGaugeVec,
    /// The leader's index of pods and the operator's namespace, counted at scrape time.
    pod_store: Mutex<Option<(PodIndex, String)>>,
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
        let admissions = IntCounterVec::new(
            Opts::new(
                "llmesh_operator_webhook_admissions_total",
                "Pods answered by the injection webhook, by outcome (injected, not_requested, opted_out, already_injected, skipped, excluded_namespace, error).",
            ),
            &["outcome"],
        )?;
        let admission_duration = Histogram::with_opts(
            HistogramOpts::new(
                "llmesh_operator_webhook_duration_seconds",
                "Time the injection webhook takes to answer one pod: from the request body read to the answer encoded.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1,
            ]),
        )?;
        registry.register(Box::new(admissions.clone()))?;
        let certificate_expiry = IntGauge::new(
            "llmesh_operator_webhook_certificate_expiry_timestamp_seconds",
            "When the webhook's serving certificate expires (unix time), while the operator manages it.",
        )?;
        registry.register(Box::new(certificate_expiry.clone()))?;
        let webhook_serving = IntGauge::new(
            "llmesh_operator_webhook_serving",
            "1 while this replica answers the injection webhook; 0 while it loads its certificate and LlmEndpoint index.",
        )?;
        registry.register(Box::new(webhook_serving.clone()))?;
        registry.register(Box::new(admission_duration.clone()))?;
        let endpoints = IntGaugeVec::new(
            Opts::new(
                "llmesh_operator_endpoints",
                "LlmEndpoints by the environment they render for and whether they are Ready.",
            ),
            &["environment", "ready"],
        )?;
        registry.register(Box::new(endpoints.clone()))?;
        let pods_without_sidecar = IntGaugeVec::new(
            Opts::new(
                "llmesh_operator_pods_without_sidecar",
                "Pods that ask for the llmesh sidecar (llmesh.io/endpoints) and have none, by their namespace (counted by the leader).",
            ),
            // Not `namespace`, which the scrape's target label (the operator's own) takes.
            &["pod_namespace"],
        )?;
        registry.register(Box::new(pods_without_sidecar.clone()))?;
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Self {
            registry,
            reconciles,
            reconcile_duration,
            api_writes,
            leader,
            admissions,
            admission_duration,
            certificate_expiry,
            webhook_serving,
            webhook_enabled: std::sync::atomic::AtomicBool::new(false),
            endpoints,
            endpoint_store: Mutex::new(None),
            pods_without_sidecar,
            pod_store: Mutex::new(None),
        })
    }

    pub fn watch_endpoints(&self, store: Store<LlmEndpoint>) {
        if let Ok(mut slot) = self.endpoint_store.lock() {
            *slot = Some(store);
        }
    }

    /// This replica serves the webhook: `/readyz` fails until `webhook_serving` is 1, so
    /// that the webhook's Service sends the API server only to replicas that answer.
    pub fn expect_webhook(&self) {
        self.webhook_enabled
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn ready(&self) -> bool {
        !self
            .webhook_enabled
            .load(std::sync::atomic::Ordering::Relaxed)
            || self.webhook_serving.get() == 1
    }

    pub fn watch_pods(&self, store: PodIndex, operator_namespace: String) {
        if let Ok(mut slot) = self.pod_store.lock() {
            *slot = Some((store, operator_namespace));
        }
    }

    fn count_pods_without_sidecar(&self) {
        self.pods_without_sidecar.reset();
        let Ok(slot) = self.pod_store.lock() else {
            return;
        };
        let Some((store, operator_namespace)) = slot.as_ref() else {
            return;
        };
        for (namespace, count) in without_sidecar(&store.state(), operator_namespace) {
            self.pods_without_sidecar
                .with_label_values(&[namespace.as_str()])
                .set(count);
        }
    }

    fn count_endpoints(&self) {
        self.endpoints.reset();
        let Ok(slot) = self.endpoint_store.lock() else {
            return;
        };
        let Some(store) = slot.as_ref() else {
            return;
        };
        let mut counts: BTreeMap<(String, bool), i64> = BTreeMap::new();
        for endpoint in store.state() {
            let status = endpoint.status.as_ref();
            let environment = status
                .and_then(|s| s.environment.clone())
                .unwrap_or_else(|| "unknown".to_string());
            let ready = status.is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            });
            *counts.entry((environment, ready)).or_default() += 1;
        }
        for ((environment, ready), count) in counts {
            self.endpoints
                .with_label_values(&[environment.as_str(), if ready { "true" } else { "false" }])
                .set(count);
        }
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

    /// The exposition text served at `/metrics`.
    pub fn render(&self) -> Vec<u8> {
        self.count_endpoints();
        self.count_pods_without_sidecar();
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

pub async fn admin<B>(metrics: Arc<Metrics>, request: Request<B>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", b"ok\n".to_vec()),
        (&Method::GET, "/readyz") if metrics.ready() => {
            (StatusCode::OK, "text/plain", b"ok\n".to_vec())
        }
        (&Method::GET, "/readyz") => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            b"the webhook is not serving yet\n".to_vec(),
        ),
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn readyz(metrics: &Arc<Metrics>) -> StatusCode {
        let request = Request::get("/readyz").body(()).unwrap();
        admin(Arc::clone(metrics), request).await.status()
    }

    #[tokio::test]
    async fn readyz_waits_for_the_webhook_only_where_one_is_served() {
        let metrics = Arc::new(Metrics::new().unwrap());
        assert_eq!(readyz(&metrics).await, StatusCode::OK);
        metrics.expect_webhook();
        assert_eq!(readyz(&metrics).await, StatusCode::SERVICE_UNAVAILABLE);
        metrics.webhook_serving.set(1);
        assert_eq!(readyz(&metrics).await, StatusCode::OK);
    }
}

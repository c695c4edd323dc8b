//! The admin listener, apart from the data path: probes for the kubelet and `/metrics` for
//! Prometheus. Neither probe ever calls a provider.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use crate::error::JSON;
use crate::reload::SharedState;

static PROMETHEUS_TEXT: http::HeaderValue =
    http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");

pub async fn handle<B>(state: Arc<SharedState>, request: Request<B>) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz" | "/live") => text(StatusCode::OK, "ok\n"),
        (&Method::GET | &Method::HEAD, "/readyz" | "/ready") => readiness(&state),
        (&Method::GET, "/metrics") => match &state.metrics {
            Some(metrics) => {
                let mut response =
                    Response::new(Full::new(Bytes::from(metrics.render(&state.snapshot()))));
                response
                    .headers_mut()
                    .insert(header::CONTENT_TYPE, PROMETHEUS_TEXT.clone());
                response
            }
            None => text(
                StatusCode::NOT_FOUND,
                "metrics are turned off (--metrics false)\n",
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Ready when a valid config is loaded, every endpoint has its credential, and the sidecar
/// is not shutting down. The body says which endpoint is missing what, and which key
/// (by fingerprint) each one uses, so a rotation can be checked from outside.
///
/// Expected endpoints whose config has not arrived (`missing`, with `complete: false`) do
/// not make it unready: the startup probe on this path holds the app's containers, and an
/// app that names an endpoint created later must still start, the others serving meanwhile.
fn readiness(state: &SharedState) -> Response<Full<Bytes>> {
    let snapshot = state.snapshot();
    let draining = state.is_draining();
    let ready = snapshot.is_ready() && !draining;
    let endpoints: Vec<_> = snapshot
        .endpoints
        .iter()
        .map(|e| {
            json!({
                "name": e.name(),
                "provider": e.config.provider.as_str(),
                "model": e.config.model,
                "credentialFingerprint": e.credential().map(|c| c.fingerprint()),
                "error": e.unavailable_reason().map(ToString::to_string),
            })
        })
        .collect();
    let status = match (draining, ready) {
        (true, _) => "draining",
        (false, true) => "ready",
        (false, false) => "not_ready",
    };
    let body = json!({
        "status": status,
        "configHash": snapshot.config_hash,
        "endpoints": endpoints,
        "complete": snapshot.missing.is_empty(),
        "missing": snapshot.missing,
        "pod": state.pod,
    });
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    response.headers_mut().insert(header::CONTENT_TYPE, JSON);
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}

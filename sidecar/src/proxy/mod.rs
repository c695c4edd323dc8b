//! The data path: one app request in, one response out.
//!
//! `handle` → request id → route by path → read and parse the body (JSON routes) → select
//! the endpoint → answer from the mock or forward upstream → response headers and log.
//! Later stages (retries, rate limits, metrics) wrap `dispatch` without changing the rest.

mod body;
mod forward;
mod json;
mod log;

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use serde_json::json;
use tokio::time::Instant;

pub use body::ResponseBody;
use body::{BodyKind, UpstreamBody};
use json::RequestJson;
use log::RequestLog;

use crate::error::{ProxyError, JSON};
use crate::provider::mock::{self, MockResponse};
use crate::reload::SharedState;
use crate::snapshot::{Backend, Endpoint, Snapshot};

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Request: the app picks an endpoint by name. Response: the endpoint that served.
pub static LLMESH_ENDPOINT: HeaderName = HeaderName::from_static("x-llmesh-endpoint");

/// Routes whose JSON body is read to select the endpoint and rewrite `model`.
const JSON_ROUTES: &[&str] = &[
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/responses",
];

pub async fn handle(state: Arc<SharedState>, request: Request<Incoming>) -> Response<ResponseBody> {
    let request_id = request_id(&request);
    let mut log = RequestLog::new(
        request_id.to_str().unwrap_or("-").to_string(),
        request.method().clone(),
        request.uri().path().to_string(),
    );
    let snapshot = state.snapshot();
    let (mut response, endpoint) = match route(&snapshot, request, &request_id, &mut log).await {
        Ok(answer) => answer,
        Err((error, endpoint)) => (error_response(&error), endpoint),
    };
    let headers = response.headers_mut();
    headers.insert(REQUEST_ID.clone(), request_id);
    if let Some(endpoint) = endpoint {
        if let Ok(value) = HeaderValue::from_str(endpoint.name()) {
            headers.insert(LLMESH_ENDPOINT.clone(), value);
        }
    }
    log.status = response.status().as_u16();
    log.headers_sent_after = Some(log.started.elapsed());
    response.map(|kind| ResponseBody::new(kind, log))
}

type Answer = (Response<BodyKind>, Option<Arc<Endpoint>>);
type Failure = (ProxyError, Option<Arc<Endpoint>>);

async fn route(
    snapshot: &Snapshot,
    request: Request<Incoming>,
    request_id: &HeaderValue,
    log: &mut RequestLog,
) -> Result<Answer, Failure> {
    let path = request.uri().path();
    let Some(api_path) = path.strip_prefix("/v1").filter(|p| p.starts_with('/')) else {
        return Err((unknown_route(&request), None));
    };
    let api_path = api_path.to_string();
    match (request.method(), api_path.as_str()) {
        (&Method::GET, "/models") => {
            Ok((json_response(StatusCode::OK, models_list(snapshot)), None))
        }
        (&Method::GET, p) if p.starts_with("/models/") => {
            let id = &p["/models/".len()..];
            match snapshot.by_model(id) {
                Some(e) => Ok((json_response(StatusCode::OK, model_object(id, e)), None)),
                None => Err((ProxyError::UnknownModel(id.to_string()), None)),
            }
        }
        (&Method::POST, p) if JSON_ROUTES.contains(&p) => {
            json_call(snapshot, request, &api_path, request_id, log).await
        }
        _ => passthrough(snapshot, request, &api_path, request_id, log).await,
    }
}

/// A JSON API call: the body is read whole (it is needed to choose the endpoint and is
/// small next to the model's work), `model` selects the endpoint and is rewritten.
async fn json_call(
    snapshot: &Snapshot,
    request: Request<Incoming>,
    api_path: &str,
    request_id: &HeaderValue,
    log: &mut RequestLog,
) -> Result<Answer, Failure> {
    let (parts, body) = request.into_parts();
    let by_header = endpoint_from_header(snapshot, &parts).map_err(|e| (e, None))?;
    // Until the endpoint is known, accept up to the largest limit of any candidate.
    let read_limit = match &by_header {
        Some(e) => e.config.max_request_body_bytes,
        None => snapshot
            .endpoints
            .iter()
            .map(|e| e.config.max_request_body_bytes)
            .max()
            .unwrap_or(0),
    };
    let bytes = read_body(&parts, body, read_limit)
        .await
        .map_err(|e| (e, by_header.clone()))?;
    let json = RequestJson::parse(&bytes).map_err(|e| (e, by_header.clone()))?;
    let model = json.model();
    log.model = model.as_deref().map(str::to_string);

    let endpoint = match (by_header, model.as_deref()) {
        (Some(e), _) => e,
        (None, Some(model)) => match snapshot.by_model(model).or(snapshot.default_endpoint()) {
            Some(e) => Arc::clone(e),
            None => return Err((ProxyError::UnknownModel(model.to_string()), None)),
        },
        (None, None) => match snapshot.default_endpoint() {
            Some(e) => Arc::clone(e),
            None => return Err((ProxyError::NoEndpointSelected, None)),
        },
    };
    log.endpoint = Some(endpoint.name().to_string());
    let fail = |e: ProxyError| (e, Some(Arc::clone(&endpoint)));
    let limit = endpoint.config.max_request_body_bytes;
    if bytes.len() as u64 > limit {
        return Err(fail(ProxyError::BodyTooLarge { limit }));
    }

    let response = match &endpoint.backend {
        Backend::Mock(config) => {
            let answer = mock::respond(
                api_path,
                &bytes,
                &endpoint.config.model,
                config,
                request_id.to_str().unwrap_or(""),
            )
            .map_err(fail)?;
            if !config.latency.is_zero() {
                tokio::time::sleep(config.latency.get()).await;
            }
            match answer {
                MockResponse::Json(body) => json_response(StatusCode::OK, body),
                MockResponse::Stream(stream) => sse_response(BodyKind::Mock(stream)),
            }
        }
        Backend::Upstream(upstream) => {
            let rewritten = Bytes::from(json.with_model(&endpoint.config.model, bytes.len()));
            let deadline = Instant::now() + endpoint.config.timeouts.total.get();
            let call = forward::UpstreamCall {
                endpoint: &endpoint,
                upstream,
                parts: &parts,
                api_path,
                content_length: Some(rewritten.len() as u64),
                body: Either::Left(Full::new(rewritten)),
                request_id,
                deadline,
            };
            let response = forward::send(call).await.map_err(fail)?;
            upstream_response(response, &endpoint, deadline)
        }
    };
    Ok((response, Some(endpoint)))
}

/// Any other `/v1/*` call (files, batches, audio, ...): the body streams through untouched
/// to the endpoint named in the header, else the default one.
async fn passthrough(
    snapshot: &Snapshot,
    request: Request<Incoming>,
    api_path: &str,
    request_id: &HeaderValue,
    log: &mut RequestLog,
) -> Result<Answer, Failure> {
    let (parts, body) = request.into_parts();
    let endpoint = match endpoint_from_header(snapshot, &parts).map_err(|e| (e, None))? {
        Some(e) => e,
        None => match snapshot.default_endpoint() {
            Some(e) => Arc::clone(e),
            None => return Err((ProxyError::NoEndpointSelected, None)),
        },
    };
    log.endpoint = Some(endpoint.name().to_string());
    let fail = |e: ProxyError| (e, Some(Arc::clone(&endpoint)));
    let upstream = match &endpoint.backend {
        Backend::Mock(_) => {
            return Err(fail(ProxyError::NotImplementedByMock(format!(
                "{} /v1{api_path}",
                parts.method
            ))))
        }
        Backend::Upstream(upstream) => upstream,
    };
    let limit = endpoint.config.max_request_body_bytes;
    let content_length = declared_length(&parts);
    if content_length.is_some_and(|len| len > limit) {
        return Err(fail(ProxyError::BodyTooLarge { limit }));
    }
    let deadline = Instant::now() + endpoint.config.timeouts.total.get();
    let call = forward::UpstreamCall {
        endpoint: &endpoint,
        upstream,
        parts: &parts,
        api_path,
        content_length,
        body: Either::Right(Limited::new(body, limit as usize)),
        request_id,
        deadline,
    };
    let response = forward::send(call).await.map_err(fail)?;
    Ok((
        upstream_response(response, &endpoint, deadline),
        Some(endpoint),
    ))
}

fn upstream_response(
    response: Response<Incoming>,
    endpoint: &Endpoint,
    deadline: Instant,
) -> Response<BodyKind> {
    let sse = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    let timeouts = &endpoint.config.timeouts;
    response.map(|body| {
        BodyKind::Upstream(UpstreamBody::new(
            body,
            endpoint.name(),
            sse,
            timeouts.idle.get(),
            deadline,
            timeouts.total.get(),
        ))
    })
}

fn endpoint_from_header(
    snapshot: &Snapshot,
    parts: &Parts,
) -> Result<Option<Arc<Endpoint>>, ProxyError> {
    let Some(value) = parts.headers.get(&LLMESH_ENDPOINT) else {
        return Ok(None);
    };
    let name = value.to_str().unwrap_or("");
    snapshot
        .by_name(name)
        .map(|e| Some(Arc::clone(e)))
        .ok_or_else(|| ProxyError::UnknownEndpoint(name.to_string()))
}

fn declared_length(parts: &Parts) -> Option<u64> {
    parts
        .headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

async fn read_body(parts: &Parts, body: Incoming, limit: u64) -> Result<Bytes, ProxyError> {
    if declared_length(parts).is_some_and(|len| len > limit) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    match Limited::new(body, limit as usize).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ProxyError::BodyTooLarge { limit })
        }
        Err(e) => Err(ProxyError::BodyRead(e.to_string())),
    }
}

/// The app's `x-request-id` if it is usable, else a new UUID.
fn request_id(request: &Request<Incoming>) -> HeaderValue {
    request
        .headers()
        .get(&REQUEST_ID)
        .filter(|v| (1..=128).contains(&v.len()) && v.to_str().is_ok())
        .cloned()
        .unwrap_or_else(|| {
            let id = uuid::Uuid::new_v4();
            let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
            HeaderValue::from_str(id.hyphenated().encode_lower(&mut buf))
                .unwrap_or(HeaderValue::from_static("-"))
        })
}

fn unknown_route(request: &Request<Incoming>) -> ProxyError {
    ProxyError::UnknownRoute {
        method: request.method().to_string(),
        path: request.uri().path().to_string(),
    }
}

fn models_list(snapshot: &Snapshot) -> Bytes {
    let data: Vec<_> = snapshot
        .endpoints
        .iter()
        .flat_map(|e| {
            std::iter::once(e.config.name.as_str())
                .chain(e.config.aliases.iter().map(String::as_str))
                .map(move |id| model_value(id, e))
        })
        .collect();
    Bytes::from(json!({"object": "list", "data": data}).to_string())
}

fn model_object(id: &str, endpoint: &Endpoint) -> Bytes {
    Bytes::from(model_value(id, endpoint).to_string())
}

fn model_value(id: &str, endpoint: &Endpoint) -> serde_json::Value {
    json!({
        "id": id,
        "object": "model",
        "created": 0,
        "owned_by": format!("llmesh:{}", endpoint.config.provider.as_str()),
    })
}

fn json_response(status: StatusCode, body: Bytes) -> Response<BodyKind> {
    let mut response = Response::new(BodyKind::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, JSON);
    response
}

fn sse_response(body: BodyKind) -> Response<BodyKind> {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn error_response(error: &ProxyError) -> Response<BodyKind> {
    json_response(error.status(), error.body())
}

//! The data path: one app request in, one response out.
//!
//! `handle` → request id → route by path → read and parse the body (JSON routes) → select
//! the endpoint → answer from the mock or forward upstream (translated into the endpoint's
//! API and back when it is not the app's, see [`crate::dialect`]) → response headers and log.
//! `dispatch` runs the call across the endpoint and its fallbacks, with retries and limits.

mod body;
mod dispatch;
mod forward;
pub(crate) mod json;
mod log;
mod path;
mod usage;
mod usage_strip;

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Limited};
use hyper::body::Incoming;
use serde_json::json;
use tokio::time::Instant;

pub use body::ResponseBody;
use body::{Accounting, BodyKind, TranslatedBody, UpstreamBody};
use dispatch::CallBody;
use json::RequestJson;
use log::{Observers, RequestLog};
pub use path::PathError;
use usage::UsageTap;
use usage_strip::UsageChunkStripper;

use crate::cache::{self, key::CacheKey, CacheOutcome, EndpointCache, Recording, Turn, Use};
use crate::config::DEFAULT_MAX_REQUEST_BODY_BYTES;
use crate::dialect::{self, Dialect, Plan, Translation};
use crate::error::{ProxyError, JSON};
use crate::logging::request_scope;
use crate::metrics::Metrics;
use crate::provider::mock::{self, MockResponse};
use crate::redact::BodyRedactor;
use crate::reload::SharedState;
use crate::snapshot::{Backend, Endpoint, Snapshot};
use crate::trace::TraceContext;
use crate::upstream_client::UpstreamResponseBody;

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Request: the app picks an endpoint by name. Response: the endpoint that served.
pub static LLMESH_ENDPOINT: HeaderName = HeaderName::from_static("x-llmesh-endpoint");
/// Response: how many upstream attempts the answer took, across endpoints.
pub static LLMESH_ATTEMPTS: HeaderName = HeaderName::from_static("x-llmesh-attempts");
/// Response (429): which limit refused the request.
pub static LLMESH_LIMIT: HeaderName = HeaderName::from_static("x-llmesh-limit");
static RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");

/// The largest JSON answer read whole to be translated into the app's API (answers are
/// a model's output: far smaller).
const TRANSLATED_BODY_LIMIT: usize = 16 * 1024 * 1024;

/// Error bodies read to tell "this server has no such route" from a real API error.
const ROUTE_ERROR_BODY_LIMIT: usize = 64 * 1024;

/// Routes whose streams carry usage only when asked (`stream_options.include_usage`).
const USAGE_IN_STREAMS_ROUTES: &[&str] = &["/chat/completions", "/completions"];

/// Routes whose JSON body is read to select the endpoint and rewrite `model` (and to
/// translate it, when the endpoint speaks another API).
const JSON_ROUTES: &[&str] = &[
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/responses",
    "/messages",
    "/messages/count_tokens",
];

pub async fn handle(state: Arc<SharedState>, request: Request<Incoming>) -> Response<ResponseBody> {
    let (request_id, upstream_replacement) = request_ids(&request);
    let error_dialect = Dialect::of_errors(request.uri().path());
    let trace = TraceContext::from_request(request.headers());
    let request_id_text = request_id.to_str().unwrap_or("-").to_string();
    let mut log = RequestLog::new(
        request_id_text,
        trace,
        request.method().clone(),
        request.uri().path().to_string(),
        Observers {
            metrics: state.metrics.clone(),
            spans: state.spans.clone(),
        },
    );
    if let Some(id) = &upstream_replacement {
        log.upstream_request_id = id.to_str().ok().map(str::to_string);
    }
    let snapshot = state.snapshot();
    let ids = CallIds {
        request_id: upstream_replacement.as_ref().unwrap_or(&request_id),
        traceparent: trace.header_value(),
        metrics: state.metrics.as_deref(),
    };
    let request_ids = Arc::clone(&log.ids);
    let served =
        match request_scope::serve(request_ids, route(&snapshot, request, &ids, &mut log)).await {
            Ok(served) => served,
            Err(failure) => {
                log.error_code = Some(failure.error.code());
                failure.into_served(error_dialect)
            }
        };
    let Served {
        mut response,
        endpoint,
        attempts,
        accounting,
    } = served;
    let headers = response.headers_mut();
    headers.insert(REQUEST_ID.clone(), request_id);
    if let Some(value) = endpoint.and_then(|e| e.name_header.clone()) {
        headers.insert(LLMESH_ENDPOINT.clone(), value);
    }
    if attempts > 0 {
        headers.insert(LLMESH_ATTEMPTS.clone(), attempts_header(attempts));
    }
    if let Some(value) = log.cache.header_value() {
        headers.insert(cache::LLMESH_CACHE.clone(), value);
    }
    log.attempts = attempts;
    log.status = response.status().as_u16();
    log.headers_sent_after = Some(log.started.elapsed());
    response.map(|kind| ResponseBody::new(kind, log, accounting))
}

/// `x-llmesh-attempts`: the common counts are static values, as a number formatted into a
/// header value costs an allocation on every response.
fn attempts_header(attempts: u32) -> HeaderValue {
    static FEW: [HeaderValue; 5] = [
        HeaderValue::from_static("1"),
        HeaderValue::from_static("2"),
        HeaderValue::from_static("3"),
        HeaderValue::from_static("4"),
        HeaderValue::from_static("5"),
    ];
    let index = usize::try_from(attempts)
        .ok()
        .and_then(|n| n.checked_sub(1));
    match index.and_then(|i| FEW.get(i)) {
        Some(value) => value.clone(),
        None => HeaderValue::from(attempts),
    }
}

/// What every upstream call of one app request carries.
pub struct CallIds<'a> {
    /// The id sent upstream: the app's, or a UUID standing for it.
    pub request_id: &'a HeaderValue,
    /// The app's trace continued under the sidecar's span.
    pub traceparent: HeaderValue,
    pub metrics: Option<&'a Metrics>,
}

/// A response ready to go, with what the log and the admission need when it ends.
struct Served {
    response: Response<BodyKind>,
    endpoint: Option<Arc<Endpoint>>,
    attempts: u32,
    accounting: Option<Accounting>,
}

impl Served {
    fn local(response: Response<BodyKind>) -> Self {
        Self {
            response,
            endpoint: None,
            attempts: 0,
            accounting: None,
        }
    }
}

struct Failure {
    error: ProxyError,
    endpoint: Option<Arc<Endpoint>>,
    attempts: u32,
}

impl Failure {
    fn new(error: ProxyError, endpoint: Option<Arc<Endpoint>>) -> Self {
        Self {
            error,
            endpoint,
            attempts: 0,
        }
    }

    fn into_served(self, dialect: Dialect) -> Served {
        Served {
            response: error_response(&self.error, dialect),
            endpoint: self.endpoint,
            attempts: self.attempts,
            accounting: None,
        }
    }
}

impl From<dispatch::Failure> for Failure {
    fn from(f: dispatch::Failure) -> Self {
        Self {
            error: f.error,
            endpoint: Some(f.endpoint),
            attempts: f.attempts,
        }
    }
}

async fn route(
    snapshot: &Snapshot,
    request: Request<Incoming>,
    ids: &CallIds<'_>,
    log: &mut RequestLog,
) -> Result<Served, Failure> {
    let path = request.uri().path();
    let Some(api_path) = path.strip_prefix("/v1").filter(|p| p.starts_with('/')) else {
        return Err(Failure::new(unknown_route(&request), None));
    };
    if let Err(reason) = path::check(api_path) {
        let error = ProxyError::InvalidPath {
            method: request.method().to_string(),
            path: path.to_string(),
            reason,
        };
        return Err(Failure::new(error, None));
    }
    let api_path = api_path.to_string();
    match (request.method(), api_path.as_str()) {
        (&Method::GET, "/models") => Ok(Served::local(json_response(
            StatusCode::OK,
            models_list(snapshot),
        ))),
        (&Method::GET, p) if p.starts_with("/models/") => {
            let id = &p["/models/".len()..];
            match snapshot.by_model(id) {
                Some(e) => Ok(Served::local(json_response(
                    StatusCode::OK,
                    model_object(id, e),
                ))),
                None if snapshot.is_missing(id) => Err(Failure::new(
                    ProxyError::EndpointNotReady(id.to_string()),
                    None,
                )),
                None => Err(Failure::new(ProxyError::UnknownModel(id.to_string()), None)),
            }
        }
        (&Method::POST, p) if JSON_ROUTES.contains(&p) => {
            // Boxed too: the future of a JSON call is several kilobytes, and each enclosing
            // future would otherwise hold (and copy) it again.
            Box::pin(json_call(snapshot, request, &api_path, ids, log)).await
        }
        // Boxed here and below: a branch that few requests take would otherwise make every
        // request's future (kept per request in flight) as large as its own, and copied
        // as often. The common path (a JSON call answered by its upstream) stays in place.
        _ => Box::pin(passthrough(snapshot, request, &api_path, ids, log)).await,
    }
}

/// A JSON API call: the body is read whole (it is needed to choose the endpoint, to count
/// tokens and to replay it on a retry, and is small next to the model's work), `model`
/// selects the endpoint and is rewritten.
async fn json_call(
    snapshot: &Snapshot,
    request: Request<Incoming>,
    api_path: &str,
    ids: &CallIds<'_>,
    log: &mut RequestLog,
) -> Result<Served, Failure> {
    let (parts, body) = request.into_parts();
    let by_header =
        endpoint_from_header(snapshot, &parts.headers).map_err(|e| Failure::new(e, None))?;
    // Until the endpoint is known, accept up to the largest limit of any candidate. With no
    // endpoint yet (a pod whose ConfigMaps have not arrived), the body is still read, to
    // tell a missing endpoint from an unknown model.
    let read_limit = match &by_header {
        Some(e) => e.config.max_request_body_bytes,
        None => snapshot
            .endpoints
            .iter()
            .map(|e| e.config.max_request_body_bytes)
            .max()
            .unwrap_or(DEFAULT_MAX_REQUEST_BODY_BYTES),
    };
    let bytes = read_body(&parts, body, read_limit)
        .await
        .map_err(|e| Failure::new(e, by_header.clone()))?;
    let json = RequestJson::parse(&bytes).map_err(|e| Failure::new(e, by_header.clone()))?;
    let model = json
        .model()
        .map_err(|e| Failure::new(e, by_header.clone()))?;
    log.model = model.as_deref().map(str::to_string);

    let endpoint = match (by_header, model.as_deref()) {
        (Some(e), _) => e,
        // An expected endpoint that has not arrived is named, not unknown: the default
        // endpoint would answer with another model than the one the app asked for.
        (None, Some(model)) if snapshot.by_model(model).is_none() && snapshot.is_missing(model) => {
            return Err(Failure::new(
                ProxyError::EndpointNotReady(model.to_string()),
                None,
            ))
        }
        (None, Some(model)) => match snapshot.by_model(model).or(snapshot.default_endpoint()) {
            Some(e) => Arc::clone(e),
            None => {
                return Err(Failure::new(
                    ProxyError::UnknownModel(model.to_string()),
                    None,
                ))
            }
        },
        (None, None) => match snapshot.default_endpoint() {
            Some(e) => Arc::clone(e),
            None => return Err(Failure::new(ProxyError::NoEndpointSelected, None)),
        },
    };
    log.endpoint = Some(Arc::clone(&endpoint));
    let limit = endpoint.config.max_request_body_bytes;
    if bytes.len() as u64 > limit {
        return Err(Failure::new(
            ProxyError::BodyTooLarge { limit },
            Some(endpoint),
        ));
    }

    let ask_usage = USAGE_IN_STREAMS_ROUTES.contains(&api_path) && json.streams_without_usage();
    let cache_use = cache::plan(
        endpoint.cache.as_ref(),
        &cache::Request {
            endpoint: endpoint.name(),
            credential_fingerprint: endpoint.credential().map_or("", |c| c.fingerprint()),
            upstream_model: &endpoint.config.model,
            route: api_path,
            body: &bytes,
            headers: &parts.headers,
        },
    );
    let mut fetching = None;
    log.cache = match &cache_use {
        Use::Off => CacheOutcome::Off,
        Use::Bypass => CacheOutcome::Bypass,
        Use::Cached { .. } => CacheOutcome::Miss,
    };
    if let Use::Cached {
        cache,
        key,
        lookup: true,
    } = &cache_use
    {
        let hit = Hit {
            cache,
            key,
            endpoint: &endpoint,
            json: &json,
            api_path,
            metrics: ids.metrics,
        };
        if let Some(served) = Box::pin(hit.answer(log)).await {
            return Ok(served);
        }
        match cache.turn(*key) {
            Turn::Fetch(turn) => fetching = Some(turn),
            // An identical request is fetching this answer: it is awaited, then served from
            // the cache (or, if it was not stored, fetched again here).
            Turn::Wait(waiting) => {
                let at_most = endpoint
                    .config
                    .timeouts
                    .total
                    .get()
                    .min(cache::MAX_COALESCED_WAIT);
                Box::pin(cache::wait(waiting, at_most)).await;
                if let Some(served) = Box::pin(hit.answer(log)).await {
                    return Ok(served);
                }
            }
        }
    }
    let primary = Arc::clone(&endpoint);
    let mut served = call_endpoint(
        snapshot, endpoint, &parts, api_path, ids, log, &bytes, &json, ask_usage,
    )
    .await?;
    // Stored only when the endpoint itself answered: the key is its own, and a fallback's
    // answer must not be served as its answer later.
    let answered_itself = served
        .endpoint
        .as_ref()
        .is_some_and(|e| Arc::ptr_eq(e, &primary));
    if let (Use::Cached { cache, key, .. }, Some(accounting)) =
        (cache_use, served.accounting.as_mut())
    {
        if accounting.success && answered_itself {
            let sse = accounting.tap.is_sse();
            accounting.recording = Some(Recording::new(cache, key, api_path, sse, fetching));
        }
    }
    Ok(served)
}

/// A cache lookup for one request, and its answer from the cache.
struct Hit<'a> {
    cache: &'a EndpointCache,
    key: &'a CacheKey,
    endpoint: &'a Arc<Endpoint>,
    json: &'a RequestJson<'a>,
    api_path: &'a str,
    metrics: Option<&'a Metrics>,
}

impl Hit<'_> {
    /// The stored answer, as JSON or as a stream, whichever the app asked for.
    async fn answer(&self, log: &mut RequestLog) -> Option<Served> {
        let (body, level) = self.cache.get(self.key).await?;
        let response = if self.json.streams() {
            let include_usage = !self.json.streams_without_usage();
            let events = cache::to_stream(self.api_path, &body, include_usage)?;
            sse_response(BodyKind::full(Bytes::from(events.concat())))
        } else {
            json_response(StatusCode::OK, body.clone())
        };
        log.cache = level;
        if let Some(metrics) = self.metrics {
            let mut tap = UsageTap::new(false);
            tap.observe(&body);
            if let Some(usage) = tap.usage() {
                let price = self.endpoint.config.price;
                metrics.cache_saved(
                    self.endpoint.name(),
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    price,
                );
            }
        }
        // No accounting: a hit holds no admission and spends no provider tokens.
        Some(Served {
            response,
            endpoint: Some(Arc::clone(self.endpoint)),
            attempts: 0,
            accounting: None,
        })
    }
}

/// The call of a JSON request to its endpoint (and fallbacks), answered by the mock or the
/// upstream, translated when the endpoint speaks another API.
#[allow(clippy::too_many_arguments)]
async fn call_endpoint(
    snapshot: &Snapshot,
    endpoint: Arc<Endpoint>,
    parts: &Parts,
    api_path: &str,
    ids: &CallIds<'_>,
    log: &mut RequestLog,
    bytes: &Bytes,
    json: &RequestJson<'_>,
    ask_usage: bool,
) -> Result<Served, Failure> {
    let outcome = dispatch::run(dispatch::Call {
        snapshot,
        primary: endpoint,
        parts,
        api_path,
        ids,
        body: CallBody::Json {
            bytes,
            json,
            ask_usage,
        },
    })
    .await?;
    match outcome {
        dispatch::Outcome::Mock {
            endpoint,
            permit,
            attempts,
        } => {
            log.endpoint = Some(Arc::clone(&endpoint));
            let response =
                Box::pin(mock_answer(&endpoint, &parts.method, api_path, bytes, ids)).await;
            let (response, sse) = match response {
                Ok(answer) => answer,
                Err(e) => return Err(Failure::new(e, Some(endpoint))),
            };
            Ok(Served {
                response,
                endpoint: Some(endpoint),
                attempts,
                accounting: Some(Accounting {
                    tap: UsageTap::new(sse),
                    permit: Some(permit),
                    success: true,
                    strip_usage: (ask_usage && sse).then(UsageChunkStripper::default),
                    recording: None,
                    upstream_tap: None,
                }),
            })
        }
        dispatch::Outcome::Upstream(answer) => {
            log.endpoint = Some(Arc::clone(&answer.endpoint));
            if let Plan::Translated(translation) = dialect::plan(api_path, &answer.endpoint.config)
            {
                return Box::pin(translated_answer(answer, translation, bytes, ask_usage)).await;
            }
            let answer = if is_route_missing(&answer) {
                match Box::pin(route_missing_upstream(answer, &parts.method, api_path)).await? {
                    Ok(answer) => answer,
                    Err(served) => return Ok(served),
                }
            } else {
                answer
            };
            let success = answer.response.status().is_success();
            let wire = Dialect::of_route(api_path).unwrap_or(Dialect::Chat);
            let (mut response, sse) =
                upstream_response(answer.response, &answer.endpoint, answer.deadline, wire);
            let strip_usage = ask_usage && sse;
            if strip_usage {
                // The usage chunk comes out, so the upstream's length no longer holds.
                response.headers_mut().remove(header::CONTENT_LENGTH);
            }
            Ok(Served {
                response,
                endpoint: Some(answer.endpoint),
                attempts: answer.attempts,
                accounting: Some(Accounting {
                    tap: UsageTap::new(sse),
                    permit: answer.permit,
                    success,
                    strip_usage: strip_usage.then(UsageChunkStripper::default),
                    recording: None,
                    upstream_tap: None,
                }),
            })
        }
    }
}

/// Any other `/v1/*` call (files, batches, audio, ...): the body streams through untouched
/// to the endpoint named in the header, else the default one. Only calls without a body are
/// retried, since a streamed body cannot be replayed.
async fn passthrough(
    snapshot: &Snapshot,
    request: Request<Incoming>,
    api_path: &str,
    ids: &CallIds<'_>,
    log: &mut RequestLog,
) -> Result<Served, Failure> {
    let (parts, body) = request.into_parts();
    let endpoint =
        match endpoint_from_header(snapshot, &parts.headers).map_err(|e| Failure::new(e, None))? {
            Some(e) => e,
            None => match snapshot.default_endpoint() {
                Some(e) => Arc::clone(e),
                None => return Err(Failure::new(ProxyError::NoEndpointSelected, None)),
            },
        };
    log.endpoint = Some(Arc::clone(&endpoint));
    if let Backend::Mock(_) = &endpoint.backend {
        let error = ProxyError::NotImplementedByMock(format!("{} /v1{api_path}", parts.method));
        return Err(Failure::new(error, Some(endpoint)));
    }
    let limit = endpoint.config.max_request_body_bytes;
    let content_length = declared_length(&parts);
    if content_length.is_some_and(|len| len > limit) {
        return Err(Failure::new(
            ProxyError::BodyTooLarge { limit },
            Some(endpoint),
        ));
    }
    let bodiless = content_length == Some(0)
        || (content_length.is_none() && !parts.headers.contains_key(header::TRANSFER_ENCODING));
    let call_body = if bodiless {
        CallBody::Empty
    } else {
        CallBody::Stream(
            Some(Either::Right(Limited::new(body, limit as usize))),
            content_length,
        )
    };
    let outcome = dispatch::run(dispatch::Call {
        snapshot,
        primary: endpoint,
        parts: &parts,
        api_path,
        ids,
        body: call_body,
    })
    .await?;
    match outcome {
        dispatch::Outcome::Upstream(answer) => {
            let (response, _) = upstream_response(
                answer.response,
                &answer.endpoint,
                answer.deadline,
                Dialect::Chat,
            );
            Ok(Served {
                response,
                endpoint: Some(answer.endpoint),
                attempts: answer.attempts,
                accounting: answer.permit.map(|permit| Accounting {
                    tap: UsageTap::new(false),
                    permit: Some(permit),
                    success: true,
                    strip_usage: None,
                    recording: None,
                    upstream_tap: None,
                }),
            })
        }
        // Fallbacks of a passthrough call are not followed (a streamed body cannot be
        // replayed, and files or batches live on one provider), so a mock here is the primary,
        // which was refused above.
        dispatch::Outcome::Mock { endpoint, .. } => Err(Failure::new(
            ProxyError::NotImplementedByMock(format!("{} /v1{api_path}", parts.method)),
            Some(endpoint),
        )),
    }
}

fn upstream_response(
    response: Response<UpstreamResponseBody>,
    endpoint: &Endpoint,
    deadline: Instant,
    dialect: Dialect,
) -> (Response<BodyKind>, bool) {
    let sse = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    let response = response
        .map(|body| BodyKind::Upstream(UpstreamBody::new(body, endpoint, sse, deadline, dialect)));
    (response, sse)
}

/// The mock's answer to a JSON call, translated when the app's API is one the mock does not
/// speak; true if it is a stream.
async fn mock_answer(
    endpoint: &Endpoint,
    method: &Method,
    api_path: &str,
    app_request: &Bytes,
    ids: &CallIds<'_>,
) -> Result<(Response<BodyKind>, bool), ProxyError> {
    let Backend::Mock(config) = &endpoint.backend else {
        return Err(ProxyError::NoEndpointSelected);
    };
    let model = &endpoint.config.model;
    let untranslatable = |source| ProxyError::Untranslatable {
        endpoint: endpoint.name().to_string(),
        provider: endpoint.config.provider.as_str(),
        source,
    };
    let plan = dialect::plan(api_path, &endpoint.config);
    let (mock_path, request) = match plan {
        Plan::Native => (api_path, app_request.clone()),
        Plan::Translated(t) => (
            t.upstream_route(),
            Bytes::from(
                t.request(app_request, &endpoint.config)
                    .map_err(untranslatable)?,
            ),
        ),
        Plan::NotServed => return Err(dispatch::not_served(endpoint, method, api_path)),
    };
    let request_id = ids.request_id.to_str().unwrap_or("");
    let answer = mock::respond(mock_path, &request, model, config, request_id)?;
    if !config.latency.is_zero() {
        tokio::time::sleep(config.latency.get()).await;
    }
    Ok(match (answer, plan) {
        (MockResponse::Json(body), Plan::Translated(t)) => {
            let body = t.response(&body, app_request).map_err(|source| {
                ProxyError::UpstreamAnswerUntranslatable {
                    endpoint: endpoint.name().to_string(),
                    provider: endpoint.config.provider.as_str(),
                    source,
                }
            })?;
            (json_response(StatusCode::OK, Bytes::from(body)), false)
        }
        (MockResponse::Json(body), _) => (json_response(StatusCode::OK, body), false),
        (MockResponse::Stream(stream), Plan::Translated(t)) => {
            let translated = TranslatedBody::new(BodyKind::Mock(stream), t.stream(app_request));
            (
                sse_response(BodyKind::Translated(Box::new(translated))),
                true,
            )
        }
        (MockResponse::Stream(stream), _) => (sse_response(BodyKind::Mock(stream)), true),
    })
}

/// The endpoint's answer to a translated call, in the app's API: a stream is translated as
/// it passes; a JSON answer or an error is read whole (it is the model's output, or an
/// error), translated, and sent with the upstream's status.
async fn translated_answer(
    answer: dispatch::Answer,
    translation: Translation,
    app_request: &Bytes,
    ask_usage: bool,
) -> Result<Served, Failure> {
    let dispatch::Answer {
        response,
        endpoint,
        permit,
        attempts,
        deadline,
    } = answer;
    let success = response.status().is_success();
    let (mut parts, body) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    let wire = translation.wire();
    let body = UpstreamBody::new(body, &endpoint, sse, deadline, wire);
    let streamed = sse && success;
    let mut upstream_tap = None;
    let body = if streamed {
        let translated =
            TranslatedBody::new(BodyKind::Upstream(body), translation.stream(app_request));
        BodyKind::Translated(Box::new(translated))
    } else {
        let read = Limited::new(body, TRANSLATED_BODY_LIMIT).collect().await;
        let upstream = match read {
            Ok(collected) => collected.to_bytes(),
            Err(e) => {
                let error = match e.downcast::<ProxyError>() {
                    Ok(error) => *error,
                    Err(other) => ProxyError::UpstreamBrokeMidResponse {
                        endpoint: endpoint.name().to_string(),
                        reason: other.to_string(),
                    },
                };
                return Err(Failure {
                    error,
                    endpoint: Some(endpoint),
                    attempts,
                });
            }
        };
        let mut tap = UsageTap::new(false);
        tap.observe(&upstream);
        upstream_tap = Some(tap);
        let translated = if success {
            translation.response(&upstream, app_request)
        } else {
            Ok(translation.error(parts.status.as_u16(), &upstream))
        };
        match translated {
            Ok(body) => {
                parts.headers.insert(header::CONTENT_TYPE, JSON);
                BodyKind::full(Bytes::from(body))
            }
            Err(source) => {
                let error = ProxyError::UpstreamAnswerUntranslatable {
                    endpoint: endpoint.name().to_string(),
                    provider: endpoint.config.provider.as_str(),
                    source,
                };
                return Err(Failure {
                    error,
                    endpoint: Some(endpoint),
                    attempts,
                });
            }
        }
    };
    Ok(Served {
        response: Response::from_parts(parts, body),
        endpoint: Some(endpoint),
        attempts,
        accounting: Some(Accounting {
            tap: UsageTap::new(streamed),
            permit,
            success,
            strip_usage: (ask_usage && streamed).then(UsageChunkStripper::default),
            recording: None,
            upstream_tap,
        }),
    })
}

/// Whether the upstream answered that it has no such route (404 or 405), which
/// [`route_missing_upstream`] looks into.
fn is_route_missing(answer: &dispatch::Answer) -> bool {
    let status = answer.response.status();
    status == StatusCode::NOT_FOUND || status == StatusCode::METHOD_NOT_ALLOWED
}

/// An upstream that answers 404 or 405 to a JSON route, with anything but an API error
/// about the request (a model it does not know), lacks the route itself (a chat-only server
/// asked for `/v1/responses`): the app is told so, naming the route and the endpoint,
/// instead of getting the server's bare "Not Found".
async fn route_missing_upstream(
    answer: dispatch::Answer,
    method: &Method,
    api_path: &str,
) -> Result<Result<dispatch::Answer, Served>, Failure> {
    let status = answer.response.status();
    let dispatch::Answer {
        response,
        endpoint,
        permit,
        attempts,
        deadline,
    } = answer;
    let (parts, body) = response.into_parts();
    let remaining = deadline.saturating_duration_since(Instant::now());
    let body = Limited::new(body, ROUTE_ERROR_BODY_LIMIT).collect();
    let body = match tokio::time::timeout(remaining, body).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        _ => Bytes::new(),
    };
    let body = match endpoint.credential() {
        Some(credential) => BodyRedactor::new(Arc::clone(credential.pattern())).whole(body),
        None => body,
    };
    let said = upstream_error_message(&body);
    if said
        .as_deref()
        .is_some_and(|m| m.to_ascii_lowercase().contains("model"))
    {
        // An API error about the request: passed on unchanged, as every upstream error is.
        let mut passed = Response::from_parts(parts, BodyKind::full(body));
        passed.headers_mut().remove(header::TRANSFER_ENCODING);
        return Ok(Err(Served {
            response: passed,
            endpoint: Some(endpoint),
            attempts,
            accounting: Some(Accounting {
                tap: UsageTap::new(false),
                permit,
                success: false,
                strip_usage: None,
                recording: None,
                upstream_tap: None,
            }),
        }));
    }
    let upstream_said =
        said.unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
    let detail = format!(
        "its upstream answered {} ({}). Send this request to an endpoint whose server has this API.",
        status.as_u16(),
        upstream_said.trim()
    );
    Err(Failure {
        error: ProxyError::RouteNotServed {
            endpoint: endpoint.name().to_string(),
            provider: endpoint.config.provider.as_str(),
            route: format!("{method} /v1{api_path}"),
            detail,
        },
        endpoint: Some(endpoint),
        attempts,
    })
}

/// `error.message`, `error` as a string, `detail` or `message` of a JSON error body.
fn upstream_error_message(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let text = value
        .pointer("/error/message")
        .or_else(|| value.get("error"))
        .or_else(|| value.get("detail"))
        .or_else(|| value.get("message"))?
        .as_str()?;
    Some(text.chars().take(200).collect())
}

fn endpoint_from_header(
    snapshot: &Snapshot,
    headers: &http::HeaderMap,
) -> Result<Option<Arc<Endpoint>>, ProxyError> {
    let Some(value) = headers.get(&LLMESH_ENDPOINT) else {
        return Ok(None);
    };
    let name = value.to_str().unwrap_or("");
    match snapshot.by_name(name) {
        Some(e) => Ok(Some(Arc::clone(e))),
        None if snapshot.is_missing(name) => Err(ProxyError::EndpointNotReady(name.to_string())),
        None => Err(ProxyError::UnknownEndpoint(name.to_string())),
    }
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
    let declared = declared_length(parts).unwrap_or(0);
    if declared > limit {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    // Room for what the app declared once a second frame comes.
    let declared = usize::try_from(declared).unwrap_or(0);
    let mut body = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    // A small body comes in one frame, kept as it is; only a body in several is copied
    // together (`collect` would queue even the one frame, an allocation per request).
    let mut first: Option<Bytes> = None;
    let mut joined: Option<Vec<u8>> = None;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(ProxyError::BodyTooLarge { limit })
            }
            Err(e) => return Err(ProxyError::BodyRead(e.to_string())),
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        match (&mut joined, &first) {
            (Some(joined), _) => joined.extend_from_slice(&data),
            (None, None) => first = Some(data),
            (None, Some(earlier)) => {
                let mut both =
                    Vec::with_capacity(declared.max(earlier.len().saturating_add(data.len())));
                both.extend_from_slice(earlier);
                both.extend_from_slice(&data);
                joined = Some(both);
            }
        }
    }
    Ok(match joined {
        Some(joined) => Bytes::from(joined),
        None => first.unwrap_or_default(),
    })
}

/// The request's id, for its response and log line: the app's `x-request-id` if it is
/// usable, else a new UUID. And the id sent upstream instead, when the app's is not a UUID:
/// some servers (llama.cpp's) answer any other `x-request-id` with an empty 400.
fn request_ids(request: &Request<Incoming>) -> (HeaderValue, Option<HeaderValue>) {
    let app_id = request
        .headers()
        .get(&REQUEST_ID)
        .filter(|v| (1..=128).contains(&v.len()) && v.to_str().is_ok());
    match app_id {
        None => (new_request_id(), None),
        Some(id) => {
            let bytes = id.as_bytes();
            let is_uuid = bytes.len() == uuid::fmt::Hyphenated::LENGTH
                && uuid::Uuid::try_parse_ascii(bytes).is_ok();
            (id.clone(), (!is_uuid).then(new_request_id))
        }
    }
}

fn new_request_id() -> HeaderValue {
    let id = uuid::Uuid::new_v4();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    HeaderValue::from_str(id.hyphenated().encode_lower(&mut buf))
        .unwrap_or(HeaderValue::from_static("-"))
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

fn error_response(error: &ProxyError, dialect: Dialect) -> Response<BodyKind> {
    let mut response = json_response(error.status(), error.body(dialect));
    if let Some(wait) = error.retry_after() {
        let headers = response.headers_mut();
        let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        headers.insert(
            RETRY_AFTER_MS.clone(),
            HeaderValue::from(wait.as_millis().max(1) as u64),
        );
    }
    if let ProxyError::RateLimited { limit, .. } = error {
        response.headers_mut().insert(
            LLMESH_LIMIT.clone(),
            HeaderValue::from_static(limit.as_str()),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_header_counts_past_its_static_values() {
        for attempts in [1, 2, 5, 6, 17, u32::MAX] {
            assert_eq!(
                attempts_header(attempts).to_str().unwrap(),
                attempts.to_string()
            );
        }
    }
}

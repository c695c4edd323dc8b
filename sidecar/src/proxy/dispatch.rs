//! One call across its endpoints: the primary, then its fallbacks in order. On each: the
//! circuit breaker, admission by the limiter, then attempts with backoff for as long as the
//! failures are retryable, the retry budget allows and the request's deadline is not passed.
//!
//! Retries happen only before any byte of a response has gone to the app: a response is
//! returned (and streamed) only once it is the answer.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::request::Parts;
use http::Response;
use http_body_util::{Either, Full};
use tokio::time::Instant;

use super::forward::{self, UpstreamCall};
use super::json::RequestJson;
use super::CallIds;
use crate::dialect::{self, Plan};
use crate::error::ProxyError;
use crate::limits::tokens::{self, Prompt};
use crate::limits::{LimitError, Permit, Reservation};
use crate::logging::request_scope;
use crate::provider;
use crate::resilience::breaker::Admission;
use crate::resilience::retry::{self, RetryReason};
use crate::snapshot::{Backend, Endpoint, Snapshot, Upstream};
use crate::upstream_client::{UpstreamRequestBody, UpstreamResponseBody};
use crate::wait;

/// How the request body is sent on each attempt.
pub enum CallBody<'a> {
    /// A JSON call: kept whole so that it can be replayed; `model` is rewritten per endpoint.
    Json {
        bytes: &'a Bytes,
        json: &'a RequestJson<'a>,
        /// Set `stream_options.include_usage` upstream (the app's stream lacks it).
        ask_usage: bool,
    },
    /// No body (GET, DELETE, ...): safe to replay.
    Empty,
    /// A streamed body of unknown size: sent once, never retried.
    Stream(Option<UpstreamRequestBody>, Option<u64>),
}

pub struct Call<'a> {
    pub snapshot: &'a Snapshot,
    pub primary: Arc<Endpoint>,
    pub parts: &'a Parts,
    pub api_path: &'a str,
    pub ids: &'a CallIds<'a>,
    pub body: CallBody<'a>,
}

/// What answered, with what it holds until the response ends.
pub struct Answer {
    pub response: Response<UpstreamResponseBody>,
    pub endpoint: Arc<Endpoint>,
    pub permit: Option<Permit>,
    pub attempts: u32,
    pub deadline: Instant,
}

/// A mock endpoint was chosen (as primary or fallback): the caller answers from it.
pub enum Outcome {
    Upstream(Answer),
    Mock {
        endpoint: Arc<Endpoint>,
        permit: Permit,
        attempts: u32,
    },
}

pub struct Failure {
    pub error: ProxyError,
    pub endpoint: Arc<Endpoint>,
    pub attempts: u32,
}

/// The last thing that went wrong, returned when no endpoint serves: an upstream's own error
/// response is passed on as it is (its 429 stays visible to the app).
enum LastFailure {
    Response(Answer),
    Error(ProxyError, Arc<Endpoint>),
}

pub async fn run(mut call: Call<'_>) -> Result<Outcome, Failure> {
    let deadline = wait::after(Instant::now(), call.primary.config.timeouts.total.get());
    let plan: Vec<Arc<Endpoint>> = std::iter::once(Arc::clone(&call.primary))
        .chain(
            call.primary
                .fallbacks
                .iter()
                .filter_map(|name| call.snapshot.by_name(name).cloned()),
        )
        .collect();
    let replayable = !matches!(call.body, CallBody::Stream(..));
    let metrics = call.ids.metrics;
    let mut attempts = 0u32;
    let mut last: Option<LastFailure> = None;
    // The admission of the endpoint whose error response may be returned.
    let mut last_permit: Option<Permit> = None;
    let mut prompt: Option<Prompt> = None;

    for (position, endpoint) in plan.iter().enumerate() {
        if position > 0 && !replayable {
            break;
        }
        let resilience = &endpoint.resilience;
        if let Admission::Rejected { retry_after, cause } = resilience.breaker.admit() {
            let error = ProxyError::CircuitOpen {
                endpoint: endpoint.name().to_string(),
                retry_after,
                cause: cause.map(RetryReason::describe),
            };
            // An upstream answer from an earlier endpoint says more than "circuit open".
            if last.is_none() {
                last = Some(LastFailure::Error(error, Arc::clone(endpoint)));
            }
            continue;
        }
        let reserve = reservation(&call.body, call.api_path, endpoint, &mut prompt).await;
        let permit = match resilience.limiter.acquire_for(reserve, deadline).await {
            Ok(permit) => permit,
            Err(error) => {
                if let (Some(metrics), LimitError::RateLimited { limit, .. }) = (metrics, &error) {
                    metrics.rate_limited(endpoint.name(), limit.as_str());
                }
                return Err(Failure {
                    error: limit_error(endpoint, error),
                    endpoint: Arc::clone(endpoint),
                    attempts,
                });
            }
        };
        let upstream = match &endpoint.backend {
            Backend::Mock(_) => {
                return Ok(Outcome::Mock {
                    endpoint: Arc::clone(endpoint),
                    permit,
                    attempts: attempts + 1,
                })
            }
            Backend::Upstream(upstream) => upstream,
        };
        resilience.budget.record_request();
        let mut retry_number = 0;
        loop {
            attempts += 1;
            if let Some(metrics) = metrics {
                metrics.attempt(endpoint.name());
            }
            let result = send_once(&mut call, endpoint, upstream, deadline).await;
            let (reason, wait_hint) = match result {
                Ok(response) => {
                    resilience.limiter.observe_upstream(response.headers());
                    match retry::retryable_status(response.status()) {
                        None => {
                            resilience.breaker.record(true);
                            return Ok(Outcome::Upstream(Answer {
                                response,
                                endpoint: Arc::clone(endpoint),
                                permit: Some(permit),
                                attempts,
                                deadline,
                            }));
                        }
                        Some(reason) => {
                            let hint = retry::retry_after(response.headers(), SystemTime::now());
                            last = Some(LastFailure::Response(Answer {
                                response,
                                endpoint: Arc::clone(endpoint),
                                permit: None,
                                attempts,
                                deadline,
                            }));
                            (reason, hint)
                        }
                    }
                }
                Err(error) => match retry_reason(&error) {
                    Some(reason) => {
                        last = Some(LastFailure::Error(error, Arc::clone(endpoint)));
                        (reason, None)
                    }
                    // Not retryable anywhere (a missing key, an oversized body).
                    None => {
                        return Err(Failure {
                            error,
                            endpoint: Arc::clone(endpoint),
                            attempts,
                        })
                    }
                },
            };
            if reason.counts_against_breaker() {
                resilience.breaker.record_failure(reason);
            } else {
                resilience.breaker.record(true);
            }
            request_scope::span().in_scope(|| {
                tracing::debug!(
                    endpoint = endpoint.name(),
                    attempt = attempts,
                    reason = reason.as_str(),
                    "attempt failed"
                )
            });
            let wait =
                wait_hint.unwrap_or_else(|| retry::backoff(&resilience.retry, retry_number + 1));
            let retried = replayable
                && retry_number + 1 < resilience.retry.max_attempts
                // Never sleep past the deadline: the last error is the answer then.
                && wait::after(Instant::now(), wait) < deadline
                && matches!(resilience.breaker.admit(), Admission::Allowed)
                && withdraw_retry(endpoint);
            if let Some(metrics) = metrics {
                metrics.retryable_failure(endpoint.name(), reason.as_str(), retried);
            }
            if !retried {
                break;
            }
            retry_number += 1;
            tokio::time::sleep(wait).await;
        }
        let answered_here =
            matches!(&last, Some(LastFailure::Response(a)) if Arc::ptr_eq(&a.endpoint, endpoint));
        last_permit = answered_here.then_some(permit);
    }
    match last {
        Some(LastFailure::Response(mut answer)) => {
            answer.permit = last_permit;
            Ok(Outcome::Upstream(answer))
        }
        Some(LastFailure::Error(error, endpoint)) => Err(Failure {
            error,
            endpoint,
            attempts,
        }),
        None => Err(Failure {
            error: ProxyError::NoEndpointSelected,
            endpoint: Arc::clone(&call.primary),
            attempts,
        }),
    }
}

async fn send_once(
    call: &mut Call<'_>,
    endpoint: &Endpoint,
    upstream: &Upstream,
    deadline: Instant,
) -> Result<Response<UpstreamResponseBody>, ProxyError> {
    let mut api_path = call.api_path;
    let (body, content_length): (UpstreamRequestBody, Option<u64>) = match &mut call.body {
        CallBody::Json {
            bytes,
            json,
            ask_usage,
        } => {
            let config = &endpoint.config;
            let body = match dialect::plan(call.api_path, config) {
                Plan::Native => {
                    let ask_usage = *ask_usage && provider::accepts_stream_options(config);
                    json.with_model(&config.model, ask_usage, bytes.len())
                }
                Plan::Translated(translation) => {
                    api_path = translation.upstream_route();
                    translation.request(bytes, config).map_err(|source| {
                        ProxyError::Untranslatable {
                            endpoint: endpoint.name().to_string(),
                            provider: config.provider.as_str(),
                            source,
                        }
                    })?
                }
                Plan::NotServed => return Err(not_served(endpoint, &call.parts.method, api_path)),
            };
            let body = Bytes::from(body);
            let len = body.len() as u64;
            (Either::Left(Full::new(body)), Some(len))
        }
        CallBody::Empty => (Either::Left(Full::new(Bytes::new())), None),
        CallBody::Stream(body, len) => match body.take() {
            Some(body) => (body, *len),
            None => {
                return Err(ProxyError::BodyRead(
                    "the request body was already sent".to_string(),
                ))
            }
        },
    };
    forward::send(UpstreamCall {
        endpoint,
        upstream,
        parts: call.parts,
        api_path,
        body,
        content_length,
        request_id: call.ids.request_id,
        traceparent: &call.ids.traceparent,
        deadline,
    })
    .await
}

/// The endpoint's provider has no such API (Anthropic has no embeddings) and no translation
/// reaches it.
pub fn not_served(endpoint: &Endpoint, method: &http::Method, api_path: &str) -> ProxyError {
    let provider = endpoint.config.provider.as_str();
    ProxyError::RouteNotServed {
        endpoint: endpoint.name().to_string(),
        provider,
        route: format!("{method} /v1{api_path}"),
        detail: format!(
            "the {provider} API has no such operation. Send this request to an endpoint whose provider has it."
        ),
    }
}

/// Takes a retry from the endpoint's budget; checked last, so only a retry that will
/// happen spends it.
fn withdraw_retry(endpoint: &Endpoint) -> bool {
    let allowed = endpoint.resilience.budget.try_withdraw();
    if !allowed {
        request_scope::span().in_scope(|| {
            tracing::debug!(
                endpoint = endpoint.name(),
                "retry budget spent; not retrying"
            )
        });
    }
    allowed
}

/// Failures before any response that another attempt may fix.
fn retry_reason(error: &ProxyError) -> Option<RetryReason> {
    match error {
        ProxyError::UpstreamUnreachable { .. } => Some(RetryReason::ConnectFailed),
        ProxyError::UpstreamReset { .. } => Some(RetryReason::Reset),
        ProxyError::UpstreamTimeout { .. } => Some(RetryReason::Timeout),
        _ => None,
    }
}

/// An app's `max_tokens` is reserved up to this much per choice: more than any model generates,
/// small enough that an absurd value (`18000000000000000000`) does not put the endpoint's
/// token bucket into a debt nobody could wait out.
const MAX_RESERVED_OUTPUT_PER_CHOICE: u64 = 1 << 20;
/// OpenAI's own ceiling for `n`.
const MAX_RESERVED_CHOICES: u64 = 128;

/// Tokens the request reserves: its counted prompt plus what it may generate when the
/// endpoint limits tokens, else a cheap size-based estimate (enough for the provider's
/// remaining-tokens hint).
async fn reservation(
    body: &CallBody<'_>,
    api_path: &str,
    endpoint: &Endpoint,
    prompt: &mut Option<Prompt>,
) -> Reservation {
    let CallBody::Json { bytes, json, .. } = body else {
        return Reservation::default();
    };
    // Counting a prompt's tokens generates nothing and is not billed.
    if api_path == "/messages/count_tokens" {
        return Reservation::default();
    }
    let limiter = &endpoint.resilience.limiter;
    if !limiter.counts_tokens() {
        return Reservation {
            prompt: tokens::estimate_bytes(bytes.len()),
            output: 0,
        };
    }
    let parsed = prompt.get_or_insert_with(|| Prompt::from_fields(|name| json.get(name)));
    let output = parsed
        .max_output
        .unwrap_or(u64::from(limiter.default_max_tokens()))
        .min(MAX_RESERVED_OUTPUT_PER_CHOICE)
        .saturating_mul(parsed.choices.min(MAX_RESERVED_CHOICES));
    Reservation {
        prompt: parsed.count(endpoint.resilience.encoding).await,
        output,
    }
}

fn limit_error(endpoint: &Endpoint, error: LimitError) -> ProxyError {
    match error {
        LimitError::RateLimited {
            limit,
            value,
            retry_after,
        } => ProxyError::RateLimited {
            endpoint: endpoint.name().to_string(),
            limit,
            value,
            retry_after: retry_after.max(Duration::from_millis(1)),
        },
        LimitError::SharedUnavailable => ProxyError::SharedLimiterUnavailable {
            endpoint: endpoint.name().to_string(),
        },
    }
}

//! Errors the sidecar itself answers with, in the error envelope of the API the app called
//! (OpenAI's, or Anthropic's for `/v1/messages`), so that SDKs raise their usual exception
//! types (`BadRequestError`, `NotFoundError`, ...). Upstream error responses pass through
//! unchanged, unless the call was translated: then only their envelope changes.

use bytes::Bytes;
use http::{HeaderValue, StatusCode};

use std::time::Duration;

use crate::credentials::CredentialError;
use crate::dialect::{envelope, sse, Dialect, TranslateError};
use crate::limits::LimitKind;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("We could not parse the JSON body of your request: {0}")]
    MalformedJson(String),
    #[error("The request body must be a JSON object.")]
    BodyNotAnObject,
    #[error("The request body is larger than the limit of {limit} bytes.")]
    BodyTooLarge { limit: u64 },
    #[error("The request body could not be read: {0}")]
    BodyRead(String),
    #[error("The model '{0}' does not exist or is not served by this llmesh sidecar. GET /v1/models lists the models it serves.")]
    UnknownModel(String),
    #[error("No endpoint is named '{0}' (from the x-llmesh-endpoint header).")]
    UnknownEndpoint(String),
    #[error("Endpoint '{0}' is not ready: this pod expects it, but its configuration (ConfigMap llmesh-{0}, file {0}.yaml) is not there yet. Check that the LlmEndpoint '{0}' exists in the pod's namespace and is rendered; the llmesh sidecar serves it as soon as it arrives, with no restart.")]
    EndpointNotReady(String),
    #[error("The request names no known model and no endpoint (x-llmesh-endpoint header), and this llmesh sidecar has no default endpoint.")]
    NoEndpointSelected,
    #[error("Invalid URL ({method} {path}).")]
    UnknownRoute { method: String, path: String },
    #[error("Invalid URL ({method} {path}): {reason}. llmesh refuses paths that could leave the endpoint's base URL.")]
    InvalidPath {
        method: String,
        path: String,
        reason: crate::proxy::PathError,
    },
    #[error("'model' must be a string naming a model or an endpoint, not {0}.")]
    ModelNotAString(&'static str),
    #[error("This request cannot be sent to endpoint '{endpoint}' ({provider}): {source}")]
    Untranslatable {
        endpoint: String,
        provider: &'static str,
        source: TranslateError,
    },
    #[error("Endpoint '{endpoint}' ({provider}) answered, but {source}")]
    UpstreamAnswerUntranslatable {
        endpoint: String,
        provider: &'static str,
        source: TranslateError,
    },
    #[error("Endpoint '{endpoint}' ({provider}) does not serve {route}: {detail}")]
    RouteNotServed {
        endpoint: String,
        provider: &'static str,
        route: String,
        detail: String,
    },
    #[error("The mock provider does not implement {0}.")]
    NotImplementedByMock(String),
    #[error("Endpoint '{endpoint}' has no usable credential: {source}")]
    CredentialUnavailable {
        endpoint: String,
        source: CredentialError,
    },
    #[error("Endpoint '{endpoint}': upstream is unreachable: {reason}")]
    UpstreamUnreachable { endpoint: String, reason: String },
    #[error("Endpoint '{endpoint}': upstream closed the connection before responding: {reason}")]
    UpstreamReset { endpoint: String, reason: String },
    #[error(
        "Endpoint '{endpoint}': upstream connection failed in the middle of the response: {reason}"
    )]
    UpstreamBrokeMidResponse { endpoint: String, reason: String },
    #[error("Endpoint '{endpoint}': the llmesh sidecar is shutting down and its grace period ran out before the upstream finished.")]
    ShutdownGraceOver { endpoint: String },
    #[error("Endpoint '{endpoint}': upstream did not {what} within {limit}.")]
    UpstreamTimeout {
        endpoint: String,
        what: &'static str,
        limit: String,
    },
    #[error("Rate limit reached for endpoint '{endpoint}' on {}{}. Please try again in {}.", limit.describe(), value.map(|v| format!(" (limit {v})")).unwrap_or_default(), human_wait(*retry_after))]
    RateLimited {
        endpoint: String,
        limit: LimitKind,
        value: Option<u64>,
        retry_after: Duration,
    },
    #[error("Endpoint '{endpoint}' shares its rate limits through Redis, which is unreachable, and is configured to fail closed.")]
    SharedLimiterUnavailable { endpoint: String },
    #[error("Endpoint '{endpoint}' is failing{} and its circuit breaker is open; it will be tried again in {}.", cause.map(|c| format!(" (its upstream {c})")).unwrap_or_default(), human_wait(*retry_after))]
    CircuitOpen {
        endpoint: String,
        retry_after: Duration,
        /// What the failures that opened it were, e.g. "timed out".
        cause: Option<&'static str>,
    },
}

/// The longest `Retry-After` given with `circuit_open`.
const CIRCUIT_RETRY_HINT: Duration = Duration::from_secs(1);

/// "3s", "250ms", rounded up so that waiting that long is always enough.
fn human_wait(wait: Duration) -> String {
    if wait < Duration::from_secs(1) {
        format!("{}ms", wait.as_millis().max(1))
    } else {
        format!("{}s", wait.as_secs_f64().ceil() as u64)
    }
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MalformedJson(_)
            | Self::BodyNotAnObject
            | Self::BodyRead(_)
            | Self::NoEndpointSelected
            | Self::InvalidPath { .. }
            | Self::ModelNotAString(_)
            | Self::Untranslatable { .. } => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnknownModel(_)
            | Self::UnknownEndpoint(_)
            | Self::UnknownRoute { .. }
            | Self::RouteNotServed { .. }
            | Self::NotImplementedByMock(_) => StatusCode::NOT_FOUND,
            Self::CredentialUnavailable { .. } | Self::EndpointNotReady(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::UpstreamUnreachable { .. }
            | Self::UpstreamReset { .. }
            | Self::UpstreamBrokeMidResponse { .. }
            | Self::UpstreamAnswerUntranslatable { .. } => StatusCode::BAD_GATEWAY,
            Self::ShutdownGraceOver { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::SharedLimiterUnavailable { .. } | Self::CircuitOpen { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// When the app should try again, sent as `Retry-After` and `retry-after-ms` (which the
    /// OpenAI SDKs honour).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after, .. } => Some(*retry_after),
            // Not the whole cooldown: SDKs sleep for what they are told before each of their
            // retries (30 s twice, with the defaults), only to meet the same open circuit.
            // A short hint lets them fail fast, or find it closed if it was about to close.
            Self::CircuitOpen { retry_after, .. } => Some((*retry_after).min(CIRCUIT_RETRY_HINT)),
            Self::SharedLimiterUnavailable { .. } => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// OpenAI's `error.type`: the class of error.
    fn kind(&self) -> &'static str {
        if let Self::RateLimited { limit, .. } = self {
            return limit.openai_type();
        }
        match self.status() {
            s if s.is_client_error() => "invalid_request_error",
            _ => "llmesh_error",
        }
    }

    /// A stable, machine-readable `error.code`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MalformedJson(_) => "invalid_json",
            Self::BodyNotAnObject => "invalid_body",
            Self::BodyTooLarge { .. } => "request_too_large",
            Self::BodyRead(_) => "body_read_error",
            Self::UnknownModel(_) => "model_not_found",
            Self::UnknownEndpoint(_) => "endpoint_not_found",
            Self::EndpointNotReady(_) => "endpoint_not_ready",
            Self::NoEndpointSelected => "model_required",
            Self::UnknownRoute { .. } => "unknown_url",
            Self::InvalidPath { .. } => "invalid_path",
            Self::ModelNotAString(_) => "invalid_type",
            Self::RouteNotServed { .. } => "route_not_supported",
            Self::Untranslatable { source, .. } => match source {
                TranslateError::Unsupported { .. } => "unsupported_parameter",
                _ => "invalid_value",
            },
            Self::UpstreamAnswerUntranslatable { .. } => "upstream_answer_untranslatable",
            Self::NotImplementedByMock(_) => "not_implemented",
            Self::CredentialUnavailable { .. } => "credential_unavailable",
            Self::UpstreamUnreachable { .. } => "upstream_unreachable",
            Self::UpstreamReset { .. } => "upstream_reset",
            Self::UpstreamBrokeMidResponse { .. } => "upstream_stream_broken",
            Self::UpstreamTimeout { .. } => "upstream_timeout",
            Self::ShutdownGraceOver { .. } => "shutting_down",
            Self::RateLimited { .. } => "rate_limit_exceeded",
            Self::SharedLimiterUnavailable { .. } => "rate_limiter_unavailable",
            Self::CircuitOpen { .. } => "circuit_open",
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            Self::UnknownModel(_) | Self::NoEndpointSelected | Self::ModelNotAString(_) => {
                Some("model")
            }
            Self::Untranslatable { source, .. } => source.param(),
            _ => None,
        }
    }

    /// The error body in the envelope of the app's API.
    pub fn body(&self, dialect: Dialect) -> Bytes {
        let message = self.to_string();
        let value = match dialect {
            Dialect::Messages => envelope::anthropic(
                envelope::anthropic_error_type(self.status().as_u16()),
                &message,
            ),
            Dialect::Chat | Dialect::Responses => {
                envelope::openai(&message, self.kind(), self.param(), Some(self.code()))
            }
        };
        // Serializing a Value into a Vec cannot fail.
        Bytes::from(serde_json::to_vec(&value).unwrap_or_default())
    }

    /// The error as one Server-Sent Event in the app's API, for failures after a stream has
    /// started: a `data:` event carrying `error` for chat (the OpenAI SDKs raise it), the
    /// `error` event for Anthropic's and the Responses API's streams.
    pub fn sse_event(&self, dialect: Dialect) -> Bytes {
        let mut event = Vec::new();
        match dialect {
            Dialect::Chat => sse::write_event(&mut event, None, &self.body(dialect)),
            Dialect::Messages => sse::write_event(&mut event, Some("error"), &self.body(dialect)),
            Dialect::Responses => {
                let message = self.to_string();
                let mut value =
                    envelope::openai(&message, self.kind(), self.param(), Some(self.code()));
                if let Some(object) = value.as_object_mut() {
                    object.insert("type".into(), "error".into());
                    object.insert("code".into(), self.code().into());
                    object.insert("message".into(), message.into());
                    object.insert("param".into(), self.param().into());
                }
                sse::write_json_event(&mut event, Some("error"), &value);
            }
        }
        Bytes::from(event)
    }
}

pub const JSON: HeaderValue = HeaderValue::from_static("application/json");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_matches_openai_shape() {
        let err = ProxyError::UnknownModel("gpt-9".into());
        let v: serde_json::Value = serde_json::from_slice(&err.body(Dialect::Chat)).unwrap();
        assert_eq!(err.status(), StatusCode::NOT_FOUND);
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["param"], "model");
        assert!(v["error"]["message"].as_str().unwrap().contains("'gpt-9'"));
    }

    #[test]
    fn anthropic_routes_get_anthropics_envelope_with_the_status_kept() {
        let limited = ProxyError::RateLimited {
            endpoint: "claude".into(),
            limit: LimitKind::RequestsPerMinute,
            value: Some(1),
            retry_after: Duration::from_secs(2),
        };
        let v: serde_json::Value =
            serde_json::from_slice(&limited.body(Dialect::Messages)).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("claude"));
        let event = limited.sse_event(Dialect::Messages);
        assert!(event.starts_with(b"event: error\ndata: {"));
        assert!(event.ends_with(b"}\n\n"));
    }

    #[test]
    fn untranslatable_requests_name_the_parameter() {
        let error = ProxyError::Untranslatable {
            endpoint: "claude".into(),
            provider: "anthropic",
            source: TranslateError::Unsupported {
                param: "n".into(),
                why: "Anthropic returns one answer per request",
            },
        };
        assert_eq!(error.status(), StatusCode::BAD_REQUEST);
        let v: serde_json::Value = serde_json::from_slice(&error.body(Dialect::Chat)).unwrap();
        assert_eq!(v["error"]["param"], "n");
        assert_eq!(v["error"]["code"], "unsupported_parameter");
        let responses = error.sse_event(Dialect::Responses);
        let text = std::str::from_utf8(&responses).unwrap();
        assert!(text.starts_with("event: error\ndata: {"), "{text}");
        assert!(text.contains(r#""type":"error""#) && text.contains(r#""error":{"#));
    }

    #[test]
    fn server_side_errors_have_their_own_type() {
        let err = ProxyError::UpstreamTimeout {
            endpoint: "chat".into(),
            what: "send response headers",
            limit: "5s".into(),
        };
        let v: serde_json::Value = serde_json::from_slice(&err.body(Dialect::Chat)).unwrap();
        assert_eq!(err.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(v["error"]["type"], "llmesh_error");
        assert_eq!(
            v["error"]["message"],
            "Endpoint 'chat': upstream did not send response headers within 5s."
        );
    }

    #[test]
    fn rate_limits_look_like_openai_s() {
        let err = ProxyError::RateLimited {
            endpoint: "chat".into(),
            limit: LimitKind::TokensPerMinute,
            value: Some(10000),
            retry_after: Duration::from_millis(2100),
        };
        let v: serde_json::Value = serde_json::from_slice(&err.body(Dialect::Chat)).unwrap();
        assert_eq!(err.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(v["error"]["type"], "tokens");
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        assert_eq!(
            v["error"]["message"],
            "Rate limit reached for endpoint 'chat' on tokens per minute (limit 10000). Please try again in 3s."
        );
    }

    #[test]
    fn a_missing_endpoint_names_its_configmap() {
        let err = ProxyError::EndpointNotReady("embed".into());
        let v: serde_json::Value = serde_json::from_slice(&err.body(Dialect::Chat)).unwrap();
        assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(v["error"]["type"], "llmesh_error");
        assert_eq!(v["error"]["code"], "endpoint_not_ready");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ConfigMap llmesh-embed"));
    }

    #[test]
    fn sse_event_is_one_complete_event() {
        let event = ProxyError::UpstreamReset {
            endpoint: "chat".into(),
            reason: "reset".into(),
        }
        .sse_event(Dialect::Chat);
        assert!(event.starts_with(b"data: {\"error\":"));
        assert!(event.ends_with(b"}\n\n"));
    }
}

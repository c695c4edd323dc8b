//! Sending one request to an upstream provider: the app's headers minus anything that is
//! hop-by-hop or a credential, the endpoint's key, and the first-byte and total deadlines.

use std::error::Error as StdError;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Request, Response};
use tokio::time::Instant;

use crate::config::{EndpointConfig, ProviderKind};
use crate::error::ProxyError;
use crate::snapshot::{CredentialState, Endpoint, Upstream};
use crate::trace::TRACEPARENT;
use crate::upstream_client::{self, SendError, UpstreamRequestBody, UpstreamResponseBody};
use crate::wait;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// names under which apps, SDKs and other providers' clients send keys and sessions: an app's
/// own credential never reaches a provider. An endpoint's `dropRequestHeaders` adds to these.
/// Matched as strings: comparing `HeaderName`s one by one cost ten times more per header.
fn is_always_dropped(name: &str) -> bool {
    is_hop_by_hop(name)
        || matches!(
            name,
            "proxy-authorization"
                | "host"
                | "content-length"
                | "authorization"
                // Providers' compressed answers would hide `usage` from the sidecar; on
                // loopback to the app compression only costs CPU.
                | "accept-encoding"
                | "proxy-connection"
                | "api-key"
                | "x-api-key"
                | "cookie"
                // Google (Gemini), Azure API Management, and OpenStack-style gateways.
                | "x-goog-api-key"
                | "ocp-apim-subscription-key"
                | "x-auth-token"
        )
}

/// The headers RFC 9110 §7.6.1 names as describing one connection, in either direction.
fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection" | "te" | "trailer" | "transfer-encoding" | "upgrade" | "keep-alive"
    )
}

pub struct UpstreamCall<'a> {
    pub endpoint: &'a Endpoint,
    pub upstream: &'a Upstream,
    pub parts: &'a Parts,
    pub api_path: &'a str,
    pub body: UpstreamRequestBody,
    pub content_length: Option<u64>,
    pub request_id: &'a HeaderValue,
    pub traceparent: &'a HeaderValue,
    /// When the whole call must be over (`timeouts.total` after it started).
    pub deadline: Instant,
}

pub async fn send(call: UpstreamCall<'_>) -> Result<Response<UpstreamResponseBody>, ProxyError> {
    let endpoint = call.endpoint.name();
    let credential = match &call.upstream.credential {
        CredentialState::Loaded(c) => Some(c),
        CredentialState::NotConfigured => None,
        CredentialState::Unavailable(source) => {
            return Err(ProxyError::CredentialUnavailable {
                endpoint: endpoint.to_string(),
                source: source.clone(),
            })
        }
    };
    let uri = call
        .upstream
        .target
        .uri(call.api_path, call.parts.uri.query())
        .map_err(|e| ProxyError::UpstreamUnreachable {
            endpoint: endpoint.to_string(),
            reason: format!("cannot build the upstream URL: {e}"),
        })?;

    let mut headers =
        upstream_request_headers(&call.parts.headers, &call.upstream.dropped_request_headers);
    if let Some(credential) = credential {
        headers.insert(credential.header().clone(), credential.value().clone());
    }
    if let Some(len) = call.content_length {
        headers.insert(header::CONTENT_LENGTH, content_length(len));
    }
    headers.insert(super::REQUEST_ID.clone(), call.request_id.clone());
    headers.insert(TRACEPARENT.clone(), call.traceparent.clone());
    set_anthropic_headers(&mut headers, &call.endpoint.config);

    let mut request = Request::new(call.body);
    *request.method_mut() = call.parts.method.clone();
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;

    let timeouts = &call.endpoint.config.timeouts;
    let headers_deadline =
        wait::after(Instant::now(), timeouts.first_byte.get()).min(call.deadline);
    let sent = upstream_client::send(timeouts.connect.get(), request);
    let response = match tokio::time::timeout_at(headers_deadline, sent).await {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => return Err(classify_send_error(call.endpoint, &error)),
        Err(_elapsed) => {
            let limit = if headers_deadline == call.deadline {
                timeouts.total
            } else {
                timeouts.first_byte
            };
            return Err(ProxyError::UpstreamTimeout {
                endpoint: endpoint.to_string(),
                what: "send response headers",
                limit: limit.to_string(),
            });
        }
    };
    let (mut parts, body) = response.into_parts();
    strip_response_headers(&mut parts.headers);
    if let Some(credential) = credential {
        credential.pattern().redact_headers(&mut parts.headers);
    }
    Ok(Response::from_parts(parts, body))
}

/// `Content-Length: len`, in one allocation: `HeaderValue::from(u64)` makes two (a buffer,
/// then the header that shares it).
fn content_length(len: u64) -> HeaderValue {
    HeaderValue::from_str(itoa::Buffer::new().format(len))
        .unwrap_or_else(|_| HeaderValue::from(len))
}

static ANTHROPIC_VERSION: HeaderName = HeaderName::from_static("anthropic-version");
static ANTHROPIC_BETA: HeaderName = HeaderName::from_static("anthropic-beta");

/// Anthropic's API needs `anthropic-version`: the app's own (its SDK's) is kept, else the
/// endpoint's is sent. Other providers are not sent Anthropic's headers, which an app
/// translated from Anthropic's SDK still sends.
fn set_anthropic_headers(headers: &mut HeaderMap, endpoint: &EndpointConfig) {
    if endpoint.provider != ProviderKind::Anthropic {
        headers.remove(&ANTHROPIC_VERSION);
        headers.remove(&ANTHROPIC_BETA);
        return;
    }
    if !headers.contains_key(&ANTHROPIC_VERSION) {
        if let Ok(version) = HeaderValue::from_str(endpoint.anthropic_version()) {
            headers.insert(ANTHROPIC_VERSION.clone(), version);
        }
    }
}

fn upstream_request_headers(app: &HeaderMap, also_dropped: &[HeaderName]) -> HeaderMap {
    // Headers the app lists in `Connection` are hop-by-hop too.
    let connection_listed: Vec<String> = app
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::with_capacity(app.len() + 2);
    for (name, value) in app {
        let name_str = name.as_str();
        let dropped = is_always_dropped(name_str)
            || also_dropped.contains(name)
            || name_str.starts_with("x-llmesh-")
            || connection_listed.iter().any(|c| c == name_str);
        if !dropped {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

fn strip_response_headers(headers: &mut HeaderMap) {
    // Looked for among the answer's names, which most answers have none of: one look at each
    // name costs less than a lookup of each dropped one.
    while let Some(name) = headers
        .keys()
        .find(|name| is_dropped_response_header(name.as_str()))
        .cloned()
    {
        headers.remove(&name);
    }
}

/// The response headers that describe the upstream's connection, not the answer.
fn is_dropped_response_header(name: &str) -> bool {
    is_hop_by_hop(name) || name == "proxy-authenticate"
}

fn classify_send_error(endpoint: &Endpoint, error: &SendError) -> ProxyError {
    if find_cause::<http_body_util::LengthLimitError>(error).is_some() {
        // The app's streamed body outgrew the limit while it was being sent upstream.
        return ProxyError::BodyTooLarge {
            limit: endpoint.config.max_request_body_bytes,
        };
    }
    let connect_timeout = endpoint.config.timeouts.connect;
    let endpoint = endpoint.name();
    let timed_out = find_cause::<std::io::Error>(error)
        .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut);
    if error.is_connect() && timed_out {
        return ProxyError::UpstreamTimeout {
            endpoint: endpoint.to_string(),
            what: "accept the connection",
            limit: connect_timeout.to_string(),
        };
    }
    let reason = root_cause(error);
    if error.is_connect() {
        ProxyError::UpstreamUnreachable {
            endpoint: endpoint.to_string(),
            reason,
        }
    } else {
        ProxyError::UpstreamReset {
            endpoint: endpoint.to_string(),
            reason,
        }
    }
}

fn find_cause<'a, T: StdError + 'static>(error: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut current: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// The innermost cause's message ("Connection refused (os error 111)"): the most telling
/// part, and free of URLs and headers.
pub fn root_cause(error: &(dyn StdError + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_response_headers_matched_as_strings_are_the_dropped_ones() {
        let dropped = [
            "connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authenticate",
            "keep-alive",
        ];
        for name in dropped {
            assert!(is_dropped_response_header(name), "{name}");
        }
        for kept in [
            "content-type",
            "x-request-id",
            "openai-processing-ms",
            "retry-after",
        ] {
            assert!(!is_dropped_response_header(kept), "{kept}");
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        for name in dropped {
            headers.append(HeaderName::from_static(name), HeaderValue::from_static("x"));
        }
        strip_response_headers(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn drops_keys_hop_by_hop_and_llmesh_headers() {
        let mut app = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer sk-app"),
            ("api-key", "app"),
            ("x-api-key", "app"),
            ("cookie", "session=app"),
            ("x-goog-api-key", "app"),
            ("ocp-apim-subscription-key", "app"),
            ("x-auth-token", "app"),
            ("proxy-authorization", "Basic app"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-llmesh-endpoint", "chat"),
            ("accept-encoding", "gzip"),
            ("host", "127.0.0.1:4000"),
            ("content-length", "10"),
            ("content-type", "application/json"),
            ("openai-organization", "org-1"),
            ("x-stainless-lang", "python"),
        ] {
            app.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let out = upstream_request_headers(&app, &[]);
        let mut kept: Vec<_> = out.keys().map(|k| k.as_str()).collect();
        kept.sort();
        assert_eq!(
            kept,
            ["content-type", "openai-organization", "x-stainless-lang"]
        );
    }

    fn endpoint(yaml: &str) -> EndpointConfig {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn anthropic_gets_its_version_header_and_others_none_of_anthropics() {
        let claude = endpoint("{name: c, provider: anthropic, model: m, credential: {file: /k}}");
        let mut headers = HeaderMap::new();
        set_anthropic_headers(&mut headers, &claude);
        assert_eq!(headers["anthropic-version"], "2023-06-01");

        let pinned = endpoint(
            "{name: c, provider: anthropic, model: m, credential: {file: /k}, anthropic: {version: '2024-01-01'}}",
        );
        let mut headers = HeaderMap::new();
        set_anthropic_headers(&mut headers, &pinned);
        assert_eq!(headers["anthropic-version"], "2024-01-01");
        // The app's SDK knows which version it speaks.
        headers.insert("anthropic-version", HeaderValue::from_static("2099-01-01"));
        set_anthropic_headers(&mut headers, &pinned);
        assert_eq!(headers["anthropic-version"], "2099-01-01");

        let local =
            endpoint("{name: l, provider: openai-compatible, model: m, baseUrl: 'http://x/v1'}");
        headers.insert("anthropic-beta", HeaderValue::from_static("x"));
        set_anthropic_headers(&mut headers, &local);
        assert!(headers.is_empty());
    }

    #[test]
    fn drops_the_endpoints_own_list_too() {
        let mut app = HeaderMap::new();
        for (k, v) in [
            ("x-internal-token", "t"),
            ("x-tenant", "a"),
            ("x-tenant", "b"),
            ("content-type", "application/json"),
        ] {
            app.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let also = [
            HeaderName::from_static("x-internal-token"),
            HeaderName::from_static("x-tenant"),
        ];
        let out = upstream_request_headers(&app, &also);
        let kept: Vec<_> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(kept, ["content-type"]);
    }
}

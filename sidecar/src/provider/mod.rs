//! What differs between providers: where a request goes and how the key is sent
//! (see [`crate::credentials`]). Apps speak OpenAI's or Anthropic's paths (`/v1/...`) to the
//! sidecar; which API an endpoint is sent is [`crate::dialect`]'s business.

pub mod mock;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::Uri;

use crate::config::{EndpointConfig, ProviderKind};

const OPENAI_BASE_URL: &str = "https://api.openai.com/v1";
/// Anthropic's base URL is the API root: its SDKs add `/v1/...` themselves.
const ANTHROPIC_BASE_URL: &str = "https://api.anthropic.com";

/// Operations that Azure OpenAI scopes to a deployment (`/openai/deployments/{name}/...`).
const AZURE_DEPLOYMENT_OPERATIONS: &[&str] = &[
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/audio/transcriptions",
    "/audio/translations",
    "/audio/speech",
    "/images/generations",
];

/// The first Azure OpenAI API version that accepts `stream_options`; older ones refuse the
/// whole request with "Unrecognized request argument".
const AZURE_STREAM_OPTIONS_SINCE: &str = "2024-09-01";

/// Whether the endpoint's API accepts `stream_options`, so that the sidecar may ask for
/// usage in streams the app sent without it.
pub fn accepts_stream_options(endpoint: &EndpointConfig) -> bool {
    match endpoint.provider {
        ProviderKind::AzureOpenai => endpoint
            .azure
            .as_ref()
            .is_some_and(|a| a.api_version.as_str() >= AZURE_STREAM_OPTIONS_SINCE),
        ProviderKind::Openai | ProviderKind::OpenaiCompatible | ProviderKind::Mock => true,
        // Its streams always carry usage.
        ProviderKind::Anthropic => false,
    }
}

/// Whether the endpoint's chat API wants `max_completion_tokens` rather than `max_tokens`:
/// OpenAI's reasoning models refuse `max_tokens`, and every current OpenAI model takes the
/// newer name; self-hosted servers mostly know only `max_tokens`.
pub fn takes_max_completion_tokens(endpoint: &EndpointConfig) -> bool {
    match endpoint.provider {
        ProviderKind::Openai => true,
        ProviderKind::AzureOpenai => accepts_stream_options(endpoint),
        ProviderKind::OpenaiCompatible | ProviderKind::Mock | ProviderKind::Anthropic => false,
    }
}

/// Where the requests of one upstream (non-mock) endpoint are sent.
#[derive(Debug, Clone)]
pub struct Target {
    scheme: Scheme,
    authority: Authority,
    /// The base URL's path without a trailing slash, e.g. `/v1` or empty; for Anthropic,
    /// with the `/v1` its base URL leaves out.
    base_path: String,
    azure: Option<AzureTarget>,
}

#[derive(Debug, Clone)]
struct AzureTarget {
    deployment: String,
    api_version: String,
}

#[derive(Debug, thiserror::Error)]
#[error("endpoint {endpoint}: base URL is not usable: {reason}")]
pub struct TargetError {
    endpoint: String,
    reason: &'static str,
}

impl Target {
    /// `None` for the mock provider, which is answered in-process.
    pub fn for_endpoint(endpoint: &EndpointConfig) -> Result<Option<Self>, TargetError> {
        let fail = |reason| TargetError {
            endpoint: endpoint.name.clone(),
            reason,
        };
        let base = match (endpoint.provider, endpoint.base_url.as_deref()) {
            (ProviderKind::Mock, _) => return Ok(None),
            (_, Some(url)) => url,
            (ProviderKind::Openai, None) => OPENAI_BASE_URL,
            (ProviderKind::Anthropic, None) => ANTHROPIC_BASE_URL,
            (_, None) => return Err(fail("missing")),
        };
        let uri: Uri = base.parse().map_err(|_| fail("not a URL"))?;
        let parts = uri.into_parts();
        let scheme = parts.scheme.ok_or_else(|| fail("no scheme"))?;
        let authority = parts.authority.ok_or_else(|| fail("no host"))?;
        let mut base_path = parts
            .path_and_query
            .map(|pq| pq.path().trim_end_matches('/').to_string())
            .unwrap_or_default();
        if endpoint.provider == ProviderKind::Anthropic {
            base_path.push_str("/v1");
        }
        let azure = endpoint.azure.as_ref().map(|a| AzureTarget {
            deployment: a
                .deployment
                .clone()
                .unwrap_or_else(|| endpoint.model.clone()),
            api_version: a.api_version.clone(),
        });
        Ok(Some(Self {
            scheme,
            authority,
            base_path,
            azure,
        }))
    }

    /// The upstream URI for an app request to `/v1{api_path}?{query}`.
    pub fn uri(&self, api_path: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        let path_and_query = match &self.azure {
            // Joined by hand: `format!` costs several times more, on every request.
            None => {
                let query_len = query.map_or(0, |q| q.len() + 1);
                let mut pq =
                    String::with_capacity(self.base_path.len() + api_path.len() + query_len);
                pq.push_str(&self.base_path);
                pq.push_str(api_path);
                if let Some(q) = query {
                    pq.push('?');
                    pq.push_str(q);
                }
                pq
            }
            Some(azure) => {
                let path = if AZURE_DEPLOYMENT_OPERATIONS.contains(&api_path) {
                    format!(
                        "{}/openai/deployments/{}{api_path}",
                        self.base_path, azure.deployment
                    )
                } else {
                    format!("{}/openai{api_path}", self.base_path)
                };
                // The endpoint's api-version wins over one the app may send.
                let mut pq = format!("{path}?api-version={}", azure.api_version);
                for pair in query.unwrap_or("").split('&') {
                    if !pair.is_empty() && !pair.starts_with("api-version=") {
                        pq.push('&');
                        pq.push_str(pair);
                    }
                }
                pq
            }
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(PathAndQuery::try_from(path_and_query)?)
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(yaml: &str) -> EndpointConfig {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn openai_defaults_to_the_public_api() {
        let t = Target::for_endpoint(&endpoint(
            "{name: a, provider: openai, model: gpt-4o, credential: {file: /k}}",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(
            t.uri("/chat/completions", None).unwrap(),
            "https://api.openai.com/v1/chat/completions"
        );
    }

    #[test]
    fn compatible_servers_keep_their_base_path_and_the_query() {
        let t = Target::for_endpoint(&endpoint(
            "{name: a, provider: openai-compatible, model: llama, baseUrl: 'http://vllm:8000/v1/'}",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(
            t.uri("/models", Some("limit=2")).unwrap(),
            "http://vllm:8000/v1/models?limit=2"
        );
    }

    #[test]
    fn azure_puts_the_deployment_in_the_path_and_pins_the_api_version() {
        let t = Target::for_endpoint(&endpoint(
            "{name: a, provider: azure-openai, model: gpt-4o, baseUrl: 'https://res.openai.azure.com',
              credential: {file: /k}, azure: {apiVersion: 2024-10-21}}",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(
            t.uri("/chat/completions", Some("api-version=1999&x=1")).unwrap(),
            "https://res.openai.azure.com/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21&x=1"
        );
        assert_eq!(
            t.uri("/files", None).unwrap(),
            "https://res.openai.azure.com/openai/files?api-version=2024-10-21"
        );
    }

    #[test]
    fn usage_is_asked_for_only_where_the_api_version_takes_it() {
        let azure = |version: &str| {
            endpoint(&format!(
                "{{name: a, provider: azure-openai, model: m, baseUrl: 'https://r.openai.azure.com',
                  credential: {{file: /k}}, azure: {{apiVersion: '{version}'}}}}"
            ))
        };
        assert!(accepts_stream_options(&azure("2024-10-21")));
        assert!(accepts_stream_options(&azure("2024-09-01-preview")));
        assert!(!accepts_stream_options(&azure("2024-06-01")));
        assert!(!accepts_stream_options(&azure("2023-05-15")));
        assert!(accepts_stream_options(&endpoint(
            "{name: a, provider: openai-compatible, model: m, baseUrl: 'http://x/v1'}"
        )));
    }

    #[test]
    fn anthropic_takes_the_api_root_like_its_sdks() {
        let default = Target::for_endpoint(&endpoint(
            "{name: a, provider: anthropic, model: claude, credential: {file: /k}}",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(
            default.uri("/messages", None).unwrap(),
            "https://api.anthropic.com/v1/messages"
        );
        let proxied = Target::for_endpoint(&endpoint(
            "{name: a, provider: anthropic, model: claude, baseUrl: 'http://gw:8080/anthropic/', credential: {file: /k}}",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(
            proxied
                .uri("/messages/count_tokens", Some("beta=true"))
                .unwrap(),
            "http://gw:8080/anthropic/v1/messages/count_tokens?beta=true"
        );
    }

    #[test]
    fn mock_has_no_target() {
        assert!(
            Target::for_endpoint(&endpoint("{name: a, provider: mock, model: m}"))
                .unwrap()
                .is_none()
        );
    }
}

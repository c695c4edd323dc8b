//! The sidecar's configuration: typed, published as a JSON Schema, validated once at load.
//!
//! The same types are what the operator renders into each endpoint's ConfigMap, so every
//! field name here is part of a public contract.

mod duration;
mod expected;
mod load;
mod resilience;
mod validate;
mod yaml_error;

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use duration::{Duration, ParseDurationError, DURATION_PATTERN};
pub use expected::{ExpectedEndpoints, ExpectedEndpointsError};
pub(crate) use load::hex as hex_digest;
pub use load::{config_hash, ConfigSource, LoadError, LoadedConfig, RawConfig};
pub use resilience::{
    CircuitBreakerConfig, LimitScope, LimitsConfig, RedisConfig, RedisFailurePolicy,
    RetryBudgetConfig, RetryConfig,
};
pub use validate::{is_dns_label, validate, ConfigError, ValidationErrors};

/// The whole configuration of one sidecar, as written in a single `--config` file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarConfig {
    /// The LLM endpoints this sidecar routes to. At least one.
    pub endpoints: Vec<EndpointConfig>,
}

/// One model endpoint that apps may call. In `--config-dir` mode each file holds one of these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointConfig {
    /// Unique name; apps select the endpoint with it (as `model`, or in the
    /// `x-llmesh-endpoint` header). Lowercase letters, digits and '-', at most 63 characters.
    pub name: String,
    pub provider: ProviderKind,
    /// The provider's API base, including any version prefix, e.g. `https://api.openai.com/v1`
    /// or `http://vllm.inference:8000/v1`. For Azure, the resource URL
    /// (`https://NAME.openai.azure.com`). For Anthropic, the API root without `/v1`, as in
    /// `ANTHROPIC_BASE_URL`. Defaults to OpenAI's for `openai` and Anthropic's
    /// (`https://api.anthropic.com`) for `anthropic`; unused by `mock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(url)]
    pub base_url: Option<String>,
    /// The model name sent upstream; the request's `model` is rewritten to it.
    pub model: String,
    /// Other names apps may use as `model` to reach this endpoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Requests that name no known model (and no endpoint header) go here. At most one endpoint may be the default.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub default: bool,
    /// Where the provider credential is read from. Required for `openai` and `azure-openai`,
    /// optional for `openai-compatible`, not allowed for `mock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<CredentialConfig>,
    #[serde(default)]
    pub timeouts: Timeouts,
    /// The largest request body accepted from the app, in bytes.
    #[serde(default = "default_max_request_body_bytes")]
    #[schemars(range(min = 1))]
    pub max_request_body_bytes: u64,
    /// Azure OpenAI settings; required when `provider` is `azure-openai`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure: Option<AzureConfig>,
    /// Mock provider settings; only for `provider: mock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mock: Option<MockConfig>,
    /// Anthropic settings; only for `provider: anthropic`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anthropic: Option<AnthropicConfig>,
    /// An exact-match response cache for this endpoint (docs/cache.md). Off unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheConfig>,
    /// How OpenAI's Responses API (`POST /v1/responses`) reaches this endpoint: `native` sends
    /// it as it is, `translate` turns it into a chat completion and the answer back (for
    /// servers that serve only chat: llama.cpp, many vLLM and Ollama versions). Defaults to
    /// `native` for `openai` and `azure-openai`, `translate` for the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub responses: Option<ResponsesMode>,
    #[serde(default)]
    pub retry: RetryConfig,
    /// Other endpoints (by name) tried in order when this one's attempts end in a retryable
    /// failure or its circuit is open. The request's `model` is rewritten to theirs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<String>,
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// What the model costs, for the `llmesh_cost_usd_total` metric. Without it no cost is
    /// reported for this endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<PriceConfig>,
    /// Headers of the app's requests that are not forwarded to this endpoint (names, in any
    /// case), on top of those always dropped: hop-by-hop headers and the ones that carry
    /// credentials (`authorization`, `proxy-authorization`, `api-key`, `x-api-key`,
    /// `x-goog-api-key`, `ocp-apim-subscription-key`, `x-auth-token`, `cookie`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(pattern(HEADER_NAME_PATTERN)))]
    pub drop_request_headers: Vec<String>,
}

/// An HTTP header name (RFC 9110 token), as the published schema states it.
pub const HEADER_NAME_PATTERN: &str = "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$";

/// A model's list price in US dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PriceConfig {
    #[schemars(range(min = 0.0))]
    pub input_per_million_tokens: f64,
    #[schemars(range(min = 0.0))]
    pub output_per_million_tokens: f64,
}

impl PriceConfig {
    pub fn cost_usd(&self, input_tokens: u64, output_tokens: u64) -> f64 {
        (input_tokens as f64 * self.input_per_million_tokens
            + output_tokens as f64 * self.output_per_million_tokens)
            / 1_000_000.0
    }
}

/// Long prompts (whole documents, base64 images) are common; 4 MiB and smaller defaults
/// are a known source of spurious 413s in other gateways.
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: u64 = 32 * 1024 * 1024;

fn default_max_request_body_bytes() -> u64 {
    DEFAULT_MAX_REQUEST_BODY_BYTES
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderKind {
    /// api.openai.com (or any URL given as `baseUrl`), Bearer credential.
    Openai,
    /// Servers that speak OpenAI's API: vLLM, Ollama, llama.cpp, TGI. Credential optional.
    OpenaiCompatible,
    /// Azure OpenAI: `api-key` header, deployment in the path, `api-version` query parameter.
    AzureOpenai,
    /// Anthropic's Messages API: `x-api-key` header, `anthropic-version` header. Apps using
    /// OpenAI's chat API are translated to it.
    Anthropic,
    /// Built in: deterministic answers with no network and no key.
    Mock,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Openai => "openai",
            Self::OpenaiCompatible => "openai-compatible",
            Self::AzureOpenai => "azure-openai",
            Self::Anthropic => "anthropic",
            Self::Mock => "mock",
        }
    }
}

/// A credential read from a file (a mounted Secret key), never from the config text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CredentialConfig {
    /// Path of the file holding the key. Surrounding whitespace is ignored. Re-read when it changes.
    pub file: PathBuf,
    /// Send the key as the raw value of this header instead of the provider's default
    /// (`Authorization: Bearer <key>` for OpenAI-style providers, `api-key: <key>` for Azure,
    /// `x-api-key: <key>` for Anthropic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
}

/// Deadlines for one upstream call. Defaults are long on purpose: reasoning models can be
/// silent for minutes before their first token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// Establishing the TCP (and TLS) connection.
    #[serde(default = "Timeouts::default_connect")]
    pub connect: Duration,
    /// From sending the request to receiving the response headers.
    #[serde(default = "Timeouts::default_first_byte")]
    pub first_byte: Duration,
    /// The longest silence allowed between two chunks of a response body.
    #[serde(default = "Timeouts::default_idle")]
    pub idle: Duration,
    /// The whole call, from request to the last byte of the response.
    #[serde(default = "Timeouts::default_total")]
    pub total: Duration,
}

impl Timeouts {
    fn default_connect() -> Duration {
        Duration::from_secs(10)
    }
    fn default_first_byte() -> Duration {
        Duration::from_secs(300)
    }
    fn default_idle() -> Duration {
        Duration::from_secs(300)
    }
    fn default_total() -> Duration {
        Duration::from_secs(600)
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Self::default_connect(),
            first_byte: Self::default_first_byte(),
            idle: Self::default_idle(),
            total: Self::default_total(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AzureConfig {
    /// The `api-version` query parameter, e.g. `2024-10-21`.
    pub api_version: String,
    /// The deployment name used in the path; defaults to `model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AnthropicConfig {
    /// The `anthropic-version` header sent when the app sends none (apps using OpenAI's
    /// SDK never do).
    #[serde(default = "AnthropicConfig::default_version")]
    pub version: String,
}

impl AnthropicConfig {
    /// The version every current Anthropic SDK sends.
    pub const DEFAULT_VERSION: &'static str = "2023-06-01";

    fn default_version() -> String {
        Self::DEFAULT_VERSION.to_string()
    }
}

/// Identical requests answered from memory, and optionally from a Redis shared by the
/// endpoint's sidecars, instead of the provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CacheConfig {
    /// How long a stored answer is served.
    #[serde(default = "CacheConfig::default_ttl")]
    pub ttl: Duration,
    /// Answers larger than this (in bytes, as the app receives them) are not stored.
    #[serde(default = "CacheConfig::default_max_entry_bytes")]
    #[schemars(range(min = 1))]
    pub max_entry_bytes: u64,
    /// Also cache requests that sample (`temperature` absent or above 0): their answers are
    /// meant to vary, so by default they go to the provider every time.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_sampling: bool,
    #[serde(default)]
    pub memory: MemoryCacheConfig,
    /// A Redis shared by all the endpoint's sidecars: a hit in any pod's answer serves all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared: Option<SharedCacheConfig>,
}

impl CacheConfig {
    fn default_ttl() -> Duration {
        Duration::from_secs(600)
    }
    fn default_max_entry_bytes() -> u64 {
        1024 * 1024
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MemoryCacheConfig {
    /// The most bytes of answers held in the pod's memory; the least used go first.
    #[serde(default = "MemoryCacheConfig::default_max_bytes")]
    #[schemars(range(min = 1))]
    pub max_bytes: u64,
}

impl MemoryCacheConfig {
    fn default_max_bytes() -> u64 {
        32 * 1024 * 1024
    }
}

impl Default for MemoryCacheConfig {
    fn default() -> Self {
        Self {
            max_bytes: Self::default_max_bytes(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SharedCacheConfig {
    /// `redis://[USER@]HOST:PORT[/DB]`; prefer `passwordFile` to a password in the URL.
    pub url: String,
    /// A file holding the Redis password (a mounted Secret key), read at each connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Prefix of the cache's Redis keys.
    #[serde(default = "SharedCacheConfig::default_key_prefix")]
    pub key_prefix: String,
    /// The longest a Redis call may take; a slower or unreachable Redis is a miss.
    #[serde(default = "SharedCacheConfig::default_timeout")]
    pub timeout: Duration,
}

impl SharedCacheConfig {
    fn default_key_prefix() -> String {
        "llmesh:cache".to_string()
    }
    fn default_timeout() -> Duration {
        Duration::from_millis(100)
    }
}

/// See [`EndpointConfig::responses`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ResponsesMode {
    Native,
    Translate,
}

impl EndpointConfig {
    /// The Responses API mode in effect: the configured one, else the provider's default.
    pub fn responses_mode(&self) -> ResponsesMode {
        self.responses.unwrap_or(match self.provider {
            ProviderKind::Openai | ProviderKind::AzureOpenai => ResponsesMode::Native,
            ProviderKind::OpenaiCompatible | ProviderKind::Anthropic | ProviderKind::Mock => {
                ResponsesMode::Translate
            }
        })
    }

    /// The `anthropic-version` header value for this endpoint.
    pub fn anthropic_version(&self) -> &str {
        self.anthropic
            .as_ref()
            .map_or(AnthropicConfig::DEFAULT_VERSION, |a| a.version.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MockConfig {
    /// Delay before the response headers, like a provider's queueing and prompt processing.
    #[serde(default = "MockConfig::default_latency")]
    pub latency: Duration,
    /// Delay between streamed tokens.
    #[serde(default = "MockConfig::default_token_interval")]
    pub token_interval: Duration,
    /// Tokens in each completion, unless the request's `max_tokens` is smaller.
    #[serde(default = "MockConfig::default_completion_tokens")]
    #[schemars(range(min = 1, max = 100000))]
    pub completion_tokens: u32,
    /// Length of each embedding vector, unless the request asks for `dimensions`.
    #[serde(default = "MockConfig::default_embedding_dimensions")]
    #[schemars(range(min = 1, max = 16384))]
    pub embedding_dimensions: u32,
}

impl MockConfig {
    fn default_latency() -> Duration {
        Duration::from_millis(0)
    }
    fn default_token_interval() -> Duration {
        Duration::from_millis(0)
    }
    fn default_completion_tokens() -> u32 {
        16
    }
    fn default_embedding_dimensions() -> u32 {
        1536
    }
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            latency: Self::default_latency(),
            token_interval: Self::default_token_interval(),
            completion_tokens: Self::default_completion_tokens(),
            embedding_dimensions: Self::default_embedding_dimensions(),
        }
    }
}

/// The JSON Schema of a `--config` file, as published under `docs/`.
pub fn sidecar_config_schema() -> schemars::Schema {
    schemars::schema_for!(SidecarConfig)
}

/// The JSON Schema of one file in a `--config-dir` directory.
pub fn endpoint_config_schema() -> schemars::Schema {
    schemars::schema_for!(EndpointConfig)
}

//! The `LlmEndpoint` custom resource (`llmesh.io/v1alpha1`).
//!
//! An LlmEndpoint is one model that apps in its namespace may call. Its spec is the
//! sidecar's endpoint configuration (the sidecar crate's own types where they fit), the
//! credential as a reference to a Secret key, and per-environment overrides.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::marker::PhantomData;

use kube::CustomResource;
use llmesh_sidecar::config::{
    AnthropicConfig, AzureConfig, CacheConfig, CircuitBreakerConfig, Duration, LimitsConfig,
    MockConfig, PriceConfig, ProviderKind, ResponsesMode, RetryConfig, HEADER_NAME_PATTERN,
};
use schemars::transform::RecursiveTransform;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "llmesh.io",
    version = "v1alpha1",
    kind = "LlmEndpoint",
    namespaced,
    shortname = "llme",
    status = "LlmEndpointStatus",
    printcolumn = r#"{"name":"Provider","type":"string","jsonPath":".status.provider"}"#,
    printcolumn = r#"{"name":"Model","type":"string","jsonPath":".status.model"}"#,
    printcolumn = r#"{"name":"Environment","type":"string","jsonPath":".status.environment"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    doc = "One LLM endpoint that pods in this namespace may call through the llmesh sidecar."
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = RecursiveTransform(keep_kubernetes_formats))]
// The flattened base's own rules do not survive flattening, so they are repeated here.
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.provider)", "message": "spec.provider is required"},
    {"rule": "has(self.model)", "message": "spec.model is required"},
    {
        "rule": "!has(self.mock) || self.provider == 'mock'",
        "message": "mock settings apply only to provider mock"
    },
    {
        "rule": "!has(self.azure) || self.provider == 'azure-openai'",
        "message": "azure settings apply only to provider azure-openai"
    },
    {
        "rule": "self.provider != 'azure-openai' || has(self.azure)",
        "message": "provider azure-openai needs azure.apiVersion"
    },
    {
        "rule": "!has(self.anthropic) || self.provider == 'anthropic'",
        "message": "anthropic settings apply only to provider anthropic"
    }
]))]
pub struct LlmEndpointSpec {
    /// The endpoint as every environment sees it, unless an environment overrides a field.
    #[serde(flatten)]
    pub base: EndpointSettings,
    /// Overrides per environment (the namespace's `llmesh.io/environment` label), merged
    /// field by field over the base, e.g. `dev: {provider: mock}` so that dev spends nothing.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = RecursiveTransform(as_overrides))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.all(env, env.matches('^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$'))",
        "message": "environment names are lowercase DNS labels, e.g. dev, test, prod"
    }]))]
    pub environments: BTreeMap<String, EndpointSettings>,
}

/// Endpoint fields. Every field is optional so that the same shape serves as base and as
/// override; the base must set `provider` and `model` (a CEL rule on the spec says so).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.mock) || !has(self.provider) || self.provider == 'mock'",
        "message": "mock settings apply only to provider mock"
    },
    {
        "rule": "!has(self.azure) || !has(self.provider) || self.provider == 'azure-openai'",
        "message": "azure settings apply only to provider azure-openai"
    },
    {
        "rule": "!has(self.anthropic) || !has(self.provider) || self.provider == 'anthropic'",
        "message": "anthropic settings apply only to provider anthropic"
    }
]))]
pub struct EndpointSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ProviderKind>,
    /// The provider's API base, e.g. `https://api.openai.com/v1` (OpenAI's is the default for
    /// `openai`, `https://api.anthropic.com` for `anthropic`, which takes the root without `/v1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.startsWith('http://') || self.startsWith('https://')",
        "message": "baseUrl must start with http:// or https://"
    }]))]
    pub base_url: Option<String>,
    /// The model name sent upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub model: Option<String>,
    /// Other names apps may use as `model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aliases: Option<Vec<String>>,
    /// Requests that name no known model go to this endpoint (one per namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<bool>,
    /// The provider key: one key of a Secret in this namespace. Ignored for provider `mock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
    /// Send the key as the raw value of this header instead of the provider's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<TimeoutSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_request_body_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure: Option<Partial<AzureConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mock: Option<Partial<MockConfig>>,
    /// Anthropic settings (`version`: the `anthropic-version` header sent when the app sends none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anthropic: Option<Partial<AnthropicConfig>>,
    /// OpenAI's Responses API: `native`, or `translate` to chat completions for servers
    /// that serve only chat. Defaults to `native` for openai and azure-openai.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub responses: Option<ResponsesMode>,
    /// Retries with backoff and a retry budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Partial<RetryConfig>>,
    /// Other LlmEndpoints of this namespace tried in order when this one fails retryably.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallbacks: Option<Vec<String>>,
    /// Ejects the endpoint after consecutive failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<Partial<CircuitBreakerConfig>>,
    /// Request, token and concurrency limits, per sidecar or shared through Redis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // The sidecar's own field; here the operator sets it from `redisPasswordSecretRef`.
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "!has(self.redis) || !has(self.redis.passwordFile)",
        "message": "limits.redis.passwordFile is set by the operator; give the password as redisPasswordSecretRef"
    }]))]
    pub limits: Option<Partial<LimitsConfig>>,
    /// The password of `limits.redis`: one key of a Secret in this namespace, copied beside
    /// the provider key, so that it is in neither the URL nor the ConfigMap. Ignored unless
    /// `limits.scope` is `global`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_password_secret_ref: Option<SecretKeyRef>,
    /// An exact-match response cache (docs/cache.md), off unless set. `cache: null` in an
    /// environment turns the base's cache off there.
    #[serde(
        default,
        deserialize_with = "null_as_removed",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<Partial<CacheConfig>>")]
    // The sidecar's own field; here the operator sets it from `cacheRedisPasswordSecretRef`.
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "!has(self.shared) || !has(self.shared.passwordFile)",
        "message": "cache.shared.passwordFile is set by the operator; give the password as cacheRedisPasswordSecretRef"
    }]))]
    pub cache: Option<Removable<Partial<CacheConfig>>>,
    /// The password of `cache.shared`: one key of a Secret in this namespace, copied beside
    /// the provider key, so that it is in neither the URL nor the ConfigMap. Ignored unless
    /// the cache has a `shared` block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_redis_password_secret_ref: Option<SecretKeyRef>,
    /// The model's price, for the sidecar's cost metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<PriceConfig>,
    /// App request headers not forwarded to the provider, on top of the credential and
    /// hop-by-hop headers the sidecar always drops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(inner(pattern(HEADER_NAME_PATTERN)))]
    pub drop_request_headers: Option<Vec<String>>,
}

/// A block an environment may remove: `None` when not written, `Some(None)` when written
/// as `null`, which survives the merge over the base and so turns the base's block off.
pub type Removable<T> = Option<T>;

/// Keeps an explicit `null` apart from an absent field (which `default` makes `None`).
fn null_as_removed<'de, D, T>(deserializer: D) -> Result<Option<Removable<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Removable::<T>::deserialize(deserializer).map(Some)
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Deadlines; unset fields keep the base's (or the sidecar's default).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TimeoutSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_byte: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<Duration>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = RecursiveTransform(keep_kubernetes_formats))]
pub struct LlmEndpointStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The environment this endpoint was rendered for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    /// The provider and model in effect for that environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The sidecar reports the same hash on `/readyz` once it serves this rendering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
}

/// A block of sidecar settings kept as the user wrote it, so that an environment's block
/// merges into the base's field by field: parsed into `T` at once, the sidecar's defaults
/// would fill the unset fields and then override the base's. The schema is `T`'s, so the
/// API server still checks the block, and rendering parses it into `T`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(transparent)]
pub struct Partial<T> {
    written: serde_json::Value,
    #[serde(skip)]
    parses_into: PhantomData<T>,
}

impl<T: DeserializeOwned> Partial<T> {
    pub fn parse(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.written)
    }
}

impl<T: JsonSchema> JsonSchema for Partial<T> {
    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }

    fn schema_id() -> Cow<'static, str> {
        T::schema_id()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        T::json_schema(generator)
    }
}

/// An environment's entry is merged over the base, so none of its fields is required and
/// none has a default: the API server would write a default into the entry, and that value
/// would then override the base's (`retry: {maxAttempts: 2}` would reset `backoffBase`).
/// The merged settings are checked when they are rendered.
fn as_overrides(schema: &mut Schema) {
    if let Some(object) = schema.as_object_mut() {
        object.remove("default");
        object.remove("required");
    }
}

/// String formats that Kubernetes has validated since 1.0 (apiextensions-apiserver's list,
/// compared with `-` removed, as the API server does).
const KUBERNETES_STRING_FORMATS: &[&str] = &[
    "bsonobjectid",
    "uri",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "cidr",
    "mac",
    "uuid",
    "uuid3",
    "uuid4",
    "uuid5",
    "isbn",
    "isbn10",
    "isbn13",
    "creditcard",
    "ssn",
    "hexcolor",
    "rgbcolor",
    "byte",
    "password",
    "date",
    "duration",
    "datetime",
];

/// Whether the API server knows `format` for a schema of `schema_type`; it warns about
/// every other one on each `kubectl apply` of the CRD.
fn kubernetes_knows_format(schema_type: Option<&str>, format: &str) -> bool {
    match schema_type {
        Some("integer") => matches!(format, "int32" | "int64"),
        Some("number") => matches!(format, "float" | "double"),
        None | Some("string") => {
            let normalized = format.replace('-', "");
            KUBERNETES_STRING_FORMATS.contains(&normalized.as_str())
        }
        Some(_) => false,
    }
}

/// Drops the JSON Schema formats Kubernetes does not know (schemars writes `uint32` and
/// `uint64` for unsigned integers; their `minimum: 0` stays and says the same).
fn keep_kubernetes_formats(schema: &mut Schema) {
    let Some(object) = schema.as_object_mut() else {
        return;
    };
    let Some(format) = object.get("format").and_then(|f| f.as_str()) else {
        return;
    };
    // An `Option`'s schema is still `[T, "null"]` here; kube turns it into `nullable` later.
    let schema_type = match object.get("type") {
        Some(serde_json::Value::String(t)) => Some(t.as_str()),
        Some(serde_json::Value::Array(types)) => {
            let mut not_null = types
                .iter()
                .filter_map(|t| t.as_str())
                .filter(|t| *t != "null");
            match (not_null.next(), not_null.next()) {
                (Some(t), None) => Some(t),
                _ => None,
            }
        }
        _ => None,
    };
    let known = kubernetes_knows_format(schema_type, format);
    if !known {
        object.remove("format");
    }
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;
    use serde_json::Value;

    use super::*;

    /// Every `(type, format)` pair anywhere in `value`.
    fn formats(value: &Value, found: &mut Vec<(Option<String>, String)>) {
        match value {
            Value::Object(object) => {
                if let Some(Value::String(format)) = object.get("format") {
                    let schema_type = object.get("type").and_then(Value::as_str);
                    found.push((schema_type.map(str::to_string), format.clone()));
                }
                object.values().for_each(|v| formats(v, found));
            }
            Value::Array(items) => items.iter().for_each(|v| formats(v, found)),
            _ => {}
        }
    }

    #[test]
    fn the_crd_carries_only_formats_kubernetes_knows() {
        let crd = serde_json::to_value(LlmEndpoint::crd()).unwrap();
        let mut found = Vec::new();
        formats(&crd, &mut found);
        // The pairs the API server accepts without a warning, spelled out rather than
        // taken from the filter under test.
        let accepted = [
            (Some("integer"), "int32"),
            (Some("integer"), "int64"),
            (Some("number"), "float"),
            (Some("number"), "double"),
            (Some("string"), "date-time"),
        ];
        for (schema_type, format) in &found {
            assert!(
                accepted.contains(&(schema_type.as_deref(), format.as_str())),
                "format {format:?} on type {schema_type:?} would make kubectl warn"
            );
        }
        assert!(found.iter().any(|(_, f)| f == "date-time"), "{found:?}");
        let status = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
            ["status"]["properties"];
        assert_eq!(status["observedGeneration"]["format"], "int64");
    }

    #[test]
    fn unsigned_fields_keep_their_minimum() {
        let crd = serde_json::to_value(LlmEndpoint::crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"];
        let max_attempts = &spec["retry"]["properties"]["maxAttempts"];
        assert_eq!(max_attempts["type"], "integer");
        assert_eq!(max_attempts["minimum"].as_f64(), Some(1.0));
        assert_eq!(max_attempts.get("format"), None);
        let body_limit = &spec["maxRequestBodyBytes"];
        assert_eq!(body_limit["minimum"].as_f64(), Some(1.0));
        assert_eq!(body_limit.get("format"), None);
        let max_queued = &spec["limits"]["properties"]["maxQueued"];
        assert_eq!(max_queued["minimum"].as_f64(), Some(0.0));
        assert_eq!(max_queued.get("format"), None);
    }

    /// Whether `key` is a keyword of any schema in `value` (not a property name).
    fn has_keyword(value: &Value, key: &str) -> bool {
        match value {
            Value::Object(object) => {
                object.contains_key(key)
                    || object.iter().any(|(k, v)| match (k.as_str(), v) {
                        ("properties", Value::Object(properties)) => {
                            properties.values().any(|p| has_keyword(p, key))
                        }
                        _ => has_keyword(v, key),
                    })
            }
            Value::Array(items) => items.iter().any(|v| has_keyword(v, key)),
            _ => false,
        }
    }

    #[test]
    fn environment_entries_have_no_defaults_and_no_required_fields() {
        let crd = serde_json::to_value(LlmEndpoint::crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let entry = &spec["properties"]["environments"]["additionalProperties"];
        assert!(entry["properties"]["cache"]["properties"]["ttl"].is_object());
        assert!(
            entry["properties"]["default"].is_object(),
            "a property named default stays"
        );
        assert!(!has_keyword(entry, "default"), "{entry:#}");
        assert!(!has_keyword(entry, "required"), "{entry:#}");
        // The base keeps them: there they fill in what the sidecar would anyway.
        let base = &spec["properties"];
        assert_eq!(base["cache"]["properties"]["ttl"]["default"], "10m");
        assert_eq!(
            base["cache"]["properties"]["shared"]["required"],
            serde_json::json!(["url"])
        );
    }

    #[test]
    fn kubernetes_formats_are_matched_like_the_api_server_does() {
        assert!(kubernetes_knows_format(Some("string"), "date-time"));
        assert!(kubernetes_knows_format(None, "uuid"));
        assert!(kubernetes_knows_format(Some("integer"), "int32"));
        assert!(!kubernetes_knows_format(Some("integer"), "uint32"));
        assert!(!kubernetes_knows_format(Some("integer"), "uint64"));
        assert!(!kubernetes_knows_format(Some("number"), "int64"));
        assert!(!kubernetes_knows_format(Some("string"), "int64"));
        assert!(!kubernetes_knows_format(Some("boolean"), "byte"));
    }
}

//! From an LlmEndpoint and an environment to exactly what the sidecar reads: one endpoint
//! file (the sidecar's own `EndpointConfig`, validated by the sidecar's own rules) and the
//! Secret keys to copy beside it. Pure: no API calls, so every rule is unit-tested.

use std::path::PathBuf;

use llmesh_sidecar::config::{
    config_hash, validate, CredentialConfig, EndpointConfig, LimitScope, ProviderKind,
    SidecarConfig, Timeouts, DEFAULT_MAX_REQUEST_BODY_BYTES,
};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::crd::{EndpointSettings, LlmEndpointSpec, Partial, SecretKeyRef, TimeoutSettings};

/// Where the injected sidecar mounts Secret `llmesh-<name>`: `<root>/<name>/<CREDENTIAL_KEY>`.
pub const CREDENTIAL_MOUNT_ROOT: &str = "/var/run/secrets/llmesh";
/// The key under which the provider key is stored in Secret `llmesh-<name>`.
pub const CREDENTIAL_KEY: &str = "apiKey";
/// The key under which the Redis password of shared limits is stored in Secret `llmesh-<name>`.
pub const REDIS_PASSWORD_KEY: &str = "redisPassword";
/// The key under which the Redis password of the shared cache is stored in Secret `llmesh-<name>`.
pub const CACHE_REDIS_PASSWORD_KEY: &str = "cacheRedisPassword";
/// The key of the rendered endpoint in ConfigMap `llmesh-<name>` (one file per endpoint,
/// the sidecar's `--config-dir` layout).
pub const CONFIG_FILE: &str = "endpoint.yaml";

#[derive(Debug, Clone, PartialEq)]
pub struct Rendering {
    pub environment: String,
    pub config: EndpointConfig,
    /// The content of [`CONFIG_FILE`].
    pub yaml: String,
    /// The hash the sidecar reports on `/readyz` once it serves this file.
    pub config_hash: String,
    /// The source Secret keys to copy into Secret `llmesh-<name>`; empty when this
    /// environment needs none.
    pub secrets: Vec<CopiedKey>,
}

/// One Secret key that the sidecar reads from its mounted copy of Secret `llmesh-<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopiedKey {
    /// The key in `llmesh-<name>` ([`CREDENTIAL_KEY`], [`REDIS_PASSWORD_KEY`] or
    /// [`CACHE_REDIS_PASSWORD_KEY`]).
    pub key: &'static str,
    pub source: SecretKeyRef,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("environment {environment}: {field} is not set (neither in spec nor in spec.environments.{environment})")]
    Missing {
        environment: String,
        field: &'static str,
    },
    #[error("environment {environment}: the settings do not combine: {message}")]
    Merge {
        environment: String,
        message: String,
    },
    #[error("environment {environment}: {message}")]
    Invalid {
        environment: String,
        message: String,
    },
}

/// The base settings with the environment's overrides merged over them, field by field
/// (objects merge recursively; lists and values are replaced). An environment that switches
/// to another provider does not inherit the base's provider-specific fields (`baseUrl`,
/// `azure`, `anthropic`, `responses`, `credentialHeader`, `mock`): `dev: {provider: mock}` over a self-hosted base with a
/// `baseUrl` must just work, and another provider's URL or header would be wrong anyway.
pub fn merged_settings(
    spec: &LlmEndpointSpec,
    environment: &str,
) -> Result<EndpointSettings, RenderError> {
    let merge_error = |e: serde_json::Error| RenderError::Merge {
        environment: environment.to_string(),
        message: e.to_string(),
    };
    let Some(overrides) = spec.environments.get(environment) else {
        return Ok(spec.base.clone());
    };
    let mut base = spec.base.clone();
    if overrides.provider.is_some() && overrides.provider != base.provider {
        base.base_url = None;
        base.azure = None;
        base.credential_header = None;
        base.mock = None;
        base.anthropic = None;
        base.responses = None;
    }
    let mut merged = serde_json::to_value(&base).map_err(merge_error)?;
    deep_merge(
        &mut merged,
        serde_json::to_value(overrides).map_err(merge_error)?,
    );
    serde_json::from_value(merged).map_err(merge_error)
}

fn deep_merge(base: &mut Value, overrides: Value) {
    match (base, overrides) {
        (Value::Object(base), Value::Object(overrides)) => {
            for (key, value) in overrides {
                match base.get_mut(&key) {
                    Some(existing) => deep_merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, value) => *base = value,
    }
}

fn parse_block<T: DeserializeOwned>(
    block: Option<&Partial<T>>,
    field: &str,
    environment: &str,
) -> Result<Option<T>, RenderError> {
    block
        .map(|block| {
            block.parse().map_err(|e| RenderError::Invalid {
                environment: environment.to_string(),
                message: format!("{field}: {e}"),
            })
        })
        .transpose()
}

/// Renders LlmEndpoint `name` for `environment`.
pub fn render(
    name: &str,
    spec: &LlmEndpointSpec,
    environment: &str,
) -> Result<Rendering, RenderError> {
    let settings = merged_settings(spec, environment)?;
    let missing = |field| RenderError::Missing {
        environment: environment.to_string(),
        field,
    };
    let provider = settings.provider.ok_or_else(|| missing("provider"))?;
    let model = settings.model.clone().ok_or_else(|| missing("model"))?;
    // The mock provider spends nothing and needs no key, whatever the base says.
    let secret = match provider {
        ProviderKind::Mock => None,
        _ => settings.secret_ref.clone(),
    };
    let mounted = |key: &str| PathBuf::from(CREDENTIAL_MOUNT_ROOT).join(name).join(key);
    let credential = secret.as_ref().map(|_| CredentialConfig {
        file: mounted(CREDENTIAL_KEY),
        header: settings.credential_header.clone(),
    });
    let mut limits =
        parse_block(settings.limits.as_ref(), "limits", environment)?.unwrap_or_default();
    let redis_password = match (&mut limits.redis, limits.scope) {
        (Some(redis), LimitScope::Global) => {
            if redis.password_file.is_some() {
                return Err(set_by_the_operator(
                    "limits.redis.passwordFile",
                    "redisPasswordSecretRef",
                    environment,
                ));
            }
            let source = settings.redis_password_secret_ref.clone();
            if source.is_some() {
                redis.password_file = Some(mounted(REDIS_PASSWORD_KEY));
            }
            source
        }
        _ => None,
    };
    let written_cache = settings.cache.as_ref().and_then(Option::as_ref);
    let mut cache = parse_block(written_cache, "cache", environment)?;
    let cache_redis_password = match cache.as_mut().and_then(|c| c.shared.as_mut()) {
        Some(shared) => {
            if shared.password_file.is_some() {
                return Err(set_by_the_operator(
                    "cache.shared.passwordFile",
                    "cacheRedisPasswordSecretRef",
                    environment,
                ));
            }
            let source = settings.cache_redis_password_secret_ref.clone();
            if source.is_some() {
                shared.password_file = Some(mounted(CACHE_REDIS_PASSWORD_KEY));
            }
            source
        }
        None => None,
    };
    let config = EndpointConfig {
        name: name.to_string(),
        provider,
        base_url: settings.base_url.clone(),
        model,
        aliases: settings.aliases.clone().unwrap_or_default(),
        default: settings.default.unwrap_or(false),
        credential,
        timeouts: timeouts(settings.timeouts),
        max_request_body_bytes: settings
            .max_request_body_bytes
            .unwrap_or(DEFAULT_MAX_REQUEST_BODY_BYTES),
        azure: parse_block(settings.azure.as_ref(), "azure", environment)?
            .filter(|_| provider == ProviderKind::AzureOpenai),
        mock: parse_block(settings.mock.as_ref(), "mock", environment)?
            .filter(|_| provider == ProviderKind::Mock),
        anthropic: parse_block(settings.anthropic.as_ref(), "anthropic", environment)?
            .filter(|_| provider == ProviderKind::Anthropic),
        responses: settings.responses,
        retry: parse_block(settings.retry.as_ref(), "retry", environment)?.unwrap_or_default(),
        fallbacks: settings.fallbacks.clone().unwrap_or_default(),
        circuit_breaker: parse_block(
            settings.circuit_breaker.as_ref(),
            "circuitBreaker",
            environment,
        )?
        .unwrap_or_default(),
        limits,
        cache,
        price: settings.price,
        drop_request_headers: settings.drop_request_headers.clone().unwrap_or_default(),
    };
    validate(&SidecarConfig {
        endpoints: vec![config.clone()],
    })
    .map_err(|errors| RenderError::Invalid {
        environment: environment.to_string(),
        // The sidecar names fields as `endpoints[0].x`; here there is one endpoint.
        message: errors.to_string().replace("endpoints[0].", ""),
    })?;
    let yaml = serde_yaml_ng::to_string(&config).map_err(|e| RenderError::Invalid {
        environment: environment.to_string(),
        message: e.to_string(),
    })?;
    let config_hash = config_hash([(CONFIG_FILE, yaml.as_bytes())]);
    Ok(Rendering {
        environment: environment.to_string(),
        config,
        yaml,
        config_hash,
        secrets: secret
            .map(|source| CopiedKey {
                key: CREDENTIAL_KEY,
                source,
            })
            .into_iter()
            .chain(redis_password.map(|source| CopiedKey {
                key: REDIS_PASSWORD_KEY,
                source,
            }))
            .chain(cache_redis_password.map(|source| CopiedKey {
                key: CACHE_REDIS_PASSWORD_KEY,
                source,
            }))
            .collect(),
    })
}

/// A password file written in the spec would point into a pod the operator does not build:
/// the operator mounts the password given as `secret_ref_field` and sets `field` itself.
fn set_by_the_operator(field: &str, secret_ref_field: &str, environment: &str) -> RenderError {
    RenderError::Invalid {
        environment: environment.to_string(),
        message: format!(
            "{field}: is set by the operator; give the password as {secret_ref_field}"
        ),
    }
}

fn timeouts(settings: Option<TimeoutSettings>) -> Timeouts {
    let mut t = Timeouts::default();
    if let Some(s) = settings {
        t.connect = s.connect.unwrap_or(t.connect);
        t.first_byte = s.first_byte.unwrap_or(t.first_byte);
        t.idle = s.idle.unwrap_or(t.idle);
        t.total = s.total.unwrap_or(t.total);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmesh_sidecar::config::Duration;

    fn spec(yaml: &str) -> LlmEndpointSpec {
        serde_yaml_ng::from_str(yaml).expect("test spec parses")
    }

    const SPEC: &str = "
provider: openai
model: gpt-4o
aliases: [gpt-4o-latest]
secretRef: {name: openai, key: apiKey}
timeouts: {firstByte: 2m, idle: 90s}
environments:
  dev: {provider: mock, mock: {tokenInterval: 20ms}}
  test: {timeouts: {idle: 30s}, aliases: [fast]}
  prod: {secretRef: {name: openai-prod, key: key}, default: true}
";

    #[test]
    fn an_environment_without_overrides_gets_the_base_with_sidecar_defaults() {
        let r = render("chat", &spec(SPEC), "staging").unwrap();
        assert_eq!(r.config.provider, ProviderKind::Openai);
        assert_eq!(r.config.model, "gpt-4o");
        assert_eq!(r.config.timeouts.first_byte, Duration::from_secs(120));
        assert_eq!(r.config.timeouts.connect, Timeouts::default().connect);
        assert_eq!(
            r.config.max_request_body_bytes,
            DEFAULT_MAX_REQUEST_BODY_BYTES
        );
        assert_eq!(
            r.secrets,
            [CopiedKey {
                key: CREDENTIAL_KEY,
                source: SecretKeyRef {
                    name: "openai".into(),
                    key: "apiKey".into()
                }
            }]
        );
        let credential = r.config.credential.unwrap();
        assert_eq!(
            credential.file,
            PathBuf::from("/var/run/secrets/llmesh/chat/apiKey")
        );
    }

    #[test]
    fn dev_as_mock_needs_no_key() {
        let r = render("chat", &spec(SPEC), "dev").unwrap();
        assert_eq!(r.config.provider, ProviderKind::Mock);
        assert_eq!(r.secrets, []);
        assert_eq!(r.config.credential, None);
        assert_eq!(
            r.config.mock.unwrap().token_interval,
            Duration::from_millis(20)
        );
        // The base's model and aliases still apply.
        assert_eq!(r.config.aliases, ["gpt-4o-latest"]);
    }

    #[test]
    fn overrides_merge_field_by_field_and_lists_are_replaced() {
        let r = render("chat", &spec(SPEC), "test").unwrap();
        assert_eq!(r.config.timeouts.idle, Duration::from_secs(30));
        assert_eq!(
            r.config.timeouts.first_byte,
            Duration::from_secs(120),
            "kept from the base"
        );
        assert_eq!(r.config.aliases, ["fast"]);
        let prod = render("chat", &spec(SPEC), "prod").unwrap();
        assert_eq!(
            prod.secrets[0].source,
            SecretKeyRef {
                name: "openai-prod".into(),
                key: "key".into()
            }
        );
        assert!(prod.config.default);
    }

    #[test]
    fn the_hash_is_stable_and_follows_the_content() {
        let a = render("chat", &spec(SPEC), "prod").unwrap();
        let b = render("chat", &spec(SPEC), "prod").unwrap();
        assert_eq!(a.config_hash, b.config_hash);
        assert_eq!(a.config_hash.len(), 64);
        assert_ne!(
            a.config_hash,
            render("chat", &spec(SPEC), "test").unwrap().config_hash
        );
        // The same hash the sidecar computes for a --config-dir holding this one file.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), &a.yaml).unwrap();
        let loaded = llmesh_sidecar::config::ConfigSource::Dir(dir.path().to_path_buf())
            .load()
            .unwrap();
        assert_eq!(loaded.hash, a.config_hash);
        assert_eq!(loaded.config.endpoints[0], a.config);
    }

    #[test]
    fn resilience_blocks_reach_the_sidecar_and_merge_field_by_field() {
        let endpoint = spec(
            "
provider: mock
model: m
retry: {maxAttempts: 5, backoffBase: 1s}
fallbacks: [backup]
limits: {requestsPerMinute: 60, scope: local}
environments:
  prod: {retry: {maxAttempts: 2}, limits: {tokensPerMinute: 1000}}
",
        );
        let test = render("chat", &endpoint, "test").unwrap().config;
        assert_eq!(test.retry.max_attempts, 5);
        assert_eq!(test.retry.backoff_base, Duration::from_secs(1));
        assert_eq!(test.fallbacks, ["backup"]);
        assert_eq!(test.limits.requests_per_minute, Some(60));
        let prod = render("chat", &endpoint, "prod").unwrap().config;
        assert_eq!(prod.retry.max_attempts, 2);
        assert_eq!(
            prod.retry.backoff_base,
            Duration::from_secs(1),
            "kept from the base: blocks merge field by field"
        );
        assert_eq!(prod.limits.requests_per_minute, Some(60));
        assert_eq!(prod.limits.tokens_per_minute, Some(1000));
        assert_eq!(prod.fallbacks, ["backup"]);
        let err = render(
            "chat",
            &spec("{provider: mock, model: m, retry: {maxAttempts: 0}}"),
            "dev",
        )
        .unwrap_err();
        assert!(err.to_string().contains("retry"), "{err}");
    }

    #[test]
    fn the_redis_password_is_copied_and_mounted_only_where_limits_are_shared() {
        let endpoint = spec(
            "
provider: openai
model: gpt-4o
secretRef: {name: openai, key: apiKey}
redisPasswordSecretRef: {name: redis, key: password}
limits:
  requestsPerMinute: 60
  scope: global
  redis: {url: 'redis://redis.llmesh:6379'}
environments:
  dev: {provider: mock, limits: {scope: local, redis: null}}
",
        );
        let prod = render("chat", &endpoint, "prod").unwrap();
        assert_eq!(
            prod.secrets.iter().map(|c| c.key).collect::<Vec<_>>(),
            [CREDENTIAL_KEY, REDIS_PASSWORD_KEY]
        );
        assert_eq!(prod.secrets[1].source.name, "redis");
        let redis = prod.config.limits.redis.unwrap();
        assert_eq!(
            redis.password_file,
            Some(PathBuf::from("/var/run/secrets/llmesh/chat/redisPassword"))
        );
        assert!(prod
            .yaml
            .contains("passwordFile: /var/run/secrets/llmesh/chat/redisPassword"));
        // Dev spends nothing and shares nothing: no key, no password.
        let dev = render("chat", &endpoint, "dev").unwrap();
        assert_eq!(dev.secrets, []);
        assert_eq!(dev.config.limits.redis, None);

        let written = spec(
            "
provider: mock
model: m
limits:
  requestsPerMinute: 60
  scope: global
  redis: {url: 'redis://r:6379', passwordFile: /etc/pw}
",
        );
        assert_eq!(
            render("chat", &written, "prod").unwrap_err().to_string(),
            "environment prod: limits.redis.passwordFile: is set by the operator; give the password as redisPasswordSecretRef"
        );
    }

    const CACHED: &str = "
provider: openai
model: gpt-4o
secretRef: {name: openai, key: apiKey}
cacheRedisPasswordSecretRef: {name: redis, key: password}
cache:
  ttl: 1h
  memory: {maxBytes: 100000000}
  shared: {url: 'redis://redis.llmesh:6379', keyPrefix: shop}
environments:
  dev: {provider: mock, cache: null}
  test: {cache: {shared: null}}
  prod: {cache: {allowSampling: true, shared: {timeout: 250ms}}}
";

    #[test]
    fn the_cache_renders_and_merges_field_by_field_per_environment() {
        let staging = render("chat", &spec(CACHED), "staging").unwrap().config;
        let cache = staging.cache.unwrap();
        assert_eq!(cache.ttl, Duration::from_secs(3600));
        assert_eq!(cache.memory.max_bytes, 100_000_000);
        assert!(!cache.allow_sampling);
        assert_eq!(cache.max_entry_bytes, 1024 * 1024, "the sidecar's default");
        let prod = render("chat", &spec(CACHED), "prod").unwrap().config;
        let cache = prod.cache.unwrap();
        assert!(cache.allow_sampling);
        assert_eq!(cache.ttl, Duration::from_secs(3600), "kept from the base");
        let shared = cache.shared.unwrap();
        assert_eq!(shared.timeout, Duration::from_millis(250));
        assert_eq!(
            (shared.url.as_str(), shared.key_prefix.as_str()),
            ("redis://redis.llmesh:6379", "shop"),
            "kept from the base"
        );
        let test = render("chat", &spec(CACHED), "test").unwrap().config;
        assert_eq!(
            test.cache.unwrap().shared,
            None,
            "`shared: null` removes it"
        );
        let dev = render("chat", &spec(CACHED), "dev").unwrap();
        assert_eq!(dev.config.cache, None, "`cache: null` turns it off");
        assert!(!dev.yaml.contains("cache"), "{}", dev.yaml);
    }

    #[test]
    fn an_environment_may_turn_on_a_cache_the_base_does_not_have() {
        let endpoint = spec("{provider: mock, model: m, environments: {ci: {cache: {}}}}");
        assert_eq!(
            render("chat", &endpoint, "prod").unwrap().config.cache,
            None
        );
        let ci = render("chat", &endpoint, "ci").unwrap();
        assert_eq!(ci.config.cache.unwrap().ttl, Duration::from_secs(600));
        assert!(ci.yaml.contains("cache:"), "{}", ci.yaml);
    }

    #[test]
    fn the_cache_password_is_copied_and_mounted_only_where_the_cache_is_shared() {
        let prod = render("chat", &spec(CACHED), "prod").unwrap();
        assert_eq!(
            prod.secrets.iter().map(|c| c.key).collect::<Vec<_>>(),
            [CREDENTIAL_KEY, CACHE_REDIS_PASSWORD_KEY]
        );
        assert_eq!(
            prod.secrets[1].source,
            SecretKeyRef {
                name: "redis".into(),
                key: "password".into()
            }
        );
        let shared = prod.config.cache.unwrap().shared.unwrap();
        assert_eq!(
            shared.password_file,
            Some(PathBuf::from(
                "/var/run/secrets/llmesh/chat/cacheRedisPassword"
            ))
        );
        assert!(prod
            .yaml
            .contains("passwordFile: /var/run/secrets/llmesh/chat/cacheRedisPassword"));
        // Not shared, or no cache at all: nothing to copy.
        let test = render("chat", &spec(CACHED), "test").unwrap();
        assert_eq!(test.secrets.len(), 1);
        assert_eq!(test.secrets[0].key, CREDENTIAL_KEY);
        assert_eq!(render("chat", &spec(CACHED), "dev").unwrap().secrets, []);
        // Shared without a password: nothing copied, no file.
        let open = spec("{provider: mock, model: m, cache: {shared: {url: 'redis://r:6379'}}}");
        let open = render("chat", &open, "prod").unwrap();
        assert_eq!(open.secrets, []);
        assert_eq!(
            open.config.cache.unwrap().shared.unwrap().password_file,
            None
        );
    }

    #[test]
    fn both_redis_passwords_are_copied_side_by_side() {
        let endpoint = spec(
            "
provider: mock
model: m
redisPasswordSecretRef: {name: redis, key: limits}
cacheRedisPasswordSecretRef: {name: redis, key: cache}
limits: {requestsPerMinute: 60, scope: global, redis: {url: 'redis://r:6379'}}
cache: {shared: {url: 'redis://r:6379/1'}}
",
        );
        let r = render("chat", &endpoint, "prod").unwrap();
        assert_eq!(
            r.secrets
                .iter()
                .map(|c| (c.key, c.source.key.as_str()))
                .collect::<Vec<_>>(),
            [
                (REDIS_PASSWORD_KEY, "limits"),
                (CACHE_REDIS_PASSWORD_KEY, "cache")
            ]
        );
    }

    #[test]
    fn a_cache_password_file_written_in_the_spec_is_refused() {
        let written = spec(
            "
provider: mock
model: m
environments:
  prod: {cache: {shared: {url: 'redis://r:6379', passwordFile: /etc/pw}}}
",
        );
        assert!(render("chat", &written, "dev").is_ok());
        assert_eq!(
            render("chat", &written, "prod").unwrap_err().to_string(),
            "environment prod: cache.shared.passwordFile: is set by the operator; give the password as cacheRedisPasswordSecretRef"
        );
        let err = render(
            "chat",
            &spec("{provider: mock, model: m, cache: {ttl: 1h, size: 3}}"),
            "dev",
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("environment dev: cache: unknown field `size`"),
            "{err}"
        );
    }

    #[test]
    fn an_explicit_null_cache_survives_a_round_trip_and_an_absent_one_stays_absent() {
        let endpoint = spec(CACHED);
        assert_eq!(endpoint.environments["dev"].cache, Some(None));
        assert_eq!(
            endpoint.environments["prod"]
                .cache
                .as_ref()
                .map(Option::is_some),
            Some(true)
        );
        assert_eq!(
            endpoint.environments["test"]
                .cache
                .as_ref()
                .map(Option::is_some),
            Some(true)
        );
        assert_eq!(spec("{provider: mock, model: m}").base.cache, None);
        let json = serde_json::to_value(&endpoint).unwrap();
        assert_eq!(json["environments"]["dev"]["cache"], Value::Null);
        assert!(json["environments"]["dev"]
            .as_object()
            .unwrap()
            .contains_key("cache"));
        let back: LlmEndpointSpec = serde_json::from_value(json).unwrap();
        assert_eq!(back, endpoint);
    }

    #[test]
    fn an_environment_that_switches_provider_drops_the_base_provider_fields() {
        let spec = spec(
            "
provider: openai-compatible
baseUrl: http://vllm.inference:8000/v1
credentialHeader: x-api-key
model: llama
secretRef: {name: vllm, key: token}
environments:
  dev: {provider: mock}
  prod: {model: llama-70b}
",
        );
        let dev = merged_settings(&spec, "dev").unwrap();
        assert_eq!(dev.base_url, None);
        assert_eq!(dev.credential_header, None);
        assert_eq!(dev.model.as_deref(), Some("llama"));
        assert!(render("chat", &spec, "dev").is_ok());
        // The same provider keeps everything.
        let prod = merged_settings(&spec, "prod").unwrap();
        assert_eq!(
            prod.base_url.as_deref(),
            Some("http://vllm.inference:8000/v1")
        );
        assert_eq!(prod.credential_header.as_deref(), Some("x-api-key"));
    }

    #[test]
    fn anthropic_settings_render_and_stay_behind_when_an_environment_switches_provider() {
        let spec = spec(
            "
provider: anthropic
model: claude-sonnet-4-5
secretRef: {name: anthropic, key: apiKey}
anthropic: {version: '2023-06-01'}
responses: translate
environments:
  dev: {provider: mock}
",
        );
        let prod = render("claude", &spec, "prod").unwrap();
        assert_eq!(prod.config.provider, ProviderKind::Anthropic);
        assert_eq!(prod.config.anthropic_version(), "2023-06-01");
        assert!(prod.config.anthropic.is_some());
        let dev = render("claude", &spec, "dev").unwrap();
        assert_eq!(dev.config.provider, ProviderKind::Mock);
        assert_eq!(dev.config.anthropic, None);
        assert_eq!(dev.config.responses, None);
        let err = render("claude", &spec_without_key(), "prod").unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment prod: credential: is required for provider anthropic"
        );
    }

    fn spec_without_key() -> LlmEndpointSpec {
        spec("{provider: anthropic, model: claude-sonnet-4-5}")
    }

    #[test]
    fn what_the_sidecar_would_reject_is_an_error_naming_the_field() {
        let err = render("chat", &spec("{provider: openai, model: gpt-4o}"), "prod").unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment prod: credential: is required for provider openai"
        );
        let err = render("Chat_1", &spec("{provider: mock, model: m}"), "dev").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("environment dev: name: is not a valid name"),
            "{err}"
        );
        let err = render(
            "chat",
            &spec("{provider: mock, environments: {dev: {}}}"),
            "dev",
        )
        .unwrap_err();
        assert_eq!(
            err,
            RenderError::Missing {
                environment: "dev".into(),
                field: "model"
            }
        );
    }

    #[test]
    fn dropped_request_headers_reach_the_sidecar_and_are_checked_by_it() {
        let r = render(
            "chat",
            &spec("{provider: mock, model: m, dropRequestHeaders: [X-Internal-Token]}"),
            "dev",
        )
        .unwrap();
        assert_eq!(r.config.drop_request_headers, ["X-Internal-Token"]);
        assert!(r.yaml.contains("dropRequestHeaders:"), "{}", r.yaml);
        let err = render(
            "chat",
            &spec("{provider: mock, model: m, dropRequestHeaders: ['x: y']}"),
            "dev",
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with(
                "environment dev: dropRequestHeaders[0]: is not a valid HTTP header name"
            ),
            "{err}"
        );
    }
}

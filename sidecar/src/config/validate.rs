//! Checks that serde cannot express: cross-field rules, uniqueness, URL and header syntax.
//! Every error names the field (as a path such as `endpoints[1].timeouts.total`) and the
//! problem. Numbers and durations are shown; strings never are, because a key pasted into the
//! wrong field would otherwise be printed, and on hot reload logged.

use std::collections::HashMap;
use std::fmt;

use http::{HeaderName, Uri};

use super::{CacheConfig, EndpointConfig, LimitScope, ProviderKind, ResponsesMode, SidecarConfig};
use http::HeaderValue;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// All the problems found in one configuration, so that a user fixes them in one pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<ConfigError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

struct Collector {
    errors: Vec<ConfigError>,
}

impl Collector {
    fn fail(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            field: field.into(),
            message: message.into(),
        });
    }
}

pub fn validate(config: &SidecarConfig) -> Result<(), ValidationErrors> {
    let mut c = Collector { errors: Vec::new() };
    if config.endpoints.is_empty() {
        c.fail("endpoints", "at least one endpoint is required");
    }
    // Every name and alias is a routing key; two endpoints claiming one would make routing ambiguous.
    let mut claimed: HashMap<&str, String> = HashMap::new();
    let mut defaults = Vec::new();
    for (i, endpoint) in config.endpoints.iter().enumerate() {
        let at = format!("endpoints[{i}]");
        validate_endpoint(&mut c, &at, endpoint);
        if endpoint.default {
            defaults.push(at.clone());
        }
        let keys = std::iter::once((format!("{at}.name"), endpoint.name.as_str())).chain(
            endpoint
                .aliases
                .iter()
                .enumerate()
                .map(|(j, a)| (format!("{at}.aliases[{j}]"), a.as_str())),
        );
        for (field, key) in keys {
            if let Some(first) = claimed.get(key) {
                c.fail(
                    field,
                    format!("is already used by {first}; names and aliases must be unique"),
                );
            } else {
                claimed.insert(key, field);
            }
        }
    }
    if defaults.len() > 1 {
        c.fail(
            "endpoints",
            format!(
                "at most one endpoint may have default: true, found {}",
                defaults.join(", ")
            ),
        );
    }
    if c.errors.is_empty() {
        Ok(())
    } else {
        Err(ValidationErrors(c.errors))
    }
}

fn validate_endpoint(c: &mut Collector, at: &str, e: &EndpointConfig) {
    if !is_dns_label(&e.name) {
        c.fail(
            format!("{at}.name"),
            "is not a valid name: use 1 to 63 lowercase letters, digits and '-', starting and ending with a letter or digit",
        );
    }
    if e.model.trim().is_empty() {
        c.fail(format!("{at}.model"), "must not be empty");
    }
    for (j, alias) in e.aliases.iter().enumerate() {
        if alias.trim().is_empty() || alias.len() > 256 {
            c.fail(format!("{at}.aliases[{j}]"), "must be 1 to 256 characters");
        }
    }
    if e.max_request_body_bytes == 0 {
        c.fail(
            format!("{at}.maxRequestBodyBytes"),
            "must be greater than 0",
        );
    }
    validate_timeouts(c, at, e);
    validate_provider_fields(c, at, e);
    if let Some(cache) = &e.cache {
        validate_cache(c, &format!("{at}.cache"), cache);
    }
    validate_resilience(c, at, e);
    if let Some(price) = &e.price {
        for (name, value) in [
            ("inputPerMillionTokens", price.input_per_million_tokens),
            ("outputPerMillionTokens", price.output_per_million_tokens),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                c.fail(
                    format!("{at}.price.{name}"),
                    format!("must be a price of 0 or more (got {value})"),
                );
            }
        }
    }
    for (j, header) in e.drop_request_headers.iter().enumerate() {
        if HeaderName::from_bytes(header.as_bytes()).is_err() {
            c.fail(
                format!("{at}.dropRequestHeaders[{j}]"),
                "is not a valid HTTP header name (the name only, e.g. x-internal-token)",
            );
        }
    }
    if let Some(cred) = &e.credential {
        check_secret_file(c, format!("{at}.credential.file"), &cred.file);
        if let Some(header) = &cred.header {
            if HeaderName::from_bytes(header.as_bytes()).is_err() {
                c.fail(
                    format!("{at}.credential.header"),
                    "is not a valid HTTP header name (the name only, e.g. x-api-key)",
                );
            }
        }
    }
}

fn validate_timeouts(c: &mut Collector, at: &str, e: &EndpointConfig) {
    let t = &e.timeouts;
    for (name, value) in [
        ("connect", t.connect),
        ("firstByte", t.first_byte),
        ("idle", t.idle),
        ("total", t.total),
    ] {
        if value.is_zero() {
            c.fail(
                format!("{at}.timeouts.{name}"),
                format!(
                    "must be greater than 0 (got {value:?})",
                    value = value.to_string()
                ),
            );
        }
    }
    if t.first_byte > t.total {
        c.fail(
            format!("{at}.timeouts.firstByte"),
            format!(
                "{} is longer than timeouts.total ({})",
                t.first_byte, t.total
            ),
        );
    }
    if t.connect > t.first_byte {
        c.fail(
            format!("{at}.timeouts.connect"),
            format!(
                "{} is longer than timeouts.firstByte ({})",
                t.connect, t.first_byte
            ),
        );
    }
}

/// Fallbacks are checked for shape only: in `--config-dir` mode an endpoint's file may arrive
/// before its fallback's, so a name not (yet) present is skipped with a warning at run time
/// rather than rejecting the whole configuration.
fn validate_resilience(c: &mut Collector, at: &str, e: &EndpointConfig) {
    let r = &e.retry;
    if !(1..=10).contains(&r.max_attempts) {
        c.fail(
            format!("{at}.retry.maxAttempts"),
            format!("must be between 1 and 10 (got {})", r.max_attempts),
        );
    }
    if r.backoff_base > r.backoff_max {
        c.fail(
            format!("{at}.retry.backoffBase"),
            format!(
                "{} is longer than retry.backoffMax ({})",
                r.backoff_base, r.backoff_max
            ),
        );
    }
    if !(0.0..=10.0).contains(&r.budget.ratio) {
        c.fail(
            format!("{at}.retry.budget.ratio"),
            format!("must be between 0 and 10 (got {})", r.budget.ratio),
        );
    }
    for (j, fallback) in e.fallbacks.iter().enumerate() {
        let field = format!("{at}.fallbacks[{j}]");
        if fallback == &e.name {
            c.fail(field, "is this endpoint itself");
        } else if let Some(first) = e.fallbacks[..j].iter().position(|f| f == fallback) {
            c.fail(field, format!("is listed twice (also fallbacks[{first}])"));
        } else if !is_dns_label(fallback) {
            c.fail(field, "is not a valid endpoint name");
        }
    }
    if e.circuit_breaker.consecutive_failures > 0 && e.circuit_breaker.cooldown.is_zero() {
        c.fail(
            format!("{at}.circuitBreaker.cooldown"),
            "must be greater than 0 while the breaker is on",
        );
    }
    let l = &e.limits;
    for (name, value) in [
        ("requestsPerMinute", l.requests_per_minute),
        ("tokensPerMinute", l.tokens_per_minute),
        ("maxConcurrent", l.max_concurrent.map(u64::from)),
    ] {
        if value == Some(0) {
            c.fail(
                format!("{at}.limits.{name}"),
                "must be at least 1; leave it out for no limit",
            );
        }
    }
    if l.default_max_tokens == 0 {
        c.fail(
            format!("{at}.limits.defaultMaxTokens"),
            "must be at least 1",
        );
    }
    match (l.scope, &l.redis) {
        (LimitScope::Global, None) => c.fail(
            format!("{at}.limits.redis"),
            "is required when limits.scope is global",
        ),
        (LimitScope::Global, Some(redis)) => {
            let at_redis = format!("{at}.limits.redis");
            check_redis(c, &at_redis, &redis.url, redis.password_file.as_deref());
            if redis.timeout.is_zero() {
                c.fail(format!("{at_redis}.timeout"), "must be greater than 0");
            }
            if !l.any_limit() {
                c.fail(
                    format!("{at}.limits.scope"),
                    "global scope needs requestsPerMinute, tokensPerMinute or maxConcurrent",
                );
            }
            if l.max_concurrent.is_some()
                && l.requests_per_minute.is_none()
                && l.tokens_per_minute.is_none()
            {
                c.fail(
                    format!("{at}.limits.maxConcurrent"),
                    "is enforced per sidecar; a global scope needs requestsPerMinute or tokensPerMinute",
                );
            }
        }
        (LimitScope::Local, Some(_)) => c.fail(
            format!("{at}.limits.redis"),
            "is only used with limits.scope: global",
        ),
        (LimitScope::Local, None) => {}
    }
}

/// A Redis URL and its password file. The URL is not echoed: it may carry a password.
fn check_redis(c: &mut Collector, at: &str, url: &str, password_file: Option<&std::path::Path>) {
    let parsed = url
        .starts_with("redis://")
        .then(|| redis::IntoConnectionInfo::into_connection_info(url).ok());
    match (parsed.flatten(), password_file) {
        (None, _) => c.fail(
            format!("{at}.url"),
            "must look like redis://[USER@]HOST:PORT[/DB]",
        ),
        (Some(info), Some(_)) if info.redis_settings().password().is_some() => c.fail(
            format!("{at}.passwordFile"),
            "the URL holds a password too; keep it in one place, the file",
        ),
        (Some(_), Some(file)) => check_secret_file(c, format!("{at}.passwordFile"), file),
        (Some(_), None) => {}
    }
}

fn validate_cache(c: &mut Collector, at: &str, cache: &CacheConfig) {
    if cache.ttl.is_zero() {
        c.fail(format!("{at}.ttl"), "must be greater than 0");
    }
    if cache.max_entry_bytes == 0 {
        c.fail(format!("{at}.maxEntryBytes"), "must be greater than 0");
    }
    if cache.memory.max_bytes == 0 {
        c.fail(format!("{at}.memory.maxBytes"), "must be greater than 0");
    } else if cache.max_entry_bytes > cache.memory.max_bytes / MIN_ENTRIES_IN_MEMORY {
        // The memory level's shards each hold a part of maxBytes: an entry near the whole of
        // it would never be kept.
        c.fail(
            format!("{at}.maxEntryBytes"),
            format!("must be at most memory.maxBytes / {MIN_ENTRIES_IN_MEMORY}, so that the memory level can hold such an answer"),
        );
    }
    if let Some(shared) = &cache.shared {
        let at_shared = format!("{at}.shared");
        check_redis(c, &at_shared, &shared.url, shared.password_file.as_deref());
        if shared.timeout.is_zero() {
            c.fail(format!("{at_shared}.timeout"), "must be greater than 0");
        }
    }
}

/// How many of the largest allowed answers the memory level must be able to hold.
const MIN_ENTRIES_IN_MEMORY: u64 = 16;

fn validate_provider_fields(c: &mut Collector, at: &str, e: &EndpointConfig) {
    let provider = e.provider.as_str();
    match (&e.base_url, e.provider) {
        (Some(_), ProviderKind::Mock) => c.fail(
            format!("{at}.baseUrl"),
            "the mock provider makes no network calls; remove baseUrl",
        ),
        (None, ProviderKind::OpenaiCompatible | ProviderKind::AzureOpenai) => c.fail(
            format!("{at}.baseUrl"),
            format!("is required for provider {provider}"),
        ),
        (Some(url), _) => {
            if let Err(reason) = check_base_url(url) {
                c.fail(format!("{at}.baseUrl"), reason);
            }
        }
        (None, _) => {}
    }
    match (&e.credential, e.provider) {
        (None, ProviderKind::Openai | ProviderKind::AzureOpenai | ProviderKind::Anthropic) => c
            .fail(
                format!("{at}.credential"),
                format!("is required for provider {provider}"),
            ),
        (Some(_), ProviderKind::Mock) => c.fail(
            format!("{at}.credential"),
            "the mock provider takes no credential; remove it",
        ),
        _ => {}
    }
    match (&e.azure, e.provider) {
        (None, ProviderKind::AzureOpenai) => c.fail(
            format!("{at}.azure"),
            "is required for provider azure-openai (it holds apiVersion)",
        ),
        (Some(azure), ProviderKind::AzureOpenai) => {
            if azure.api_version.trim().is_empty() {
                c.fail(format!("{at}.azure.apiVersion"), "must not be empty");
            }
            if let Some(d) = &azure.deployment {
                if d.is_empty()
                    || !d
                        .chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
                {
                    c.fail(
                        format!("{at}.azure.deployment"),
                        "may contain only letters, digits, '-', '_' and '.'",
                    );
                }
            }
        }
        (Some(_), _) => c.fail(
            format!("{at}.azure"),
            format!("only applies to provider azure-openai, not {provider}"),
        ),
        (None, _) => {}
    }
    match (&e.anthropic, e.provider) {
        (Some(a), ProviderKind::Anthropic) if a.version.trim().is_empty() => {
            c.fail(format!("{at}.anthropic.version"), "must not be empty")
        }
        (Some(a), ProviderKind::Anthropic) if HeaderValue::from_str(&a.version).is_err() => c.fail(
            format!("{at}.anthropic.version"),
            "cannot be sent as an HTTP header value",
        ),
        (Some(_), ProviderKind::Anthropic) | (None, _) => {}
        (Some(_), _) => c.fail(
            format!("{at}.anthropic"),
            format!("only applies to provider anthropic, not {provider}"),
        ),
    }
    if e.responses == Some(ResponsesMode::Native) && e.provider == ProviderKind::Anthropic {
        c.fail(
            format!("{at}.responses"),
            "Anthropic has no Responses API; use translate (the default)",
        );
    }
    if e.mock.is_some() && e.provider != ProviderKind::Mock {
        c.fail(
            format!("{at}.mock"),
            format!("only applies to provider mock, not {provider}"),
        );
    }
    if let Some(mock) = &e.mock {
        if mock.completion_tokens == 0 || mock.completion_tokens > 100_000 {
            c.fail(
                format!("{at}.mock.completionTokens"),
                format!("{} is out of range 1..=100000", mock.completion_tokens),
            );
        }
        if mock.embedding_dimensions == 0 || mock.embedding_dimensions > 16_384 {
            c.fail(
                format!("{at}.mock.embeddingDimensions"),
                format!("{} is out of range 1..=16384", mock.embedding_dimensions),
            );
        }
    }
}

fn check_base_url(url: &str) -> Result<(), &'static str> {
    // Looked for before parsing, so that a URL that is also malformed gets this message.
    let authority = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split(['/', '?', '#'])
        .next()
        .unwrap_or_default();
    if authority.contains('@') {
        return Err(
            "must not contain user info (user:password@); credentials go in credential.file",
        );
    }
    let uri: Uri = url.parse().map_err(|_| "is not a valid URL")?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("must start with http:// or https://"),
    }
    if uri.authority().is_none() {
        return Err("has no host");
    }
    if uri.query().is_some() {
        return Err("must not contain a query string");
    }
    Ok(())
}

/// A file holding a secret is named by an absolute path (a mounted Secret key): a key written
/// here by mistake, which would then be shown wherever the path is, fails this check.
fn check_secret_file(c: &mut Collector, field: String, file: &std::path::Path) {
    if file.as_os_str().is_empty() {
        c.fail(field, "must not be empty");
    } else if !file.is_absolute() {
        c.fail(
            field,
            "must be an absolute path, to the file that holds the secret (never the secret itself)",
        );
    }
}

/// The rule for endpoint names (a DNS label), which the operator's webhook applies too: a
/// name fits in a ConfigMap name, a file name and a mount path.
pub fn is_dns_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> SidecarConfig {
        serde_yaml_ng::from_str(yaml).expect("test YAML parses")
    }

    fn errors(yaml: &str) -> Vec<String> {
        match validate(&parse(yaml)) {
            Ok(()) => Vec::new(),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn accepts_a_minimal_mock_config() {
        assert!(errors("endpoints: [{name: chat, provider: mock, model: mock-1}]").is_empty());
    }

    #[test]
    fn names_the_field_and_the_problem() {
        let errs = errors("endpoints: [{name: Chat_1, provider: mock, model: m}]");
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].starts_with("endpoints[0].name: is not a valid name"),
            "{errs:?}"
        );
    }

    #[test]
    fn rejects_duplicate_routing_keys() {
        let errs = errors(
            "endpoints:
              - {name: a, provider: mock, model: m, aliases: [gpt-4o]}
              - {name: b, provider: mock, model: m, aliases: [gpt-4o, a]}",
        );
        assert_eq!(
            errs,
            vec![
                "endpoints[1].aliases[0]: is already used by endpoints[0].aliases[0]; names and aliases must be unique",
                "endpoints[1].aliases[1]: is already used by endpoints[0].name; names and aliases must be unique",
            ]
        );
    }

    #[test]
    fn requires_provider_specific_fields() {
        let errs = errors(
            "endpoints:
              - {name: a, provider: openai, model: gpt-4o}
              - {name: b, provider: azure-openai, model: gpt-4o, credential: {file: /k}}
              - {name: c, provider: openai-compatible, model: llama}",
        );
        assert_eq!(
            errs,
            vec![
                "endpoints[0].credential: is required for provider openai",
                "endpoints[1].baseUrl: is required for provider azure-openai",
                "endpoints[1].azure: is required for provider azure-openai (it holds apiVersion)",
                "endpoints[2].baseUrl: is required for provider openai-compatible",
            ]
        );
    }

    #[test]
    fn rejects_bad_urls_and_credentials_in_them() {
        let errs = errors(
            "endpoints:
              - {name: a, provider: openai-compatible, model: m, baseUrl: 'ftp://x/v1'}
              - {name: b, provider: openai-compatible, model: m, baseUrl: 'https://user:pw@x/v1'}
              - {name: c, provider: openai-compatible, model: m, baseUrl: 'not a url'}",
        );
        assert_eq!(
            errs,
            vec![
                "endpoints[0].baseUrl: must start with http:// or https://",
                "endpoints[1].baseUrl: must not contain user info (user:password@); credentials go in credential.file",
                "endpoints[2].baseUrl: is not a valid URL",
            ]
        );
    }

    #[test]
    fn checks_timeout_order() {
        let errs = errors(
            "endpoints: [{name: a, provider: mock, model: m, timeouts: {firstByte: 20m, total: 10m, idle: 0s}}]",
        );
        assert_eq!(
            errs,
            vec![
                "endpoints[0].timeouts.idle: must be greater than 0 (got \"0s\")",
                "endpoints[0].timeouts.firstByte: 20m is longer than timeouts.total (10m)",
            ]
        );
    }

    #[test]
    fn allows_one_default_only() {
        let errs = errors(
            "endpoints:
              - {name: a, provider: mock, model: m, default: true}
              - {name: b, provider: mock, model: m, default: true}",
        );
        assert_eq!(
            errs,
            vec!["endpoints: at most one endpoint may have default: true, found endpoints[0], endpoints[1]"]
        );
    }

    #[test]
    fn mock_takes_no_credential_or_url() {
        let errs = errors(
            "endpoints: [{name: a, provider: mock, model: m, baseUrl: 'http://x', credential: {file: /k}}]",
        );
        assert_eq!(errs.len(), 2, "{errs:?}");
    }

    #[test]
    fn checks_retry_fallbacks_breaker_and_limits() {
        let errs = errors(
            "endpoints:
              - name: a
                provider: mock
                model: m
                retry: {maxAttempts: 0, backoffBase: 1m, backoffMax: 1s}
                fallbacks: [a, b, b]
                circuitBreaker: {consecutiveFailures: 3, cooldown: 0s}
                limits: {requestsPerMinute: 0, scope: global}
              - name: b
                provider: mock
                model: m
                limits: {scope: global, redis: {url: 'redis://:s3cret@[bad'}}",
        );
        assert_eq!(
            errs,
            vec![
                "endpoints[0].retry.maxAttempts: must be between 1 and 10 (got 0)",
                "endpoints[0].retry.backoffBase: 1m is longer than retry.backoffMax (1s)",
                "endpoints[0].fallbacks[0]: is this endpoint itself",
                "endpoints[0].fallbacks[2]: is listed twice (also fallbacks[1])",
                "endpoints[0].circuitBreaker.cooldown: must be greater than 0 while the breaker is on",
                "endpoints[0].limits.requestsPerMinute: must be at least 1; leave it out for no limit",
                "endpoints[0].limits.redis: is required when limits.scope is global",
                "endpoints[1].limits.redis.url: must look like redis://[USER@]HOST:PORT[/DB]",
                "endpoints[1].limits.scope: global scope needs requestsPerMinute, tokensPerMinute or maxConcurrent",
            ]
        );
        assert!(
            !errs.concat().contains("s3cret"),
            "a Redis password is not echoed"
        );
    }

    #[test]
    fn cache_settings_are_checked() {
        let errs = errors(
            "endpoints:
              - name: a
                provider: mock
                model: m
                cache: {ttl: 0s, maxEntryBytes: 1000000, memory: {maxBytes: 1000000},
                        shared: {url: 'http://nope', timeout: 0s}}
              - name: b
                provider: mock
                model: m
                cache: {shared: {url: 'redis://:pw@127.0.0.1:6379', passwordFile: /p}}",
        );
        assert_eq!(
            errs,
            [
                "endpoints[0].cache.ttl: must be greater than 0",
                "endpoints[0].cache.maxEntryBytes: must be at most memory.maxBytes / 16, so that the memory level can hold such an answer",
                "endpoints[0].cache.shared.url: must look like redis://[USER@]HOST:PORT[/DB]",
                "endpoints[0].cache.shared.timeout: must be greater than 0",
                "endpoints[1].cache.shared.passwordFile: the URL holds a password too; keep it in one place, the file",
            ]
        );
        assert!(errors("endpoints: [{name: a, provider: mock, model: m, cache: {}}]").is_empty());
    }

    #[test]
    fn a_redis_password_lives_in_one_place() {
        let errs = errors(
            "endpoints:
              - name: a
                provider: mock
                model: m
                limits:
                  requestsPerMinute: 60
                  scope: global
                  redis: {url: 'redis://:s3cret@127.0.0.1:6379', passwordFile: /p}
              - name: b
                provider: mock
                model: m
                limits:
                  requestsPerMinute: 60
                  scope: global
                  redis: {url: 'redis://limits@127.0.0.1:6379/2', passwordFile: /p}",
        );
        assert_eq!(
            errs,
            vec![
                "endpoints[0].limits.redis.passwordFile: the URL holds a password too; keep it in one place, the file"
            ]
        );
        assert!(!errs.concat().contains("s3cret"));
    }

    /// A key written where a string is expected: every such field gets an error that names
    /// it and does not repeat the key.
    #[test]
    fn a_key_in_any_string_field_is_never_repeated() {
        const KEY: &str = "sk-proj-Zq81SecretKeyMaterial";
        let hostile = [
            ("name", format!("name: '{KEY}'")),
            ("aliases[1]", format!("aliases: ['{KEY}', '{KEY}']")),
            ("aliases[0]", format!("aliases: ['{KEY}{}']", "x".repeat(300))),
            ("fallbacks[0]", format!("fallbacks: ['{KEY} x']")),
            ("baseUrl", format!("baseUrl: 'https://user:{KEY}@api.example.com/v1'")),
            ("baseUrl", format!("baseUrl: 'https://{KEY}@api.example.com/v1'")),
            ("baseUrl", format!("baseUrl: '{KEY}:pw@host'")),
            ("baseUrl", format!("baseUrl: 'https://user:{KEY} x@host/v1'")),
            ("baseUrl", format!("baseUrl: 'https://host/v1?key={KEY}'")),
            ("baseUrl", format!("baseUrl: '{KEY}'")),
            ("credential.file", format!("credential: {{file: '{KEY}'}}")),
            ("dropRequestHeaders[1]", format!("dropRequestHeaders: [cookie, 'x-token: {KEY}']")),
            ("credential.header", format!("credential: {{file: /k, header: 'Bearer {KEY}'}}")),
            ("azure.deployment", format!("azure: {{apiVersion: v, deployment: '{KEY}/x'}}")),
            (
                "limits.redis.passwordFile",
                format!("limits: {{requestsPerMinute: 1, scope: global, redis: {{url: 'redis://h:1', passwordFile: '{KEY}'}}}}"),
            ),
            (
                "limits.redis.url",
                format!("limits: {{requestsPerMinute: 1, scope: global, redis: {{url: 'redis://:{KEY}@[h'}}}}"),
            ),
        ];
        for (field, yaml) in hostile {
            let rest = if field.starts_with("azure") {
                "provider: azure-openai, baseUrl: 'https://r.example.com', credential: {file: /k}"
            } else if field.starts_with("baseUrl") {
                "provider: openai-compatible"
            } else {
                "provider: openai-compatible, baseUrl: 'http://h/v1'"
            };
            let name = if field == "name" { "" } else { "name: a, " };
            let errs =
                errors(&format!("endpoints: [{{{name}model: m, {rest}, {yaml}}}]")).join("; ");
            assert!(!errs.contains("Zq81Secret"), "{field}: {errs}");
            assert!(
                errs.contains(&format!("endpoints[0].{field}: ")),
                "{field} not named: {errs}"
            );
        }
    }

    #[test]
    fn secret_files_are_absolute_paths() {
        let errs = errors(
            "endpoints:
              - {name: a, provider: openai, model: m, credential: {file: keys/openai}}
              - {name: b, provider: openai, model: m, credential: {file: /run/secrets/openai}}",
        );
        assert_eq!(
            errs,
            vec!["endpoints[0].credential.file: must be an absolute path, to the file that holds the secret (never the secret itself)"]
        );
    }
}

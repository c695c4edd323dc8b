//! Checks that serde cannot express: cross-field rules, uniqueness, URL and header syntax.
//! Every error names the field (as a path such as `endpoints[1].timeouts.total`) and the value.

use std::collections::HashMap;
use std::fmt;

use http::{HeaderName, Uri};

use super::{EndpointConfig, LimitScope, ProviderKind, SidecarConfig};

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
            defaults.push(endpoint.name.as_str());
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
                    format!("{key:?} is already used by {first}; names and aliases must be unique"),
                );
            } else {
                claimed.insert(key, field);
            }
        }
    }
    if defaults.len() > 1 {
        c.fail(
            "endpoints",
            format!("at most one endpoint may have default: true, found {defaults:?}"),
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
            format!(
                "{:?} is not a valid name: use 1 to 63 lowercase letters, digits and '-', starting and ending with a letter or digit",
                e.name
            ),
        );
    }
    if e.model.trim().is_empty() {
        c.fail(format!("{at}.model"), "must not be empty");
    }
    for (j, alias) in e.aliases.iter().enumerate() {
        if alias.trim().is_empty() || alias.len() > 256 {
            c.fail(
                format!("{at}.aliases[{j}]"),
                format!("{alias:?} must be 1 to 256 characters"),
            );
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
    if let Some(cred) = &e.credential {
        if cred.file.as_os_str().is_empty() {
            c.fail(format!("{at}.credential.file"), "must not be empty");
        }
        if let Some(header) = &cred.header {
            if HeaderName::from_bytes(header.as_bytes()).is_err() {
                c.fail(
                    format!("{at}.credential.header"),
                    format!("{header:?} is not a valid HTTP header name"),
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
        if fallback == &e.name {
            c.fail(
                format!("{at}.fallbacks[{j}]"),
                format!("{fallback:?} is this endpoint itself"),
            );
        } else if e.fallbacks[..j].contains(fallback) {
            c.fail(
                format!("{at}.fallbacks[{j}]"),
                format!("{fallback:?} is listed twice"),
            );
        } else if !is_dns_label(fallback) {
            c.fail(
                format!("{at}.fallbacks[{j}]"),
                format!("{fallback:?} is not a valid endpoint name"),
            );
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
            // The URL is not echoed: it may carry a password.
            let parsed = redis
                .url
                .starts_with("redis://")
                .then(|| redis::IntoConnectionInfo::into_connection_info(redis.url.as_str()).ok());
            match (parsed.flatten(), &redis.password_file) {
                (None, _) => c.fail(
                    format!("{at}.limits.redis.url"),
                    "must look like redis://[USER@]HOST:PORT[/DB]",
                ),
                (Some(info), Some(_)) if info.redis_settings().password().is_some() => c.fail(
                    format!("{at}.limits.redis.passwordFile"),
                    "the URL holds a password too; keep it in one place, the file",
                ),
                (Some(_), Some(file)) if file.as_os_str().is_empty() => c.fail(
                    format!("{at}.limits.redis.passwordFile"),
                    "must not be empty",
                ),
                (Some(_), _) => {}
            }
            if redis.timeout.is_zero() {
                c.fail(
                    format!("{at}.limits.redis.timeout"),
                    "must be greater than 0",
                );
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
                c.fail(format!("{at}.baseUrl"), format!("{url:?} {reason}"));
            }
        }
        (None, _) => {}
    }
    match (&e.credential, e.provider) {
        (None, ProviderKind::Openai | ProviderKind::AzureOpenai) => c.fail(
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
                        format!("{d:?} may contain only letters, digits, '-', '_' and '.'"),
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
    let uri: Uri = url.parse().map_err(|_| "is not a valid URL")?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("must start with http:// or https://"),
    }
    let authority = uri.authority().ok_or("has no host")?;
    if authority.as_str().contains('@') {
        return Err("must not contain user info; put credentials in credential.file");
    }
    if uri.query().is_some() {
        return Err("must not contain a query string");
    }
    Ok(())
}

fn is_dns_label(s: &str) -> bool {
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
    fn names_the_field_and_value() {
        let errs = errors("endpoints: [{name: Chat_1, provider: mock, model: m}]");
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].starts_with("endpoints[0].name: \"Chat_1\""),
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
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].starts_with(
            "endpoints[1].aliases[0]: \"gpt-4o\" is already used by endpoints[0].aliases[0]"
        ));
        assert!(errs[1]
            .starts_with("endpoints[1].aliases[1]: \"a\" is already used by endpoints[0].name"));
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
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs[0].contains("must start with http"));
        assert!(errs[1].contains("must not contain user info"));
        assert!(errs[2].contains("is not a valid URL"));
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
            vec!["endpoints: at most one endpoint may have default: true, found [\"a\", \"b\"]"]
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
                "endpoints[0].fallbacks[0]: \"a\" is this endpoint itself",
                "endpoints[0].fallbacks[2]: \"b\" is listed twice",
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
}

//! Configuration comes from files anyone with access to a ConfigMap (or a mistyped
//! `--config`) can fill: loading must never panic, what loads must read back the same, and
//! an error must never repeat a secret that was written where it does not belong.

use std::path::PathBuf;

use proptest::collection::vec;
use proptest::option::weighted;
use proptest::prelude::*;
use serde_yaml_ng::{Mapping, Value};

use super::*;

fn file_source() -> ConfigSource {
    ConfigSource::File(PathBuf::from("/etc/llmesh/config.yaml"))
}

fn dir_source() -> ConfigSource {
    ConfigSource::Dir(PathBuf::from("/etc/llmesh/endpoints"))
}

/// Parses `files` as the files of `source`, with no filesystem involved.
fn parse(source: &ConfigSource, files: Vec<Vec<u8>>) -> Result<LoadedConfig, LoadError> {
    let files = files
        .into_iter()
        .enumerate()
        .map(|(i, bytes)| (source.path().join(format!("{i}.yaml")), bytes))
        .collect();
    RawConfig { files }.parse(source)
}

fn yaml(value: &Value) -> Vec<u8> {
    serde_yaml_ng::to_string(value).unwrap().into_bytes()
}

fn string(s: impl Into<String>) -> Value {
    Value::String(s.into())
}

/// Any YAML value, to put where the schema expects something else.
fn anything() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 3, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..3).prop_map(Value::Sequence),
            vec((any::<String>(), inner), 0..3).prop_map(|pairs| Value::Mapping(
                pairs.into_iter().map(|(k, v)| (string(k), v)).collect()
            )),
        ]
    })
    .boxed()
}

/// A duration in the config's syntax, from 1 ms to its 720 h maximum.
fn duration_text(min_ms: u64) -> impl Strategy<Value = String> {
    (min_ms.max(1)..=30 * 24 * 3_600_000u64, 0usize..4).prop_map(|(ms, unit)| {
        let (per_unit, suffix) = [(1, "ms"), (1000, "s"), (60_000, "m"), (3_600_000, "h")][unit];
        // Rounded up to the unit, so never below `min_ms`.
        format!("{}{suffix}", ms.div_ceil(per_unit))
    })
}

fn mapping_of(fields: Vec<(&str, Option<Value>)>) -> Value {
    Value::Mapping(
        fields
            .into_iter()
            .filter_map(|(k, v)| Some((string(k), v?)))
            .collect(),
    )
}

/// Everything about an endpoint that does not depend on its provider: each field present
/// or not, always within its valid range.
fn common_fields() -> impl Strategy<Value = Vec<(&'static str, Option<Value>)>> {
    let timeouts = (1u64..10_000, 1u64..600_000, 1u64..600_000, 1u64..1_200_000).prop_map(
        |(connect, a, b, c)| {
            // connect <= firstByte <= total.
            let mut ms = [connect, a, c];
            ms.sort_unstable();
            mapping_of(vec![
                ("connect", Some(string(format!("{}ms", ms[0])))),
                ("firstByte", Some(string(format!("{}ms", ms[1])))),
                ("idle", Some(string(format!("{b}ms")))),
                ("total", Some(string(format!("{}ms", ms[2])))),
            ])
        },
    );
    let retry = (
        1u32..=10,
        1u64..60_000,
        0u64..60_000,
        0.0..=10.0f64,
        any::<u32>(),
    )
        .prop_map(|(attempts, base, extra, ratio, min_per_second)| {
            mapping_of(vec![
                ("maxAttempts", Some(Value::from(attempts))),
                ("backoffBase", Some(string(format!("{base}ms")))),
                ("backoffMax", Some(string(format!("{}ms", base + extra)))),
                (
                    "budget",
                    Some(mapping_of(vec![
                        ("ratio", Some(Value::from(ratio))),
                        ("minPerSecond", Some(Value::from(min_per_second))),
                    ])),
                ),
            ])
        });
    let breaker = (any::<u32>(), duration_text(1)).prop_map(|(failures, cooldown)| {
        mapping_of(vec![
            ("consecutiveFailures", Some(Value::from(failures))),
            ("cooldown", Some(string(cooldown))),
        ])
    });
    let limit = || weighted(0.5, (1u64..=u64::MAX).prop_map(Value::from));
    let limits = (
        limit(),
        limit(),
        weighted(0.5, (1u32..=u32::MAX).prop_map(Value::from)),
        1u32..=u32::MAX,
        duration_text(0),
        any::<u32>(),
        any::<bool>(),
        prop::sample::select(&["failOpen", "failClosed"][..]),
    )
        .prop_map(
            |(rpm, tpm, concurrent, max_tokens, queue, queued, global, policy)| {
                // Global limits need Redis and a shared (per-minute) limit.
                let rpm = if global && tpm.is_none() {
                    rpm.or(Some(Value::from(60)))
                } else {
                    rpm
                };
                let redis = global.then(|| {
                    mapping_of(vec![
                        ("url", Some(string("redis://127.0.0.1:6379/0"))),
                        ("passwordFile", Some(string("/run/secrets/redis"))),
                        ("onUnavailable", Some(string(policy))),
                    ])
                });
                mapping_of(vec![
                    ("requestsPerMinute", rpm),
                    ("tokensPerMinute", tpm),
                    ("maxConcurrent", concurrent),
                    ("defaultMaxTokens", Some(Value::from(max_tokens))),
                    ("queueTimeout", Some(string(queue))),
                    ("maxQueued", Some(Value::from(queued))),
                    (
                        "scope",
                        Some(string(if global { "global" } else { "local" })),
                    ),
                    ("redis", redis),
                ])
            },
        );
    let price = (0.0..1000.0f64, 0.0..1000.0f64).prop_map(|(input, output)| {
        mapping_of(vec![
            ("inputPerMillionTokens", Some(Value::from(input))),
            ("outputPerMillionTokens", Some(Value::from(output))),
        ])
    });
    (
        weighted(0.5, timeouts),
        weighted(0.3, retry),
        weighted(0.3, breaker),
        weighted(0.3, limits),
        weighted(0.3, price),
        weighted(0.3, (1u64..=u64::MAX).prop_map(Value::from)),
        "[a-z][a-z0-9 ._/-]{0,20}",
    )
        .prop_map(
            |(timeouts, retry, breaker, limits, price, max_body, model)| {
                vec![
                    ("model", Some(string(model))),
                    ("timeouts", timeouts),
                    ("retry", retry),
                    ("circuitBreaker", breaker),
                    ("limits", limits),
                    ("price", price),
                    ("maxRequestBodyBytes", max_body),
                ]
            },
        )
}

/// The provider and the fields that go with it.
fn provider_fields() -> impl Strategy<Value = Vec<(&'static str, Option<Value>)>> {
    let credential = || {
        weighted(
            0.5,
            prop::sample::select(&["x-api-key", "api-key", "authorization"][..]),
        )
        .prop_map(|header| {
            mapping_of(vec![
                ("file", Some(string("/var/run/secrets/llmesh/key"))),
                ("header", header.map(string)),
            ])
        })
    };
    let url = prop::sample::select(
        &[
            "https://api.openai.com/v1",
            "http://127.0.0.1:8000/v1",
            "http://vllm.inference.svc:8000/v1",
            "https://res.openai.azure.com",
        ][..],
    )
    .prop_map(string);
    prop_oneof![
        (weighted(0.5, url.clone()), credential()).prop_map(|(url, credential)| vec![
            ("provider", Some(string("openai"))),
            ("baseUrl", url),
            ("credential", Some(credential)),
        ]),
        (url.clone(), weighted(0.5, credential())).prop_map(|(url, credential)| vec![
            ("provider", Some(string("openai-compatible"))),
            ("baseUrl", Some(url)),
            ("credential", credential),
        ]),
        (url, credential(), weighted(0.5, "[a-zA-Z0-9._-]{1,20}")).prop_map(
            |(url, credential, deployment)| vec![
                ("provider", Some(string("azure-openai"))),
                ("baseUrl", Some(url)),
                ("credential", Some(credential)),
                (
                    "azure",
                    Some(mapping_of(vec![
                        ("apiVersion", Some(string("2024-10-21"))),
                        ("deployment", deployment.map(string)),
                    ])),
                ),
            ]
        ),
        weighted(
            0.5,
            (
                duration_text(0),
                duration_text(0),
                1u32..=100_000,
                1u32..=16_384
            )
        )
        .prop_map(|mock| vec![
            ("provider", Some(string("mock"))),
            (
                "mock",
                mock.map(|(latency, interval, tokens, dimensions)| mapping_of(vec![
                    ("latency", Some(string(latency))),
                    ("tokenInterval", Some(string(interval))),
                    ("completionTokens", Some(Value::from(tokens))),
                    ("embeddingDimensions", Some(Value::from(dimensions))),
                ])),
            ),
        ]),
    ]
}

/// A valid endpoint named `name`, which may fall back to `others`.
fn valid_endpoint(name: String, others: Vec<String>) -> impl Strategy<Value = Value> {
    let most_fallbacks = others.len().min(2);
    (
        provider_fields(),
        common_fields(),
        proptest::sample::subsequence(others, 0..=most_fallbacks),
        vec("[a-z0-9._-]{1,12}", 0..3),
    )
        .prop_map(move |(provider, common, fallbacks, aliases)| {
            let mut map = vec![("name", Some(string(name.clone())))];
            map.extend(provider);
            map.extend(common);
            let aliases: Vec<Value> = aliases
                .into_iter()
                .enumerate()
                .map(|(i, a)| string(format!("{name}.{a}{i}")))
                .collect();
            map.push((
                "aliases",
                (!aliases.is_empty()).then_some(Value::Sequence(aliases)),
            ));
            map.push((
                "fallbacks",
                (!fallbacks.is_empty())
                    .then(|| Value::Sequence(fallbacks.into_iter().map(string).collect())),
            ));
            mapping_of(map)
        })
}

/// 1 to 3 valid endpoints with distinct names, at most one of them the default.
fn valid_endpoints() -> impl Strategy<Value = Vec<Value>> {
    (1usize..4, any::<prop::sample::Index>(), any::<bool>()).prop_flat_map(
        |(n, default, has_default)| {
            let names: Vec<String> = (0..n).map(|i| format!("endpoint-{i}")).collect();
            let endpoints: Vec<_> = names
                .iter()
                .map(|name| {
                    let others = names.iter().filter(|o| *o != name).cloned().collect();
                    valid_endpoint(name.clone(), others)
                })
                .collect();
            endpoints.prop_map(move |mut endpoints| {
                if has_default {
                    if let Value::Mapping(map) = &mut endpoints[default.index(n)] {
                        map.insert(string("default"), Value::Bool(true));
                    }
                }
                endpoints
            })
        },
    )
}

/// One change that may make a configuration invalid.
#[derive(Debug, Clone)]
enum Mutation {
    /// Any value in place of a value (or of a key, for a mapping entry).
    Replace(Value),
    /// A value at an edge: zero, negative, huge, not a number, empty.
    Edge(Value),
    /// The entry (or item) removed.
    Remove,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        anything().prop_map(Mutation::Replace),
        prop::sample::select(
            &[
                "0",
                "-1",
                "18446744073709551615",
                "-9223372036854775808",
                "1e300",
                ".nan",
                ".inf",
                "-.inf",
                "''",
                "0s",
                "721h",
                "99999999999999999999h",
                "null",
                "[]",
                "{}",
            ][..]
        )
        .prop_map(|yaml| Mutation::Edge(serde_yaml_ng::from_str(yaml).unwrap())),
        Just(Mutation::Remove),
    ]
}

/// Places in `value` a mutation can hit: every scalar and every mapping key.
fn slots(value: &Value) -> usize {
    match value {
        Value::Sequence(items) => items.iter().map(slots).sum(),
        Value::Mapping(map) => map.iter().map(|(_, v)| 1 + slots(v)).sum(),
        Value::Tagged(tagged) => slots(&tagged.value),
        _ => 1,
    }
}

/// Applies `mutation` at slot number `*at` (counting down, as in [`slots`]).
fn mutate(value: &mut Value, at: &mut usize, mutation: &Mutation) {
    match value {
        Value::Sequence(items) => {
            let mut kept = Vec::new();
            for mut item in std::mem::take(items) {
                let hit = *at == 0 && matches!(mutation, Mutation::Remove);
                mutate(&mut item, at, mutation);
                if !hit {
                    kept.push(item);
                }
            }
            *items = kept;
        }
        Value::Mapping(map) => {
            let mut kept = Mapping::new();
            for (key, mut item) in std::mem::take(map) {
                let key = match (*at, mutation) {
                    (0, Mutation::Remove) => {
                        *at = at.wrapping_sub(1);
                        continue;
                    }
                    // YAML can write a sequence or mapping as a key, libyaml's emitter cannot.
                    (0, Mutation::Replace(v) | Mutation::Edge(v))
                        if !matches!(v, Value::Sequence(_) | Value::Mapping(_)) =>
                    {
                        v.clone()
                    }
                    _ => key,
                };
                *at = at.wrapping_sub(1);
                mutate(&mut item, at, mutation);
                kept.insert(key, item);
            }
            *map = kept;
        }
        Value::Tagged(tagged) => mutate(&mut tagged.value, at, mutation),
        _ => {
            if *at == 0 {
                if let Mutation::Replace(v) | Mutation::Edge(v) = mutation {
                    *value = v.clone();
                }
            }
            *at = at.wrapping_sub(1);
        }
    }
}

/// Valid endpoints, changed in up to three places (often in none).
fn endpoints() -> impl Strategy<Value = Vec<Value>> {
    let change = (
        any::<prop::sample::Index>(),
        any::<prop::sample::Index>(),
        mutation(),
    );
    let changes = prop_oneof![Just(Vec::new()), vec(change, 1..4)];
    (valid_endpoints(), changes).prop_map(|(mut endpoints, changes)| {
        for (which, slot, mutation) in &changes {
            let n = endpoints.len();
            let endpoint = &mut endpoints[which.index(n)];
            let places = slots(endpoint);
            if places > 0 {
                let mut at = slot.index(places);
                mutate(endpoint, &mut at, mutation);
            }
        }
        endpoints
    })
}

fn config_document() -> impl Strategy<Value = Value> {
    prop_oneof![
        8 => endpoints().prop_map(|endpoints| {
            Value::Mapping(Mapping::from_iter([(string("endpoints"), Value::Sequence(endpoints))]))
        }),
        1 => anything(),
    ]
}

/// What loaded must survive the trip the operator makes: serialized, then loaded again.
fn reads_back_the_same(loaded: &LoadedConfig) -> Result<(), TestCaseError> {
    prop_assert!(validate(&loaded.config).is_ok());
    let text = serde_yaml_ng::to_string(&loaded.config).unwrap();
    let again = parse(&file_source(), vec![text.clone().into_bytes()]);
    prop_assert!(
        again.is_ok(),
        "{} did not load again: {:?}",
        text,
        again.err()
    );
    prop_assert_eq!(&again.unwrap().config, &loaded.config);
    Ok(())
}

proptest! {
    #![proptest_config(crate::proptest_config::config())]

    #[test]
    fn any_bytes_load_or_fail_cleanly(files in vec(vec(any::<u8>(), 0..512), 1..3)) {
        let _ = parse(&file_source(), files[..1].to_vec());
        let _ = parse(&dir_source(), files);
    }

    #[test]
    fn valid_configurations_load_and_read_back(endpoints in valid_endpoints()) {
        let document = Mapping::from_iter([(string("endpoints"), Value::Sequence(endpoints))]);
        let loaded = parse(&file_source(), vec![yaml(&Value::Mapping(document))]);
        prop_assert!(loaded.is_ok(), "{:?}", loaded.err());
        reads_back_the_same(&loaded.unwrap())?;
    }

    #[test]
    fn config_files_load_or_fail_cleanly(document in config_document(), as_json in any::<bool>()) {
        // JSON, where it can say the same (its keys are strings only).
        let bytes = match as_json.then(|| serde_json::to_vec(&document).ok()).flatten() {
            Some(json) => json,
            None => yaml(&document),
        };
        if let Ok(loaded) = parse(&file_source(), vec![bytes]) {
            reads_back_the_same(&loaded)?;
        }
    }

    #[test]
    fn endpoint_files_load_or_fail_cleanly(endpoints in endpoints()) {
        let files = endpoints.iter().map(yaml).collect();
        if let Ok(loaded) = parse(&dir_source(), files) {
            reads_back_the_same(&loaded)?;
        }
    }
}

/// Where users put a key by mistake.
#[derive(Debug, Clone, Copy)]
enum Misplaced {
    /// `--config` pointing at the key file itself.
    WholeFile,
    /// A `.env` file: `OPENAI_API_KEY=sk-...`.
    EnvFile,
    /// `credential: sk-...` instead of `credential: {file: ...}`.
    InlineCredential,
    /// `credential: {key: sk-...}`.
    CredentialField,
    /// `credential.header: "Authorization: Bearer sk-..."`.
    CredentialHeader,
    /// `baseUrl: https://user:sk-...@host/v1`.
    UrlUserInfo,
    /// `baseUrl: https://host/v1?api-key=sk-...`.
    UrlQuery,
    /// `apiKey: sk-...` next to the known fields.
    UnknownField,
    /// `limits.redis.url: rediss://:sk-...@host` (an unsupported scheme, with a password).
    RedisUrl,
    /// `credential: {sk-...}`: braces make the key a mapping's key.
    MappingKey,
}

const MISPLACED: &[Misplaced] = &[
    Misplaced::WholeFile,
    Misplaced::EnvFile,
    Misplaced::InlineCredential,
    Misplaced::CredentialField,
    Misplaced::CredentialHeader,
    Misplaced::UrlUserInfo,
    Misplaced::UrlQuery,
    Misplaced::UnknownField,
    Misplaced::RedisUrl,
    Misplaced::MappingKey,
];

fn secret() -> impl Strategy<Value = String> {
    prop_oneof![
        "sk-[A-Za-z0-9]{20,48}",
        "sk-proj-[A-Za-z0-9_-]{40,80}",
        "sk-ant-api03-[A-Za-z0-9_-]{40,80}",
        "[0-9a-f]{32}",
    ]
}

/// One endpoint file (or, for `WholeFile` and `EnvFile`, the file's bytes) with `secret`
/// written at `place`.
fn with_secret(place: Misplaced, secret: &str) -> Vec<u8> {
    let mut endpoint: Mapping = [
        ("name", string("chat")),
        ("provider", string("openai")),
        ("model", string("gpt-4o")),
        (
            "credential",
            Value::Mapping(Mapping::from_iter([(string("file"), string("/k"))])),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (string(k), v))
    .collect();
    let mut set = |key: &str, value: Value| endpoint.insert(string(key), value);
    match place {
        Misplaced::WholeFile => return format!("{secret}\n").into_bytes(),
        Misplaced::EnvFile => return format!("OPENAI_API_KEY={secret}\n").into_bytes(),
        Misplaced::InlineCredential => set("credential", string(secret)),
        Misplaced::CredentialField => set(
            "credential",
            Value::Mapping(Mapping::from_iter([(string("key"), string(secret))])),
        ),
        Misplaced::CredentialHeader => set(
            "credential",
            Value::Mapping(Mapping::from_iter([
                (string("file"), string("/k")),
                (string("header"), string(format!("Authorization: Bearer {secret}"))),
            ])),
        ),
        Misplaced::UrlUserInfo => set("baseUrl", string(format!("https://user:{secret}@host/v1"))),
        Misplaced::UrlQuery => set("baseUrl", string(format!("https://host/v1?api-key={secret}"))),
        Misplaced::UnknownField => set("apiKey", string(secret)),
        Misplaced::MappingKey => set(
            "credential",
            Value::Mapping(Mapping::from_iter([(string(secret), Value::Null)])),
        ),
        Misplaced::RedisUrl => set(
            "limits",
            serde_yaml_ng::from_str(&format!(
                "{{scope: global, requestsPerMinute: 10, redis: {{url: 'rediss://:{secret}@host:6379'}}}}"
            ))
            .unwrap(),
        ),
    };
    yaml(&Value::Mapping(endpoint))
}

/// The error, as logged (`%error`) or printed by `main` (`{:?}` through anyhow), must not
/// hold any 12 consecutive characters of the secret.
fn assert_not_echoed(error: &LoadError, secret: &str) -> Result<(), TestCaseError> {
    let shown = format!("{error} {error:?}");
    let chars: Vec<char> = secret.chars().collect();
    for window in chars.windows(12) {
        let piece: String = window.iter().collect();
        prop_assert!(
            !shown.contains(&piece),
            "the error repeats {:?}: {}",
            piece,
            shown
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(crate::proptest_config::config())]

    /// Issue 13 item 4: configuration errors name the field and the kind of problem, never a
    /// value that may be a secret (a hot reload logs them at ERROR, into cluster logs).
    #[test]
    fn errors_never_repeat_a_misplaced_secret(
        place in prop::sample::select(MISPLACED),
        secret in secret(),
        in_dir in any::<bool>(),
    ) {
        let bytes = with_secret(place, &secret);
        let result = if in_dir {
            parse(&dir_source(), vec![bytes])
        } else if matches!(place, Misplaced::WholeFile | Misplaced::EnvFile) {
            parse(&file_source(), vec![bytes])
        } else {
            let endpoint: Value = serde_yaml_ng::from_slice(&bytes).unwrap();
            let document = Mapping::from_iter([(string("endpoints"), Value::Sequence(vec![endpoint]))]);
            parse(&file_source(), vec![yaml(&Value::Mapping(document))])
        };
        match result {
            Err(error) => assert_not_echoed(&error, &secret)?,
            // A misplaced key must not make a valid configuration either.
            Ok(loaded) => prop_assert!(false, "{:?} loaded: {:?}", place, loaded.config),
        }
    }
}

proptest! {
    #![proptest_config(crate::proptest_config::config())]

    /// The same, with the secret written in place of any value or key of any endpoint.
    #[test]
    fn errors_never_repeat_a_secret_written_anywhere(
        mut endpoint in valid_endpoint("chat".to_string(), Vec::new()),
        slot in any::<prop::sample::Index>(),
        secret in secret(),
    ) {
        let mut at = slot.index(slots(&endpoint));
        mutate(&mut endpoint, &mut at, &Mutation::Replace(string(secret.as_str())));
        if let Err(error) = parse(&dir_source(), vec![yaml(&endpoint)]) {
            assert_not_echoed(&error, &secret)?;
        }
    }
}

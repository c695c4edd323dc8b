//! Which requests may be answered from the cache, and under which key.
//!
//! A key is a SHA-256 hash: it holds no prompt text, so it can go into Redis key names and
//! logs. It covers everything that can change the answer or whose answer it is (the
//! endpoint, the credential's fingerprint, the route, the upstream model and the request body
//! in a canonical form) and nothing that does not (JSON key order and whitespace, `stream`
//! and its options, the caller's identifiers).

use std::fmt::Write as _;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The routes whose answers may be stored.
pub const CACHEABLE_ROUTES: &[&str] = &["/chat/completions", "/completions", "/embeddings"];

/// Changing the canonical form or the hashed parts must change this tag, so that entries
/// written by an older sidecar into a shared Redis are never read under a different meaning.
const DOMAIN_TAG: &str = "llmesh-cache-v1";

/// Fields that do not change the answer: how it is delivered (`stream`, `stream_options`:
/// a stored answer is served either way) and who asked or how the provider bills and keeps
/// it.
const NON_SEMANTIC_FIELDS: &[&str] = &[
    "stream",
    "stream_options",
    "user",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
];

/// A request's place in the cache: SHA-256 (32 bytes) of what makes two requests the same.
/// It is a hash: no prompt text can be read back from it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    /// 64 lowercase hex digits, for Redis keys and logs.
    pub fn hex(&self) -> String {
        let mut hex = String::with_capacity(64);
        for byte in self.0 {
            // Writing into a String cannot fail.
            let _ = write!(hex, "{byte:02x}");
        }
        hex
    }
}

/// Why a request does not use the cache (a label value: keep these strings stable).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Bypass {
    /// Not one of CACHEABLE_ROUTES.
    Route,
    /// More than one choice asked for (`n`).
    Choices,
    /// A sampled answer (temperature not 0) on an endpoint that does not allow caching one.
    Sampling,
    /// The body is not a JSON object: the upstream will refuse it, and errors are not cached.
    NotJson,
}

impl Bypass {
    pub fn as_str(self) -> &'static str {
        match self {
            Bypass::Route => "route",
            Bypass::Choices => "choices",
            Bypass::Sampling => "sampling",
            Bypass::NotJson => "not_json",
        }
    }
}

pub struct KeyInput<'a> {
    /// The endpoint's name.
    pub endpoint: &'a str,
    /// The key's fingerprint (`sha256:…`), or "" when the endpoint has none.
    pub credential: &'a str,
    /// The upstream model, after the rewrite.
    pub model: &'a str,
    /// The API path after /v1, e.g. "/chat/completions".
    pub route: &'a str,
    /// The app's request body.
    pub body: &'a [u8],
    pub allow_sampling: bool,
}

/// The request's key, or why it must not use the cache.
pub fn key_for(input: &KeyInput<'_>) -> Result<CacheKey, Bypass> {
    if !CACHEABLE_ROUTES.contains(&input.route) {
        return Err(Bypass::Route);
    }
    // serde_json refuses nesting deeper than 128 and numbers out of f64's range, so neither
    // the parse nor the recursive canonical writer below can exhaust the stack.
    let Ok(Value::Object(mut body)) = serde_json::from_slice::<Value>(input.body) else {
        return Err(Bypass::NotJson);
    };
    if input.route != "/embeddings" {
        check_one_choice(&body)?;
        if !input.allow_sampling && !is_greedy(&body) {
            return Err(Bypass::Sampling);
        }
    }
    remove_non_semantic(&mut body);
    body.insert("model".to_string(), Value::from(input.model));
    let mut canonical = Vec::with_capacity(input.body.len());
    write_canonical(&mut canonical, &Value::Object(body));
    Ok(hash_parts(&[
        DOMAIN_TAG.as_bytes(),
        input.endpoint.as_bytes(),
        input.credential.as_bytes(),
        input.route.as_bytes(),
        &canonical,
    ]))
}

/// `n` absent, null or 1. Any other value bypasses, including ones the upstream will refuse
/// (0, "2"): a lenient server could answer them with several choices.
fn check_one_choice(body: &Map<String, Value>) -> Result<(), Bypass> {
    match body.get("n") {
        None | Some(Value::Null) => Ok(()),
        Some(n) if n.as_f64() == Some(1.0) => Ok(()),
        Some(_) => Err(Bypass::Choices),
    }
}

/// `temperature` exactly 0. Absent or null means the providers' default, 1.
fn is_greedy(body: &Map<String, Value>) -> bool {
    body.get("temperature").and_then(Value::as_f64) == Some(0.0)
}

fn remove_non_semantic(body: &mut Map<String, Value>) {
    for field in NON_SEMANTIC_FIELDS {
        body.remove(*field);
    }
    // Only a single choice reaches here: `n: 1` asks for the default.
    body.remove("n");
}

/// Compact JSON with every object's keys sorted, whatever order the map keeps them in (a
/// crate enabling serde_json's `preserve_order` elsewhere in the build must not split or
/// merge entries).
fn write_canonical(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(out, &Value::from(key.as_str()));
                out.push(b':');
                write_canonical(out, value);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(out, item);
            }
            out.push(b']');
        }
        scalar => write_scalar(out, scalar),
    }
}

fn write_scalar(out: &mut Vec<u8>, value: &Value) {
    // Writing a Value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
}

/// Each part is preceded by its length, so that no two different lists of parts hash the
/// same bytes (("ab", "c") and ("a", "bc") would under plain concatenation).
fn hash_parts(parts: &[&[u8]]) -> CacheKey {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    CacheKey(hasher.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT: &str = "/chat/completions";

    fn input<'a>(route: &'a str, body: &'a str) -> KeyInput<'a> {
        KeyInput {
            endpoint: "openai",
            credential: "sha256:0123456789ab",
            model: "gpt-4o-mini",
            route,
            body: body.as_bytes(),
            allow_sampling: false,
        }
    }

    fn key(body: &str) -> CacheKey {
        key_for(&input(CHAT, body)).unwrap()
    }

    const BODY: &str =
        r#"{"model":"fast","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#;

    #[test]
    fn key_order_and_whitespace_do_not_matter() {
        let reordered = r#" { "messages" : [ { "content" : "hi" , "role" : "user" } ] ,
            "temperature" : 0 , "model" : "fast" } "#;
        assert_eq!(key(BODY), key(reordered));
    }

    #[test]
    fn canonical_form_sorts_nested_keys_itself() {
        let mut map = Map::new();
        map.insert(
            "b".to_string(),
            serde_json::json!({"z": 1, "a": [{"y": 2, "x": 3}]}),
        );
        map.insert("a".to_string(), Value::Null);
        let mut out = Vec::new();
        write_canonical(&mut out, &Value::Object(map));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"a":null,"b":{"a":[{"x":3,"y":2}],"z":1}}"#
        );
    }

    #[test]
    fn delivery_and_caller_fields_do_not_split_entries() {
        let with_extras = r#"{"model":"fast","temperature":0,"messages":[{"role":"user","content":"hi"}],
            "stream":true,"stream_options":{"include_usage":true},"user":"u-42","metadata":{"a":"b"},
            "store":false,"service_tier":"auto","safety_identifier":"s","prompt_cache_key":"k","n":1}"#;
        assert_eq!(key(BODY), key(with_extras));
    }

    #[test]
    fn alias_and_name_share_an_entry_once_rewritten() {
        let by_name = r#"{"model":"gpt-4o-mini","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#;
        let no_model = r#"{"temperature":0,"messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(key(BODY), key(by_name));
        assert_eq!(key(BODY), key(no_model));
        let other_upstream = KeyInput {
            model: "gpt-4o",
            ..input(CHAT, BODY)
        };
        assert_ne!(key(BODY), key_for(&other_upstream).unwrap());
    }

    #[test]
    fn endpoint_credential_route_and_prompt_each_split_entries() {
        let base = key(BODY);
        let variants = [
            KeyInput {
                endpoint: "openai-eu",
                ..input(CHAT, BODY)
            },
            KeyInput {
                credential: "sha256:ba9876543210",
                ..input(CHAT, BODY)
            },
            KeyInput {
                credential: "",
                ..input(CHAT, BODY)
            },
            input("/completions", BODY),
            input(
                CHAT,
                r#"{"model":"fast","temperature":0,"messages":[{"role":"user","content":"hello"}]}"#,
            ),
        ];
        let mut keys: Vec<CacheKey> = variants.iter().map(|v| key_for(v).unwrap()).collect();
        keys.push(base);
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn parts_are_length_prefixed() {
        let a = KeyInput {
            endpoint: "ab",
            credential: "c",
            ..input(CHAT, BODY)
        };
        let b = KeyInput {
            endpoint: "a",
            credential: "bc",
            ..input(CHAT, BODY)
        };
        assert_ne!(key_for(&a).unwrap(), key_for(&b).unwrap());
    }

    #[test]
    fn hex_is_64_lowercase_digits_and_holds_no_prompt() {
        let hex = key(BODY).hex();
        assert_eq!(hex.len(), 64);
        assert!(hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_ne!(key(BODY).hex(), CacheKey([0; 32]).hex());
    }

    #[test]
    fn several_choices_bypass() {
        for n in ["2", "0", "\"2\"", "1.5"] {
            let body = format!(r#"{{"temperature":0,"n":{n},"messages":[]}}"#);
            assert_eq!(key_for(&input(CHAT, &body)), Err(Bypass::Choices), "n={n}");
        }
        for n in ["1", "1.0", "null"] {
            let body = format!(r#"{{"temperature":0,"n":{n},"messages":[]}}"#);
            assert!(key_for(&input(CHAT, &body)).is_ok(), "n={n}");
        }
    }

    #[test]
    fn only_temperature_zero_is_cached_unless_sampling_is_allowed() {
        for temperature in ["0", "0.0", "-0.0"] {
            let body = format!(r#"{{"temperature":{temperature},"prompt":"x"}}"#);
            assert!(key_for(&input("/completions", &body)).is_ok());
        }
        for body in [
            r#"{"prompt":"x"}"#,
            r#"{"prompt":"x","temperature":null}"#,
            r#"{"prompt":"x","temperature":0.7}"#,
            r#"{"prompt":"x","temperature":"0"}"#,
        ] {
            for route in [CHAT, "/completions"] {
                assert_eq!(key_for(&input(route, body)), Err(Bypass::Sampling));
                let allowed = KeyInput {
                    allow_sampling: true,
                    ..input(route, body)
                };
                assert!(key_for(&allowed).is_ok());
            }
        }
        let allowed_n2 = KeyInput {
            allow_sampling: true,
            ..input(CHAT, r#"{"n":2}"#)
        };
        assert_eq!(key_for(&allowed_n2), Err(Bypass::Choices));
    }

    #[test]
    fn embeddings_ignore_temperature_and_choices() {
        for body in [
            r#"{"model":"emb","input":"hello"}"#,
            r#"{"model":"emb","input":"hello","temperature":0.7}"#,
            r#"{"model":"emb","input":"hello","n":2}"#,
        ] {
            assert!(key_for(&input("/embeddings", body)).is_ok(), "{body}");
        }
        let key = key_for(&input("/embeddings", r#"{"input":"hello"}"#)).unwrap();
        let other = key_for(&input("/embeddings", r#"{"input":"hello!"}"#)).unwrap();
        assert_ne!(key, other);
    }

    #[test]
    fn other_routes_and_non_objects_bypass() {
        for route in [
            "/responses",
            "/messages",
            "/models",
            "/chat/completions/",
            "",
        ] {
            assert_eq!(key_for(&input(route, BODY)), Err(Bypass::Route));
        }
        for body in ["[]", "[1,2]", "\"x\"", "1", "null", "", "{", "{}x", "\u{0}"] {
            assert_eq!(
                key_for(&input(CHAT, body)),
                Err(Bypass::NotJson),
                "{body:?}"
            );
        }
        let labels: Vec<&str> = [
            Bypass::Route,
            Bypass::Choices,
            Bypass::Sampling,
            Bypass::NotJson,
        ]
        .into_iter()
        .map(Bypass::as_str)
        .collect();
        assert_eq!(labels, ["route", "choices", "sampling", "not_json"]);
    }

    #[test]
    fn hostile_bodies_do_not_panic() {
        let deep_array = format!("{{\"a\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        let deep_object = format!("{}{}", "{\"a\":".repeat(100_000), "}".repeat(100_000));
        let huge_numbers = format!(
            r#"{{"temperature":0,"a":1{},"b":1e999,"c":-1e-999,"d":{}}}"#,
            "0".repeat(5000),
            "9".repeat(400)
        );
        for body in [deep_array, deep_object, huge_numbers] {
            let _ = key_for(&input(CHAT, &body));
            let _ = key_for(&KeyInput {
                allow_sampling: true,
                ..input("/embeddings", &body)
            });
        }
        // Nesting just under serde_json's limit is keyed, through the recursive writer.
        let nested = format!(
            r#"{{"temperature":0,"a":{}{}}}"#,
            "[".repeat(120),
            "]".repeat(120)
        );
        assert!(key_for(&input(CHAT, &nested)).is_ok());
    }
}

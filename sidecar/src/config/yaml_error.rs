//! What a config file's YAML error may say: where it is and what kind of problem it is, never
//! the text it is about.
//!
//! serde and serde_yaml quote the offending value ("invalid type: string \"sk-...\", expected
//! struct CredentialConfig"). A key pasted where its file's path belongs, or a key file given as
//! `--config`, would be printed, and on hot reload logged. So the message is rebuilt from the
//! parts that come from the config's own types (field paths, expected types, field and variant
//! lists) and the kind of the value found; a message of a shape not known here is replaced by
//! a generic one rather than passed on.

use serde_yaml_ng::Error as YamlError;

/// Describes an error of a document that is YAML but does not fit the config types.
pub(super) fn describe(error: &YamlError) -> String {
    let text = error.to_string();
    let location = error
        .location()
        .map(|at| format!("line {} column {}", at.line(), at.column()));
    let without_location = location
        .as_ref()
        .and_then(|at| {
            text.strip_suffix(at.as_str())
                .and_then(|t| t.strip_suffix(" at "))
        })
        .unwrap_or(&text);
    let (path, message) = split_path(without_location);
    let mut out = String::new();
    if let Some(path) = path {
        out.push_str(path);
        out.push_str(": ");
    }
    out.push_str(&describe_problem(path, message));
    if let Some(at) = location {
        out.push_str(" at ");
        out.push_str(&at);
    }
    out
}

/// serde_yaml writes `path: message`; the path is made of the config's own field names
/// (every struct denies unknown fields, so no key of the input's choosing gets into it).
fn split_path(text: &str) -> (Option<&str>, &str) {
    match text.split_once(": ") {
        Some((path, message)) if is_field_path(path) => (Some(path), message),
        _ => (None, text),
    }
}

/// `endpoints[0].timeouts.total`: camelCase names, indexes in brackets, `?` for a key serde_yaml
/// could not name.
fn is_field_path(path: &str) -> bool {
    let mut in_index = false;
    !path.is_empty()
        && path.chars().all(|c| match c {
            '[' if !in_index => {
                in_index = true;
                true
            }
            ']' if in_index => {
                in_index = false;
                true
            }
            '0'..='9' => in_index,
            'a'..='z' | 'A'..='Z' | '.' | '?' => !in_index,
            _ => false,
        })
        && !in_index
}

fn describe_problem(path: Option<&str>, message: &str) -> String {
    const NOT_VALID: &str = "is not valid here";
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            // `{found}, expected {what}`: `found` may quote the value; `what` comes from the
            // config's types, which never say ", expected ", so the last one is the separator.
            let Some((found, expected)) = rest.rsplit_once(", expected ") else {
                return NOT_VALID.to_string();
            };
            let kind = kind_of(found);
            return format!("{prefix}{kind}, expected {expected}{}", hint(path, kind));
        }
    }
    for (prefix, what) in [
        ("unknown field `", "unknown field"),
        ("unknown variant `", "unknown variant"),
    ] {
        if let Some(rest) = message.strip_prefix(prefix) {
            // `{name}`, expected {list}` or `{name}`, there are no {fields|variants}`.
            let split = rest
                .rsplit_once("`, expected ")
                .map(|(name, list)| (name, "expected ", list))
                .or_else(|| {
                    rest.rsplit_once("`, there are no ")
                        .map(|(name, what)| (name, "there are no ", what))
                });
            let Some((name, lead, tail)) = split else {
                return NOT_VALID.to_string();
            };
            return if is_word(name) {
                format!("{what} `{name}`, {lead}{tail}")
            } else {
                format!("{what}, {lead}{tail}")
            };
        }
    }
    for (prefix, what) in [
        ("missing field `", "missing field"),
        ("duplicate field `", "duplicate field"),
    ] {
        if let Some(name) = message
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix('`'))
        {
            return if is_word(name) {
                format!("{what} `{name}`")
            } else {
                what.to_string()
            };
        }
    }
    if let Some(rest) = message.strip_prefix("invalid length ") {
        if let Some((length, expected)) = rest.split_once(", expected ") {
            if length.bytes().all(|b| b.is_ascii_digit()) {
                return format!("invalid length {length}, expected {expected}");
            }
        }
        return NOT_VALID.to_string();
    }
    // The duration parser's `invalid duration "{value}": {what it accepts}`.
    if message.starts_with("invalid duration ") {
        if let Some((_, accepted)) = message.rsplit_once("\": ") {
            return format!("invalid duration: {accepted}");
        }
        return NOT_VALID.to_string();
    }
    if SERDE_YAML_FIXED_MESSAGES.contains(&message) {
        return message.to_string();
    }
    NOT_VALID.to_string()
}

/// Messages of serde_yaml's own that hold no input text.
const SERDE_YAML_FIXED_MESSAGES: &[&str] = &[
    "EOF while parsing a value",
    "deserializing from YAML containing more than one document is not supported",
    "recursion limit exceeded",
    "repetition limit exceeded",
    "unknown anchor",
    "expected a mapping or list of mappings for merging, but found scalar",
    "unexpected tagged value in merge",
    "expected a mapping for merging, but found scalar",
    "expected a mapping for merging, but found sequence",
    "empty YAML tag is not allowed",
    "failed to parse YAML number",
];

/// serde's `Unexpected` prints a kind and, for scalars, the value after it: keep the kind.
fn kind_of(found: &str) -> &'static str {
    const KINDS: &[(&str, &str)] = &[
        ("boolean", "a boolean"),
        ("integer", "an integer"),
        ("floating point", "a number"),
        ("character", "a character"),
        ("string", "a string"),
        ("unit value", "null"),
        ("sequence", "a list"),
        ("map", "a mapping"),
    ];
    KINDS
        .iter()
        .find(|(kind, _)| {
            found
                .strip_prefix(kind)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '))
        })
        .map_or("another kind of value", |(_, described)| described)
}

/// The two ways a key most likely ends up in a config: written as the credential, or the key
/// file passed as the config.
fn hint(path: Option<&str>, kind: &str) -> &'static str {
    match path {
        _ if kind != "a string" => "",
        None => "; the file holds a single string, not a configuration: is it a key file?",
        Some(path) if path.ends_with("credential") => {
            "; a key never goes in the config: write it to a file and give that file's path as credential.file"
        }
        Some(_) => "",
    }
}

/// Short words (what a misspelt field or provider looks like) are repeated; anything with a
/// digit, or long, is not, as that is what keys and passwords look like.
fn is_word(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphabetic() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{EndpointConfig, SidecarConfig};

    const SECRET: &str = "sk-proj-Abc123SecretKeyText";

    fn config_error(yaml: &str) -> String {
        match serde_yaml_ng::from_str::<SidecarConfig>(yaml) {
            Ok(_) => panic!("{yaml} parsed"),
            Err(e) => describe(&e),
        }
    }

    fn assert_hidden(yaml: &str, secret: &str, expected: &str) {
        let error = config_error(yaml);
        assert!(!error.contains(secret), "{error}");
        assert!(error.contains(expected), "{error:?} lacks {expected:?}");
    }

    #[test]
    fn an_inline_key_names_the_field_and_says_where_keys_go() {
        let error = config_error(&format!(
            "endpoints:\n  - name: a\n    provider: openai\n    model: m\n    credential: {SECRET}\n"
        ));
        assert_eq!(
            error,
            "endpoints[0].credential: invalid type: a string, expected struct CredentialConfig; \
             a key never goes in the config: write it to a file and give that file's path as \
             credential.file at line 5 column 17"
        );
    }

    #[test]
    fn a_key_file_given_as_the_config_is_not_echoed() {
        for content in [
            SECRET.to_string(),
            format!("{SECRET}\n"),
            format!("'{SECRET}'"),
        ] {
            let error = config_error(&content);
            assert!(!error.contains(SECRET), "{error}");
            assert!(error.contains("is it a key file?"), "{error}");
        }
        let error = match serde_yaml_ng::from_str::<EndpointConfig>(SECRET) {
            Ok(_) => unreachable!(),
            Err(e) => describe(&e),
        };
        assert!(!error.contains(SECRET), "{error}");
        assert!(error.contains("expected struct EndpointConfig"), "{error}");
    }

    #[test]
    fn a_value_that_does_not_fit_its_field_is_named_by_kind_only() {
        let endpoint = "endpoints: [{name: a, provider: mock, model: m, ";
        for (field, expected) in [
            (
                format!("maxRequestBodyBytes: {SECRET}}}]"),
                "endpoints[0].maxRequestBodyBytes: invalid type: a string, expected u64",
            ),
            (
                format!("timeouts: {{total: {SECRET}}}}}]"),
                // serde_yaml places a custom error at the enclosing mapping.
                "endpoints[0].timeouts: invalid duration: expected a whole number",
            ),
            (
                format!("aliases: {SECRET}}}]"),
                "endpoints[0].aliases: invalid type: a string, expected a sequence",
            ),
            (
                format!("default: {SECRET}}}]"),
                "endpoints[0].default: invalid type: a string, expected a boolean",
            ),
            (
                format!("mock: {{completionTokens: {SECRET}}}}}]"),
                "endpoints[0].mock.completionTokens: invalid type: a string, expected u32",
            ),
            (
                format!("limits: {{scope: {SECRET}}}}}]"),
                "endpoints[0].limits.scope: unknown variant, expected `local` or `global`",
            ),
            (
                format!("{SECRET}: 1}}]"),
                "endpoints[0]: unknown field, expected one of `name`, `provider`",
            ),
        ] {
            let yaml = format!("{endpoint}{field}");
            assert_hidden(&yaml, &SECRET[3..], expected);
        }
    }

    #[test]
    fn a_provider_that_is_a_key_is_not_echoed() {
        assert_hidden(
            &format!("endpoints: [{{name: a, provider: {SECRET}, model: m}}]"),
            &SECRET[3..],
            "endpoints[0].provider: unknown variant, expected one of `openai`",
        );
    }

    #[test]
    fn quoting_tricks_do_not_smuggle_the_value_out() {
        for value in [
            r#""sk-9, expected struct X""#,
            r#""sk-9`, expected `x""#,
            r#""sk-9\": expected y""#,
        ] {
            let secret = "sk-9";
            for yaml in [
                format!("endpoints: [{{name: a, provider: mock, model: m, credential: {value}}}]"),
                format!("endpoints: [{{name: a, provider: {value}, model: m}}]"),
                format!("endpoints: [{{name: a, provider: mock, model: m, {value}: 1}}]"),
                format!(
                    "endpoints: [{{name: a, provider: mock, model: m, timeouts: {{idle: {value}}}}}]"
                ),
            ] {
                let error = config_error(&yaml);
                assert!(!error.contains(secret), "{yaml} -> {error}");
            }
        }
    }

    #[test]
    fn misspelt_names_are_still_repeated() {
        assert_hidden(
            "endpoints: [{name: a, provider: mock, model: m, timeout: 5s}]",
            "5s",
            "endpoints[0]: unknown field `timeout`, expected one of",
        );
        assert_hidden(
            "endpoints: [{name: a, provider: claude, model: m}]",
            "xxx",
            "endpoints[0].provider: unknown variant `claude`, expected one of",
        );
        assert_hidden(
            "endpoints: [{provider: mock, model: m}]",
            "xxx",
            "endpoints[0]: missing field `name`",
        );
    }

    #[test]
    fn only_known_message_shapes_pass() {
        assert_eq!(
            describe_problem(Some("x"), "some new message quoting \"sk-1\""),
            "is not valid here"
        );
        assert_eq!(
            describe_problem(None, "recursion limit exceeded"),
            "recursion limit exceeded"
        );
        assert_eq!(kind_of("strings"), "another kind of value");
        assert!(is_field_path("endpoints[10].limits.redis.url"));
        assert!(!is_field_path("endpoints[0].sk-1"));
        assert!(!is_field_path("invalid type"));
        assert!(!is_field_path("a[b]"));
    }
}

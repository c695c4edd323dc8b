//! Error bodies in each dialect's envelope. SDKs choose their exception type from the HTTP
//! status, then show the envelope's message: an error keeps its status and is put in the
//! envelope of the API the app called.

use serde_json::{json, Value};

/// Anthropic's error `type` for a status, as its API documents them.
pub fn anthropic_error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// `{"type":"error","error":{"type":...,"message":...}}`
pub fn anthropic(error_type: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": error_type, "message": message}})
}

/// `{"error":{"message":...,"type":...,"param":...,"code":...}}`
pub fn openai(message: &str, error_type: &str, param: Option<&str>, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": error_type, "param": param, "code": code}})
}

/// The message and type of an upstream error body in either envelope (or a bare string),
/// for putting it into the other one. A body that is no known envelope gives its text.
pub fn read(body: &[u8]) -> (String, Option<String>) {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return (
            String::from_utf8_lossy(body).chars().take(500).collect(),
            None,
        );
    };
    let error = value.get("error").unwrap_or(&value);
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .or_else(|| error.as_str())
        .or_else(|| value.get("detail").and_then(Value::as_str))
        .map(str::to_string)
        .unwrap_or_else(|| value.to_string().chars().take(500).collect());
    let kind = error
        .get("type")
        .and_then(Value::as_str)
        .map(str::to_string);
    (message, kind)
}

/// An upstream's error body (OpenAI-style) put into Anthropic's envelope.
pub fn to_anthropic(status: u16, body: &[u8]) -> Value {
    let (message, _) = read(body);
    anthropic(anthropic_error_type(status), &message)
}

/// An upstream's error body (Anthropic's) put into OpenAI's envelope; Anthropic's error type
/// is kept as `type` and `code`, so nothing it said is lost.
pub fn to_openai(status: u16, body: &[u8]) -> Value {
    let (message, kind) = read(body);
    let kind = kind.unwrap_or_else(|| anthropic_error_type(status).to_string());
    openai(&message, &kind, None, Some(&kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anthropic_errors_become_openai_errors_with_their_type_kept() {
        let body =
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        assert_eq!(
            to_openai(529, body),
            json!({"error": {"message": "Overloaded", "type": "overloaded_error", "param": null, "code": "overloaded_error"}})
        );
    }

    #[test]
    fn openai_errors_become_anthropic_errors_typed_by_status() {
        let body = br#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
        assert_eq!(
            to_anthropic(429, body),
            json!({"type": "error", "error": {"type": "rate_limit_error", "message": "Rate limit reached"}})
        );
        assert_eq!(
            to_anthropic(404, b"Not Found")["error"]["message"],
            "Not Found"
        );
        assert_eq!(
            to_anthropic(503, b"{\"detail\":\"busy\"}")["error"]["type"],
            "api_error"
        );
    }
}

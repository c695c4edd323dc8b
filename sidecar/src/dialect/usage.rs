//! Token usage in each API's words. Anthropic's `input_tokens` leaves out the prompt tokens
//! read from or written to its cache and reports them apart; OpenAI's `prompt_tokens`
//! includes every prompt token and details the cached ones in `prompt_tokens_details`,
//! where cache writes go under `cache_write_tokens` (the name OpenAI's Responses API uses),
//! so that nothing Anthropic reported is lost on the way.

use serde_json::{json, Map, Value};

/// Merges a later usage report into the fields seen so far: Anthropic's streams report
/// input in `message_start` and output in `message_delta`.
pub fn merge(seen: &mut Map<String, Value>, report: &Value) {
    if let Some(report) = report.as_object() {
        for (key, value) in report {
            seen.insert(key.clone(), value.clone());
        }
    }
}

/// Anthropic's usage object as OpenAI's chat usage.
pub fn to_openai(anthropic: &Value) -> Value {
    let count = |key: &str| anthropic.get(key).and_then(Value::as_u64).unwrap_or(0);
    let cache_read = count("cache_read_input_tokens");
    let cache_write = count("cache_creation_input_tokens");
    let prompt = count("input_tokens")
        .saturating_add(cache_write)
        .saturating_add(cache_read);
    let completion = count("output_tokens");
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt.saturating_add(completion),
        "prompt_tokens_details": {"cached_tokens": cache_read, "cache_write_tokens": cache_write},
    })
}

/// OpenAI's chat usage object as Anthropic's.
pub fn to_anthropic(openai: &Value) -> Value {
    let count = |pointer: &str| openai.pointer(pointer).and_then(Value::as_u64).unwrap_or(0);
    let cache_read = count("/prompt_tokens_details/cached_tokens");
    let cache_write = count("/prompt_tokens_details/cache_write_tokens");
    json!({
        "input_tokens": count("/prompt_tokens")
            .saturating_sub(cache_read)
            .saturating_sub(cache_write),
        "output_tokens": count("/completion_tokens"),
        "cache_read_input_tokens": cache_read,
        "cache_creation_input_tokens": cache_write,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_tokens_move_in_and_out_of_the_prompt_count() {
        let anthropic = json!({
            "input_tokens": 12,
            "cache_creation_input_tokens": 2,
            "cache_read_input_tokens": 3,
            "output_tokens": 5,
        });
        let openai = to_openai(&anthropic);
        assert_eq!(
            openai,
            json!({
                "prompt_tokens": 17,
                "completion_tokens": 5,
                "total_tokens": 22,
                "prompt_tokens_details": {"cached_tokens": 3, "cache_write_tokens": 2},
            })
        );
        assert_eq!(to_anthropic(&openai), anthropic);
        let plain = json!({"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30});
        assert_eq!(to_anthropic(&plain)["input_tokens"], 10);
        assert_eq!(
            to_anthropic(&json!({"prompt_tokens": "x"}))["input_tokens"],
            0
        );
    }

    #[test]
    fn later_reports_replace_only_what_they_say() {
        let mut seen = Map::new();
        merge(&mut seen, &json!({"input_tokens": 12, "output_tokens": 1}));
        merge(&mut seen, &json!({"output_tokens": 7}));
        merge(&mut seen, &json!(null));
        assert_eq!(
            Value::Object(seen),
            json!({"input_tokens": 12, "output_tokens": 7})
        );
    }
}

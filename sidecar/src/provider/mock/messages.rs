//! The mock's answers to Anthropic's Messages API (`POST /v1/messages` and its
//! `count_tokens`), so that apps using Anthropic's SDKs work offline too. Same text and
//! token counting as the OpenAI-format answers; streams as Anthropic's named events.

use std::collections::VecDeque;

use bytes::Bytes;
use serde_json::{json, Value};

use super::{
    content_text, estimate_tokens, is_stream, reply_for, to_bytes, MockResponse, MockStream,
};
use crate::config::MockConfig;

pub(super) fn message(request: &Value, model: &str, config: &MockConfig, id: &str) -> MockResponse {
    let (prompt, input_tokens) = prompt_of(request);
    let reply = reply_for(&prompt, input_tokens, request, config);
    let stop_reason = match reply.finish_reason {
        "length" => "max_tokens",
        _ => "end_turn",
    };
    let output_tokens = reply.tokens.len() as u64;
    if !is_stream(request) {
        return MockResponse::Json(to_bytes(&json!({
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": reply.text()}],
            "stop_reason": stop_reason,
            "stop_sequence": null,
            "usage": usage(input_tokens, output_tokens),
        })));
    }
    let mut events = VecDeque::new();
    let mut push = |value: Value| {
        let name = value["type"].as_str().unwrap_or("unknown").to_string();
        events.push_back(Bytes::from(format!("event: {name}\ndata: {value}\n\n")));
    };
    push(json!({
        "type": "message_start",
        "message": {
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": null,
            "stop_sequence": null,
            "usage": usage(input_tokens, 1),
        },
    }));
    push(
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    );
    for piece in reply.pieces() {
        push(
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}),
        );
    }
    push(json!({"type": "content_block_stop", "index": 0}));
    push(json!({
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": null},
        "usage": {"output_tokens": output_tokens},
    }));
    push(json!({"type": "message_stop"}));
    MockResponse::Stream(MockStream::of_events(events, config.token_interval.get()))
}

pub(super) fn count_tokens(request: &Value) -> MockResponse {
    let (_, input_tokens) = prompt_of(request);
    MockResponse::Json(to_bytes(&json!({"input_tokens": input_tokens})))
}

/// The prompt's text (system first) and its token count, counted as the chat answers count.
fn prompt_of(request: &Value) -> (String, u64) {
    let mut prompt = content_text(request.get("system"));
    let mut tokens = 3 + estimate_tokens(&prompt);
    let messages = request
        .get("messages")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    for message in messages {
        let text = content_text(message.get("content"));
        tokens += 4 + estimate_tokens(&text);
        prompt.push('\n');
        prompt.push_str(&text);
    }
    (prompt, tokens)
}

fn usage(input_tokens: u64, output_tokens: u64) -> Value {
    json!({
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    })
}

#[cfg(test)]
mod tests {
    use super::super::respond;
    use super::*;
    use http_body_util::BodyExt;

    fn request(extra: Value) -> Vec<u8> {
        let mut body = json!({
            "model": "claude",
            "max_tokens": 100,
            "system": "Be brief",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Say hello to the mesh"}]}],
        });
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body.to_string().into_bytes()
    }

    #[test]
    fn answers_a_message_with_usage_and_stop_reason() {
        let cfg = MockConfig::default();
        let MockResponse::Json(body) =
            respond("/messages", &request(json!({})), "m", &cfg, "r-1").unwrap()
        else {
            panic!("expected JSON");
        };
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["id"], "msg_r1");
        assert_eq!(
            v["content"][0]["text"].as_str().unwrap().split(' ').count(),
            16
        );
        assert_eq!(v["stop_reason"], "end_turn");
        assert_eq!(v["usage"]["output_tokens"], 16);
        // 3 + ceil(8 / 4) for the system prompt, 4 + ceil(21 / 4) for the message.
        assert_eq!(v["usage"]["input_tokens"], 3 + 2 + 4 + 6);

        let MockResponse::Json(short) = respond(
            "/messages",
            &request(json!({"max_tokens": 2})),
            "m",
            &cfg,
            "r",
        )
        .unwrap() else {
            panic!("expected JSON");
        };
        let v: Value = serde_json::from_slice(&short).unwrap();
        assert_eq!(v["stop_reason"], "max_tokens");
    }

    #[tokio::test]
    async fn streams_anthropics_events_with_the_same_text() {
        let cfg = MockConfig::default();
        let MockResponse::Json(whole) =
            respond("/messages", &request(json!({})), "m", &cfg, "r").unwrap()
        else {
            panic!("expected JSON");
        };
        let whole: Value = serde_json::from_slice(&whole).unwrap();
        let MockResponse::Stream(stream) = respond(
            "/messages",
            &request(json!({"stream": true})),
            "m",
            &cfg,
            "r",
        )
        .unwrap() else {
            panic!("expected a stream");
        };
        let text = String::from_utf8(stream.collect().await.unwrap().to_bytes().to_vec()).unwrap();
        let names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("event: "))
            .collect();
        assert_eq!(names.first(), Some(&"message_start"));
        assert_eq!(
            names
                .iter()
                .filter(|n| **n == "content_block_delta")
                .count(),
            16
        );
        assert_eq!(&names[names.len() - 2..], ["message_delta", "message_stop"]);
        assert!(!text.contains("[DONE]"));
        let streamed: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|v| {
                v.pointer("/delta/text")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .collect();
        assert_eq!(streamed, whole["content"][0]["text"].as_str().unwrap());
    }

    #[test]
    fn counts_tokens_as_the_answer_does() {
        let MockResponse::Json(body) = respond(
            "/messages/count_tokens",
            &request(json!({})),
            "m",
            &MockConfig::default(),
            "r",
        )
        .unwrap() else {
            panic!("expected JSON");
        };
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap(),
            json!({"input_tokens": 15})
        );
    }
}

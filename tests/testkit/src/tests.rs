use std::time::Instant;

use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::*;

const KEY: &str = "sk-test-0123456789abcdefghijklmnopqrstuv";

/// A response as the client saw it: each body frame with the time it arrived.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    frames: Vec<(Duration, Bytes)>,
    ended: Duration,
}

impl Answer {
    fn body(&self) -> Vec<u8> {
        self.frames.iter().flat_map(|(_, f)| f.to_vec()).collect()
    }

    fn text(&self) -> String {
        String::from_utf8(self.body()).unwrap()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body()).unwrap()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// Offsets in the body at which one frame ended and the next began.
    fn frame_boundaries(&self) -> Vec<usize> {
        self.frames
            .iter()
            .scan(0, |at, (_, f)| {
                *at += f.len();
                Some(*at)
            })
            .collect()
    }
}

async fn call(upstream: &FakeUpstream, headers: &[(&str, &str)], stream: bool) -> Answer {
    let body = serde_json::json!({
        "model": "m",
        "stream": stream,
        "stream_options": {"include_usage": stream},
        "messages": [{"role": "user", "content": "hi"}],
    });
    post(upstream, "/v1/chat/completions", headers, &body).await
}

async fn post(
    upstream: &FakeUpstream,
    path: &str,
    headers: &[(&str, &str)],
    body: &serde_json::Value,
) -> Answer {
    let mut request = Request::post(format!("http://{}{path}", upstream.addr()))
        .header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(
        request
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap(),
    )
    .await
}

async fn send(request: Request<Full<Bytes>>) -> Answer {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let started = Instant::now();
    let response = client.request(request).await.unwrap();
    let (parts, mut body) = response.into_parts();
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            frames.push((started.elapsed(), data));
        }
    }
    Answer {
        status: parts.status,
        headers: parts.headers,
        frames,
        ended: started.elapsed(),
    }
}

fn bearer() -> String {
    format!("Bearer {KEY}")
}

#[tokio::test]
async fn echoes_the_key_in_headers_of_a_normal_answer() {
    let upstream = FakeUpstream::start().await.unwrap();
    let bearer = bearer();
    let answer = call(
        &upstream,
        &[
            ("authorization", &bearer),
            (directives::ECHO_KEY_IN, "header, www-authenticate"),
        ],
        false,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header(ECHO_AUTHORIZATION), Some(bearer.as_str()));
    assert_eq!(
        answer.header("www-authenticate").unwrap(),
        format!(r#"Bearer realm="fake", error="invalid_token", error_description="bad key {KEY}""#)
    );
    assert!(!answer.text().contains(KEY));
}

#[tokio::test]
async fn echoes_the_key_in_a_401_body() {
    let upstream = FakeUpstream::start().await.unwrap();
    let bearer = bearer();
    let answer = call(
        &upstream,
        &[
            ("authorization", &bearer),
            (directives::ECHO_KEY_IN, "body"),
        ],
        true,
    )
    .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let error = &answer.json()["error"];
    assert!(error["message"]
        .as_str()
        .unwrap()
        .starts_with(&format!("Incorrect API key provided: {KEY}. ")));
    assert_eq!(error["param"], bearer);
    assert_eq!(error["code"], "invalid_api_key");
}

#[tokio::test]
async fn a_raw_key_header_is_echoed_when_there_is_no_authorization() {
    let upstream = FakeUpstream::start().await.unwrap();
    let answer = call(
        &upstream,
        &[("api-key", KEY), (directives::ECHO_KEY_IN, "body,header")],
        false,
    )
    .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.header(ECHO_AUTHORIZATION), Some(KEY));
    assert_eq!(answer.json()["error"]["param"], KEY);
}

#[tokio::test]
async fn nothing_is_echoed_without_a_credential() {
    let upstream = FakeUpstream::start().await.unwrap();
    let answer = call(
        &upstream,
        &[(
            directives::ECHO_KEY_IN,
            "header,www-authenticate,body,stream",
        )],
        false,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header(ECHO_AUTHORIZATION), None);
    assert_eq!(answer.header("www-authenticate"), None);
    assert_eq!(answer.json()["object"], "chat.completion");
}

#[tokio::test]
async fn echoes_the_key_in_a_successful_completion() {
    let upstream = FakeUpstream::start().await.unwrap();
    let bearer = bearer();
    let answer = call(
        &upstream,
        &[
            ("authorization", &bearer),
            (directives::ECHO_KEY_IN, "ok-body"),
        ],
        false,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let content = answer.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(content.contains(KEY), "{content}");
}

#[tokio::test]
async fn a_streamed_key_arrives_split_across_two_frames() {
    let upstream = FakeUpstream::start().await.unwrap();
    let bearer = bearer();
    let answer = call(
        &upstream,
        &[
            ("authorization", &bearer),
            (directives::ECHO_KEY_IN, "stream"),
        ],
        true,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let text = answer.text();
    let leaked = format!("leaked {KEY} here");
    assert!(text.contains(&leaked), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    // A normal chunk first, and the default three chunks in all (plus usage, as asked).
    assert!(text.starts_with("data: ") && text.contains("tok0 ") && text.contains("tok2 "));
    assert!(text.contains("\"usage\""));
    assert!(answer
        .frames
        .iter()
        .all(|(_, f)| !f.windows(KEY.len()).any(|w| w == KEY.as_bytes())));
    let key_at = text.find(KEY).unwrap();
    assert!(
        answer
            .frame_boundaries()
            .contains(&(key_at + KEY.len() / 2)),
        "no frame ends in the middle of the key"
    );
}

#[tokio::test]
async fn drips_streamed_and_whole_bodies_without_changing_them() {
    let upstream = FakeUpstream::start().await.unwrap();

    let plain = call(&upstream, &[(directives::STREAM_CHUNKS, "3")], true).await;
    let dripped = call(
        &upstream,
        &[
            (directives::STREAM_CHUNKS, "3"),
            (directives::FRAME_BYTES, "7"),
        ],
        true,
    )
    .await;
    assert_eq!(dripped.body(), plain.body());
    assert!(dripped.frames.iter().all(|(_, f)| f.len() <= 7));
    assert!(dripped.frames.len() >= plain.body().len() / 7);

    let plain = call(&upstream, &[], false).await;
    let dripped = call(&upstream, &[(directives::FRAME_BYTES, "100")], false).await;
    assert_eq!(dripped.body(), plain.body());
    assert_eq!(
        dripped.header("content-length"),
        Some(plain.body().len().to_string().as_str())
    );
    // Read with a content-length, pieces that arrive together are read together.
    assert!(dripped.frames.len() > 1);
}

#[tokio::test]
async fn no_usage_even_when_asked() {
    let upstream = FakeUpstream::start().await.unwrap();
    let with = call(&upstream, &[(directives::STREAM_CHUNKS, "2")], true).await;
    assert!(with.text().contains("\"usage\""));
    let without = call(
        &upstream,
        &[
            (directives::STREAM_CHUNKS, "2"),
            (directives::NO_USAGE, "1"),
        ],
        true,
    )
    .await;
    assert!(!without.text().contains("usage"), "{}", without.text());
    assert!(without.text().ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn rejects_a_request_id_that_is_not_a_uuid_like_llama_cpp() {
    let upstream = FakeUpstream::start().await.unwrap();
    let require = (directives::UUID_REQUEST_ID, "1");
    for id in ["abc", "req-123", "0190c9a2-7b4e-7c31-9a0f-1d2e3f4a5b6", ""] {
        let answer = call(&upstream, &[require, ("x-request-id", id)], false).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{id:?}");
        assert!(answer.body().is_empty(), "{id:?}");
    }
    for headers in [
        vec![
            require,
            ("x-request-id", "0190C9A2-7b4e-7c31-9a0f-1d2e3f4a5b6c"),
        ],
        vec![require],
        vec![("x-request-id", "abc")],
    ] {
        let answer = call(&upstream, &headers, false).await;
        assert_eq!(answer.status, StatusCode::OK, "{headers:?}");
    }
}

#[tokio::test]
async fn holds_the_stream_open_after_done() {
    let upstream = FakeUpstream::start().await.unwrap();
    let answer = call(
        &upstream,
        &[
            (directives::STREAM_CHUNKS, "2"),
            (directives::FINISH_THEN_HOLD_MS, "300"),
        ],
        true,
    )
    .await;
    let (done_at, _) = answer
        .frames
        .iter()
        .find(|(_, f)| f.ends_with(b"data: [DONE]\n\n"))
        .unwrap();
    assert!(
        answer.ended - *done_at >= Duration::from_millis(250),
        "ended {:?} after [DONE]",
        answer.ended - *done_at
    );
}

const ANTHROPIC_HEADERS: [(&str, &str); 2] =
    [("x-api-key", KEY), ("anthropic-version", "2023-06-01")];

async fn messages(upstream: &FakeUpstream, body: serde_json::Value) -> Answer {
    post(upstream, "/v1/messages", &ANTHROPIC_HEADERS, &body).await
}

fn hello_claude(stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": "claude-x",
        "max_tokens": 100,
        "stream": stream,
        "messages": [{"role": "user", "content": "hi"}],
    })
}

/// `(event name, data)` of each SSE event, `[DONE]` included as data.
fn events(text: &str) -> Vec<(Option<String>, serde_json::Value)> {
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|event| {
            let mut name = None;
            let mut data = serde_json::Value::Null;
            for line in event.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = Some(n.to_string());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(d).unwrap_or_else(|_| d.into());
                }
            }
            (name, data)
        })
        .collect()
}

fn weather_tools_chat(n: usize) -> serde_json::Value {
    ["get_weather", "get_time", "get_tide"][..n]
        .iter()
        .map(|name| serde_json::json!({"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}))
        .collect()
}

fn weather_tools_anthropic(n: usize) -> serde_json::Value {
    ["get_weather", "get_time", "get_tide"][..n]
        .iter()
        .map(|name| serde_json::json!({"name": name, "input_schema": {"type": "object"}}))
        .collect()
}

#[tokio::test]
async fn answers_anthropic_messages_with_a_message_and_fixed_usage() {
    let upstream = FakeUpstream::start().await.unwrap();
    let answer = messages(&upstream, hello_claude(false)).await;
    assert_eq!(answer.status, StatusCode::OK);
    let message = answer.json();
    assert!(message["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(message["type"], "message");
    assert_eq!(message["role"], "assistant");
    assert_eq!(message["model"], "claude-x");
    assert_eq!(message["content"][0]["type"], "text");
    assert_eq!(message["content"][0]["text"], "tok0 tok1 tok2 tok3 tok4 ");
    assert_eq!(message["stop_reason"], "end_turn");
    assert_eq!(message["stop_sequence"], serde_json::Value::Null);
    assert_eq!(
        message["usage"],
        serde_json::json!({"input_tokens": 12, "output_tokens": 5, "cache_creation_input_tokens": 2, "cache_read_input_tokens": 3})
    );
}

#[tokio::test]
async fn streams_anthropic_s_event_sequence() {
    let upstream = FakeUpstream::start().await.unwrap();
    let answer = messages(&upstream, hello_claude(true)).await;
    assert_eq!(answer.header("content-type"), Some("text/event-stream"));
    let events = events(&answer.text());
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_deref().unwrap()).collect();
    let mut expected = vec!["message_start", "content_block_start", "ping"];
    expected.extend(["content_block_delta"; 5]);
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names, expected);
    for (name, data) in &events {
        assert_eq!(data["type"], name.as_deref().unwrap());
    }
    let start = &events[0].1["message"];
    assert_eq!(start["model"], "claude-x");
    assert_eq!(start["usage"]["input_tokens"], 12);
    assert_eq!(start["usage"]["output_tokens"], 1);
    assert_eq!(start["usage"]["cache_creation_input_tokens"], 2);
    assert_eq!(start["usage"]["cache_read_input_tokens"], 3);
    let text: String = events
        .iter()
        .filter_map(|(_, d)| d.pointer("/delta/text")?.as_str())
        .collect();
    assert_eq!(text, "tok0 tok1 tok2 tok3 tok4 ");
    let delta = &events[events.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta["delta"]["stop_sequence"], serde_json::Value::Null);
    assert_eq!(delta["usage"]["output_tokens"], 5);
}

#[tokio::test]
async fn anthropic_streams_obey_the_stream_directives() {
    let upstream = FakeUpstream::start().await.unwrap();
    let mut headers = ANTHROPIC_HEADERS.to_vec();
    headers.push((directives::STREAM_CHUNKS, "0"));
    let empty = post(&upstream, "/v1/messages", &headers, &hello_claude(true)).await;
    let names: Vec<_> = events(&empty.text())
        .into_iter()
        .map(|(n, _)| n.unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    headers.push((directives::ECHO_KEY_IN, "stream"));
    let leaked = post(&upstream, "/v1/messages", &headers, &hello_claude(true)).await;
    assert!(leaked.text().contains(&format!("leaked {KEY} here")));
    assert!(leaked.frames.len() >= 3, "the leaking event is split");
}

#[tokio::test]
async fn anthropic_needs_its_key_and_version_headers() {
    let upstream = FakeUpstream::start().await.unwrap();
    let body = hello_claude(false);
    let without_key = post(
        &upstream,
        "/v1/messages",
        &[("anthropic-version", "2023-06-01")],
        &body,
    )
    .await;
    assert_eq!(without_key.status, StatusCode::UNAUTHORIZED);
    assert_eq!(without_key.json()["error"]["type"], "authentication_error");
    let bearer = bearer();
    let with_bearer = post(
        &upstream,
        "/v1/messages",
        &[
            ("authorization", &bearer),
            ("anthropic-version", "2023-06-01"),
        ],
        &body,
    )
    .await;
    assert_eq!(with_bearer.status, StatusCode::OK);
    let without_version = post(&upstream, "/v1/messages", &[("x-api-key", KEY)], &body).await;
    assert_eq!(without_version.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        without_version.json()["error"]["type"],
        "invalid_request_error"
    );
}

#[tokio::test]
async fn anthropic_errors_come_in_anthropic_s_envelope() {
    let upstream = FakeUpstream::start().await.unwrap();
    for (status, kind) in [
        ("529", "overloaded_error"),
        ("429", "rate_limit_error"),
        ("500", "api_error"),
        ("404", "not_found_error"),
        ("400", "invalid_request_error"),
    ] {
        let mut headers = ANTHROPIC_HEADERS.to_vec();
        headers.push((directives::STATUS, status));
        let answer = post(&upstream, "/v1/messages", &headers, &hello_claude(true)).await;
        assert_eq!(answer.status.as_str(), status);
        let body = answer.json();
        assert_eq!(body["type"], "error", "{body}");
        assert_eq!(body["error"]["type"], kind, "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains(status));
    }
    let mut headers = ANTHROPIC_HEADERS.to_vec();
    headers.push((directives::ECHO_KEY_IN, "body"));
    let echoed = post(&upstream, "/v1/messages", &headers, &hello_claude(false)).await;
    assert_eq!(echoed.status, StatusCode::UNAUTHORIZED);
    assert!(echoed.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains(KEY));
}

#[tokio::test]
async fn chat_tools_are_called_in_parallel_whole_and_streamed() {
    let upstream = FakeUpstream::start().await.unwrap();
    let mut body = serde_json::json!({
        "model": "m",
        "tools": weather_tools_chat(3),
        "messages": [{"role": "user", "content": "weather?"}],
    });
    let answer = post(&upstream, "/v1/chat/completions", &[], &body).await;
    let choice = &answer.json()["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2, "at most two calls");
    for (call, name) in calls.iter().zip(["get_weather", "get_time"]) {
        assert_eq!(call["type"], "function");
        assert_eq!(call["function"]["name"], name);
        let arguments: serde_json::Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(arguments, tool_arguments(name));
        assert_eq!(arguments["city"], "Paris");
    }
    assert_ne!(calls[0]["id"], calls[1]["id"]);

    body["stream"] = true.into();
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let streamed = post(&upstream, "/v1/chat/completions", &[], &body).await;
    let events = events(&streamed.text());
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let mut arguments = [String::new(), String::new()];
    let mut pieces = [0, 0];
    let mut names = Vec::new();
    let mut finish = None;
    for (_, chunk) in &events {
        for call in chunk
            .pointer("/choices/0/delta/tool_calls")
            .and_then(|c| c.as_array())
            .into_iter()
            .flatten()
        {
            let i = call["index"].as_u64().unwrap() as usize;
            if let Some(name) = call.pointer("/function/name") {
                names.push((i, name.as_str().unwrap().to_string(), call["id"].clone()));
            }
            let piece = call["function"]["arguments"].as_str().unwrap();
            if !piece.is_empty() {
                pieces[i] += 1;
            }
            arguments[i].push_str(piece);
        }
        if let Some(reason) = chunk
            .pointer("/choices/0/finish_reason")
            .and_then(|r| r.as_str())
        {
            finish = Some(reason.to_string());
        }
    }
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    assert_eq!(names.len(), 2);
    assert_eq!(names[1].1, "get_time");
    assert_eq!(pieces, [2, 2], "arguments arrive in pieces");
    for (i, name) in ["get_weather", "get_time"].iter().enumerate() {
        let parsed: serde_json::Value = serde_json::from_str(&arguments[i]).unwrap();
        assert_eq!(parsed, tool_arguments(name));
    }
    let usage = &events[events.len() - 2].1["usage"];
    assert_eq!(usage["completion_tokens"], 7, "1 + 3 per call");
}

#[tokio::test]
async fn the_last_text_chunk_has_the_finish_reason() {
    let upstream = FakeUpstream::start().await.unwrap();
    let answer = call(&upstream, &[(directives::STREAM_CHUNKS, "3")], true).await;
    let reasons: Vec<_> = events(&answer.text())
        .iter()
        .filter_map(|(_, c)| c.pointer("/choices/0/finish_reason").cloned())
        .collect();
    assert_eq!(
        reasons,
        [
            serde_json::Value::Null,
            serde_json::Value::Null,
            "stop".into()
        ]
    );
}

#[tokio::test]
async fn chat_tool_results_come_back_in_the_answer() {
    let upstream = FakeUpstream::start().await.unwrap();
    let mut body = serde_json::json!({
        "model": "m",
        "tools": weather_tools_chat(1),
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21C"},
        ],
    });
    let answer = post(&upstream, "/v1/chat/completions", &[], &body).await;
    let choice = &answer.json()["choices"][0];
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(choice["message"]["content"], "The tool said: sunny, 21C");

    body["stream"] = true.into();
    let streamed = post(&upstream, "/v1/chat/completions", &[], &body).await;
    let text: String = events(&streamed.text())
        .iter()
        .filter_map(|(_, c)| {
            c.pointer("/choices/0/delta/content")?
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(text, "The tool said: sunny, 21C");
}

#[tokio::test]
async fn anthropic_tools_are_called_in_parallel_whole_and_streamed() {
    let upstream = FakeUpstream::start().await.unwrap();
    let mut body = hello_claude(false);
    body["tools"] = weather_tools_anthropic(2);
    let message = messages(&upstream, body.clone()).await.json();
    assert_eq!(message["stop_reason"], "tool_use");
    let blocks = message["content"].as_array().unwrap();
    assert_eq!(blocks.len(), 2);
    for (block, name) in blocks.iter().zip(["get_weather", "get_time"]) {
        assert_eq!(block["type"], "tool_use");
        assert!(block["id"].as_str().unwrap().starts_with("toolu_"));
        assert_eq!(block["name"], name);
        assert_eq!(block["input"], tool_arguments(name));
    }

    body["stream"] = true.into();
    let events = events(&messages(&upstream, body).await.text());
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_deref().unwrap()).collect();
    assert_eq!(&names[..2], ["message_start", "ping"]);
    assert_eq!(&names[names.len() - 2..], ["message_delta", "message_stop"]);
    let mut inputs = [String::new(), String::new()];
    let mut pieces = [0, 0];
    for (name, data) in &events {
        if name.as_deref() == Some("content_block_start") {
            let i = data["index"].as_u64().unwrap() as usize;
            assert_eq!(data["content_block"]["type"], "tool_use");
            assert_eq!(
                data["content_block"]["name"],
                ["get_weather", "get_time"][i]
            );
        }
        if let Some(piece) = data.pointer("/delta/partial_json") {
            let i = data["index"].as_u64().unwrap() as usize;
            inputs[i].push_str(piece.as_str().unwrap());
            pieces[i] += 1;
        }
    }
    assert_eq!(pieces, [2, 2]);
    for (i, name) in ["get_weather", "get_time"].iter().enumerate() {
        let parsed: serde_json::Value = serde_json::from_str(&inputs[i]).unwrap();
        assert_eq!(parsed, tool_arguments(name));
    }
    let delta = &events[events.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    assert_eq!(delta["usage"]["output_tokens"], 8, "4 per call");
}

#[tokio::test]
async fn anthropic_tool_results_come_back_in_the_answer() {
    let upstream = FakeUpstream::start().await.unwrap();
    let mut body = hello_claude(false);
    body["tools"] = weather_tools_anthropic(1);
    body["messages"] = serde_json::json!([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "t2", "content": [{"type": "text", "text": "21C"}]},
        ]},
    ]);
    let message = messages(&upstream, body.clone()).await.json();
    assert_eq!(message["stop_reason"], "end_turn");
    assert_eq!(message["content"][0]["text"], "The tool said: sunny 21C");

    body["stream"] = true.into();
    let text: String = events(&messages(&upstream, body).await.text())
        .iter()
        .filter_map(|(_, d)| d.pointer("/delta/text")?.as_str().map(str::to_string))
        .collect();
    assert_eq!(text, "The tool said: sunny 21C");
}

#[tokio::test]
async fn counts_tokens_for_anthropic() {
    let upstream = FakeUpstream::start().await.unwrap();
    let answer = post(
        &upstream,
        "/v1/messages/count_tokens",
        &ANTHROPIC_HEADERS,
        &hello_claude(false),
    )
    .await;
    assert_eq!(answer.json(), serde_json::json!({"input_tokens": 12}));
}

#[tokio::test]
async fn the_responses_api_is_a_404_like_a_chat_only_server() {
    let upstream = FakeUpstream::start().await.unwrap();
    let body = serde_json::json!({"model": "m", "input": "hi"});
    let answer = post(&upstream, "/v1/responses", &[], &body).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.json()["error"]["type"], "not_found_error");
}

#[test]
fn fingerprints_are_fnv_1a_64() {
    assert_eq!(fingerprint(b""), "fnv1a64:cbf29ce484222325");
    assert_eq!(fingerprint(b"a"), "fnv1a64:af63dc4c8601ec8c");
}

#[tokio::test]
async fn shows_what_it_received_with_keys_as_fingerprints() {
    let upstream = FakeUpstream::start().await.unwrap();
    let bearer = bearer();
    call(&upstream, &[("authorization", &bearer)], false).await;
    messages(&upstream, hello_claude(false)).await;
    let inspect = Request::get(format!("http://{}{INSPECT_PATH}", upstream.addr()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let answer = send(inspect).await;
    assert!(!answer.text().contains(KEY), "{}", answer.text());
    let seen = answer.json();
    let seen = seen.as_array().unwrap();
    assert_eq!(seen.len(), 2, "the inspection itself is not recorded");
    let key = fingerprint(KEY.as_bytes());
    assert_eq!(seen[0]["path"], "/v1/chat/completions");
    assert_eq!(seen[0]["headers"]["authorization"], format!("Bearer {key}"));
    assert_eq!(seen[0]["body"]["messages"][0]["content"], "hi");
    assert_eq!(seen[1]["method"], "POST");
    assert_eq!(seen[1]["path"], "/v1/messages");
    assert_eq!(seen[1]["headers"]["x-api-key"], key);
    assert_eq!(seen[1]["headers"]["anthropic-version"], "2023-06-01");
    assert_eq!(seen[1]["headers"].get("authorization"), None);
}

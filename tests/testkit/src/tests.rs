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
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let body = serde_json::json!({
        "model": "m",
        "stream": stream,
        "stream_options": {"include_usage": stream},
        "messages": [{"role": "user", "content": "hi"}],
    });
    let mut request = Request::post(format!("{}/chat/completions", upstream.base_url()))
        .header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
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

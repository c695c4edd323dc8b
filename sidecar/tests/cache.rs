//! The response cache against real processes: what the fake upstream is asked (its recorded
//! requests), what the app gets (status, `x-llmesh-cache`, bodies, streams) and the metrics,
//! with the answers kept in the sidecar's memory or in a real `redis-server` shared by two
//! sidecars.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::redis::{free_port, Redis};
use common::{client, eventually, KubeletVolume, Sidecar};
use llmesh_testkit::{directives, usage, FakeUpstream};
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";
const EMBEDDINGS: &str = "/v1/embeddings";

/// A sidecar with one openai-compatible endpoint `chat` on the fake upstream, retries off,
/// with `cache` as its cache block (YAML flow style) and `extra` endpoint fields.
fn sidecar_with(upstream: &FakeUpstream, cache: &str, extra: &str) -> Sidecar {
    Sidecar::start(&endpoints_yaml(upstream, &[("chat", cache, extra)]))
}

fn cached(upstream: &FakeUpstream) -> Sidecar {
    sidecar_with(upstream, "{ttl: 60s}", "")
}

/// `endpoints:` with (name, cache block, extra fields) each, all on the same upstream model.
fn endpoints_yaml(upstream: &FakeUpstream, endpoints: &[(&str, &str, &str)]) -> String {
    let mut yaml = String::from("endpoints:\n");
    for (name, cache, extra) in endpoints {
        yaml.push_str(&format!(
            "  - name: {name}
    provider: openai-compatible
    model: upstream-model
    baseUrl: {base}
    retry: {{maxAttempts: 1}}
    cache: {cache}
{extra}",
            base = upstream.base_url()
        ));
    }
    yaml
}

/// What the app received.
struct Answer {
    status: u16,
    cache: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

async fn call(sidecar: &Sidecar, path: &str, body: &Value, headers: &[(&str, &str)]) -> Answer {
    send_raw(sidecar, path, body.to_string(), headers).await
}

async fn send_raw(sidecar: &Sidecar, path: &str, body: String, headers: &[(&str, &str)]) -> Answer {
    let mut request = client()
        .post(sidecar.url(path))
        .header("content-type", "application/json")
        .body(body)
        .timeout(Duration::from_secs(20));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let cache = response
        .headers()
        .get("x-llmesh-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = response.text().await.unwrap_or_default();
    Answer {
        status,
        cache,
        body,
    }
}

fn chat(prompt: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": "chat",
        "temperature": 0,
        "messages": [{"role": "user", "content": prompt}],
    });
    merge(&mut body, extra);
    body
}

fn completion(prompt: &str, extra: Value) -> Value {
    let mut body = json!({"model": "chat", "temperature": 0, "prompt": prompt});
    merge(&mut body, extra);
    body
}

fn embedding(input: &str) -> Value {
    json!({"model": "chat", "input": [input, "second"]})
}

fn merge(body: &mut Value, extra: Value) {
    if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
}

fn streamed() -> Value {
    json!({"stream": true})
}

/// What a stream added up to: its text (chat content or completion text), its last
/// finish_reason, the ids of its chunks, and the usage chunk's usage.
#[derive(Debug, PartialEq)]
struct Streamed {
    text: String,
    finish_reason: Option<String>,
    ids: Vec<String>,
    usage: Option<Value>,
    done: bool,
}

fn read_stream(body: &str) -> Streamed {
    let mut streamed = Streamed {
        text: String::new(),
        finish_reason: None,
        ids: Vec::new(),
        usage: None,
        done: false,
    };
    for line in body.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            streamed.done = true;
            continue;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        if let Some(id) = chunk["id"].as_str() {
            streamed.ids.push(id.to_string());
        }
        if !chunk["usage"].is_null() {
            streamed.usage = Some(chunk["usage"].clone());
        }
        // A stream cut short ends with an error event instead of `[DONE]`.
        for choice in chunk["choices"].as_array().into_iter().flatten() {
            let piece = choice["delta"]["content"]
                .as_str()
                .or(choice["text"].as_str());
            streamed.text.push_str(piece.unwrap_or(""));
            if let Some(reason) = choice["finish_reason"].as_str() {
                streamed.finish_reason = Some(reason.to_string());
            }
        }
    }
    streamed
}

/// The text and finish_reason of a JSON answer.
fn json_text(answer: &Value) -> (String, Option<String>) {
    let choice = &answer["choices"][0];
    let text = choice["message"]["content"]
        .as_str()
        .or(choice["text"].as_str())
        .unwrap()
        .to_string();
    (text, choice["finish_reason"].as_str().map(str::to_string))
}

fn upstream_calls(upstream: &FakeUpstream, path: &str) -> usize {
    upstream
        .requests()
        .iter()
        .filter(|r| r.path_and_query == path)
        .count()
}

/// Each route, missed as JSON or as a stream, is then answered from the cache both ways, with
/// the content the miss had.
#[tokio::test]
async fn every_route_hits_as_json_and_as_stream_whichever_way_it_missed() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = cached(&upstream);
    type Body = fn(&str, Value) -> Value;
    let routes: [(&str, Body); 2] = [(CHAT, chat), (COMPLETIONS, completion)];
    for (path, body) in routes {
        for miss_streams in [false, true] {
            let prompt = format!("{path} missed as stream: {miss_streams}");
            let as_json = body(&prompt, json!({}));
            let as_stream = body(&prompt, streamed());
            let before = upstream_calls(&upstream, path);

            let miss = call(
                &sidecar,
                path,
                if miss_streams { &as_stream } else { &as_json },
                &[],
            )
            .await;
            assert_eq!(
                (miss.status, miss.cache.as_str()),
                (200, "miss"),
                "{prompt}"
            );
            let (text, finish_reason, id) = if miss_streams {
                let s = read_stream(&miss.body);
                assert!(s.done, "{prompt}: {}", miss.body);
                (s.text, s.finish_reason, s.ids[0].clone())
            } else {
                let answer = miss.json();
                let (text, reason) = json_text(&answer);
                (text, reason, answer["id"].as_str().unwrap().to_string())
            };
            assert!(!text.is_empty(), "{prompt}");

            let hit = call(&sidecar, path, &as_json, &[]).await;
            assert_eq!(
                (hit.status, hit.cache.as_str()),
                (200, "hit-memory"),
                "{prompt}"
            );
            if !miss_streams {
                assert_eq!(
                    hit.body, miss.body,
                    "{prompt}: a JSON hit is the stored bytes"
                );
            }
            let answer = hit.json();
            assert_eq!(
                json_text(&answer),
                (text.clone(), finish_reason.clone()),
                "{prompt}"
            );
            assert_eq!(answer["id"], id.as_str(), "{prompt}");

            let hit = call(&sidecar, path, &as_stream, &[]).await;
            assert_eq!(
                (hit.status, hit.cache.as_str()),
                (200, "hit-memory"),
                "{prompt}"
            );
            let s = read_stream(&hit.body);
            assert!(s.done, "{prompt}: {}", hit.body);
            assert_eq!((s.text, s.finish_reason), (text, finish_reason), "{prompt}");
            assert!(s.ids.len() > 2, "{prompt}: chunked: {}", hit.body);
            assert!(s.ids.iter().all(|i| *i == id), "{prompt}");
            assert_eq!(s.usage, None, "{prompt}: no usage chunk unless asked");

            assert_eq!(upstream_calls(&upstream, path), before + 1, "{prompt}");
        }
    }

    let miss = call(&sidecar, EMBEDDINGS, &embedding("vectors"), &[]).await;
    assert_eq!((miss.status, miss.cache.as_str()), (200, "miss"));
    assert_eq!(miss.json()["data"].as_array().unwrap().len(), 2);
    let hit = call(&sidecar, EMBEDDINGS, &embedding("vectors"), &[]).await;
    assert_eq!((hit.status, hit.cache.as_str()), (200, "hit-memory"));
    assert_eq!(hit.body, miss.body);
    assert_eq!(upstream_calls(&upstream, EMBEDDINGS), 1);
}

#[tokio::test]
async fn a_stream_hit_carries_the_stored_usage_when_asked() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = cached(&upstream);
    let miss = call(&sidecar, CHAT, &chat("usage", json!({})), &[]).await;
    assert_eq!(miss.cache, "miss");
    let with_usage = chat(
        "usage",
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let hit = call(&sidecar, CHAT, &with_usage, &[]).await;
    assert_eq!(hit.cache, "hit-memory");
    let s = read_stream(&hit.body);
    assert_eq!(s.usage.as_ref(), Some(&miss.json()["usage"]));
    assert_eq!(upstream.requests().len(), 1);
}

/// Key order, whitespace, `stream`, `stream_options` and `user` do not split entries; the
/// prompt and other parameters do.
#[tokio::test]
async fn equivalent_bodies_share_an_entry() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = cached(&upstream);
    let first = send_raw(
        &sidecar,
        CHAT,
        r#"{"model":"chat","temperature":0,"max_tokens":5,"messages":[{"role":"user","content":"same"}]}"#
            .to_string(),
        &[],
    )
    .await;
    assert_eq!(first.cache, "miss");
    let equivalent = [
        "{\n  \"messages\" : [ { \"content\" : \"same\", \"role\" : \"user\" } ],\n  \"max_tokens\": 5, \"temperature\" : 0, \"model\" : \"chat\"\n}",
        r#"{"model":"chat","temperature":0,"max_tokens":5,"messages":[{"role":"user","content":"same"}],"user":"someone-else"}"#,
        r#"{"model":"chat","temperature":0,"max_tokens":5,"messages":[{"role":"user","content":"same"}],"stream":false}"#,
        r#"{"model":"chat","temperature":0,"max_tokens":5,"messages":[{"role":"user","content":"same"}],"stream":true,"stream_options":{"include_usage":true}}"#,
    ];
    for body in equivalent {
        let hit = send_raw(&sidecar, CHAT, body.to_string(), &[]).await;
        assert_eq!(
            (hit.status, hit.cache.as_str()),
            (200, "hit-memory"),
            "{body}"
        );
    }
    let different = [
        r#"{"model":"chat","temperature":0,"max_tokens":6,"messages":[{"role":"user","content":"same"}]}"#,
        r#"{"model":"chat","temperature":0,"max_tokens":5,"messages":[{"role":"user","content":"Same"}]}"#,
        r#"{"model":"chat","temperature":0,"max_tokens":5,"messages":[{"role":"system","content":"same"}]}"#,
    ];
    for body in different {
        let miss = send_raw(&sidecar, CHAT, body.to_string(), &[]).await;
        assert_eq!((miss.status, miss.cache.as_str()), (200, "miss"), "{body}");
    }
    assert_eq!(upstream.requests().len(), 1 + different.len());
}

#[tokio::test]
async fn answers_expire_after_the_ttl() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_with(&upstream, "{ttl: 1s}", "");
    let body = chat("short-lived", json!({}));
    assert_eq!(call(&sidecar, CHAT, &body, &[]).await.cache, "miss");
    assert_eq!(call(&sidecar, CHAT, &body, &[]).await.cache, "hit-memory");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(call(&sidecar, CHAT, &body, &[]).await.cache, "miss");
    assert_eq!(call(&sidecar, CHAT, &body, &[]).await.cache, "hit-memory");
    assert_eq!(upstream.requests().len(), 2);
}

/// The value of the first sample of `metric` whose labels contain all of `labels`.
fn sample(metrics: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} ")))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn the_memory_bound_holds_and_evicts() {
    let upstream = FakeUpstream::start().await.unwrap();
    // Each answer is about 1 KiB (the fake's JSON body): the level holds about 30 of them
    // (an entry may be at most a sixteenth of the level).
    let sidecar = sidecar_with(
        &upstream,
        "{maxEntryBytes: 2000, memory: {maxBytes: 32000}}",
        "",
    );
    let mut size = 0;
    for i in 0..100 {
        let answer = call(
            &sidecar,
            CHAT,
            &chat(&format!("prompt {i}"), json!({})),
            &[],
        )
        .await;
        assert_eq!(answer.cache, "miss", "{i}");
        size = answer.body.len();
    }
    let held = sample(
        &sidecar.metrics_text().await,
        "llmesh_cache_memory_bytes",
        &["endpoint=\"chat\""],
    )
    .unwrap();
    assert!(held > 0.0 && held <= 32000.0, "{held}");
    let last = call(&sidecar, CHAT, &chat("prompt 99", json!({})), &[]).await;
    assert_eq!(last.cache, "hit-memory", "the latest answer is kept");
    // Asked again in order, only the answers still held are hits (each miss is stored
    // again, and may evict one that would have been).
    let mut hits = Vec::new();
    for i in 0..100 {
        let again = call(
            &sidecar,
            CHAT,
            &chat(&format!("prompt {i}"), json!({})),
            &[],
        )
        .await;
        if again.cache == "hit-memory" {
            hits.push(i);
        }
    }
    // quick_cache keeps answers it already held over new ones asked for once (a burst of
    // one-off prompts does not flush them): here the first ones.
    assert!(
        !hits.is_empty() && hits.len() * size <= 32000,
        "{size} {hits:?}"
    );
    assert_eq!(upstream.requests().len(), 100 + 100 - hits.len());
}

#[tokio::test]
async fn answers_over_the_entry_limit_are_not_stored() {
    let upstream = FakeUpstream::start().await.unwrap();
    // The fake's JSON answer is about 1 KiB; its 5-chunk stream about 1 KiB of events that
    // fold into a 300-byte answer.
    let sidecar = sidecar_with(&upstream, "{maxEntryBytes: 200}", "");
    for body in [chat("big", json!({})), chat("big stream", streamed())] {
        for _ in 0..2 {
            let answer = call(&sidecar, CHAT, &body, &[]).await;
            assert_eq!((answer.status, answer.cache.as_str()), (200, "miss"));
        }
    }
    assert_eq!(upstream.requests().len(), 4);
    let held = sample(
        &sidecar.metrics_text().await,
        "llmesh_cache_memory_bytes",
        &[],
    );
    assert_eq!(held, Some(0.0));
}

#[tokio::test]
async fn two_endpoints_on_the_same_model_do_not_share_answers() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = Sidecar::start(&endpoints_yaml(
        &upstream,
        &[("team-a", "{ttl: 60s}", ""), ("team-b", "{ttl: 60s}", "")],
    ));
    let body = |model: &str| {
        let mut body = chat("shared prompt", json!({}));
        body["model"] = model.into();
        body
    };
    assert_eq!(
        call(&sidecar, CHAT, &body("team-a"), &[]).await.cache,
        "miss"
    );
    assert_eq!(
        call(&sidecar, CHAT, &body("team-b"), &[]).await.cache,
        "miss"
    );
    assert_eq!(
        call(&sidecar, CHAT, &body("team-a"), &[]).await.cache,
        "hit-memory"
    );
    assert_eq!(
        call(&sidecar, CHAT, &body("team-b"), &[]).await.cache,
        "hit-memory"
    );
    assert_eq!(upstream.requests().len(), 2);
    let models: Vec<Value> = upstream
        .requests()
        .iter()
        .map(|r| r.json()["model"].clone())
        .collect();
    assert_eq!(models, ["upstream-model", "upstream-model"]);
}

async fn fingerprint(sidecar: &Sidecar) -> String {
    let (_, ready) = sidecar.readiness().await;
    ready["endpoints"][0]["credentialFingerprint"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[tokio::test]
async fn a_rotated_key_does_not_see_the_previous_keys_answers() {
    let upstream = FakeUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret_dir = dir.path().join("secret");
    let mut secret = KubeletVolume::create(&secret_dir, &[("apiKey", "sk-first\n")]);
    let key = secret_dir.join("apiKey");
    let sidecar = sidecar_with(&upstream, "{ttl: 60s}", &credential_field(&key));
    let body = chat("per key", json!({}));
    assert_eq!(call(&sidecar, CHAT, &body, &[]).await.cache, "miss");
    assert_eq!(call(&sidecar, CHAT, &body, &[]).await.cache, "hit-memory");
    let first = fingerprint(&sidecar).await;

    secret.update(&[("apiKey", "sk-second\n")]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            let now = fingerprint(&sidecar).await;
            !now.is_empty() && now != first
        })
        .await
    );
    assert_eq!(call(&sidecar, CHAT, &body, &[]).await.cache, "miss");
    assert_eq!(call(&sidecar, CHAT, &body, &[]).await.cache, "hit-memory");
    let keys: Vec<String> = upstream
        .requests()
        .iter()
        .map(|r| r.header("authorization").unwrap_or("").to_string())
        .collect();
    assert_eq!(keys, ["Bearer sk-first", "Bearer sk-second"]);
}

fn credential_field(key: &Path) -> String {
    format!("    credential: {{file: {}}}\n", key.display())
}

#[tokio::test]
async fn no_cache_fetches_and_stores_no_store_does_neither() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = cached(&upstream);
    let no_cache = [("x-llmesh-cache", "no-cache")];
    let no_store = [("x-llmesh-cache", "no-store")];

    let fresh = chat("fetched, then stored", json!({}));
    assert_eq!(call(&sidecar, CHAT, &fresh, &no_cache).await.cache, "miss");
    assert_eq!(call(&sidecar, CHAT, &fresh, &[]).await.cache, "hit-memory");
    // An entry already there is not used, but replaced.
    assert_eq!(call(&sidecar, CHAT, &fresh, &no_cache).await.cache, "miss");
    assert_eq!(upstream.requests().len(), 2);

    let private = chat("neither looked up nor stored", json!({}));
    assert_eq!(
        call(&sidecar, CHAT, &private, &no_store).await.cache,
        "bypass"
    );
    assert_eq!(call(&sidecar, CHAT, &private, &[]).await.cache, "miss");
    assert_eq!(
        call(&sidecar, CHAT, &private, &no_store).await.cache,
        "bypass"
    );
    assert_eq!(
        call(&sidecar, CHAT, &private, &[]).await.cache,
        "hit-memory"
    );
    assert_eq!(upstream.requests().len(), 5);
    for sent in upstream.requests() {
        assert_eq!(
            sent.header("x-llmesh-cache"),
            None,
            "the directive stays in the pod"
        );
    }
}

#[tokio::test]
async fn sampling_and_several_choices_bypass_unless_sampling_is_allowed() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = Sidecar::start(&endpoints_yaml(
        &upstream,
        &[("chat", "{}", ""), ("sampled", "{allowSampling: true}", "")],
    ));
    let mut bodies = vec![
        json!({"model": "chat", "messages": [{"role": "user", "content": "no temperature"}]}),
        chat("warm", json!({"temperature": 0.7})),
        chat("two choices", json!({"n": 2})),
    ];
    bodies.push(completion("warm", json!({"temperature": 1})));
    for body in &bodies {
        for _ in 0..2 {
            let path = if body.get("prompt").is_some() {
                COMPLETIONS
            } else {
                CHAT
            };
            let answer = call(&sidecar, path, body, &[]).await;
            assert_eq!(
                (answer.status, answer.cache.as_str()),
                (200, "bypass"),
                "{body}"
            );
        }
    }
    assert_eq!(upstream.requests().len(), 2 * bodies.len());

    let sampled =
        json!({"model": "sampled", "messages": [{"role": "user", "content": "no temperature"}]});
    assert_eq!(call(&sidecar, CHAT, &sampled, &[]).await.cache, "miss");
    assert_eq!(
        call(&sidecar, CHAT, &sampled, &[]).await.cache,
        "hit-memory"
    );
    let mut two = sampled.clone();
    two["n"] = 2.into();
    assert_eq!(call(&sidecar, CHAT, &two, &[]).await.cache, "bypass");
    assert_eq!(upstream.requests().len(), 2 * bodies.len() + 2);
}

#[tokio::test]
async fn errors_and_cut_streams_are_not_stored() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = cached(&upstream);
    let body = chat("fails first", json!({}));
    let failed = call(&sidecar, CHAT, &body, &[(directives::STATUS, "500")]).await;
    assert_eq!((failed.status, failed.cache.as_str()), (500, "miss"));
    let answer = call(&sidecar, CHAT, &body, &[]).await;
    assert_eq!((answer.status, answer.cache.as_str()), (200, "miss"));
    assert_eq!(call(&sidecar, CHAT, &body, &[]).await.cache, "hit-memory");
    assert_eq!(upstream.requests().len(), 2);

    let stream = chat("cut short", streamed());
    let cut = call(
        &sidecar,
        CHAT,
        &stream,
        &[(directives::FAIL_AFTER_CHUNKS, "2")],
    )
    .await;
    assert_eq!((cut.status, cut.cache.as_str()), (200, "miss"));
    assert!(!read_stream(&cut.body).done, "{}", cut.body);
    let whole = call(&sidecar, CHAT, &stream, &[]).await;
    assert_eq!((whole.status, whole.cache.as_str()), (200, "miss"));
    assert!(read_stream(&whole.body).done);
    assert_eq!(call(&sidecar, CHAT, &stream, &[]).await.cache, "hit-memory");
    assert_eq!(upstream.requests().len(), 4);
}

/// Ten identical requests at once: one goes upstream, the others wait for its answer.
#[tokio::test]
async fn concurrent_identical_misses_make_one_upstream_call() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = cached(&upstream);
    let delay = [(directives::DELAY_MS, "300")];
    for (prompt, stream) in [("together", false), ("together, streamed", true)] {
        let body = if stream {
            chat(prompt, streamed())
        } else {
            chat(prompt, json!({}))
        };
        let before = upstream.requests().len();
        let answers =
            futures::future::join_all((0..10).map(|_| call(&sidecar, CHAT, &body, &delay))).await;
        assert_eq!(upstream.requests().len(), before + 1, "{prompt}");
        let mut outcomes: Vec<&str> = answers.iter().map(|a| a.cache.as_str()).collect();
        outcomes.sort_unstable();
        let mut expected = vec!["hit-memory"; 9];
        expected.push("miss");
        assert_eq!(outcomes, expected, "{prompt}");
        for answer in &answers {
            assert_eq!(answer.status, 200);
            if stream {
                let s = read_stream(&answer.body);
                assert!(s.done);
                assert_eq!(s.text, read_stream(&answers[0].body).text, "{prompt}");
            } else {
                assert_eq!(answer.body, answers[0].body, "{prompt}");
            }
        }
    }
}

#[tokio::test]
async fn hits_spend_no_rate_limit_budget() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_with(
        &upstream,
        "{ttl: 60s}",
        "    limits: {requestsPerMinute: 1, queueTimeout: 100ms}\n",
    );
    let body = chat("limited", json!({}));
    assert_eq!(call(&sidecar, CHAT, &body, &[]).await.status, 200);
    for _ in 0..3 {
        let hit = call(&sidecar, CHAT, &body, &[]).await;
        assert_eq!((hit.status, hit.cache.as_str()), (200, "hit-memory"));
    }
    let other = call(&sidecar, CHAT, &chat("another prompt", json!({})), &[]).await;
    assert_eq!(other.status, 429, "{}", other.body);
    assert_eq!(upstream.requests().len(), 1);
}

#[tokio::test]
async fn metrics_and_log_lines_say_what_the_cache_did() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = sidecar_with(
        &upstream,
        "{ttl: 60s}",
        "    price: {inputPerMillionTokens: 1000, outputPerMillionTokens: 2000}\n",
    );
    let body = chat("counted", json!({}));
    assert_eq!(call(&sidecar, CHAT, &body, &[]).await.cache, "miss");
    assert_eq!(call(&sidecar, CHAT, &body, &[]).await.cache, "hit-memory");
    assert_eq!(
        call(&sidecar, CHAT, &chat("counted", streamed()), &[])
            .await
            .cache,
        "hit-memory"
    );
    let sampled = chat("sampled", json!({"temperature": 1}));
    assert_eq!(call(&sidecar, CHAT, &sampled, &[]).await.cache, "bypass");

    let metrics = sidecar.metrics_text().await;
    let requests = |cache: &str| {
        sample(
            &metrics,
            "llmesh_requests_total",
            &[
                "endpoint=\"chat\"",
                "status=\"200\"",
                &format!("cache=\"{cache}\""),
            ],
        )
    };
    assert_eq!(requests("miss"), Some(1.0), "{metrics}");
    assert_eq!(requests("hit-memory"), Some(2.0), "{metrics}");
    assert_eq!(requests("bypass"), Some(1.0), "{metrics}");
    let saved = |kind: &str| {
        sample(
            &metrics,
            "llmesh_cache_saved_tokens_total",
            &["endpoint=\"chat\"", &format!("token_type=\"{kind}\"")],
        )
    };
    assert_eq!(
        saved("input"),
        Some(2.0 * usage::PROMPT_TOKENS as f64),
        "{metrics}"
    );
    assert_eq!(
        saved("output"),
        Some(2.0 * usage::COMPLETION_TOKENS as f64),
        "{metrics}"
    );
    let cost = sample(
        &metrics,
        "llmesh_cache_saved_cost_usd_total",
        &["endpoint=\"chat\""],
    )
    .unwrap();
    let expected = 2.0
        * (usage::PROMPT_TOKENS as f64 * 1000.0 + usage::COMPLETION_TOKENS as f64 * 2000.0)
        / 1e6;
    assert!((cost - expected).abs() < 1e-9, "{cost} != {expected}");
    let held = sample(
        &metrics,
        "llmesh_cache_memory_bytes",
        &["endpoint=\"chat\""],
    )
    .unwrap();
    assert!(held > 500.0, "{held}");

    // Hits are logged like any request, with what the cache did.
    assert!(
        eventually(Duration::from_secs(2), || async {
            sidecar.log_events("request").len() >= 4
        })
        .await
    );
    let caches: Vec<Value> = sidecar
        .log_events("request")
        .iter()
        .map(|l| l["cache"].clone())
        .collect();
    assert_eq!(caches, ["miss", "hit-memory", "hit-memory", "bypass"]);
}

/// True when the cache's Redis holds at least `n` keys, none of them with prompt text.
async fn cache_keys(port: u16, n: usize) -> bool {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else {
        return false;
    };
    let Ok(mut connection) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut connection)
        .await
        .unwrap_or_default();
    for key in &keys {
        let hash = key
            .strip_prefix("llmesh:cache:chat:")
            .unwrap_or_else(|| panic!("{key}"));
        assert!(
            hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
            "{key}"
        );
    }
    keys.len() >= n
}

const UNREACHABLE: &str = "the shared cache's Redis is unreachable";

#[tokio::test]
async fn two_sidecars_share_answers_through_redis_and_survive_its_outage() {
    let upstream = FakeUpstream::start().await.unwrap();
    let mut redis = Redis::start_on(free_port());
    let cache = format!(
        "{{ttl: 60s, shared: {{url: 'redis://127.0.0.1:{}', timeout: 200ms}}}}",
        redis.port
    );
    let a = sidecar_with(&upstream, &cache, "");
    let b = sidecar_with(&upstream, &cache, "");

    let body = chat("shared", json!({}));
    let miss = call(&a, CHAT, &body, &[]).await;
    assert_eq!(miss.cache, "miss");
    // A stores into Redis in the background, just after its answer ends.
    assert!(eventually(Duration::from_secs(5), || cache_keys(redis.port, 1)).await);
    let shared = call(&b, CHAT, &body, &[]).await;
    assert_eq!(shared.cache, "hit-shared");
    assert_eq!(shared.body, miss.body);
    assert_eq!(call(&b, CHAT, &body, &[]).await.cache, "hit-memory");
    // The stream of a shared answer.
    let s = read_stream(&call(&b, CHAT, &chat("shared", streamed()), &[]).await.body);
    assert_eq!(s.text, json_text(&miss.json()).0);
    assert_eq!(upstream.requests().len(), 1);

    redis.stop();
    let before = upstream.requests().len();
    for i in 0..5 {
        for sidecar in [&a, &b] {
            let answer = call(sidecar, CHAT, &chat(&format!("outage {i}"), json!({})), &[]).await;
            assert_eq!(
                (answer.status, answer.cache.as_str()),
                (200, "miss"),
                "{}",
                answer.body
            );
        }
    }
    // What each had in memory is still served.
    assert_eq!(call(&b, CHAT, &body, &[]).await.cache, "hit-memory");
    assert_eq!(upstream.requests().len(), before + 10);
    for sidecar in [&a, &b] {
        let warnings = sidecar.logs().matches(UNREACHABLE).count();
        assert_eq!(warnings, 1, "logged once:\n{}", sidecar.logs());
    }

    let _redis = Redis::start_on(redis.port);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut round = 0;
    loop {
        // A's first store may fail while its link reconnects: a new prompt each round.
        round += 1;
        let body = chat(&format!("after the outage {round}"), json!({}));
        assert_eq!(call(&a, CHAT, &body, &[]).await.cache, "miss");
        if eventually(Duration::from_millis(500), || cache_keys(redis.port, 1)).await {
            assert_eq!(call(&b, CHAT, &body, &[]).await.cache, "hit-shared");
            break;
        }
        assert!(Instant::now() < deadline, "not shared again:\n{}", a.logs());
    }
    assert!(
        b.wait_for_log("reachable again", Duration::from_secs(1))
            .await
    );
}

/// An answer a fallback gave is not stored under the failed endpoint's key.
#[tokio::test]
async fn a_fallbacks_answer_is_not_stored_as_the_endpoints() {
    let upstream = FakeUpstream::start().await.unwrap();
    let closed = free_port();
    let sidecar = Sidecar::start(&format!(
        "endpoints:
  - name: broken
    provider: openai-compatible
    model: upstream-model
    baseUrl: http://127.0.0.1:{closed}/v1
    retry: {{maxAttempts: 1}}
    fallbacks: [working]
    cache: {{ttl: 60s}}
  - name: working
    provider: openai-compatible
    model: upstream-model
    baseUrl: {base}
    retry: {{maxAttempts: 1}}
",
        base = upstream.base_url()
    ));
    let mut body = chat("through the fallback", json!({}));
    body["model"] = "broken".into();
    for _ in 0..2 {
        let answer = call(&sidecar, CHAT, &body, &[]).await;
        assert_eq!((answer.status, answer.cache.as_str()), (200, "miss"));
    }
    assert_eq!(upstream.requests().len(), 2);
}

//! `--otlp-endpoint`: one span per request reaches a collector (a loopback OTLP/HTTP receiver
//! standing in for the OpenTelemetry Collector), in the app's trace, with GenAI attributes.

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{client, eventually, Sidecar};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use llmesh_testkit::{directives, FakeUpstream};
use serde_json::{json, Value};

/// Receives OTLP/HTTP JSON exports and keeps every span.
struct Collector {
    addr: std::net::SocketAddr,
    spans: Arc<Mutex<Vec<Value>>>,
}

impl Collector {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&spans);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let sink = Arc::clone(&sink);
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                        let sink = Arc::clone(&sink);
                        async move {
                            assert_eq!(request.uri().path(), "/v1/traces");
                            let body = request.into_body().collect().await.unwrap().to_bytes();
                            let export: Value = serde_json::from_slice(&body).unwrap();
                            for resource in export["resourceSpans"].as_array().unwrap() {
                                for scope in resource["scopeSpans"].as_array().unwrap() {
                                    for span in scope["spans"].as_array().unwrap() {
                                        let mut span = span.clone();
                                        span["resource"] = resource["resource"].clone();
                                        sink.lock().unwrap().push(span);
                                    }
                                }
                            }
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}"))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, spans }
    }

    fn spans(&self) -> Vec<Value> {
        self.spans.lock().unwrap().clone()
    }
}

/// The value of attribute `key` of an OTLP JSON span.
fn attribute<'a>(span: &'a Value, key: &str) -> &'a Value {
    span["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| &a["value"])
        .unwrap_or(&Value::Null)
}

#[tokio::test]
async fn each_request_is_a_span_in_the_apps_trace_with_genai_attributes() {
    let collector = Collector::start().await;
    let upstream = FakeUpstream::start().await.unwrap();
    let endpoint = format!("http://{}", collector.addr);
    let sidecar = Sidecar::start_with_flags(
        &format!(
            "endpoints:
  - name: chat
    provider: openai-compatible
    baseUrl: {}
    model: upstream-model
",
            upstream.base_url()
        ),
        &["--otlp-endpoint", &endpoint],
    );

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let app_span = "00f067aa0ba902b7";
    let r = client()
        .post(sidecar.url("/v1/chat/completions"))
        .header("traceparent", format!("00-{trace_id}-{app_span}-01"))
        .json(&json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    // An app that does not sample its trace gets no span exported.
    client()
        .post(sidecar.url("/v1/chat/completions"))
        .header(
            "traceparent",
            "00-11111111111111111111111111111111-2222222222222222-00",
        )
        .json(&json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    // An upstream error is a span with an error status.
    client()
        .post(sidecar.url("/v1/chat/completions"))
        .header(directives::STATUS, "400")
        .json(&json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();

    assert!(
        eventually(Duration::from_secs(10), || async {
            collector.spans().len() >= 2
        })
        .await,
        "no spans exported; logs:\n{}",
        sidecar.logs()
    );
    let spans = collector.spans();
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let ok = spans
        .iter()
        .find(|s| s["traceId"] == trace_id)
        .expect("the span is in the app's trace");
    assert_eq!(ok["parentSpanId"], app_span);
    assert_eq!(ok["name"], "chat chat");
    assert_eq!(ok["kind"], 3, "SPAN_KIND_CLIENT");
    let upstream_parent = upstream.requests()[0]
        .header("traceparent")
        .unwrap()
        .split('-')
        .nth(2)
        .unwrap()
        .to_string();
    assert_eq!(
        ok["spanId"], upstream_parent,
        "the span the upstream sees as its parent"
    );
    assert_eq!(
        attribute(ok, "gen_ai.operation.name")["stringValue"],
        "chat"
    );
    assert_eq!(attribute(ok, "gen_ai.request.model")["stringValue"], "chat");
    assert_eq!(
        attribute(ok, "gen_ai.provider.name")["stringValue"],
        "openai-compatible"
    );
    assert_eq!(
        attribute(ok, "llmesh.upstream_model")["stringValue"],
        "upstream-model"
    );
    assert_eq!(attribute(ok, "gen_ai.usage.input_tokens")["intValue"], "10");
    assert_eq!(
        attribute(ok, "gen_ai.usage.output_tokens")["intValue"],
        "20"
    );
    assert_eq!(
        attribute(ok, "gen_ai.response.finish_reasons")["arrayValue"]["values"][0]["stringValue"],
        "stop"
    );
    assert_eq!(
        attribute(ok, "http.response.status_code")["intValue"],
        "200"
    );
    assert!(
        ok["resource"]["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["key"] == "service.name" && a["value"]["stringValue"] == "llmesh-sidecar"),
        "{ok:#?}"
    );

    let failed = spans
        .iter()
        .find(|s| s["traceId"] != trace_id)
        .expect("the failed call's span");
    assert_eq!(attribute(failed, "error.type")["stringValue"], "400");
    assert_eq!(failed["status"]["code"], 2, "STATUS_CODE_ERROR");
    assert_eq!(failed["parentSpanId"], "", "a trace the sidecar started");
}

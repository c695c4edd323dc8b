//! A real Prometheus server (Debian's `prometheus`) scrapes a running sidecar, and PromQL over
//! its HTTP API returns the tokens the test sent.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{client, Sidecar};
use llmesh_testkit::FakeUpstream;
use serde_json::{json, Value};

struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_prometheus(target: &str) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: llmesh-sidecar
    static_configs: [{{targets: ['{target}']}}]
"
        ),
    )
    .unwrap();
    let port = free_port();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus is installed (Debian's prometheus package; scripts/test installs it)");
    Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    }
}

async fn query(prometheus: &Prometheus, promql: &str) -> Option<f64> {
    let response = client()
        .get(format!("{}/api/v1/query", prometheus.url))
        .query(&[("query", promql)])
        .send()
        .await
        .ok()?;
    let body: Value = response.json().await.ok()?;
    body["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn prometheus_scrapes_the_sidecar_and_promql_returns_the_tokens_sent() {
    let upstream = FakeUpstream::start().await.unwrap();
    let sidecar = Sidecar::start(&format!(
        "endpoints:
  - name: chat
    provider: openai-compatible
    baseUrl: {}
    model: upstream-model
",
        upstream.base_url()
    ));
    // The fake upstream reports 10 prompt and 20 completion tokens per call.
    for _ in 0..3 {
        let r = client()
            .post(sidecar.url("/v1/chat/completions"))
            .json(&json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    let target = sidecar
        .admin_url("")
        .trim_start_matches("http://")
        .to_string();
    let prometheus = start_prometheus(&target);

    let input = r#"sum(gen_ai_client_token_usage_sum{job="llmesh-sidecar",endpoint="chat",token_type="input"})"#;
    let output = r#"sum(gen_ai_client_token_usage_sum{job="llmesh-sidecar",endpoint="chat",token_type="output"})"#;
    let requests = r#"sum(llmesh_requests_total{job="llmesh-sidecar",status="200"})"#;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = (
            query(&prometheus, input).await,
            query(&prometheus, output).await,
            query(&prometheus, requests).await,
        );
        if got == (Some(30.0), Some(60.0), Some(3.0)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never returned the tokens sent (input, output, requests): {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        query(&prometheus, r#"up{job="llmesh-sidecar"}"#).await,
        Some(1.0)
    );
}

//! The alert rules and the Grafana dashboard under charts/llmesh/files: `promtool check
//! rules` accepts the rules, and every metric they query is one that llmesh exports.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use common::{client, Sidecar};
use llmesh_testkit::{directives, FakeUpstream};
use serde_json::{json, Value};

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

const RULES: &str = "charts/llmesh/files/prometheus-rules.yaml";
const DASHBOARD: &str = "charts/llmesh/files/grafana-dashboard.json";

/// The llmesh metric names (histogram series reduced to their family) in a PromQL text.
fn metric_names(promql: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = promql;
    while let Some(start) = rest.find(|c: char| c.is_ascii_alphabetic() || c == '_') {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        let word = &tail[..end];
        if word.starts_with("llmesh_") || word.starts_with("gen_ai_") {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| word.strip_suffix(suffix))
                .unwrap_or(word);
            names.insert(family.to_string());
        }
        rest = &tail[end..];
    }
    names
}

/// Every query of the rules file and the dashboard.
fn queries() -> Vec<String> {
    let rules: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(repo_file(RULES)).unwrap()).unwrap();
    let mut out: Vec<String> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .map(|r| r["expr"].as_str().unwrap().to_string())
        .collect();
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(repo_file(DASHBOARD)).unwrap()).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            out.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    out
}

#[test]
fn promtool_accepts_the_rules() {
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo_file(RULES))
        .output()
        .expect("promtool is installed (scripts/test installs Debian's prometheus)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn the_rules_and_dashboard_query_only_metrics_that_exist() {
    // Exercise the sidecar so that every family has a series: a keyed endpoint, a priced
    // success, a stream, a retry and a refusal by a limit.
    let upstream = FakeUpstream::start().await.unwrap();
    let key = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key.path(), "sk-dashboards").unwrap();
    let sidecar = Sidecar::start(&format!(
        "endpoints:
  - name: chat
    provider: openai-compatible
    baseUrl: {base}
    model: upstream-model
    credential: {{file: {key}}}
    retry: {{maxAttempts: 2, backoffBase: 10ms, backoffMax: 10ms}}
    price: {{inputPerMillionTokens: 1, outputPerMillionTokens: 2}}
    limits: {{requestsPerMinute: 3, queueTimeout: 0ms}}
",
        base = upstream.base_url(),
        key = key.path().display()
    ));
    let chat =
        json!({"model": "chat", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let calls: [&[(&str, &str)]; 4] = [
        &[(directives::STREAM_CHUNKS, "2")],
        &[
            (directives::STATUS, "503"),
            (directives::FAIL_TIMES, "1"),
            ("x-request-id", "dashboards-retry"),
        ],
        &[],
        &[],
    ];
    for headers in calls {
        let mut request = client()
            .post(sidecar.url("/v1/chat/completions"))
            .json(&chat);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        request.send().await.unwrap().bytes().await.unwrap();
    }
    let mut exported = BTreeSet::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        let text = sidecar.metrics_text().await;
        exported = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .map(str::to_string)
            .collect();
        if exported.contains("gen_ai_client_operation_time_to_first_chunk_seconds") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The operator's names, from its source: they are registered there as literals.
    let operator_source = std::fs::read_to_string(repo_file("operator/src/metrics.rs")).unwrap();

    let queried: BTreeSet<String> = queries().iter().flat_map(|q| metric_names(q)).collect();
    assert!(queried.len() >= 10, "{queried:?}");
    for name in &queried {
        let known = exported.contains(name)
            || (name.starts_with("llmesh_operator_")
                && operator_source.contains(&format!("\"{name}\"")));
        assert!(
            known,
            "{name} is queried but not exported; exported: {exported:?}"
        );
    }
}

//! Scale benchmark (run by `bench/operator.sh`, ignored in the normal test run):
//! 1,000 LlmEndpoints across 50 namespaces created at once against a control plane of its
//! own. Reports how long each endpoint took from its create to Ready (p50, p99, max), the
//! time until every one is Ready, the creates' own latency, the operator's mean reconcile time,
//! CPU time and peak RSS, the API server's requests and its mean time serving them by verb and
//! resource, and the writes a restarted operator makes when it finds
//! nothing to change (must be 0).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{eventually, install_crd};
use futures::{stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::ByteString;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;
use llmesh_operator::crd::LlmEndpoint;
use llmesh_testenv::ControlPlane;
use serde_json::json;

const NAMESPACES: usize = 50;
const PER_NAMESPACE: usize = 20;

/// `LLMESH_SCALE_CREATES_PER_SECOND` paces the creates; unset, they go as fast as 32 at a time
/// allow. A burst measures the API server saturated by the test itself; a pace the API server
/// keeps up with measures the operator's own lag.
fn creates_per_second() -> Option<f64> {
    std::env::var("LLMESH_SCALE_CREATES_PER_SECOND")
        .ok()?
        .parse()
        .ok()
        .filter(|rate: &f64| *rate > 0.0)
}

struct Operator {
    child: Child,
    admin: u16,
}

impl Operator {
    fn start(plane: &ControlPlane, lease_ns: &str) -> Self {
        let admin = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_llmesh-operator"))
            .env("KUBECONFIG", &plane.kubeconfig)
            .args([
                "--lease-namespace",
                lease_ns,
                "--admin-listen",
                &format!("127.0.0.1:{admin}"),
            ])
            .args(["--log", "warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start llmesh-operator");
        Self { child, admin }
    }

    /// Sums every sample of `metric` on `/metrics`.
    async fn metric(&self, metric: &str) -> Option<f64> {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.admin))
            .await
            .ok()?;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await.ok()?;
        let values: Vec<f64> = text
            .lines()
            .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let kb: f64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0.0);
        kb / 1024.0
    }
}

impl Operator {
    /// SIGTERM, as a rolling update sends: the operator releases its lease on the way out,
    /// so the next one leads at once instead of waiting for the lease to expire.
    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_ready(endpoint: &LlmEndpoint) -> bool {
    endpoint.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

type Key = (String, String);

fn key_of(endpoint: &LlmEndpoint) -> Key {
    (
        endpoint.namespace().unwrap_or_default(),
        endpoint.name_any(),
    )
}

/// Records when the test first saw each endpoint Ready, from a watch (no polling load).
fn record_ready_times(client: kube::Client) -> Arc<Mutex<HashMap<Key, Instant>>> {
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let record = Arc::clone(&seen);
    tokio::spawn(
        watcher(Api::<LlmEndpoint>::all(client), watcher::Config::default())
            .applied_objects()
            .for_each(move |endpoint| {
                if let Ok(endpoint) = endpoint {
                    if is_ready(&endpoint) {
                        record
                            .lock()
                            .unwrap()
                            .entry(key_of(&endpoint))
                            .or_insert_with(Instant::now);
                    }
                }
                std::future::ready(())
            }),
    );
    seen
}

/// The API server's requests, and the time it took serving them, by "VERB
/// resource[/subresource]".
struct ApiRequests {
    counts: BTreeMap<String, f64>,
    seconds: BTreeMap<String, f64>,
}

async fn api_requests(client: &kube::Client) -> ApiRequests {
    let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(request).await.unwrap_or_default();
    ApiRequests {
        counts: api_series(&text, "apiserver_request_total"),
        seconds: api_series(&text, "apiserver_request_duration_seconds_sum"),
    }
}

impl ApiRequests {
    fn since(&self, before: &ApiRequests) -> serde_json::Value {
        let counts = requests_since(&before.counts, &self.counts);
        let seconds = requests_since(&before.seconds, &self.seconds);
        // The server's mean time per request (watches excluded: they last as long as they
        // are open).
        let mean_ms: BTreeMap<&String, f64> = counts
            .iter()
            .filter(|(key, _)| !key.starts_with("WATCH"))
            .filter_map(|(key, n)| Some((key, seconds.get(key)? / n * 1000.0)))
            .collect();
        json!({"count": counts, "server_mean_ms": mean_ms})
    }
}

/// A series of the API server's `metric` summed by "VERB resource[/subresource]".
fn api_series(text: &str, metric: &str) -> BTreeMap<String, f64> {
    let prefix = format!("{metric}{{");
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(prefix.as_str()) else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|l| l.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        let (resource, subresource) = (label("resource"), label("subresource"));
        if resource.is_empty() {
            continue;
        }
        let key = if subresource.is_empty() {
            format!("{} {resource}", label("verb"))
        } else {
            format!("{} {resource}/{subresource}", label("verb"))
        };
        *counts.entry(key).or_default() += value.parse::<f64>().unwrap_or(0.0);
    }
    counts
}

fn requests_since(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(rank).copied().unwrap_or(f64::NAN)
}

async fn count_ready(api: &Api<LlmEndpoint>) -> usize {
    let Ok(list) = api.list(&ListParams::default()).await else {
        return 0;
    };
    list.items.iter().filter(|e| is_ready(e)).count()
}

#[tokio::test]
#[ignore = "benchmark: run by bench/operator.sh"]
async fn thousand_endpoints_become_ready_and_a_resync_writes_nothing() {
    let plane = ControlPlane::start().await.unwrap();
    install_crd(&plane).await;
    let client = plane.client().await.unwrap();
    let lease_ns = plane.namespace("llmesh-system").await.unwrap();
    let environments = ["dev", "test", "prod"];
    let mut namespaces = Vec::new();
    for i in 0..NAMESPACES {
        let name = format!("team-{i:02}");
        let ns: Namespace = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"llmesh.io/environment": environments[i % 3]}}
        }))
        .unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap();
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some("openai".into()),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                "apiKey".to_string(),
                ByteString(format!("sk-{i}").into_bytes()),
            )])),
            ..Default::default()
        };
        Api::<Secret>::namespaced(client.clone(), &name)
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
        namespaces.push(name);
    }

    let ready_at = record_ready_times(client.clone());
    let requests_before = api_requests(&client).await;
    let operator = Operator::start(&plane, &lease_ns);
    let started = Instant::now();
    let creations = namespaces
        .iter()
        .flat_map(|ns| (0..PER_NAMESPACE).map(move |j| (ns.clone(), j)));
    let pace = creates_per_second();
    let created: HashMap<Key, (Instant, f64)> = stream::iter(creations.enumerate())
        .map(|(n, (ns, j))| {
            let api: Api<LlmEndpoint> = Api::namespaced(client.clone(), &ns);
            let send_at = pace.map(|rate| started + Duration::from_secs_f64(n as f64 / rate));
            async move {
                if let Some(at) = send_at {
                    tokio::time::sleep_until(at.into()).await;
                }
                let endpoint: LlmEndpoint = serde_json::from_value(json!({
                    "apiVersion": "llmesh.io/v1alpha1", "kind": "LlmEndpoint",
                    "metadata": {"name": format!("model-{j:02}")},
                    "spec": {
                        "provider": "openai", "model": "gpt-4o",
                        "secretRef": {"name": "openai", "key": "apiKey"},
                        "environments": {"dev": {"provider": "mock"}},
                    },
                }))
                .unwrap();
                let sent = Instant::now();
                let created = api.create(&PostParams::default(), &endpoint).await.unwrap();
                (
                    key_of(&created),
                    (Instant::now(), sent.elapsed().as_secs_f64()),
                )
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let created_after = started.elapsed();
    let all: Api<LlmEndpoint> = Api::all(client.clone());
    let total = NAMESPACES * PER_NAMESPACE;
    let ready = eventually(Duration::from_secs(600), || async {
        (ready_at.lock().unwrap().len() == total).then_some(())
    })
    .await;
    let ready_after = ready_at
        .lock()
        .unwrap()
        .values()
        .max()
        .map_or(started.elapsed(), |last| last.duration_since(started));
    let requests_to_ready = api_requests(&client).await.since(&requests_before);
    let mut create_latencies: Vec<f64> = created.values().map(|(_, took)| *took).collect();
    create_latencies.sort_by(f64::total_cmp);
    let mut lags: Vec<f64> = ready_at
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(key, ready)| {
            let (created, _) = created.get(key)?;
            Some(ready.saturating_duration_since(*created).as_secs_f64())
        })
        .collect();
    lags.sort_by(f64::total_cmp);
    assert!(
        ready.is_some(),
        "only {} of {total} became Ready",
        count_ready(&all).await
    );
    let cpu = operator
        .metric("process_cpu_seconds_total")
        .await
        .unwrap_or(f64::NAN);
    let rss = operator.peak_rss_mib();
    let writes = operator
        .metric("llmesh_operator_api_writes_total")
        .await
        .unwrap_or(0.0);
    let reconcile_mean_ms = match (
        operator
            .metric("llmesh_operator_reconcile_duration_seconds_sum")
            .await,
        operator
            .metric("llmesh_operator_reconcile_duration_seconds_count")
            .await,
    ) {
        (Some(sum), Some(count)) if count > 0.0 => sum / count * 1000.0,
        _ => f64::NAN,
    };
    operator.stop();

    // A fresh operator reconciles every endpoint again and must find nothing to write.
    let requests_before = api_requests(&client).await;
    let restarted = Operator::start(&plane, &lease_ns);
    let resync_started = Instant::now();
    let resynced = eventually(Duration::from_secs(600), || async {
        let n = restarted.metric("llmesh_operator_reconciles_total").await?;
        (n >= total as f64).then_some(())
    })
    .await;
    assert!(
        resynced.is_some(),
        "the restarted operator did not reconcile all {total}"
    );
    let resync_after = resync_started.elapsed();
    let resync_writes = restarted
        .metric("llmesh_operator_api_writes_total")
        .await
        .unwrap_or(0.0);
    let resync_cpu = restarted
        .metric("process_cpu_seconds_total")
        .await
        .unwrap_or(f64::NAN);
    let resync_rss = restarted.peak_rss_mib();
    let resync_requests = api_requests(&client).await.since(&requests_before);

    let report = json!({
        "endpoints": total,
        "creates_per_second": pace,
        "namespaces": NAMESPACES,
        "create_requests_done_s": created_after.as_secs_f64(),
        "all_ready_s": ready_after.as_secs_f64(),
        "ready_lag_s": {
            "p50": percentile(&lags, 0.5),
            "p99": percentile(&lags, 0.99),
            "max": lags.last().copied().unwrap_or(f64::NAN),
            "over_1s": lags.iter().filter(|l| **l > 1.0).count(),
        },
        "create_latency_s": {
            "p50": percentile(&create_latencies, 0.5),
            "p99": percentile(&create_latencies, 0.99),
        },
        "reconcile_mean_ms": reconcile_mean_ms,
        "operator_cpu_s": cpu,
        "operator_peak_rss_mib": rss,
        "api_writes_to_ready": writes,
        "api_requests_to_ready": requests_to_ready,
        "resync_s": resync_after.as_secs_f64(),
        "resync_api_writes": resync_writes,
        "resync_cpu_s": resync_cpu,
        "resync_peak_rss_mib": resync_rss,
        "resync_api_requests": resync_requests,
    });
    println!("SCALE-REPORT {report}");
    assert_eq!(
        resync_writes, 0.0,
        "a resync that finds nothing changed must not write"
    );
}

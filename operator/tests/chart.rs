//! The Helm chart `charts/llmesh`, rendered with no node: `helm lint --strict`, its CRD is the
//! committed one, `helm template` matches golden files in `operator/tests/golden/chart/`
//! (`LLMESH_UPDATE_GOLDEN=1` rewrites them), and the test API server accepts every rendering
//! with a server-side dry run.

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{install_crd, CRD_FILE};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use llmesh_testenv::{tool, ControlPlane};
use serde::Deserialize as _;
use serde_json::{json, Value};

/// The namespace the README installs into, and the one the namespaced variant watches.
const RELEASE_NAMESPACE: &str = "llmesh-system";
const WATCHED_NAMESPACE: &str = "shop";
const MONITORING_API: &str = "monitoring.coreos.com/v1";

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/llmesh")
}

/// The value sets that have a golden rendering: (case, extra `helm template` arguments).
const CASES: [(&str, &[&str]); 4] = [
    ("default", &[]),
    (
        "cert-manager",
        &["--set", "webhook.certificates=cert-manager"],
    ),
    ("monitoring", &["--api-versions", MONITORING_API]),
    ("namespaced", &["--set", "operator.watchNamespace=shop"]),
];

fn case_args(case: &str) -> &'static [&'static str] {
    CASES
        .iter()
        .find(|(name, _)| *name == case)
        .map(|(_, args)| *args)
        .unwrap_or_else(|| panic!("no case {case}"))
}

fn run(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// `helm template llmesh charts/llmesh -n <namespace> <args>`.
fn render(namespace: &str, args: &[&str]) -> String {
    let output = run(Command::new(tool("helm"))
        .args(["template", "llmesh"])
        .arg(chart_dir())
        .args(["--namespace", namespace])
        .args(args));
    String::from_utf8(output.stdout).expect("helm prints UTF-8")
}

/// Each object of a multi-document rendering.
fn objects(rendering: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(rendering)
        .map(|document| Value::deserialize(document).expect("helm renders YAML"))
        .filter(|object| !object.is_null())
        .collect()
}

fn kinds(rendering: &str) -> Vec<String> {
    objects(rendering)
        .iter()
        .map(|o| o["kind"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn only<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} expected");
    found[0]
}

#[test]
fn helm_lint_strict_passes() {
    for (case, args) in CASES {
        let mut lint = Command::new(tool("helm"));
        lint.args(["lint", "--strict"]).arg(chart_dir());
        // lint takes --set but not --api-versions.
        if args.first() == Some(&"--set") {
            lint.args(args);
        }
        let output = run(&mut lint);
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(text.contains("0 chart(s) failed"), "{case}: {text}");
    }
}

#[test]
fn the_chart_crd_is_the_committed_crd() {
    let committed = std::fs::read(CRD_FILE).unwrap();
    let in_chart = std::fs::read(chart_dir().join("crds/llmendpoints.llmesh.io.yaml")).unwrap();
    assert!(
        committed == in_chart,
        "charts/llmesh/crds/llmendpoints.llmesh.io.yaml differs from crds/: cp crds/llmendpoints.llmesh.io.yaml charts/llmesh/crds/"
    );
}

#[test]
fn renderings_match_the_golden_files() {
    for (case, args) in CASES {
        let actual = render(RELEASE_NAMESPACE, args);
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden/chart")
            .join(format!("{case}.yaml"));
        if std::env::var_os("LLMESH_UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &actual).unwrap();
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!("{}: {e} (LLMESH_UPDATE_GOLDEN=1 writes it)", path.display())
        });
        assert!(
            actual == expected,
            "{case}: `helm template` differs from {} (LLMESH_UPDATE_GOLDEN=1 rewrites it after a review of the change)",
            path.display()
        );
    }
}

#[test]
fn monitoring_objects_need_the_prometheus_operator_api() {
    const MONITORING: [&str; 3] = ["PodMonitor", "ServiceMonitor", "PrometheusRule"];
    let without = render(RELEASE_NAMESPACE, &[]);
    let without_kinds = kinds(&without);
    for kind in MONITORING {
        assert!(
            !without_kinds.contains(&kind.to_string()),
            "{kind} rendered without {MONITORING_API}"
        );
    }
    assert!(
        !objects(&without)
            .iter()
            .any(|o| o["metadata"]["labels"]["grafana_dashboard"] == "1"),
        "the dashboard ConfigMap rendered without {MONITORING_API}"
    );

    let with = objects(&render(
        RELEASE_NAMESPACE,
        &["--api-versions", MONITORING_API],
    ));
    let pod_monitor = only(&with, "PodMonitor");
    assert_eq!(pod_monitor["spec"]["selector"], json!({}));
    assert_eq!(
        pod_monitor["spec"]["namespaceSelector"],
        json!({"any": true})
    );
    assert_eq!(
        pod_monitor["spec"]["podMetricsEndpoints"][0]["port"], "llmesh-admin",
        "the injected sidecar's admin port name"
    );
    let dashboard = with
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["labels"]["grafana_dashboard"] == "1")
        .expect("the dashboard ConfigMap");
    let json: Value = serde_json::from_str(dashboard["data"]["llmesh.json"].as_str().unwrap())
        .expect("the dashboard is JSON");
    assert_eq!(json["uid"], "llmesh-overview");
    let rule = only(&with, "PrometheusRule");
    let rules_file: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(chart_dir().join("files/prometheus-rules.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(rule["spec"], rules_file, "the rules of charts/llmesh/files");

    // Each one can be turned off on its own.
    let off = render(
        RELEASE_NAMESPACE,
        &[
            "--api-versions",
            MONITORING_API,
            "--set",
            "monitoring.podMonitor.enabled=false,monitoring.prometheusRule.enabled=false",
        ],
    );
    let off_kinds = kinds(&off);
    assert!(!off_kinds.contains(&"PodMonitor".to_string()));
    assert!(!off_kinds.contains(&"PrometheusRule".to_string()));
    assert!(off_kinds.contains(&"ServiceMonitor".to_string()));
}

/// The never-injected namespaces follow the release namespace, whatever it is.
#[test]
fn the_webhook_never_matches_the_release_namespace() {
    for namespace in [RELEASE_NAMESPACE, "platform-llm"] {
        let rendered = objects(&render(namespace, &[]));
        let configuration = only(&rendered, "MutatingWebhookConfiguration");
        let webhook = &configuration["webhooks"][0];
        let expressions = webhook["namespaceSelector"]["matchExpressions"]
            .as_array()
            .unwrap();
        assert!(expressions.contains(&json!({
            "key": "llmesh.io/inject", "operator": "In", "values": ["enabled"]
        })));
        assert!(
            expressions.contains(&json!({
                "key": "kubernetes.io/metadata.name",
                "operator": "NotIn",
                "values": ["kube-system", "kube-public", "kube-node-lease", namespace],
            })),
            "{namespace}: {expressions:?}"
        );
        assert_eq!(
            webhook["clientConfig"]["service"],
            json!({"name": "llmesh-operator-webhook", "namespace": namespace, "path": "/mutate", "port": 443})
        );
        assert_eq!(webhook["failurePolicy"], "Ignore");
        assert!(
            webhook["clientConfig"].get("caBundle").is_none(),
            "caBundle is the operator's (or cainjector's) to fill"
        );
    }
}

/// The chart refuses a watched namespace equal to its own: the webhook never injects there.
#[test]
fn watching_the_release_namespace_is_refused() {
    let output = Command::new(tool("helm"))
        .args(["template", "llmesh"])
        .arg(chart_dir())
        .args(["--namespace", RELEASE_NAMESPACE])
        .args(["--set", "operator.watchNamespace=llmesh-system"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("operator.watchNamespace"));
}

async fn ensure_namespace(client: &kube::Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    match namespaces.create(&PostParams::default(), &namespace).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(error) => panic!("create namespace {name}: {error}"),
    }
}

fn kubectl(plane: &ControlPlane) -> Command {
    let mut command = Command::new(tool("kubectl"));
    command.arg("--kubeconfig").arg(&plane.kubeconfig);
    command
}

/// `kubectl apply --dry-run=server` of `manifest`: every object is validated (unknown fields
/// included) and admitted by the API server, and nothing is stored.
fn dry_run(plane: &ControlPlane, manifest: &str) -> Output {
    let mut child = kubectl(plane)
        .args(["apply", "--dry-run=server", "--validate=strict", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kubectl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(manifest.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn assert_accepted(plane: &ControlPlane, manifest: &str) {
    let output = dry_run(plane, manifest);
    assert!(
        output.status.success(),
        "the API server refused the rendering:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn manifest(objects: &[Value]) -> String {
    objects
        .iter()
        .map(|o| format!("---\n{}", serde_yaml_ng::to_string(o).unwrap()))
        .collect()
}

/// The cluster the dry runs go to: the LlmEndpoint CRD and the namespaces the renderings use.
async fn prepared_plane() -> &'static ControlPlane {
    let plane = ControlPlane::shared().await;
    install_crd(plane).await;
    let client = plane.client().await.unwrap();
    for namespace in [RELEASE_NAMESPACE, WATCHED_NAMESPACE] {
        ensure_namespace(&client, namespace).await;
    }
    plane
}

#[tokio::test]
async fn the_api_server_accepts_the_default_rendering() {
    let plane = prepared_plane().await;
    let rendering = render(RELEASE_NAMESPACE, case_args("default"));
    assert_accepted(plane, &rendering);

    // The dry run is a real check: a field the API does not know is refused.
    let mut objects = objects(&rendering);
    let deployment = objects
        .iter_mut()
        .find(|o| o["kind"] == "Deployment")
        .unwrap();
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = json!([]);
    let output = dry_run(plane, &manifest(&objects));
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("unknown field"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn the_api_server_accepts_the_namespaced_rendering() {
    let plane = prepared_plane().await;
    assert_accepted(plane, &render(RELEASE_NAMESPACE, case_args("namespaced")));
}

/// cert-manager's CRDs are not available here: everything but its own kinds is checked.
#[tokio::test]
async fn the_api_server_accepts_the_cert_manager_rendering_but_its_certificates() {
    let plane = prepared_plane().await;
    let rendering = render(RELEASE_NAMESPACE, case_args("cert-manager"));
    let (cert_manager, rest): (Vec<Value>, Vec<Value>) =
        objects(&rendering).into_iter().partition(|o| {
            o["apiVersion"]
                .as_str()
                .unwrap_or_default()
                .starts_with("cert-manager.io/")
        });
    assert_eq!(cert_manager.len(), 4, "2 Issuers and 2 Certificates");
    assert_accepted(plane, &manifest(&rest));
}

/// With the Prometheus Operator's CRDs (built by `scripts/testenv`) installed.
#[tokio::test]
async fn the_api_server_accepts_the_monitoring_rendering() {
    let plane = prepared_plane().await;
    let crds = tool("helm")
        .parent()
        .map(|bin| bin.join("../prometheus-operator-crds"))
        .filter(|dir| dir.is_dir())
        .expect("the Prometheus Operator's CRDs next to the testenv binaries: run scripts/testenv");
    run(kubectl(plane)
        .args([
            "apply",
            "--server-side",
            "--field-manager",
            "llmesh-tests",
            "-f",
        ])
        .arg(&crds));
    run(kubectl(plane)
        .args([
            "wait",
            "--for",
            "condition=Established",
            "--timeout",
            "60s",
            "-f",
        ])
        .arg(&crds));
    assert_accepted(plane, &render(RELEASE_NAMESPACE, case_args("monitoring")));
}

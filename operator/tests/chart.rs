//! The Helm chart `charts/llmesh`, with no node: `helm lint --strict`; its CRD is the committed
//! one; `helm template` matches golden files in `operator/tests/golden/chart/`
//! (`LLMESH_UPDATE_GOLDEN=1` rewrites them); the test API server accepts every rendering with a
//! server-side dry run; the real operator runs with exactly the chart's RBAC; and a real
//! `helm install`, `upgrade` and `uninstall` leave the webhook configuration as they should.

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{install_crd, CRD_FILE};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ServiceReference, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, PostParams};
use llmesh_operator::crd::LlmEndpoint;
use llmesh_operator::webhook::config::mutating_webhook_configuration;
use llmesh_testenv::{tool, ControlPlane};
use serde::Deserialize as _;
use serde_json::{json, Value};

/// The namespace the README installs into.
const RELEASE_NAMESPACE: &str = "llmesh-system";
/// The namespace the "namespaced" case watches (its Role goes there).
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

/// The chart's webhook is the operator's own `mutating_webhook_configuration` (the one the
/// webhook tests register), with the never-injected namespaces following the release namespace.
#[test]
fn the_webhook_is_the_operators_and_never_matches_the_release_namespace() {
    for namespace in [RELEASE_NAMESPACE, "platform-llm"] {
        let rendered = objects(&render(namespace, &[]));
        let configuration = only(&rendered, "MutatingWebhookConfiguration");
        let operators = mutating_webhook_configuration(
            "llmesh-sidecar-injector",
            WebhookClientConfig {
                service: Some(ServiceReference {
                    name: "llmesh-operator-webhook".into(),
                    namespace: namespace.into(),
                    path: Some("/mutate".into()),
                    port: Some(443),
                }),
                ..WebhookClientConfig::default()
            },
            None,
            namespace,
        );
        assert_eq!(
            configuration["webhooks"],
            serde_json::to_value(&operators).unwrap()["webhooks"],
            "{namespace}"
        );
        let expressions = &configuration["webhooks"][0]["namespaceSelector"]["matchExpressions"];
        assert!(
            expressions.as_array().unwrap().contains(&json!({
                "key": "kubernetes.io/metadata.name",
                "operator": "NotIn",
                "values": ["kube-system", "kube-public", "kube-node-lease", namespace],
            })),
            "{namespace}: {expressions}"
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

/// `kubectl ARGS -f -` with `manifest` on its standard input.
fn kubectl_with_manifest(plane: &ControlPlane, args: &[&str], manifest: &str) -> Output {
    let mut child = kubectl(plane)
        .args(args)
        .args(["-f", "-"])
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

/// `kubectl apply --dry-run=server` of `manifest`: every object is validated (unknown fields
/// included) and admitted by the API server, and nothing is stored.
fn dry_run(plane: &ControlPlane, manifest: &str) -> Output {
    kubectl_with_manifest(
        plane,
        &["apply", "--dry-run=server", "--validate=strict"],
        manifest,
    )
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
    llmesh_testenv::monitoring::install_operator_crds(plane)
        .await
        .unwrap();
    assert_accepted(plane, &render(RELEASE_NAMESPACE, case_args("monitoring")));
}

/// `kubeconfig`, acting as the chart's ServiceAccount (impersonation), so that a process using
/// it has exactly the chart's RBAC.
fn kubeconfig_as_service_account(kubeconfig: &Path, namespace: &str) -> String {
    let mut config: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(kubeconfig).unwrap()).unwrap();
    for user in config["users"].as_array_mut().unwrap() {
        user["user"]["as"] = json!(format!("system:serviceaccount:{namespace}:llmesh-operator"));
    }
    serde_yaml_ng::to_string(&config).unwrap()
}

async fn admin_get(port: u16, path: &str) -> Option<(u16, String)> {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let response = http
        .get(format!("http://127.0.0.1:{port}{path}"))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// Applies `manifest` for real, with server-side apply.
fn apply(plane: &ControlPlane, manifest: &str) {
    let output = kubectl_with_manifest(
        plane,
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager",
            "llmesh-tests",
        ],
        manifest,
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Whether the LlmEndpoint `chat` has the condition Ready with `wanted` status.
async fn chat_ready(endpoints: Api<LlmEndpoint>, wanted: &'static str) -> Option<()> {
    let status = endpoints.get("chat").await.ok()?.status?;
    status
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == wanted)
        .then_some(())
}

/// Renders the chart into `release_namespace` with `args`, applies its ServiceAccount, RBAC
/// and webhook configuration, and starts the real operator with the rendered Deployment's own
/// arguments, acting as the chart's ServiceAccount. Then, in `endpoint_namespace`: an
/// LlmEndpoint whose Secret arrives late is reported waiting (with an Event), then Ready with
/// its key copied; the operator leads, issues the webhook certificate, patches caBundle and
/// serves the webhook; and no request of it was refused.
async fn operator_runs_with_the_charts_rbac(
    plane: &ControlPlane,
    release_namespace: &str,
    args: &[&str],
    endpoint_namespace: &str,
) {
    let client = plane.client().await.unwrap();
    ensure_namespace(&client, release_namespace).await;
    let rendering = objects(&render(release_namespace, args));
    let granted: Vec<Value> = rendering
        .iter()
        .filter(|o| {
            let kind = o["kind"].as_str().unwrap_or_default();
            kind == "ServiceAccount"
                || kind == "MutatingWebhookConfiguration"
                || o["apiVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with("rbac.")
        })
        .cloned()
        .collect();
    apply(plane, &manifest(&granted));

    let admin_port = common::free_port();
    let webhook_port = common::free_port();
    let deployment = only(&rendering, "Deployment");
    let operator_args: Vec<String> = deployment["spec"]["template"]["spec"]["containers"][0]
        ["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let arg = a.as_str().unwrap();
            // Loopback ports of the test's own instead of the pod's.
            if arg.starts_with("--admin-listen=") {
                format!("--admin-listen=127.0.0.1:{admin_port}")
            } else if arg.starts_with("--webhook-listen=") {
                format!("--webhook-listen=127.0.0.1:{webhook_port}")
            } else {
                arg.to_string()
            }
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        kubeconfig_as_service_account(&plane.kubeconfig, release_namespace),
    )
    .unwrap();
    let operator = common::OperatorProcess::spawn(
        Command::new(env!("CARGO_BIN_EXE_llmesh-operator"))
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAMESPACE", release_namespace)
            .env("POD_NAME", "llmesh-operator-chart-test")
            .args(&operator_args),
    );

    let endpoints: Api<LlmEndpoint> = Api::namespaced(client.clone(), endpoint_namespace);
    let endpoint = serde_json::from_value(json!({
        "apiVersion": "llmesh.io/v1alpha1",
        "kind": "LlmEndpoint",
        "metadata": {"name": "chat"},
        "spec": {"provider": "openai", "model": "gpt-4o-mini",
                 "secretRef": {"name": "openai", "key": "apiKey"}},
    }))
    .unwrap();
    endpoints
        .create(&PostParams::default(), &endpoint)
        .await
        .unwrap();
    let wait = std::time::Duration::from_secs(60);
    assert!(
        common::eventually(wait, || chat_ready(endpoints.clone(), "False"))
            .await
            .is_some(),
        "the endpoint is reported waiting for its Secret\n{}",
        operator.logs()
    );
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), endpoint_namespace);
    let published = common::eventually(wait, || {
        let events = events.clone();
        async move {
            let list = events.list(&Default::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| e.reason.as_deref() == Some("SecretNotFound"))
                .then_some(())
        }
    })
    .await;
    assert!(
        published.is_some(),
        "an Event says the Secret is missing\n{}",
        operator.logs()
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), endpoint_namespace);
    let secret = serde_json::from_value(json!({
        "metadata": {"name": "openai"},
        "stringData": {"apiKey": "sk-chart-rbac-test-key"},
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    assert!(
        common::eventually(wait, || chat_ready(endpoints.clone(), "True"))
            .await
            .is_some(),
        "the endpoint becomes Ready with the copied key\n{}",
        operator.logs()
    );
    assert!(secrets.get_opt("llmesh-chat").await.unwrap().is_some());

    let configurations: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let ca_patched = common::eventually(wait, || {
        let configurations = configurations.clone();
        async move {
            let configuration = configurations.get("llmesh-sidecar-injector").await.ok()?;
            configuration.webhooks?[0]
                .client_config
                .ca_bundle
                .as_ref()
                .filter(|ca| !ca.0.is_empty())
                .map(|_| ())
        }
    })
    .await;
    assert!(
        ca_patched.is_some(),
        "caBundle is patched\n{}",
        operator.logs()
    );
    let serving = common::eventually(wait, || async {
        let (status, _) = admin_get(admin_port, "/readyz").await?;
        (status == 200).then_some(())
    })
    .await;
    assert!(
        serving.is_some(),
        "/readyz: the webhook serves\n{}",
        operator.logs()
    );
    let (_, metrics) = admin_get(admin_port, "/metrics").await.unwrap();
    assert!(metrics.contains("llmesh_operator_leader 1"), "{metrics}");

    let logs = operator.logs();
    assert!(
        !logs.to_lowercase().contains("forbidden"),
        "a request was refused by the chart's RBAC:\n{logs}"
    );
}

/// Both variants in one test, one after the other: they share the cluster-wide names (the
/// ClusterRole, the webhook configuration).
#[tokio::test]
async fn the_operator_runs_with_only_the_charts_rbac() {
    let plane = prepared_plane().await;
    let everywhere = plane.namespace("chart-rbac").await.unwrap();
    operator_runs_with_the_charts_rbac(plane, RELEASE_NAMESPACE, case_args("default"), &everywhere)
        .await;

    // Another release namespace, so that the first operator's Lease does not hold this one up.
    let watched = plane.namespace("chart-scoped").await.unwrap();
    operator_runs_with_the_charts_rbac(
        plane,
        "llmesh-scoped",
        &["--set", &format!("operator.watchNamespace={watched}")],
        &watched,
    )
    .await;
}

/// `helm install --dry-run=server` against the test API server renders the whole release, and
/// its notes give the next three commands.
#[tokio::test]
async fn helm_install_prints_the_next_commands() {
    let plane = prepared_plane().await;
    let output = run(Command::new(tool("helm"))
        .args(["install", "llmesh"])
        .arg(chart_dir())
        .args(["--namespace", RELEASE_NAMESPACE, "--dry-run=server"])
        .arg("--kubeconfig")
        .arg(&plane.kubeconfig));
    let text = String::from_utf8_lossy(&output.stdout);
    let notes = &text[text.find("NOTES:").expect("helm prints the notes")..];
    for command in [
        "kubectl label namespace shop llmesh.io/inject=enabled llmesh.io/environment=prod",
        "kubectl -n shop create secret generic openai --from-literal=apiKey=",
        "kind: LlmEndpoint",
        r#"kubectl -n shop patch deployment my-app -p '{"spec":{"template":{"metadata":{"annotations":{"llmesh.io/endpoints":"chat"}}}}}'"#,
    ] {
        assert!(notes.contains(command), "{command:?} not in\n{notes}");
    }
}

/// A real `helm install`, `upgrade` and `uninstall` on a control plane of its own (the other
/// tests apply the same cluster-wide names without Helm): an upgrade that changes the webhook
/// configuration keeps the caBundle the operator filled in, and uninstalling removes the
/// configuration but keeps the CRD.
#[tokio::test]
async fn helm_upgrade_keeps_the_ca_bundle_and_uninstall_removes_the_webhook() {
    let plane = ControlPlane::start().await.unwrap();
    let client = plane.client().await.unwrap();
    ensure_namespace(&client, WATCHED_NAMESPACE).await;
    let helm = |args: &[&str]| {
        run(Command::new(tool("helm"))
            .args(args)
            .args(["--namespace", RELEASE_NAMESPACE])
            .arg("--kubeconfig")
            .arg(&plane.kubeconfig));
    };
    let chart = chart_dir().to_string_lossy().into_owned();
    helm(&["install", "llmesh", &chart, "--create-namespace"]);

    // What the operator does with --webhook-managed-tls.
    let configurations: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let mut configuration = configurations.get("llmesh-sidecar-injector").await.unwrap();
    let ca = k8s_openapi::ByteString(plane.ca_pem().into_bytes());
    configuration.webhooks.as_mut().unwrap()[0]
        .client_config
        .ca_bundle = Some(ca.clone());
    configurations
        .replace(
            "llmesh-sidecar-injector",
            &PostParams::default(),
            &configuration,
        )
        .await
        .unwrap();

    helm(&[
        "upgrade",
        "llmesh",
        &chart,
        "--set",
        "operator.watchNamespace=shop",
    ]);
    let upgraded = configurations.get("llmesh-sidecar-injector").await.unwrap();
    let webhook = &upgraded.webhooks.as_ref().unwrap()[0];
    assert_eq!(
        webhook
            .namespace_selector
            .as_ref()
            .unwrap()
            .match_expressions
            .as_ref()
            .unwrap()
            .len(),
        3,
        "the upgrade changed the configuration"
    );
    assert_eq!(webhook.client_config.ca_bundle.as_ref(), Some(&ca));

    helm(&["uninstall", "llmesh", "--wait"]);
    assert!(configurations
        .get_opt("llmesh-sidecar-injector")
        .await
        .unwrap()
        .is_none());
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client);
    assert!(crds
        .get_opt("llmendpoints.llmesh.io")
        .await
        .unwrap()
        .is_some());
}

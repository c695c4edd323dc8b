//! The monitoring stack on the node: the real Prometheus Operator and a Prometheus it manages
//! (both built by `scripts/testenv` from their Go modules: Debian's Prometheus has no Kubernetes
//! service discovery), from the images that `scripts/images --monitoring` builds. Tests create PodMonitors and ServiceMonitors as users
//! do, and ask Prometheus with PromQL from the host, at its pod's address.
//!
//! Everything lives in the namespace [`NAMESPACE`] or, when cluster-scoped (the CRDs, the
//! ClusterRoles and their bindings), carries the label `app.kubernetes.io/part-of` =
//! [`PART_OF`]; all of it goes with the cluster.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, ListParams, LogParams, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::Scope;
use serde::Deserialize as _;
use serde_json::{json, Value};

use crate::{pods, ControlPlane};

/// Where the operator, Prometheus and their ServiceAccounts run.
pub const NAMESPACE: &str = "monitoring";
/// The `app.kubernetes.io/part-of` label of every object the stack adds.
pub const PART_OF: &str = "llmesh-testenv-monitoring";
/// The `Prometheus` object's name; its pod is `prometheus-llmesh-0`.
pub const PROMETHEUS_NAME: &str = "llmesh";
/// Prometheus's scrape and rule evaluation interval.
pub const SCRAPE_INTERVAL: &str = "5s";

const FIELD_MANAGER: &str = "llmesh-testenv";
const OPERATOR_NAME: &str = "prometheus-operator";
const OPERATOR_IMAGE: &str = "llmesh.local/prometheus-operator:";
const RELOADER_IMAGE: &str = "llmesh.local/prometheus-config-reloader:";
const PROMETHEUS_IMAGE: &str = "llmesh.local/prometheus:";
/// From the first apply to a Ready Prometheus pod on a busy 2-core machine: the operator
/// starts, renders the configuration, and the StatefulSet's pod starts its three containers.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// A running Prometheus, managed by the Prometheus Operator, selecting every PodMonitor,
/// ServiceMonitor and PrometheusRule of every namespace.
pub struct Prometheus {
    /// `http://<pod IP>:9090`, reachable from the host.
    pub url: String,
    http: reqwest::Client,
    client: kube::Client,
}

/// Installs the Prometheus Operator's CRDs, the operator and a `Prometheus`, and waits until
/// Prometheus is Ready. Idempotent (server-side apply): tests sharing a cluster may all call it.
pub async fn install_prometheus(plane: &ControlPlane) -> anyhow::Result<Prometheus> {
    let node = plane
        .node()
        .context("the monitoring stack needs a cluster with a node")?;
    let image = |prefix: &str| -> anyhow::Result<String> {
        node.images
            .iter()
            .find(|i| i.starts_with(prefix))
            .cloned()
            .with_context(|| {
                format!("no {prefix}<version> image on the node: run scripts/images --monitoring")
            })
    };
    let operator_image = image(OPERATOR_IMAGE)?;
    let reloader_image = image(RELOADER_IMAGE)?;
    let prometheus_image = image(PROMETHEUS_IMAGE)?;
    // The operator generates the flags and configuration that this version accepts.
    let prometheus_version = format!("v{}", &prometheus_image[PROMETHEUS_IMAGE.len()..]);

    install_operator_crds(plane).await?;
    let client = plane.client().await?;
    let objects = operator_objects(&operator_image, &reloader_image)
        .into_iter()
        .chain(prometheus_objects(&prometheus_image, &prometheus_version));
    for object in objects {
        apply(&client, object).await?;
    }

    let pods_api: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let pod_name = format!("prometheus-{PROMETHEUS_NAME}-0");
    let pod =
        match pods::wait_for(&pods_api, &pod_name, READY_TIMEOUT, "Ready", pods::is_ready).await {
            Ok(pod) => pod,
            Err(error) => bail!("{error:#}\n{}", diagnostics(&client).await),
        };
    let ip = pods::ip(&pod).context("the Prometheus pod has no IP")?;
    Ok(Prometheus {
        url: format!("http://{ip}:9090"),
        // Only the pod network: never a proxy from the environment.
        http: reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()?,
        client,
    })
}

impl Prometheus {
    /// An instant query: the `data.result` of `/api/v1/query` (for a vector, an array of
    /// `{"metric": {labels}, "value": [time, "value"]}`).
    pub async fn query(&self, promql: &str) -> anyhow::Result<Value> {
        let data = self.get("/api/v1/query", &[("query", promql)]).await?;
        Ok(data["result"].clone())
    }

    /// Queries every second until `done` holds for the result; fails after `timeout` with the
    /// last result and the active targets.
    pub async fn wait_for(
        &self,
        promql: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.query(promql).await;
            if let Ok(result) = &last {
                if done(result) {
                    return Ok(result.clone());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{promql} not as expected after {timeout:?}; last: {last:?}\n{}",
                    self.describe().await
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// The active targets: `data.activeTargets` of `/api/v1/targets`.
    pub async fn active_targets(&self) -> anyhow::Result<Value> {
        let data = self.get("/api/v1/targets", &[("state", "active")]).await?;
        Ok(data["activeTargets"].clone())
    }

    /// One line per active target (scrape pool, URL, health, last error), for failure messages.
    pub async fn describe_targets(&self) -> String {
        let targets = match self.active_targets().await {
            Ok(targets) => targets,
            Err(error) => return format!("active targets unavailable: {error:#}"),
        };
        let lines: Vec<String> = targets
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                format!(
                    "{} {} {} {}",
                    t["scrapePool"].as_str().unwrap_or_default(),
                    t["scrapeUrl"].as_str().unwrap_or_default(),
                    t["health"].as_str().unwrap_or_default(),
                    t["lastError"].as_str().unwrap_or_default(),
                )
            })
            .collect();
        format!("active targets ({}):\n{}", lines.len(), lines.join("\n"))
    }

    /// The active targets, the scrape jobs of the loaded configuration, and the operator's and
    /// Prometheus's pods with their logs: what a failing test's message needs.
    pub async fn describe(&self) -> String {
        let jobs = match self.get("/api/v1/status/config", &[]).await {
            Ok(data) => data["yaml"]
                .as_str()
                .unwrap_or_default()
                .lines()
                .filter(|l| l.trim_start().starts_with("- job_name:"))
                .collect::<Vec<_>>()
                .join("\n"),
            Err(error) => format!("{error:#}"),
        };
        format!(
            "{}\nscrape jobs:\n{jobs}\n{}",
            self.describe_targets().await,
            diagnostics(&self.client).await
        )
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> anyhow::Result<Value> {
        let response = self
            .http
            .get(format!("{}{path}", self.url))
            .query(query)
            .send()
            .await
            .with_context(|| format!("GET {}{path}", self.url))?;
        let status = response.status();
        let body: Value = response
            .json()
            .await
            .with_context(|| format!("{path}: {status}, not JSON"))?;
        if body["status"] != "success" {
            bail!("{path}: {status}: {body}");
        }
        Ok(body["data"].clone())
    }
}

/// The numbers of a query's vector result, one per series.
pub fn sample_values(result: &Value) -> Vec<f64> {
    result
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|sample| sample["value"][1].as_str()?.parse().ok())
        .collect()
}

/// The CRDs that `scripts/testenv` copied from the operator's Go module, next to its binaries.
/// Installs the Prometheus Operator's CRDs (server-side apply) and waits until each is
/// served: what a chart's monitoring objects need, with or without the operator running.
pub async fn install_operator_crds(plane: &ControlPlane) -> anyhow::Result<()> {
    for crd in operator_crds()? {
        plane.install_crd(&crd).await?;
    }
    Ok(())
}

fn operator_crds() -> anyhow::Result<Vec<CustomResourceDefinition>> {
    let dir = crate::testenv_bin_dir()?.join("../prometheus-operator-crds");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("{}: run scripts/testenv", dir.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|f| f.extension().is_some_and(|e| e == "yaml"));
    files.sort();
    let mut crds = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let crd = CustomResourceDefinition::deserialize(document)
                .with_context(|| format!("{}", file.display()))?;
            crds.push(crd);
        }
    }
    if crds.is_empty() {
        bail!("no CRDs in {}: run scripts/testenv", dir.display());
    }
    Ok(crds)
}

fn labels(component: &str) -> Value {
    json!({"app.kubernetes.io/name": component, "app.kubernetes.io/part-of": PART_OF})
}

/// The operator, watching monitors in every namespace and managing Prometheus only in
/// [`NAMESPACE`]. Its ClusterRole reads what it selects from; what it writes (the StatefulSet,
/// its configuration Secrets, rule ConfigMaps, the governing Service) is allowed in
/// [`NAMESPACE`] only. Without permissions on Alertmanagers, ThanosRulers and
/// PrometheusAgents it leaves their controllers off.
fn operator_objects(operator_image: &str, reloader_image: &str) -> Vec<Value> {
    let cluster_role = format!("{PART_OF}-{OPERATOR_NAME}");
    let read = ["get", "list", "watch"];
    let write = [
        "get", "list", "watch", "create", "update", "patch", "delete",
    ];
    let security = json!({
        "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]},
    });
    vec![
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": NAMESPACE, "labels": labels("monitoring")}}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": OPERATOR_NAME, "namespace": NAMESPACE, "labels": labels(OPERATOR_NAME)}}),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": cluster_role, "labels": labels(OPERATOR_NAME)},
            "rules": [
                {"apiGroups": ["monitoring.coreos.com"],
                 "resources": ["servicemonitors", "podmonitors", "probes", "prometheusrules", "scrapeconfigs"],
                 "verbs": read},
                // Namespace selectors of the Prometheus and of the monitors.
                {"apiGroups": [""], "resources": ["namespaces"], "verbs": read},
                // Events about the monitors it rejects, in their namespaces.
                {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": cluster_role, "labels": labels(OPERATOR_NAME)},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
            "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_NAME, "namespace": NAMESPACE}],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": OPERATOR_NAME, "namespace": NAMESPACE, "labels": labels(OPERATOR_NAME)},
            "rules": [
                {"apiGroups": ["monitoring.coreos.com"], "resources": ["prometheuses"], "verbs": read},
                {"apiGroups": ["monitoring.coreos.com"],
                 "resources": ["prometheuses/status", "prometheuses/finalizers"],
                 "verbs": ["get", "update", "patch"]},
                {"apiGroups": ["apps"], "resources": ["statefulsets"], "verbs": write},
                {"apiGroups": [""], "resources": ["configmaps", "secrets", "services"], "verbs": write},
                // The status counts the StatefulSet's pods; a changed spec deletes them.
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "delete"]},
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": OPERATOR_NAME, "namespace": NAMESPACE, "labels": labels(OPERATOR_NAME)},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": OPERATOR_NAME},
            "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_NAME, "namespace": NAMESPACE}],
        }),
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": OPERATOR_NAME, "namespace": NAMESPACE, "labels": labels(OPERATOR_NAME)},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels(OPERATOR_NAME)},
                "template": {
                    "metadata": {"labels": labels(OPERATOR_NAME)},
                    "spec": {
                        "serviceAccountName": OPERATOR_NAME,
                        "terminationGracePeriodSeconds": 2,
                        "securityContext": {
                            "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "containers": [{
                            "name": OPERATOR_NAME,
                            "image": operator_image,
                            "imagePullPolicy": "Never",
                            "args": [
                                format!("--prometheus-config-reloader={reloader_image}"),
                                format!("--prometheus-instance-namespaces={NAMESPACE}"),
                                // The default 10m CPU limit throttles the reloader's start for
                                // seconds on this machine; its request stays.
                                "--config-reloader-cpu-limit=0",
                                "--web.listen-address=:8080",
                                // No kubelet Service: left empty (the default), its sync is off.
                            ],
                            "ports": [{"name": "http", "containerPort": 8080}],
                            "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 2},
                            "securityContext": security,
                        }],
                    },
                },
            },
        }),
    ]
}

/// Prometheus's ServiceAccount and its discovery rights, and the `Prometheus` object.
fn prometheus_objects(image: &str, version: &str) -> Vec<Value> {
    let cluster_role = format!("{PART_OF}-prometheus");
    vec![
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": "prometheus", "namespace": NAMESPACE, "labels": labels("prometheus")}}),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": cluster_role, "labels": labels("prometheus")},
            "rules": [
                {"apiGroups": [""], "resources": ["pods", "services", "endpoints"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": cluster_role, "labels": labels("prometheus")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
            "subjects": [{"kind": "ServiceAccount", "name": "prometheus", "namespace": NAMESPACE}],
        }),
        json!({
            "apiVersion": "monitoring.coreos.com/v1", "kind": "Prometheus",
            "metadata": {"name": PROMETHEUS_NAME, "namespace": NAMESPACE, "labels": labels("prometheus")},
            "spec": {
                "image": image,
                "version": version,
                "imagePullPolicy": "Never",
                "replicas": 1,
                "serviceAccountName": "prometheus",
                "scrapeInterval": SCRAPE_INTERVAL,
                "evaluationInterval": SCRAPE_INTERVAL,
                // Empty selectors: every monitor and rule of every namespace, as a cluster's
                // Prometheus set up for a chart's objects without extra labels.
                "podMonitorSelector": {},
                "podMonitorNamespaceSelector": {},
                "serviceMonitorSelector": {},
                "serviceMonitorNamespaceSelector": {},
                "ruleSelector": {},
                "ruleNamespaceSelector": {},
                // The images' user; the operator's default (1000, fsGroup 2000) has no entry there.
                "securityContext": {
                    "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "terminationGracePeriodSeconds": 5,
            },
        }),
    ]
}

/// Server-side applies one object of any kind, found through the API server's discovery.
async fn apply(client: &kube::Client, object: Value) -> anyhow::Result<()> {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (resource, capabilities) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .with_context(|| format!("discover {api_version} {kind}"))?;
    let api: Api<DynamicObject> =
        match (capabilities.scope, object["metadata"]["namespace"].as_str()) {
            (Scope::Namespaced, Some(namespace)) => {
                Api::namespaced_with(client.clone(), namespace, &resource)
            }
            (Scope::Namespaced, None) => bail!("{kind} {name} has no namespace"),
            (Scope::Cluster, _) => Api::all_with(client.clone(), &resource),
        };
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(name, &params, &Patch::Apply(&object))
        .await
        .with_context(|| format!("apply {kind} {name}"))?;
    Ok(())
}

/// The operator's log and the Prometheus objects' state, for a failure's message.
async fn diagnostics(client: &kube::Client) -> String {
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let mut out = Vec::new();
    let listed = pods_api.list(&ListParams::default()).await;
    for pod in listed.iter().flat_map(|l| l.items.iter()) {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let status = pod
            .status
            .as_ref()
            .map(|s| serde_json::to_string(s).unwrap_or_default());
        out.push(format!("== pod {name}: {status:?}"));
        let containers = pod.spec.iter().flat_map(|s| {
            s.init_containers
                .iter()
                .flatten()
                .chain(s.containers.iter())
                .map(|c| c.name.clone())
        });
        for container in containers {
            let params = LogParams {
                container: Some(container.clone()),
                tail_lines: Some(20),
                ..LogParams::default()
            };
            let log = pods_api.logs(&name, &params).await.unwrap_or_default();
            out.push(format!("-- {container}:\n{log}"));
        }
    }
    if let Err(error) = listed {
        out.push(format!("pods of {NAMESPACE}: {error}"));
    }
    let gvk = GroupVersionKind::gvk("monitoring.coreos.com", "v1", "Prometheus");
    if let Ok((resource, _)) = kube::discovery::pinned_kind(client, &gvk).await {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), NAMESPACE, &resource);
        if let Ok(prometheus) = api.get(PROMETHEUS_NAME).await {
            out.push(format!(
                "== Prometheus status: {}",
                prometheus.data["status"]
            ));
        }
    }
    out.join("\n")
}

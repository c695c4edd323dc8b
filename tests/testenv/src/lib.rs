//! A real Kubernetes cluster on loopback for llmesh's tests, started from the binaries that
//! `scripts/testenv` builds.
//!
//! The control plane alone ([`ControlPlane::shared`]): etcd, kube-apiserver and
//! kube-controller-manager (garbage collector and namespace controllers only). Server-side
//! apply, field managers, watches, status subresources, CRD and CEL validation, owner-reference
//! garbage collection and admission webhooks behave as in a cluster; pods are stored, never run.
//!
//! With a node ([`ControlPlane::shared_with_node`]): also containerd, a kubelet registered as the
//! Ready node `localhost`, kube-scheduler, the controllers that Deployments, ReplicaSets, Jobs,
//! StatefulSets, ServiceAccounts and their tokens need, and the ServiceAccount admission plugin.
//! Pods run, each in a network namespace of its own on a bridge the node creates (so each has
//! its own 127.0.0.1), with the images `scripts/images` builds. One node per machine at a time;
//! stopping it leaves nothing on the host.
//!
//! Tests in one binary share one cluster and isolate themselves by namespace
//! ([`ControlPlane::namespace`]); several test binaries may run at once, each with its own
//! control plane (their nodes take turns).

pub mod monitoring;
mod node;
mod pki;
pub mod pods;
mod process;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use kube::config::{KubeConfigOptions, Kubeconfig};
use rcgen::KeyPair;

pub use node::footprint::Footprint;
use node::NodeTeardown;
pub use node::{remove_stale_node, Node, NODE_NAME};
use pki::{issue, kubeconfig_yaml, new_ca, Ca};
use process::{free_port, launch, process_alive, spawn_supervised, stop_processes};

/// How long the control plane may take to become ready (first start after a build is slow).
const START_TIMEOUT: Duration = Duration::from_secs(90);

pub struct ControlPlane {
    /// `https://127.0.0.1:PORT`
    pub server: String,
    pub kubeconfig: PathBuf,
    ca: Ca,
    names: Vec<&'static str>,
    node: Option<Node>,
    teardown: Arc<Teardown>,
}

/// A node prepared for a control plane that is not running yet: torn down if dropped.
struct PreparedNode(Option<NodeTeardown>);

impl Drop for PreparedNode {
    fn drop(&mut self) {
        if let Some(node) = self.0.take() {
            node.run();
        }
    }
}

/// Stops a cluster; runs at most once, from `Drop` or at exit.
struct Teardown {
    done: AtomicBool,
    node: Option<NodeTeardown>,
    pids: Vec<u32>,
    dir: PathBuf,
}

impl Teardown {
    fn run(&self) {
        if self.done.swap(true, Ordering::SeqCst) {
            return;
        }
        // The control plane first: the node's teardown releases the machine's node lock, and
        // the next node's API server binds the same address (10.96.0.1:443).
        stop_processes(&self.pids);
        if let Some(node) = &self.node {
            node.run();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A certificate and its private key, both PEM.
pub struct ServingCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl ControlPlane {
    /// The control plane shared by every test in this test binary, started on first use and
    /// stopped when the binary exits (also when it is killed: the processes are tied to it).
    pub async fn shared() -> &'static ControlPlane {
        static SHARED: tokio::sync::OnceCell<ControlPlane> = tokio::sync::OnceCell::const_new();
        SHARED
            .get_or_init(|| async {
                let plane = ControlPlane::start()
                    .await
                    .expect("start the test control plane");
                register_exit_cleanup(&plane);
                plane
            })
            .await
    }

    /// The cluster with a node shared by every test in this test binary, like [`Self::shared`].
    pub async fn shared_with_node() -> &'static ControlPlane {
        static SHARED: tokio::sync::OnceCell<ControlPlane> = tokio::sync::OnceCell::const_new();
        SHARED
            .get_or_init(|| async {
                let plane = ControlPlane::start_with_node()
                    .await
                    .expect("start the test cluster with a node");
                register_exit_cleanup(&plane);
                plane
            })
            .await
    }

    /// Starts a control plane of its own, stopped when it is dropped.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_mode(false).await
    }

    /// Starts a cluster with a node of its own, stopped when it is dropped.
    pub async fn start_with_node() -> anyhow::Result<Self> {
        Self::start_mode(true).await
    }

    async fn start_mode(with_node: bool) -> anyhow::Result<Self> {
        let bin = bin_dir(with_node)?;
        let dir = tempfile::Builder::new()
            .prefix("llmesh-testenv-")
            .tempdir()?
            .keep();
        let result = Self::start_in(&bin, &dir, with_node).await;
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        result
    }

    async fn start_in(bin: &Path, dir: &Path, with_node: bool) -> anyhow::Result<Self> {
        // The node's bridge comes first: in node mode the API server listens on it. Until the
        // control plane runs, any error here must still take the bridge and the lock down.
        let mut prepared = PreparedNode(if with_node {
            Some(node::prepare(dir)?)
        } else {
            None
        });
        let ca = new_ca()?;
        let write = |name: &str, content: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, content).with_context(|| format!("write {}", path.display()))?;
            Ok(path)
        };
        let ca_file = write("ca.crt", &ca.pem())?;
        let serving = issue(
            &ca,
            "kube-apiserver",
            &["localhost", "kubernetes"],
            true,
            &[],
            &[node::network::API_ADDRESS],
        )?;
        let serving_cert = write("apiserver.crt", &serving.cert_pem)?;
        let serving_key = write("apiserver.key", &serving.key_pem)?;
        let admin = issue(
            &ca,
            "llmesh-test-admin",
            &[],
            false,
            &["system:masters"],
            &[],
        )?;
        let admin_cert = write("admin.crt", &admin.cert_pem)?;
        let admin_key = write("admin.key", &admin.key_pem)?;
        let sa_key = KeyPair::generate()?;
        let sa_private = write("sa.key", &sa_key.serialize_pem())?;
        let sa_public = write("sa.pub", &sa_key.public_key_pem())?;

        let etcd_port = free_port()?;
        let peer_port = free_port()?;
        // With a node, pods reach the API server as in a cluster: at the `kubernetes` Service's
        // address and port (KUBERNETES_SERVICE_HOST/PORT), which the node's bridge carries; there
        // is no kube-proxy to translate them.
        let (api_address, api_port) = if with_node {
            (node::network::API_ADDRESS, 443)
        } else {
            (std::net::Ipv4Addr::LOCALHOST, free_port()?)
        };
        let kcm_port = free_port()?;
        let scheduler_port = free_port()?;
        let server = format!("https://{api_address}:{api_port}");
        let kubeconfig = write("kubeconfig", &kubeconfig_yaml(&server, &ca.pem(), &admin))?;

        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd = vec![
            format!("--data-dir={}", dir.join("etcd").display()),
            "--name=default".into(),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=default={peer_url}"),
            "--unsafe-no-fsync=true".into(),
            "--log-level=warn".into(),
        ];
        let mut apiserver = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--bind-address={api_address}"),
            format!("--advertise-address={api_address}"),
            // The `kubernetes` Service endpoint may not be a loopback address; nothing needs it here.
            "--endpoint-reconciler-type=none".into(),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", dir.join("apiserver-certs").display()),
            format!("--tls-cert-file={}", serving_cert.display()),
            format!("--tls-private-key-file={}", serving_key.display()),
            format!("--client-ca-file={}", ca_file.display()),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={}", sa_public.display()),
            format!(
                "--service-account-signing-key-file={}",
                sa_private.display()
            ),
            // A range for Service IPs inside the API; no traffic goes there.
            "--service-cluster-ip-range=10.96.0.0/24".into(),
            "--allow-privileged=true".into(),
            "--v=0".into(),
        ];
        let mut controllers = vec!["garbagecollector", "namespace"];
        if with_node {
            apiserver.extend([
                "--authorization-mode=Node,RBAC".into(),
                // Logs and exec: the API server reaches the kubelet as `localhost`, with a
                // client certificate the kubelet's CA trusts.
                "--kubelet-preferred-address-types=Hostname".into(),
                format!("--kubelet-client-certificate={}", admin_cert.display()),
                format!("--kubelet-client-key={}", admin_key.display()),
                // Webhooks and aggregated APIs are called at their Service's endpoints (pod
                // addresses on the bridge), since no kube-proxy serves Service addresses.
                "--enable-aggregator-routing=true".into(),
            ]);
            controllers.extend([
                // Takes off the not-ready taint the kubelet registers the node with.
                "nodelifecycle",
                "deployment",
                "replicaset",
                "job",
                "statefulset",
                "daemonset",
                "serviceaccount",
                "serviceaccount-token",
                "root-ca-cert-publisher",
                "endpoint",
                "endpointslice",
                "podgc",
                "ttl-after-finished",
            ]);
        } else {
            apiserver.extend([
                "--authorization-mode=RBAC".into(),
                // Without the service-account controller no namespace gets its `default`
                // ServiceAccount, which this plugin would require of every Pod.
                "--disable-admission-plugins=ServiceAccount".into(),
            ]);
        }
        let controller_manager = vec![
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--controllers={}", controllers.join(",")),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={kcm_port}"),
            // For the ServiceAccount token and kube-root-ca.crt controllers.
            format!(
                "--service-account-private-key-file={}",
                sa_private.display()
            ),
            format!("--root-ca-file={}", ca_file.display()),
            "--v=0".into(),
        ];
        let mut names = vec!["etcd", "kube-apiserver", "kube-controller-manager"];
        let mut commands = vec![
            launch(&bin.join("etcd"), etcd, &dir.join("etcd.log"))?,
            launch(
                &bin.join("kube-apiserver"),
                apiserver,
                &dir.join("kube-apiserver.log"),
            )?,
            launch(
                &bin.join("kube-controller-manager"),
                controller_manager,
                &dir.join("kube-controller-manager.log"),
            )?,
        ];
        if with_node {
            let scheduler = vec![
                format!("--kubeconfig={}", kubeconfig.display()),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={scheduler_port}"),
                "--v=0".into(),
            ];
            names.push("kube-scheduler");
            commands.push(launch(
                &bin.join("kube-scheduler"),
                scheduler,
                &dir.join("kube-scheduler.log"),
            )?);
        }
        let pids = spawn_supervised(commands)?;
        let teardown = Teardown {
            done: AtomicBool::new(false),
            node: prepared.0.take(),
            pids,
            dir: dir.to_path_buf(),
        };
        let mut plane = Self {
            server,
            kubeconfig,
            ca,
            names,
            node: None,
            teardown: Arc::new(teardown),
        };
        if let Err(error) = plane.wait_ready().await {
            let logs = plane.logs();
            plane.teardown.run();
            bail!("control plane not ready after {START_TIMEOUT:?}: {error:#}\n{logs}");
        }
        if with_node {
            plane.start_node(bin, &ca_file).await?;
        }
        Ok(plane)
    }

    async fn start_node(&mut self, bin: &Path, ca_file: &Path) -> anyhow::Result<()> {
        let Some(node_teardown) = &self.teardown.node else {
            bail!("the control plane was started without a node");
        };
        let access = node::PlaneAccess {
            bin,
            dir: &self.teardown.dir,
            ca: &self.ca,
            ca_file,
            server: &self.server,
        };
        let node = match node::start(&access, node_teardown, spawn_supervised).await {
            Ok(node) => node,
            Err(error) => {
                self.teardown.run();
                return Err(error.context("start the node"));
            }
        };
        let ready = match self.client().await {
            Ok(client) => node::wait_ready(&client, node_teardown).await,
            Err(error) => Err(error),
        };
        if let Err(error) = ready {
            let logs = format!("{}\n{}", self.logs(), node.log_tail());
            self.teardown.run();
            bail!("{error:#}\n{logs}");
        }
        self.node = Some(node);
        Ok(())
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last_error = anyhow::anyhow!("not tried");
        while Instant::now() < deadline {
            for (pid, name) in self.teardown.pids.iter().zip(&self.names) {
                if !process_alive(*pid) {
                    bail!("{name} (pid {pid}) exited during start-up");
                }
            }
            match self.readyz().await {
                Ok(()) => return Ok(()),
                Err(e) => last_error = e,
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(last_error)
    }

    async fn readyz(&self) -> anyhow::Result<()> {
        let client = self.client().await?;
        let request = http_request("/readyz")?;
        let text = client.request_text(request).await?;
        if text.trim() != "ok" {
            bail!("readyz: {text}");
        }
        // The default namespace appears a moment after readiness; tests expect it.
        let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client);
        namespaces.get("default").await?;
        Ok(())
    }

    async fn wait_default_service_account(&self, namespace: &str) -> anyhow::Result<()> {
        use k8s_openapi::api::core::v1::ServiceAccount;
        let accounts: kube::Api<ServiceAccount> =
            kube::Api::namespaced(self.client().await?, namespace);
        let deadline = Instant::now() + Duration::from_secs(30);
        while accounts.get_opt("default").await?.is_none() {
            if Instant::now() > deadline {
                bail!("namespace {namespace} got no default ServiceAccount");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// The node, when the cluster was started with one.
    pub fn node(&self) -> Option<&Node> {
        self.node.as_ref()
    }

    /// What the node leaves on the host while it runs, to check that stopping removed it.
    pub fn node_footprint(&self) -> Option<Footprint> {
        self.teardown.node.as_ref().map(|n| n.footprint.clone())
    }

    /// A new client (each test's runtime needs its own connections).
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Creates a namespace with a unique name starting with `prefix`, and returns its name.
    pub async fn namespace(&self, prefix: &str) -> anyhow::Result<String> {
        use k8s_openapi::api::core::v1::Namespace;
        let name = format!("{prefix}-{}", unique_suffix());
        let namespaces: kube::Api<Namespace> = kube::Api::all(self.client().await?);
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"llmesh.io/test": "true"}}
        }))?;
        namespaces.create(&Default::default(), &ns).await?;
        if self.node.is_some() {
            // With the ServiceAccount admission plugin on, pods are refused until the
            // namespace's `default` ServiceAccount exists.
            self.wait_default_service_account(&name).await?;
        }
        Ok(name)
    }

    /// Server-side applies a CRD (idempotent, so tests may all call it) and waits until the
    /// API server serves it.
    pub async fn install_crd(
        &self,
        crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    ) -> anyhow::Result<()> {
        use kube::runtime::wait::{await_condition, conditions};
        let name = crd.metadata.name.clone().context("the CRD has no name")?;
        let crds: kube::Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
            kube::Api::all(self.client().await?);
        let params = kube::api::PatchParams::apply("llmesh-testenv").force();
        crds.patch(&name, &params, &kube::api::Patch::Apply(crd))
            .await?;
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(crds, &name, conditions::is_crd_established()),
        )
        .await
        .with_context(|| format!("CRD {name} did not become Established"))??;
        Ok(())
    }

    /// The cluster CA, PEM: what a webhook configuration's `caBundle` needs.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A serving certificate for 127.0.0.1 signed by the cluster CA (for webhook servers).
    pub fn issue_serving_cert(&self, common_name: &str) -> anyhow::Result<ServingCert> {
        issue(&self.ca, common_name, &["localhost"], true, &[], &[])
    }

    /// The last lines of each control plane process's log, for a failing test's message.
    pub fn logs(&self) -> String {
        self.names
            .iter()
            .map(|name| {
                let file = self.teardown.dir.join(format!("{name}.log"));
                format!("== {name}\n{}", tail(&file, 30))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.teardown.run();
    }
}

/// The last `lines` lines of a log file.
pub(crate) fn tail(file: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A tool (`helm`, `kubectl`) built by `scripts/testenv`, else the one on `PATH`.
pub fn tool(name: &str) -> PathBuf {
    match testenv_bin_dir() {
        Ok(dir) if dir.join(name).is_file() => dir.join(name),
        _ => PathBuf::from(name),
    }
}

fn bin_dir(with_node: bool) -> anyhow::Result<PathBuf> {
    let dir = testenv_bin_dir()?;
    let node_tools: &[&str] = if with_node {
        &["kube-scheduler", "kubelet"]
    } else {
        &[]
    };
    for tool in ["etcd", "kube-apiserver", "kube-controller-manager"]
        .iter()
        .chain(node_tools)
    {
        if !dir.join(tool).is_file() {
            bail!(
                "{} not found in {}: run scripts/testenv first",
                tool,
                dir.display()
            );
        }
    }
    Ok(dir)
}

fn testenv_bin_dir() -> anyhow::Result<PathBuf> {
    Ok(match std::env::var_os("LLMESH_TESTENV_BIN") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = std::env::var_os("HOME").context("HOME is not set")?;
            let cache = std::env::var_os("LLMESH_TESTENV_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(home).join(".cache/llmesh/testenv"));
            cache.join("bin")
        }
    })
}

/// The shared control plane is a static, which Rust never drops: stop it at exit instead.
fn register_exit_cleanup(plane: &ControlPlane) {
    static AT_EXIT: Mutex<Vec<Arc<Teardown>>> = Mutex::new(Vec::new());
    extern "C" fn cleanup() {
        if let Ok(planes) = AT_EXIT.lock() {
            for teardown in planes.iter() {
                teardown.run();
            }
        }
    }
    if let Ok(mut planes) = AT_EXIT.lock() {
        if planes.is_empty() {
            // SAFETY: registering a plain extern "C" fn with no captured state.
            unsafe {
                libc::atexit(cleanup);
            }
        }
        planes.push(plane.teardown.clone());
    }
}

fn http_request(path: &str) -> anyhow::Result<http::Request<Vec<u8>>> {
    Ok(http::Request::get(path).body(Vec::new())?)
}

fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{n}", std::process::id())
}

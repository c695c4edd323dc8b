//! A real Kubernetes control plane on loopback for llmesh's tests: etcd, kube-apiserver and
//! kube-controller-manager (garbage collector and namespace controllers only), started from
//! the binaries that `scripts/testenv` builds.
//!
//! Server-side apply, field managers, watches, status subresources, CRD and CEL validation,
//! owner-reference garbage collection and admission webhooks behave as in a cluster. Pods
//! are stored, never run: there is no kubelet.
//!
//! Tests in one binary share one control plane ([`ControlPlane::shared`]) and isolate
//! themselves by namespace ([`ControlPlane::namespace`]); several test binaries may run at
//! once, each with its own processes, ports and files.

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use kube::config::{KubeConfigOptions, Kubeconfig};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// How long the control plane may take to become ready (first start after a build is slow).
const START_TIMEOUT: Duration = Duration::from_secs(90);

pub struct ControlPlane {
    /// `https://127.0.0.1:PORT`
    pub server: String,
    pub kubeconfig: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
    pids: Vec<u32>,
    dir: PathBuf,
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

    /// Starts a control plane of its own, stopped when it is dropped.
    pub async fn start() -> anyhow::Result<Self> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("llmesh-testenv-")
            .tempdir()?
            .keep();
        let result = Self::start_in(&bin, &dir).await;
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        result
    }

    async fn start_in(bin: &Path, dir: &Path) -> anyhow::Result<Self> {
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
        )?;
        let serving_cert = write("apiserver.crt", &serving.cert_pem)?;
        let serving_key = write("apiserver.key", &serving.key_pem)?;
        let admin = issue(&ca, "llmesh-test-admin", &[], false, &["system:masters"])?;
        let sa_key = KeyPair::generate()?;
        let sa_private = write("sa.key", &sa_key.serialize_pem())?;
        let sa_public = write("sa.pub", &sa_key.public_key_pem())?;

        let etcd_port = free_port()?;
        let peer_port = free_port()?;
        let api_port = free_port()?;
        let kcm_port = free_port()?;
        let server = format!("https://127.0.0.1:{api_port}");
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
        let apiserver = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
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
            "--authorization-mode=RBAC".into(),
            "--allow-privileged=true".into(),
            // Without the service-account controller no namespace gets its `default`
            // ServiceAccount, which this plugin would require of every Pod.
            "--disable-admission-plugins=ServiceAccount".into(),
            "--v=0".into(),
        ];
        let controller_manager = vec![
            format!("--kubeconfig={}", kubeconfig.display()),
            "--controllers=garbagecollector,namespace".into(),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={kcm_port}"),
            "--v=0".into(),
        ];
        let pids = spawn_supervised(vec![
            launch(bin, "etcd", etcd, &dir.join("etcd.log"))?,
            launch(
                bin,
                "kube-apiserver",
                apiserver,
                &dir.join("kube-apiserver.log"),
            )?,
            launch(
                bin,
                "kube-controller-manager",
                controller_manager,
                &dir.join("kube-controller-manager.log"),
            )?,
        ])?;
        let plane = Self {
            server,
            kubeconfig,
            ca,
            pids,
            dir: dir.to_path_buf(),
        };
        if let Err(error) = plane.wait_ready().await {
            let logs = [
                "etcd.log",
                "kube-apiserver.log",
                "kube-controller-manager.log",
            ]
            .map(|f| format!("== {f}\n{}", plane.log_tail(f)))
            .join("\n");
            plane.stop();
            bail!("control plane not ready after {START_TIMEOUT:?}: {error:#}\n{logs}");
        }
        Ok(plane)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last_error = anyhow::anyhow!("not tried");
        while Instant::now() < deadline {
            let names = ["etcd", "kube-apiserver", "kube-controller-manager"];
            for (pid, name) in self.pids.iter().zip(names) {
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
        issue(&self.ca, common_name, &["localhost"], true, &[])
    }

    fn log_tail(&self, file: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn stop(&self) {
        stop_processes(&self.pids);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A tool (`helm`, `kubectl`) built by `scripts/testenv`, else the one on `PATH`.
pub fn tool(name: &str) -> PathBuf {
    match testenv_bin_dir() {
        Ok(dir) if dir.join(name).is_file() => dir.join(name),
        _ => PathBuf::from(name),
    }
}

fn bin_dir() -> anyhow::Result<PathBuf> {
    let dir = testenv_bin_dir()?;
    for tool in ["etcd", "kube-apiserver", "kube-controller-manager"] {
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

fn launch(bin: &Path, name: &str, args: Vec<String>, log: &Path) -> anyhow::Result<Command> {
    let log = std::fs::File::create(log)?;
    let mut command = Command::new(bin.join(name));
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    Ok(command)
}

/// Starts the commands from a thread that lives as long as the process, each child set to
/// be killed when that thread's process dies (`PR_SET_PDEATHSIG` fires when the spawning
/// *thread* exits, so a short-lived test thread must not be the one that spawns).
fn spawn_supervised(commands: Vec<Command>) -> anyhow::Result<Vec<u32>> {
    static SUPERVISOR: OnceLock<Mutex<std::sync::mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    type SpawnRequest = (
        Vec<Command>,
        std::sync::mpsc::Sender<std::io::Result<Vec<u32>>>,
    );
    let sender = SUPERVISOR.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("testenv-supervisor".into())
            .spawn(move || {
                let mut children: Vec<Child> = Vec::new();
                for (commands, reply) in rx {
                    let mut pids = Vec::new();
                    let mut result = Ok(());
                    for mut command in commands {
                        set_parent_death_signal(&mut command);
                        match command.spawn() {
                            Ok(child) => {
                                pids.push(child.id());
                                children.push(child);
                            }
                            Err(e) => {
                                result = Err(e);
                                break;
                            }
                        }
                    }
                    let _ = reply.send(result.map(|()| pids));
                    // Reap children that exited so they do not linger as zombies.
                    children.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
                }
            })
            .expect("start the testenv supervisor thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = std::sync::mpsc::channel();
    sender
        .lock()
        .map_err(|_| anyhow::anyhow!("supervisor lock poisoned"))?
        .send((commands, reply_tx))
        .context("supervisor thread is gone")?;
    Ok(reply_rx.recv().context("supervisor thread is gone")??)
}

fn set_parent_death_signal(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches only the child's own state.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn stop_processes(pids: &[u32]) {
    // Reverse order: the controller manager and API server before etcd.
    for pid in pids.iter().rev() {
        // SAFETY: kill(2) on a PID this harness started.
        unsafe {
            libc::kill(*pid as libc::pid_t, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| process_alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in pids {
        if process_alive(*pid) {
            // SAFETY: as above.
            unsafe {
                libc::kill(*pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
}

fn process_alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped by the supervisor) counts as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// The shared control plane is a static, which Rust never drops: stop it at exit instead.
fn register_exit_cleanup(plane: &ControlPlane) {
    static AT_EXIT: Mutex<Vec<(Vec<u32>, PathBuf)>> = Mutex::new(Vec::new());
    extern "C" fn cleanup() {
        if let Ok(planes) = AT_EXIT.lock() {
            for (pids, dir) in planes.iter() {
                stop_processes(pids);
                let _ = std::fs::remove_dir_all(dir);
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
        planes.push((plane.pids.clone(), plane.dir.clone()));
    }
}

fn new_ca() -> anyhow::Result<CertifiedIssuer<'static, KeyPair>> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "llmesh-testenv-ca");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(CertifiedIssuer::self_signed(params, KeyPair::generate()?)?)
}

fn issue(
    ca: &CertifiedIssuer<'static, KeyPair>,
    common_name: &str,
    dns_names: &[&str],
    server: bool,
    organizations: &[&str],
) -> anyhow::Result<ServingCert> {
    let mut params =
        CertificateParams::new(dns_names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    for org in organizations {
        params
            .distinguished_name
            .push(DnType::OrganizationName, *org);
    }
    if server {
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    } else {
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    Ok(ServingCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn kubeconfig_yaml(server: &str, ca_pem: &str, admin: &ServingCert) -> String {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: testenv
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: admin
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: testenv
  context: {{cluster: testenv, user: admin}}
current-context: testenv
",
        ca = b64(ca_pem),
        cert = b64(&admin.cert_pem),
        key = b64(&admin.key_pem),
    )
}

fn http_request(path: &str) -> anyhow::Result<http::Request<Vec<u8>>> {
    Ok(http::Request::get(path).body(Vec::new())?)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{n}", std::process::id())
}

//! The node mode: containerd and a kubelet beside the control plane, registered as the Ready
//! node `localhost`, running pods on a bridge of their own (see [`network`]) with llmesh's
//! locally built images. Stopping it leaves nothing on the host (see [`footprint`]).

mod command;
mod containerd;
pub(crate) mod footprint;
mod kubelet;
mod lock;
pub(crate) mod network;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::pki::{self, Ca};
use crate::process::{free_port, launch, process_alive, stop_processes};
use footprint::Footprint;
pub use kubelet::NODE_NAME;
use lock::NodeLock;

const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// The running node, as tests see it.
pub struct Node {
    /// The host's address on the pod network (the pods' `status.hostIP`): a server a test
    /// binds there is reachable from pods, and from nothing beyond this machine.
    pub host_address: Ipv4Addr,
    /// The images the node has, by reference (the pods use `imagePullPolicy: Never`).
    pub images: Vec<String>,
    dir: PathBuf,
}

impl Node {
    /// The last lines of the kubelet's and containerd's logs, for a failing test's message.
    pub fn log_tail(&self) -> String {
        log_tail(&self.dir)
    }
}

fn log_tail(dir: &Path) -> String {
    ["kubelet.log", "containerd.log"]
        .map(|f| format!("== {f}\n{}", crate::tail(&dir.join(f), 30)))
        .join("\n")
}

/// What stopping the node takes; runs at most once.
pub(crate) struct NodeTeardown {
    kubelet_pid: Mutex<Option<u32>>,
    pub(crate) footprint: Footprint,
    lock: Mutex<Option<NodeLock>>,
}

impl NodeTeardown {
    pub(crate) fn run(&self) {
        if let Some(pid) = self.kubelet_pid.lock().ok().and_then(|mut p| p.take()) {
            stop_processes(&[pid]);
        }
        if let Some(lock) = self.lock.lock().ok().and_then(|mut l| l.take()) {
            self.footprint.remove();
            lock.release();
        }
    }
}

/// What the node needs from the control plane.
pub(crate) struct PlaneAccess<'a> {
    pub(crate) bin: &'a Path,
    pub(crate) dir: &'a Path,
    pub(crate) ca: &'a Ca,
    pub(crate) ca_file: &'a Path,
    pub(crate) server: &'a str,
}

/// Removes what a node whose process was killed left on the host (its pods, daemons, mounts,
/// cgroups, bridge and files), as the next node's start would; waits for a running node.
pub fn remove_stale_node() -> anyhow::Result<()> {
    let scratch = tempfile::Builder::new()
        .prefix("llmesh-node-clean-")
        .tempdir()?;
    let (lock, _) = NodeLock::acquire(scratch.path())?;
    lock.release();
    Ok(())
}

/// Takes the machine's node lock and makes the node's place on the host: its pods' cgroup root
/// and the pod network (which the API server listens on, so it comes before the control plane).
pub(crate) fn prepare(plane_dir: &Path) -> anyhow::Result<NodeTeardown> {
    let dir = plane_dir.join("node");
    std::fs::create_dir_all(&dir)?;
    let (lock, footprint) = NodeLock::acquire(&dir)?;
    let teardown = NodeTeardown {
        kubelet_pid: Mutex::new(None),
        footprint,
        lock: Mutex::new(Some(lock)),
    };
    if let Err(error) = footprint::create_cgroup_root().and_then(|()| network::create()) {
        teardown.run();
        return Err(error);
    }
    Ok(teardown)
}

/// Starts containerd and the kubelet; the node registers itself with the API server.
pub(crate) async fn start(
    plane: &PlaneAccess<'_>,
    teardown: &NodeTeardown,
    spawn: impl Fn(Vec<Command>) -> anyhow::Result<Vec<u32>>,
) -> anyhow::Result<Node> {
    let dir = plane.dir.join("node");
    start_processes(plane, &dir, teardown, spawn)
        .await
        .map_err(|error| error.context(log_tail(&dir)))
}

async fn start_processes(
    plane: &PlaneAccess<'_>,
    dir: &Path,
    teardown: &NodeTeardown,
    spawn: impl Fn(Vec<Command>) -> anyhow::Result<Vec<u32>>,
) -> anyhow::Result<Node> {
    let cni_config = network::cni_config(&dir.join("cni/ipam"));
    let containerd_paths = containerd::configure(dir, &cni_config)?;
    let containerd_pid = spawn(vec![launch_containerd(&containerd_paths.config, dir)?])?
        .into_iter()
        .next()
        .context("containerd was not started")?;
    containerd::wait_ready(&containerd_paths.socket, containerd_pid).await?;
    let images = containerd::import_images(&containerd_paths.socket)?;

    let write = |name: &str, content: &str| -> anyhow::Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, content).with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    };
    let serving = pki::issue(plane.ca, NODE_NAME, &[NODE_NAME], true, &[], &[])?;
    write("kubelet-serving.crt", &serving.cert_pem)?;
    write("kubelet-serving.key", &serving.key_pem)?;
    let identity = pki::issue(
        plane.ca,
        &format!("system:node:{NODE_NAME}"),
        &[],
        false,
        &["system:nodes"],
        &[],
    )?;
    let kubeconfig = write(
        "kubelet.kubeconfig",
        &pki::kubeconfig_yaml(plane.server, &plane.ca.pem(), &identity),
    )?;
    let ports = kubelet::Ports {
        server: free_port()?,
        healthz: free_port()?,
    };
    let config = write(
        "kubelet.yaml",
        &kubelet::config(dir, plane.ca_file, &containerd_paths.socket, &ports),
    )?;
    let args = kubelet::args(dir, &config, &kubeconfig, network::HOST_ADDRESS);
    let kubelet_pid = spawn(vec![launch(
        &plane.bin.join("kubelet"),
        args,
        &dir.join("kubelet.log"),
    )?])?
    .into_iter()
    .next()
    .context("the kubelet was not started")?;
    if let Ok(mut slot) = teardown.kubelet_pid.lock() {
        *slot = Some(kubelet_pid);
    }
    Ok(Node {
        host_address: network::HOST_ADDRESS,
        images,
        dir: dir.to_path_buf(),
    })
}

fn launch_containerd(config: &Path, dir: &Path) -> anyhow::Result<Command> {
    let args = vec![
        format!("--config={}", config.display()),
        "--log-level=warn".into(),
    ];
    let mut command = launch(Path::new("containerd"), args, &dir.join("containerd.log"))?;
    // An image that was not imported must fail, not be pulled from a registry: every pull
    // goes to a proxy address on loopback where nothing listens.
    command
        .env("HTTP_PROXY", "http://127.0.0.1:9")
        .env("HTTPS_PROXY", "http://127.0.0.1:9")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy");
    Ok(command)
}

/// Waits until the node is Ready and the kubelet still runs.
pub(crate) async fn wait_ready(
    client: &kube::Client,
    teardown: &NodeTeardown,
) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Node as NodeObject;
    let nodes: kube::Api<NodeObject> = kube::Api::all(client.clone());
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(pid) = teardown.kubelet_pid.lock().ok().and_then(|p| *p) {
            if !process_alive(pid) {
                bail!("the kubelet (pid {pid}) exited");
            }
        }
        let ready = nodes.get_opt(NODE_NAME).await?.is_some_and(|node| {
            node.status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("node {NODE_NAME} not Ready after {READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

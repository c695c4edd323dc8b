//! containerd for the node: its own root, state, socket and runc state under the node's
//! directory, the CRI plugin on the node's pod network, and llmesh's locally built images.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use super::command::run;

/// The pod sandbox image, built from `tests/images/pause.c` by `scripts/images`.
pub(crate) const PAUSE_IMAGE: &str = concat!("llmesh.local/pause:", env!("CARGO_PKG_VERSION"));
const READY_TIMEOUT: Duration = Duration::from_secs(20);

pub(crate) struct Paths {
    pub(crate) config: PathBuf,
    pub(crate) socket: PathBuf,
}

/// Writes containerd's and the CNI configuration under `dir`.
pub(crate) fn configure(dir: &Path, cni_config: &str) -> anyhow::Result<Paths> {
    let root = dir.join("containerd");
    let cni_conf_dir = dir.join("cni/net.d");
    std::fs::create_dir_all(&cni_conf_dir)?;
    std::fs::write(cni_conf_dir.join("10-llmesh.conflist"), cni_config)?;
    let socket = root.join("containerd.sock");
    // restrict_oom_score_adj: processes here lack CAP_SYS_RESOURCE, and runc fails to create
    // the sandbox when asked to lower its OOM score.
    let config = format!(
        r#"version = 2
root = "{root}/root"
state = "{root}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{root}/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{root}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
"#,
        root = root.display(),
        socket = socket.display(),
        cni = cni_conf_dir.display(),
    );
    let config_path = root.join("config.toml");
    std::fs::create_dir_all(&root)?;
    std::fs::write(&config_path, config)?;
    Ok(Paths {
        config: config_path,
        socket,
    })
}

pub(crate) fn ctr(socket: &Path, args: &[&str]) -> anyhow::Result<String> {
    let address = socket.to_string_lossy();
    // No ctr call may hang a test run.
    let mut all = vec![
        "--address",
        &address,
        "--namespace",
        "k8s.io",
        "--timeout",
        "120s",
    ];
    all.extend_from_slice(args);
    run("ctr", &all)
}

pub(crate) async fn wait_ready(socket: &Path, pid: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if !crate::process::process_alive(pid) {
            bail!("containerd (pid {pid}) exited during start-up");
        }
        match ctr(socket, &["version"]) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e.context("containerd not ready")),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The directory of OCI archives that `scripts/images` writes.
pub(crate) fn images_dir() -> PathBuf {
    match std::env::var_os("LLMESH_IMAGES_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/images"),
    }
}

/// Imports every image archive of [`images_dir`] into the node's containerd.
pub(crate) fn import_images(socket: &Path) -> anyhow::Result<Vec<String>> {
    let dir = images_dir();
    let mut archives: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("read {}: run scripts/images first", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".oci.tar"))
        .collect();
    archives.sort();
    if archives.is_empty() {
        bail!(
            "no image archives in {}: run scripts/images first",
            dir.display()
        );
    }
    for archive in &archives {
        ctr(socket, &["images", "import", &archive.to_string_lossy()])?;
    }
    let listed = ctr(socket, &["images", "ls", "--quiet"])?;
    let images: Vec<String> = listed.lines().map(String::from).collect();
    if !images.iter().any(|i| i == PAUSE_IMAGE) {
        bail!(
            "{PAUSE_IMAGE} is not among the images of {}: run scripts/images",
            dir.display()
        );
    }
    Ok(images)
}

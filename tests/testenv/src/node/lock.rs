//! One node per machine: the bridge, the pods' cgroup root and the host paths the kubelet and
//! containerd use are fixed, so nodes take turns. The lock file names the running node's
//! footprint, so a node whose process was killed is cleaned up by the next one to start.

use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use super::footprint::{self, Footprint};

const LOCK_FILE: &str = "/run/llmesh-node.lock";
/// Long enough for another test binary's node to finish; `scripts/cluster` holds it for good.
const WAIT: Duration = Duration::from_secs(600);

pub(crate) struct NodeLock {
    file: File,
}

impl NodeLock {
    /// Waits for the lock, removes what a killed node left, then records what is on the host
    /// before the node in `dir` starts.
    pub(crate) fn acquire(dir: &Path) -> anyhow::Result<(Self, Footprint)> {
        let path = Path::new(LOCK_FILE);
        let deadline = Instant::now() + WAIT;
        let mut file = loop {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .with_context(|| format!("open {LOCK_FILE}"))?;
            // SAFETY: flock(2) on a descriptor this function owns.
            let locked =
                unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
            // The holder may have unlinked the file after we opened it: only a lock on the
            // file that is still at the path counts.
            if locked && same_file(&file, path) {
                break file;
            }
            if Instant::now() > deadline {
                bail!("another llmesh test node holds {LOCK_FILE} (scripts/cluster down stops one left running)");
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        let mut previous = String::new();
        file.read_to_string(&mut previous)?;
        if let Some(stale) = Footprint::from_text(&previous) {
            stale.remove();
            stale.remove_cluster_dir();
        }
        footprint::remove_fixed_names();
        let footprint = Footprint::record(dir);
        file.set_len(0)?;
        file.rewind()?;
        file.write_all(footprint.to_text().as_bytes())?;
        file.sync_all()?;
        Ok((Self { file }, footprint))
    }

    /// Called once the node is gone: nothing is left to clean up after this.
    pub(crate) fn release(self) {
        let _ = self.file.set_len(0);
        let _ = std::fs::remove_file(LOCK_FILE);
        drop(self.file);
    }
}

fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

//! Everything a node leaves on the host outside its own directory while it runs, so that
//! stopping it (or the next start, after a run that was killed) removes exactly that: its
//! processes, its mounts, its cgroups, its bridge, and the files the kubelet, containerd and
//! the CNI plugins put at fixed host paths.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::network;

/// The cgroup (in every hierarchy) under which the kubelet puts its pods (`cgroupRoot`).
pub(crate) const CGROUP_ROOT: &str = "llmesh-node";

/// Host paths that containerd, its shims, the kubelet or the CNI plugins write to whatever
/// their configuration says. Each is removed if the node created it, else only the entries the
/// node added to it.
const HOST_PATHS: &[&str] = &[
    "/run/containerd",
    "/run/containerd/s",
    // util-linux's record of mounts made with mount(8), as the kubelet does for tmpfs volumes.
    "/run/mount",
    "/run/netns",
    "/var/lib/cni",
    "/var/lib/cni/results",
    "/var/lib/kubelet",
    "/var/lib/kubelet/device-plugins",
    "/var/log/containers",
    "/var/log/pods",
];

/// What was on the host before the node started, to tell its additions apart.
#[derive(Clone, Debug)]
pub struct Footprint {
    dir: PathBuf,
    /// For each of [`HOST_PATHS`]: `None` if it did not exist, else its entries then.
    before: Vec<(PathBuf, Option<BTreeSet<String>>)>,
}

impl Footprint {
    /// Records the host's state before a node starts in `dir`.
    pub(crate) fn record(dir: &Path) -> Self {
        let before = HOST_PATHS
            .iter()
            .map(|path| (PathBuf::from(path), entries(Path::new(path))))
            .collect();
        Self {
            dir: dir.to_path_buf(),
            before,
        }
    }

    /// One line per path: `path` then, if it existed, its entries (for the lock file).
    pub(crate) fn to_text(&self) -> String {
        let mut text = format!("{}\n", self.dir.display());
        for (path, entries) in &self.before {
            match entries {
                None => text.push_str(&format!("{}\n", path.display())),
                Some(entries) => {
                    let names: Vec<&str> = entries.iter().map(String::as_str).collect();
                    text.push_str(&format!("{}\t{}\n", path.display(), names.join("\t")));
                }
            }
        }
        text
    }

    pub(crate) fn from_text(text: &str) -> Option<Self> {
        let mut lines = text.lines();
        let dir = PathBuf::from(lines.next().filter(|l| !l.is_empty())?);
        let before = lines
            .map(|line| {
                let mut fields = line.split('\t');
                let path = PathBuf::from(fields.next().unwrap_or_default());
                let entries = line
                    .contains('\t')
                    .then(|| fields.filter(|f| !f.is_empty()).map(String::from).collect());
                (path, entries)
            })
            .collect();
        Some(Self { dir, before })
    }

    /// Removes everything the node left: kills its processes (pods first), unmounts, removes
    /// its cgroups, the bridge, the host files it added, and its directory.
    pub(crate) fn remove(&self) {
        kill_until_gone(|| self.all_processes());
        for mount in self.mounts() {
            let Ok(path) = std::ffi::CString::new(mount.as_os_str().as_encoded_bytes()) else {
                continue;
            };
            // SAFETY: a NUL-terminated path; MNT_DETACH so a busy mount goes away when released.
            unsafe {
                libc::umount2(path.as_ptr(), libc::MNT_DETACH);
            }
        }
        remove_fixed_names();
        // Deleting through a mount that survived would delete what it shows (a host directory
        // bind-mounted into a pod): then leave the files, and the check reports them.
        if let Some(mount) = self.mounts().next() {
            eprintln!(
                "llmesh-testenv: {} is still mounted; the node's files are left in place",
                mount.display()
            );
            return;
        }
        for path in self.added_paths() {
            let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Removes the directory of the cluster the node belonged to (its control plane's files),
    /// for a node whose process was killed: its control plane died with it.
    pub(crate) fn remove_cluster_dir(&self) {
        let Some(cluster_dir) = self.dir.parent() else {
            return;
        };
        let harness_made = cluster_dir
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("llmesh-testenv-"));
        if harness_made {
            let _ = std::fs::remove_dir_all(cluster_dir);
        }
    }

    /// What the node left on the host, one line each; empty once [`Footprint::remove`] ran.
    pub fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        found.extend(
            self.all_processes()
                .into_iter()
                .map(|pid| format!("process {pid}: {}", cmdline(pid).unwrap_or_default())),
        );
        found.extend(self.mounts().map(|m| format!("mount {}", m.display())));
        found.extend(cgroups().map(|c| format!("cgroup {}", c.display())));
        if network::exists() {
            found.push(format!("network interface {}", network::BRIDGE));
        }
        found.extend(self.added_paths().map(|p| format!("file {}", p.display())));
        if self.dir.exists() {
            found.push(format!("directory {}", self.dir.display()));
        }
        found
    }

    /// The pods' processes and the node's own daemons.
    fn all_processes(&self) -> Vec<u32> {
        pod_processes()
            .into_iter()
            .chain(self.processes())
            .collect()
    }

    /// The node's own daemons: containerd, its shims (by their socket address) and the kubelet,
    /// each with a path inside the node's directory among its arguments. Nothing else is
    /// matched, not even a `tail -f` of one of their logs.
    fn processes(&self) -> Vec<u32> {
        const DAEMONS: [&str; 3] = ["containerd", "containerd-shim-runc-v2", "kubelet"];
        let inside = format!("{}/", self.dir.to_string_lossy());
        let own = std::process::id();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| *pid != own && crate::process::process_alive(*pid))
            .filter(|pid| {
                let Some(args) = arguments(*pid) else {
                    return false;
                };
                let program = args.first().map(|a| a.rsplit('/').next().unwrap_or(a));
                program.is_some_and(|p| DAEMONS.contains(&p))
                    && args.iter().skip(1).any(|a| a.contains(&inside))
            })
            .collect()
    }

    /// Mount points under the node's directory or under what it added to the host.
    fn mounts(&self) -> impl Iterator<Item = PathBuf> {
        let roots: Vec<PathBuf> = std::iter::once(self.dir.clone())
            .chain(self.added_paths())
            .collect();
        let mut points: Vec<PathBuf> = mount_points()
            .into_iter()
            .filter(|point| roots.iter().any(|root| point.starts_with(root)))
            .collect();
        // Deepest first, so nested mounts go before the ones they sit on.
        points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        points.into_iter()
    }

    /// Host paths the node created, or entries it added to host directories that existed.
    fn added_paths(&self) -> impl Iterator<Item = PathBuf> + '_ {
        let mut added = Vec::new();
        for (path, before) in &self.before {
            match before {
                // A parent the node created covers it.
                None if (path.exists() || path.is_symlink())
                    && !added.iter().any(|a: &PathBuf| path.starts_with(a)) =>
                {
                    added.push(path.clone());
                }
                None => {}
                Some(before) => {
                    let now = entries(path).unwrap_or_default();
                    let watched_children: BTreeSet<&str> = self
                        .before
                        .iter()
                        .filter(|(p, _)| p.parent() == Some(path.as_path()))
                        .filter_map(|(p, _)| p.file_name()?.to_str())
                        .collect();
                    added.extend(
                        now.difference(before)
                            .filter(|name| !watched_children.contains(name.as_str()))
                            .map(|name| path.join(name))
                            .filter(|entry| self.may_be_ours(path, entry)),
                    );
                }
            }
        }
        added.into_iter()
    }
}

impl Footprint {
    /// Whether a new entry of a shared host directory can be the node's: where its owner can be
    /// told from the entry, only the node's own are (others may add to these directories
    /// while the node runs).
    fn may_be_ours(&self, directory: &Path, entry: &Path) -> bool {
        let name = entry
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        match directory.to_str() {
            // containerd names the network namespaces of its sandboxes so.
            Some("/run/netns") => name.starts_with("cni-"),
            // The CNI library's cache files start with the network's name.
            Some("/var/lib/cni/results") => name.starts_with(network::NETWORK_NAME),
            // The kubelet's links to the container logs, which it keeps in the node's directory.
            Some("/var/log/containers") => {
                std::fs::read_link(entry).is_ok_and(|target| target.starts_with(&self.dir))
            }
            _ => true,
        }
    }
}

/// What carries the harness's fixed names (the pods' processes under its cgroup root, the
/// cgroups, the bridge) is a node's, whoever left it: removed before a node starts, even when a
/// killed run left no footprint to go by.
pub(crate) fn remove_fixed_names() {
    kill_until_gone(pod_processes);
    remove_cgroups();
    network::delete();
}

/// SIGKILLs what `find` lists until it lists nothing (or 10 s have passed).
fn kill_until_gone(find: impl Fn() -> Vec<u32>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = find();
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in pids {
            // SAFETY: kill(2) on a process of the node's pods or one of its own daemons.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes the cgroups under the pods' root, deepest first; a cgroup can stay busy for a
/// moment after its last process is reaped.
fn remove_cgroups() {
    let deadline = Instant::now() + Duration::from_secs(5);
    while cgroups().next().is_some() && Instant::now() < deadline {
        for cgroup in cgroups() {
            let _ = std::fs::remove_dir(cgroup);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn entries(path: &Path) -> Option<BTreeSet<String>> {
    let read = std::fs::read_dir(path).ok()?;
    Some(
        read.flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect(),
    )
}

fn arguments(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

fn cmdline(pid: u32) -> Option<String> {
    arguments(pid).map(|args| args.join(" "))
}

/// The mount points of this mount namespace, from /proc/self/mountinfo (field 5, with the
/// kernel's octal escapes undone).
fn mount_points() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|escaped| PathBuf::from(unescape_mountinfo(escaped)))
        .collect()
}

fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let code = rest
            .get(at + 1..at + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[at + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The mount points of the cgroup hierarchies (v1: one per controller; v2: the unified one).
pub(crate) fn cgroup_hierarchies() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let fstype = fs.split(' ').next()?;
            (fstype == "cgroup" || fstype == "cgroup2")
                .then(|| {
                    mount
                        .split(' ')
                        .nth(4)
                        .map(|p| PathBuf::from(unescape_mountinfo(p)))
                })
                .flatten()
        })
        .collect()
}

/// Creates the pods' cgroup root in every hierarchy. A v1 cpuset cgroup starts with no CPUs
/// and no memory nodes, and takes no tasks until given its parent's.
pub(crate) fn create_cgroup_root() -> anyhow::Result<()> {
    for hierarchy in cgroup_hierarchies() {
        let root = hierarchy.join(CGROUP_ROOT);
        std::fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
        for file in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(value) = std::fs::read_to_string(hierarchy.join(file)) {
                std::fs::write(root.join(file), value.trim())
                    .with_context(|| format!("write {}", root.join(file).display()))?;
            }
        }
        // cgroup v2: the kubelet needs the controllers enabled below its root.
        if let Ok(controllers) = std::fs::read_to_string(hierarchy.join("cgroup.subtree_control")) {
            let enable: Vec<String> = controllers
                .split_whitespace()
                .map(|c| format!("+{c}"))
                .collect();
            if !enable.is_empty() {
                let _ = std::fs::write(root.join("cgroup.subtree_control"), enable.join(" "));
            }
        }
    }
    Ok(())
}

/// Every cgroup under the pods' root, deepest first.
fn cgroups() -> impl Iterator<Item = PathBuf> {
    let mut found = Vec::new();
    for hierarchy in cgroup_hierarchies() {
        collect_dirs(&hierarchy.join(CGROUP_ROOT), &mut found);
    }
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.into_iter()
}

fn collect_dirs(dir: &Path, found: &mut Vec<PathBuf>) {
    if !dir.is_dir() {
        return;
    }
    if let Ok(read) = std::fs::read_dir(dir) {
        for entry in read.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&entry.path(), found);
            }
        }
    }
    found.push(dir.to_path_buf());
}

/// The processes in the pods' cgroups: every container and pause process of the node.
fn pod_processes() -> Vec<u32> {
    let mut pids = BTreeSet::new();
    for cgroup in cgroups() {
        let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
        pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    pids.into_iter()
        .filter(|pid| crate::process::process_alive(*pid))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mountinfo(r"/tmp/x\\y"), r"/tmp/x\\y");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    #[test]
    fn the_lock_file_text_gives_back_the_same_footprint() {
        let footprint = Footprint {
            dir: PathBuf::from("/tmp/llmesh-node-x"),
            before: vec![
                (PathBuf::from("/run/containerd"), None),
                (
                    PathBuf::from("/run/netns"),
                    Some(["a".to_string(), "b".to_string()].into()),
                ),
                (PathBuf::from("/var/lib/cni"), Some(BTreeSet::new())),
            ],
        };
        let back = Footprint::from_text(&footprint.to_text()).unwrap();
        assert_eq!(back.dir, footprint.dir);
        assert_eq!(back.before, footprint.before);
    }

    #[test]
    fn entries_added_to_an_existing_host_directory_are_ours_and_old_ones_are_not() {
        let host = tempfile::tempdir().unwrap();
        let watched = host.path().join("netns");
        std::fs::create_dir(&watched).unwrap();
        std::fs::write(watched.join("theirs"), "").unwrap();
        let footprint = Footprint {
            dir: host.path().join("node"),
            before: vec![
                (watched.clone(), entries(&watched)),
                (host.path().join("created"), None),
            ],
        };
        std::fs::write(watched.join("cni-1"), "").unwrap();
        std::fs::create_dir(host.path().join("created")).unwrap();
        let added: Vec<PathBuf> = footprint.added_paths().collect();
        assert_eq!(
            added,
            vec![watched.join("cni-1"), host.path().join("created")]
        );
    }
}

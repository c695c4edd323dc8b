//! Starts the real `llmesh-sidecar` binary on free loopback ports, with JSON logs captured.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The sidecar writes its log in batches, 20 ms after the first line of a batch
/// (`logging::sink::BATCH_DELAY`); five times that leaves room for a busy machine.
const LOG_BATCH_DELAY: Duration = Duration::from_millis(100);

pub mod redis;

pub const BIN: &str = env!("CARGO_BIN_EXE_llmesh-sidecar");

pub struct Sidecar {
    child: Child,
    pub app: SocketAddr,
    pub admin: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    pub dir: TempDir,
}

impl Sidecar {
    /// Writes `config_yaml` to `config.yaml` in a new temp dir and starts the sidecar on it.
    pub fn start(config_yaml: &str) -> Self {
        Self::start_with_flags(config_yaml, &[])
    }

    /// Starts the sidecar on `config_yaml` with extra command-line `flags`.
    pub fn start_with_flags(config_yaml: &str, flags: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, config_yaml).expect("write config");
        let path = path.to_str().expect("utf-8 path").to_string();
        let mut args = vec!["--config", path.as_str()];
        args.extend_from_slice(flags);
        Self::start_with(dir, &args)
    }

    /// Starts the sidecar with `args` (plus test ports and JSON logs); `dir` lives as long as it.
    pub fn start_with(dir: TempDir, args: &[&str]) -> Self {
        Self::start_with_env(dir, args, &[])
    }

    /// Like `start_with`, with environment variables set for the sidecar only.
    pub fn start_with_env(dir: TempDir, args: &[&str], env: &[(&str, &str)]) -> Self {
        // The test's own flags come last: a flag given twice takes its last value.
        let mut child = Command::new(BIN)
            .envs(env.iter().copied())
            .args([
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--reload-interval",
                "100ms",
                "--shutdown-grace",
                "10s",
            ])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start llmesh-sidecar");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["message"] == "listening" {
                        let _ = tx.send((
                            v["app"].as_str().map(str::to_string),
                            v["admin"].as_str().map(str::to_string),
                        ));
                    }
                }
                sink.lock().expect("log lock").push(line);
            }
        });
        let (app, admin) = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok((Some(app), Some(admin))) => (
                app.parse().expect("app addr"),
                admin.parse().expect("admin addr"),
            ),
            _ => {
                let _ = child.kill();
                let logs = logs.lock().expect("log lock").join("\n");
                panic!("sidecar did not start listening:\n{logs}");
            }
        };
        Self {
            child,
            app,
            admin,
            logs,
            dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.app)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// The exposition text of the admin listener's `/metrics`.
    pub async fn metrics_text(&self) -> String {
        client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("scrape /metrics")
            .text()
            .await
            .expect("read /metrics")
    }

    /// Status and body of the admin listener's `/readyz`.
    pub async fn readiness(&self) -> (u16, serde_json::Value) {
        let r = client()
            .get(self.admin_url("/readyz"))
            .send()
            .await
            .expect("GET /readyz");
        (r.status().as_u16(), r.json().await.expect("/readyz body"))
    }

    /// The log so far, once the batch of lines in flight has been written.
    pub fn logs(&self) -> String {
        std::thread::sleep(LOG_BATCH_DELAY);
        self.logs_now()
    }

    fn logs_now(&self) -> String {
        self.logs.lock().expect("log lock").join("\n")
    }

    /// The JSON log lines whose `message` is `message`, once the batch of lines in flight
    /// has been written.
    pub fn log_events(&self, message: &str) -> Vec<serde_json::Value> {
        std::thread::sleep(LOG_BATCH_DELAY);
        self.logs
            .lock()
            .expect("log lock")
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["message"] == message)
            .collect()
    }

    /// Waits until a log line contains `needle`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.logs_now().contains(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    pub fn signal_term(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The layout of a mounted ConfigMap, Secret or projected volume: keys are symlinks into
/// `..data`, which the kubelet swaps atomically to a new timestamped directory, then adds the
/// symlinks of new keys and removes those of keys gone (an optional item whose ConfigMap
/// does not exist is simply absent).
pub struct KubeletVolume {
    root: PathBuf,
    generation: u32,
    keys: Vec<String>,
}

impl KubeletVolume {
    pub fn create(root: &Path, files: &[(&str, &str)]) -> Self {
        std::fs::create_dir_all(root).expect("create volume dir");
        let mut volume = Self {
            root: root.to_path_buf(),
            generation: 0,
            keys: Vec::new(),
        };
        volume.update(files);
        volume
    }

    pub fn update(&mut self, files: &[(&str, &str)]) {
        self.generation += 1;
        let data = format!(
            "..2026_11_23_00_00_{:02}.{}",
            self.generation, self.generation
        );
        std::fs::create_dir(self.root.join(&data)).expect("create data dir");
        for (name, content) in files {
            std::fs::write(self.root.join(&data).join(name), content).expect("write key");
        }
        let tmp = self.root.join("..data_tmp");
        std::os::unix::fs::symlink(&data, &tmp).expect("link ..data_tmp");
        std::fs::rename(&tmp, self.root.join("..data")).expect("swap ..data");
        let keys: Vec<String> = files.iter().map(|(name, _)| name.to_string()).collect();
        for key in keys.iter().filter(|k| !self.keys.contains(k)) {
            std::os::unix::fs::symlink(format!("..data/{key}"), self.root.join(key))
                .expect("link key");
        }
        for key in self.keys.iter().filter(|k| !keys.contains(k)) {
            std::fs::remove_file(self.root.join(key)).expect("unlink key");
        }
        self.keys = keys;
    }
}

/// Replaces a file the way editors and `kubectl cp` do: write aside, then rename over it.
pub fn replace_file(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, content).expect("write temp file");
    std::fs::rename(&tmp, path).expect("rename over");
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("reqwest client")
}

/// Polls `check` until it is true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, ValueEnum};
use tokio::net::TcpListener;
use tokio::sync::watch;

use llmesh_sidecar::config::{self, ConfigSource};
use llmesh_sidecar::logging::{self, LogFormat};
use llmesh_sidecar::metrics::Metrics;
use llmesh_sidecar::otlp::SpanSink;
use llmesh_sidecar::pod::PodIdentity;
use llmesh_sidecar::reload::{Reloader, SharedState};
use llmesh_sidecar::server;
use llmesh_sidecar::snapshot::Snapshot;

/// llmesh sidecar: point your OpenAI SDK at http://127.0.0.1:4000/v1 and it adds the
/// provider's credentials, deadlines and streaming.
#[derive(Parser, Debug)]
// A flag given twice takes its last value, as in most servers (wrappers append overrides).
#[command(name = "llmesh-sidecar", version, args_override_self = true)]
struct Cli {
    /// A YAML file with the whole configuration.
    #[arg(long, env = "LLMESH_CONFIG", conflicts_with = "config_dir", required_unless_present_any = ["config_dir", "print_schema"])]
    config: Option<PathBuf>,
    /// A directory with one YAML file per endpoint (a mounted ConfigMap).
    #[arg(long, env = "LLMESH_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
    /// With --config-dir: the endpoints this pod expects there (comma-separated names, or *
    /// for whatever is there). The sidecar starts even if some or all have no file yet,
    /// lists them as `missing` on /readyz, answers them with 503 and serves each one as soon
    /// as its file appears.
    #[arg(long, env = "LLMESH_EXPECT_ENDPOINTS")]
    expect_endpoints: Option<config::ExpectedEndpoints>,
    /// The pod's namespace (from the downward API), shown on /readyz and in llmesh_pod_info.
    #[arg(long, env = "POD_NAMESPACE")]
    pod_namespace: Option<String>,
    /// The pod's ServiceAccount (from the downward API), shown on /readyz and in llmesh_pod_info.
    #[arg(long, env = "POD_SERVICE_ACCOUNT")]
    pod_service_account: Option<String>,
    /// Where apps connect. Loopback by default: the pod is the security boundary.
    #[arg(long, env = "LLMESH_LISTEN", default_value = "127.0.0.1:4000")]
    listen: SocketAddr,
    /// Probes for the kubelet and `/metrics` for Prometheus.
    #[arg(long, env = "LLMESH_ADMIN_LISTEN", default_value = "0.0.0.0:4001")]
    admin_listen: SocketAddr,
    #[arg(long, env = "LLMESH_LOG_FORMAT", value_enum, default_value = "human")]
    log_format: LogFormat,
    /// Log filter in RUST_LOG syntax.
    #[arg(long, env = "LLMESH_LOG", default_value = "info")]
    log: String,
    /// How often config and credential files are checked for changes.
    #[arg(long, env = "LLMESH_RELOAD_INTERVAL", default_value = "2s")]
    reload_interval: config::Duration,
    /// How long requests and streams in flight may take to finish after SIGTERM.
    #[arg(long, env = "LLMESH_SHUTDOWN_GRACE", default_value = "30s")]
    shutdown_grace: config::Duration,
    /// Threads serving the app port, each with its own connections and upstream pool.
    /// Defaults to the CPUs this process may use (its cgroup quota included).
    #[arg(long, env = "LLMESH_WORKERS")]
    workers: Option<usize>,
    /// Serve Prometheus metrics at the admin port's `/metrics` (`--metrics false` turns them off).
    #[arg(long, env = "LLMESH_METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    metrics: bool,
    /// Export one span per request to this OpenTelemetry collector (its OTLP/HTTP base URL,
    /// e.g. http://otel-collector:4318; spans go to /v1/traces as JSON). Off by default.
    #[arg(long, env = "LLMESH_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Validate the configuration, print a summary and exit.
    #[arg(long)]
    check: bool,
    /// Print the JSON Schema of the configuration and exit.
    #[arg(long, value_enum)]
    print_schema: Option<SchemaKind>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SchemaKind {
    /// A `--config` file.
    Config,
    /// One file of a `--config-dir` directory.
    Endpoint,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(kind) = cli.print_schema {
        let schema = match kind {
            SchemaKind::Config => config::sidecar_config_schema(),
            SchemaKind::Endpoint => config::endpoint_config_schema(),
        };
        println!("{}", serde_json::to_string_pretty(&schema)?);
        return Ok(());
    }
    // Dropped last, at the end of main: pending log lines are written before exit.
    let _log_writer = logging::init(cli.log_format, &cli.log).map_err(anyhow::Error::msg)?;
    let source = match (&cli.config, &cli.config_dir, &cli.expect_endpoints) {
        (Some(file), None, None) => ConfigSource::File(file.clone()),
        (None, Some(dir), None) => ConfigSource::Dir(dir.clone()),
        (None, Some(dir), Some(expected)) => ConfigSource::ExpectingDir {
            dir: dir.clone(),
            expected: expected.clone(),
        },
        (_, None, Some(_)) => bail!("--expect-endpoints goes with --config-dir, not --config"),
        _ => bail!("give exactly one of --config and --config-dir"),
    };
    let loaded = source.load()?;
    let snapshot = Snapshot::build(&loaded, None)?;
    if cli.check {
        for e in &snapshot.endpoints {
            let credential = match (e.credential(), e.unavailable_reason()) {
                (Some(c), _) => c.fingerprint().to_string(),
                (None, Some(error)) => format!("UNAVAILABLE: {error}"),
                (None, None) => "none".to_string(),
            };
            println!(
                "{} provider={} model={} credential={credential}",
                e.name(),
                e.config.provider.as_str(),
                e.config.model
            );
        }
        for name in &snapshot.missing {
            println!("{name} MISSING: expected, but no file defines it yet");
        }
        println!("configuration is valid (hash {})", loaded.hash);
        return Ok(());
    }

    run(cli, source, loaded, snapshot)
}

/// Worker threads serve the app port, each on its own single-threaded runtime; the main
/// thread's runtime runs what is not on the data path: signals, reload, the admin port.
fn run(
    cli: Cli,
    source: ConfigSource,
    loaded: config::LoadedConfig,
    snapshot: Snapshot,
) -> anyhow::Result<()> {
    let pod = PodIdentity::new(cli.pod_namespace.clone(), cli.pod_service_account.clone());
    let metrics = if cli.metrics {
        Some(Arc::new(
            Metrics::new(&pod).context("cannot register the metrics")?,
        ))
    } else {
        None
    };
    let (spans_shutdown_tx, spans_shutdown_rx) = watch::channel(false);
    let (spans, span_export) = match &cli.otlp_endpoint {
        Some(endpoint) => {
            let (sink, export) = SpanSink::start(endpoint, spans_shutdown_rx)?;
            (Some(Arc::new(sink)), Some(export))
        }
        None => (None, None),
    };
    let state = SharedState::new(snapshot, metrics, spans, pod);
    let workers = cli
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let app_listener = server::bind_app_listener(cli.listen)
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    let app_addr = app_listener.local_addr()?;
    let (balancer, inboxes) = server::balance::channels(workers);
    let admin_listener = std::net::TcpListener::bind(cli.admin_listen)
        .with_context(|| format!("cannot listen on {} (admin)", cli.admin_listen))?;
    admin_listener.set_nonblocking(true)?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let grace = cli.shutdown_grace.get();
    let mut worker_threads = Vec::with_capacity(workers);
    for (i, inbox) in inboxes.into_iter().enumerate() {
        let state = state.clone();
        let shutdown = shutdown_rx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("llmesh-worker-{i}"))
            .spawn(move || -> anyhow::Result<()> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(server::serve_app(inbox, state, shutdown, grace));
                Ok(())
            })
            .context("cannot start a worker thread")?;
        worker_threads.push(thread);
    }

    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    control.block_on(async move {
        let admin_listener = TcpListener::from_std(admin_listener)?;
        // On this thread, off the workers': accepting is rare next to requests (SDKs keep
        // their connections open), and the handoff must not wait behind a busy worker.
        tokio::spawn(balancer.run(TcpListener::from_std(app_listener)?, shutdown_rx.clone()));
        tracing::info!(
            app = %app_addr,
            admin = %admin_listener.local_addr()?,
            workers,
            config = %source.path().display(),
            config_hash = %loaded.hash,
            endpoints = state.snapshot().endpoints.len(),
            ready = state.snapshot().is_ready(),
            "listening"
        );
        for name in &state.snapshot().missing {
            tracing::warn!(endpoint = %name, "expected endpoint has no configuration yet; answering it with 503 until it arrives");
        }
        let reloader = Reloader::new(source, state.clone(), loaded);
        tokio::spawn(reloader.run(cli.reload_interval.get()));
        let (admin_shutdown_tx, admin_shutdown_rx) = watch::channel(false);
        let admin = tokio::spawn(server::serve_admin(admin_listener, state.clone(), admin_shutdown_rx));
        let span_export = span_export.map(tokio::spawn);

        wait_for_signal().await?;
        tracing::info!(grace = %cli.shutdown_grace, "shutting down: no new connections, finishing requests in flight");
        state.start_draining();
        let _ = shutdown_tx.send(true);
        // The admin port stays up (reporting "draining") until the data path is done.
        let joined = tokio::task::spawn_blocking(move || {
            worker_threads.into_iter().map(|t| t.join()).collect::<Vec<_>>()
        })
        .await?;
        for result in joined {
            match result {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::error!(%error, "worker failed"),
                Err(_) => tracing::error!("worker panicked"),
            }
        }
        // The last requests' spans are sent before exit.
        if let Some(export) = span_export {
            let _ = spans_shutdown_tx.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(5), export).await;
        }
        let _ = admin_shutdown_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(2), admin).await;
        tracing::info!("stopped");
        Ok(())
    })
}
async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

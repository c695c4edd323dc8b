use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use llmesh_operator::controller::{self, Settings};
use llmesh_operator::lease::{Attempt, LeaderLease, LeaseSettings};
use llmesh_operator::metrics::{self, Metrics};
use llmesh_sidecar::config;
use tokio::sync::watch;

/// llmesh operator: reconciles LlmEndpoints into the ConfigMaps and Secrets that the llmesh
/// sidecar reads. Of several replicas, the one holding the leader Lease reconciles.
#[derive(Parser, Debug)]
#[command(name = "llmesh-operator", version)]
struct Cli {
    /// The environment of namespaces without the `llmesh.io/environment` label.
    #[arg(long, env = "LLMESH_DEFAULT_ENVIRONMENT", default_value = "default")]
    default_environment: String,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "LLMESH_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, env = "LLMESH_ADMIN_LISTEN", default_value = "0.0.0.0:8081")]
    admin_listen: SocketAddr,
    /// Namespace of the leader Lease (normally the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "llmesh-system")]
    lease_namespace: String,
    #[arg(long, env = "LLMESH_LEASE_NAME", default_value = "llmesh-operator")]
    lease_name: String,
    /// This replica's identity in the Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How long the lease stays valid without renewal: how soon a standby takes over
    /// from a replica that died.
    #[arg(long, env = "LLMESH_LEASE_DURATION", default_value = "15s")]
    lease_duration: config::Duration,
    #[arg(long, env = "LLMESH_LEASE_RENEW", default_value = "5s")]
    lease_renew: config::Duration,
    #[arg(long, env = "LLMESH_LOG_FORMAT", value_enum, default_value = "json")]
    log_format: llmesh_sidecar::logging::LogFormat,
    #[arg(long, env = "LLMESH_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    llmesh_sidecar::logging::init(cli.log_format, &cli.log).map_err(anyhow::Error::msg)?;
    let client = kube::Client::try_default()
        .await
        .context("cannot reach the Kubernetes API")?;
    let metrics = Arc::new(Metrics::new()?);

    let admin_listener = tokio::net::TcpListener::bind(cli.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.admin_listen))?;
    let (admin_stop, admin_stopped) = watch::channel(false);
    let admin_metrics = Arc::clone(&metrics);
    let admin = tokio::spawn(llmesh_sidecar::server::serve(
        admin_listener,
        llmesh_sidecar::server::http1_only(),
        admin_stopped,
        Duration::from_secs(1),
        "admin",
        move |req| metrics::admin(Arc::clone(&admin_metrics), req),
    ));

    let identity = cli
        .identity
        .clone()
        .unwrap_or_else(|| format!("llmesh-operator-{}", std::process::id()));
    let lease = LeaderLease::new(
        client.clone(),
        LeaseSettings {
            namespace: cli.lease_namespace.clone(),
            name: cli.lease_name.clone(),
            holder: identity.clone(),
            duration: cli.lease_duration.get(),
            renew_every: cli.lease_renew.get(),
        },
    );
    tracing::info!(%identity, lease = %format!("{}/{}", cli.lease_namespace, cli.lease_name), "waiting for leadership");
    tokio::select! {
        acquired = acquire(&lease) => acquired?,
        () = shutdown_signal() => {
            tracing::info!("stopped before becoming leader");
            return Ok(());
        }
    }
    metrics.leader.set(1);
    tracing::info!(%identity, default_environment = %cli.default_environment, namespace = ?cli.namespace, "leading: reconciling");

    let settings = Settings {
        default_environment: cli.default_environment.clone(),
        namespace: cli.namespace.clone(),
    };
    // The controller stops itself on SIGTERM/SIGINT; losing the lease stops the process,
    // so a replica that may no longer be leader never writes again.
    tokio::select! {
        () = controller::run(client, settings, Arc::clone(&metrics)) => {
            if let Err(error) = lease.release().await {
                tracing::warn!(%error, "cannot release the lease; the next leader waits for it to expire");
            }
            tracing::info!("stopped");
        }
        lost = keep_renewing(&lease) => {
            metrics.leader.set(0);
            let _ = admin_stop.send(true);
            anyhow::bail!("lost the leader lease: {lost}");
        }
    }
    let _ = admin_stop.send(true);
    let _ = admin.await;
    Ok(())
}

async fn acquire(lease: &LeaderLease) -> anyhow::Result<()> {
    let mut reported_holder = None;
    loop {
        match lease.try_acquire().await {
            Ok(Attempt::Held) => return Ok(()),
            Ok(Attempt::HeldBy(holder)) => {
                if reported_holder.as_ref() != Some(&holder) {
                    tracing::info!(%holder, "another replica leads; standing by");
                    reported_holder = Some(holder);
                }
            }
            Err(error) => tracing::warn!(%error, "cannot read the leader lease; retrying"),
        }
        tokio::time::sleep(lease.settings().renew_every).await;
    }
}

/// Renews until renewal fails for longer than the lease lasts; returns why.
async fn keep_renewing(lease: &LeaderLease) -> String {
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(lease.settings().renew_every).await;
        match lease.try_acquire().await {
            Ok(Attempt::Held) => last_renewed = tokio::time::Instant::now(),
            Ok(Attempt::HeldBy(holder)) => return format!("{holder} holds it"),
            Err(error) => {
                tracing::warn!(%error, "cannot renew the leader lease");
                if last_renewed.elapsed() >= lease.settings().duration {
                    return format!("not renewed for {:?}: {error}", lease.settings().duration);
                }
            }
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

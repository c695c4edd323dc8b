use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use kube::runtime::events::{Recorder, Reporter};
use llmesh_operator::controller::{self, Settings};
use llmesh_operator::lease::{Attempt, LeaderLease, LeaseSettings};
use llmesh_operator::metrics::{self, Metrics};
use llmesh_operator::webhook::certs::{self, ManagedCertSettings};
use llmesh_operator::webhook::inject::{is_quantity, InjectionSettings, SidecarResources};
use llmesh_operator::webhook::server::{self as webhook_server, Webhook};
use llmesh_operator::webhook::skipped;
use llmesh_operator::webhook::tls::ReloadingCert;
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
    /// The sidecar-injection webhook's HTTPS address. Every replica serves it.
    #[arg(long, env = "LLMESH_WEBHOOK_LISTEN", default_value = "0.0.0.0:9443")]
    webhook_listen: SocketAddr,
    /// Directory holding the webhook's `tls.crt` and `tls.key` (a mounted Secret); a renewed
    /// pair is served without a restart. Without it, no webhook is served.
    #[arg(long, env = "LLMESH_WEBHOOK_CERT_DIR")]
    webhook_cert_dir: Option<PathBuf>,
    /// The operator issues the webhook's certificate itself (a CA and a serving certificate
    /// in a Secret of its namespace), renews it and patches the CA into the webhook
    /// configuration's `caBundle`. The alternative to `--webhook-cert-dir`.
    #[arg(
        long,
        env = "LLMESH_WEBHOOK_MANAGED_TLS",
        conflicts_with = "webhook_cert_dir"
    )]
    webhook_managed_tls: bool,
    /// The Secret (in the operator's namespace) holding the managed CA and certificate.
    #[arg(
        long,
        env = "LLMESH_WEBHOOK_SECRET",
        default_value = "llmesh-webhook-tls"
    )]
    webhook_secret: String,
    /// The MutatingWebhookConfiguration whose `caBundle` the managed CA goes into.
    #[arg(
        long,
        env = "LLMESH_WEBHOOK_CONFIGURATION",
        default_value = "llmesh-sidecar-injector"
    )]
    webhook_configuration: String,
    /// The Service in front of the webhook: the managed certificate is issued for
    /// `<service>.<namespace>.svc`.
    #[arg(
        long,
        env = "LLMESH_WEBHOOK_SERVICE",
        default_value = "llmesh-operator-webhook"
    )]
    webhook_service: String,
    /// More names for the managed certificate, comma-separated (IP addresses become IP names).
    #[arg(long, env = "LLMESH_WEBHOOK_CERT_EXTRA_NAMES", value_delimiter = ',')]
    webhook_cert_extra_names: Vec<String>,
    /// How long a managed serving certificate is valid; it is renewed when a third is left,
    /// and its CA lives ten times as long.
    #[arg(long, env = "LLMESH_WEBHOOK_CERT_VALIDITY", default_value = "720h")]
    webhook_cert_validity: config::Duration,
    /// How often the certificate files are re-read.
    #[arg(long, env = "LLMESH_WEBHOOK_CERT_RELOAD", default_value = "10s")]
    webhook_cert_reload: config::Duration,
    /// The image of the injected sidecar.
    #[arg(long, env = "LLMESH_SIDECAR_IMAGE", default_value = DEFAULT_SIDECAR_IMAGE)]
    sidecar_image: String,
    #[arg(long, env = "LLMESH_SIDECAR_IMAGE_PULL_POLICY", value_parser = ["Always", "IfNotPresent", "Never"])]
    sidecar_image_pull_policy: Option<String>,
    /// Inject the sidecar as a native sidecar (an init container with `restartPolicy:
    /// Always`, Kubernetes 1.29 and later); `false` injects a plain first container.
    #[arg(long, env = "LLMESH_NATIVE_SIDECARS", default_value_t = true, action = clap::ArgAction::Set)]
    native_sidecars: bool,
    /// The sidecar's app port on 127.0.0.1 (the apps' OPENAI_BASE_URL follows it).
    #[arg(long, env = "LLMESH_SIDECAR_APP_PORT", default_value_t = 4000)]
    sidecar_app_port: u16,
    /// The sidecar's admin port (`/readyz`, `/metrics`), named `llmesh-admin`.
    #[arg(long, env = "LLMESH_SIDECAR_ADMIN_PORT", default_value_t = 4001)]
    sidecar_admin_port: u16,
    /// Default sidecar CPU request (a pod's `llmesh.io/sidecar-cpu-request` overrides it;
    /// `none` sets none). Default 50m.
    #[arg(long, env = "LLMESH_SIDECAR_CPU_REQUEST")]
    sidecar_cpu_request: Option<String>,
    /// Default sidecar memory request (`llmesh.io/sidecar-memory-request`). Default 64Mi.
    #[arg(long, env = "LLMESH_SIDECAR_MEMORY_REQUEST")]
    sidecar_memory_request: Option<String>,
    /// Default sidecar CPU limit (`llmesh.io/sidecar-cpu-limit`). Default none.
    #[arg(long, env = "LLMESH_SIDECAR_CPU_LIMIT")]
    sidecar_cpu_limit: Option<String>,
    /// Default sidecar memory limit (`llmesh.io/sidecar-memory-limit`). Default 256Mi.
    #[arg(long, env = "LLMESH_SIDECAR_MEMORY_LIMIT")]
    sidecar_memory_limit: Option<String>,
}

const DEFAULT_SIDECAR_IMAGE: &str = concat!("ghcr.io/llmesh/sidecar:", env!("CARGO_PKG_VERSION"));

impl Cli {
    fn managed_cert_settings(&self) -> anyhow::Result<ManagedCertSettings> {
        // Shorter, and the renewal loop (a twentieth of it, at least a second) could not keep up.
        if self.webhook_cert_validity.get() < std::time::Duration::from_secs(10) {
            anyhow::bail!("--webhook-cert-validity: at least 10s");
        }
        let service = &self.webhook_service;
        let namespace = &self.lease_namespace;
        let mut names = vec![
            format!("{service}.{namespace}.svc"),
            format!("{service}.{namespace}.svc.cluster.local"),
        ];
        names.extend(
            self.webhook_cert_extra_names
                .iter()
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty()),
        );
        Ok(ManagedCertSettings {
            namespace: namespace.clone(),
            secret_name: self.webhook_secret.clone(),
            configuration_name: self.webhook_configuration.clone(),
            names,
            validity: self.webhook_cert_validity.get(),
        })
    }

    fn injection_settings(&self) -> anyhow::Result<InjectionSettings> {
        let defaults = SidecarResources::default();
        let pick = |flag: &Option<String>, name: &str, default: Option<String>| match flag
            .as_deref()
            .map(str::trim)
        {
            None => Ok(default),
            Some("" | "none") => Ok(None),
            Some(value) if is_quantity(value) => Ok(Some(value.to_string())),
            Some(_) => Err(anyhow::anyhow!("--{name}: not a Kubernetes quantity")),
        };
        Ok(InjectionSettings {
            image: self.sidecar_image.clone(),
            image_pull_policy: self.sidecar_image_pull_policy.clone(),
            native_sidecar: self.native_sidecars,
            app_port: self.sidecar_app_port,
            admin_port: self.sidecar_admin_port,
            resources: SidecarResources {
                cpu_request: pick(
                    &self.sidecar_cpu_request,
                    "sidecar-cpu-request",
                    defaults.cpu_request,
                )?,
                memory_request: pick(
                    &self.sidecar_memory_request,
                    "sidecar-memory-request",
                    defaults.memory_request,
                )?,
                cpu_limit: pick(
                    &self.sidecar_cpu_limit,
                    "sidecar-cpu-limit",
                    defaults.cpu_limit,
                )?,
                memory_limit: pick(
                    &self.sidecar_memory_limit,
                    "sidecar-memory-limit",
                    defaults.memory_limit,
                )?,
            },
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    llmesh_sidecar::logging::init(cli.log_format, &cli.log).map_err(anyhow::Error::msg)?;
    // Flags are checked before anything connects.
    let webhook_tls = match (&cli.webhook_cert_dir, cli.webhook_managed_tls) {
        (Some(dir), _) => Some(WebhookTls::Files(dir.clone())),
        (None, true) => Some(WebhookTls::Managed(cli.managed_cert_settings()?)),
        (None, false) => None,
    };
    let webhook = match webhook_tls {
        Some(tls) => Some((tls, cli.injection_settings()?)),
        None => None,
    };
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

    let webhook_task = match webhook {
        Some((tls, settings)) => Some(
            start_webhook(
                &cli,
                tls,
                settings,
                client.clone(),
                Arc::clone(&metrics),
                admin_stop.subscribe(),
            )
            .await?,
        ),
        None => {
            tracing::info!(
                "neither --webhook-managed-tls nor --webhook-cert-dir: the sidecar-injection webhook is not served"
            );
            None
        }
    };

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
    let (pods, watch_pods) = skipped::pod_index(client.clone(), cli.namespace.as_deref());
    tokio::spawn(watch_pods);
    metrics.watch_pods(pods, cli.lease_namespace.clone());
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
    // Admissions in flight finish within the webhook's own grace (5 s) before the process
    // exits; bounded, since a webhook still waiting for its certificate never returns.
    if let Some(task) = webhook_task {
        let _ = tokio::time::timeout(Duration::from_secs(6), task).await;
    }
    Ok(())
}

/// Where the webhook's certificate comes from.
enum WebhookTls {
    /// Files that something else renews (cert-manager), re-read periodically.
    Files(PathBuf),
    /// A Secret that the operator itself issues, renews and puts into `caBundle`.
    Managed(ManagedCertSettings),
}

enum Certificate {
    Loaded(Arc<ReloadingCert>),
    /// Issued (or read from the Secret) once the webhook task starts.
    Managed(ManagedCertSettings),
}

/// Starts the injection webhook in the background: it answers once its certificate is
/// there and its index of LlmEndpoints is loaded, so that `*` and the missing-endpoint
/// warnings are right from the first pod.
async fn start_webhook(
    cli: &Cli,
    tls: WebhookTls,
    settings: InjectionSettings,
    client: kube::Client,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    metrics.expect_webhook();
    // From files, a missing certificate stops the start (a mount is wrong); a managed one
    // is waited for (the API may be briefly unreachable).
    let certificate = match tls {
        WebhookTls::Files(dir) => {
            let certificate = ReloadingCert::load(&dir).context("webhook certificate")?;
            tokio::spawn(
                Arc::clone(&certificate).keep_reloading(dir, cli.webhook_cert_reload.get()),
            );
            Certificate::Loaded(certificate)
        }
        WebhookTls::Managed(managed) => Certificate::Managed(managed),
    };
    let listener = tokio::net::TcpListener::bind(cli.webhook_listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.webhook_listen))?;
    let (endpoints, watch_endpoints) =
        webhook_server::endpoint_index(client.clone(), cli.namespace.as_deref());
    tokio::spawn(watch_endpoints);
    let webhook = Arc::new(Webhook {
        settings,
        endpoints,
        operator_namespace: cli.lease_namespace.clone(),
        metrics: Arc::clone(&metrics),
        events: Some(Recorder::new(
            client.clone(),
            Reporter {
                controller: "llmesh-operator-webhook".into(),
                instance: cli.identity.clone(),
            },
        )),
    });
    let address = cli.webhook_listen;
    Ok(tokio::spawn(async move {
        let certificate = match certificate {
            Certificate::Loaded(certificate) => certificate,
            Certificate::Managed(managed) => {
                let certificate = certs::first_certificate(&client, &managed, &metrics).await;
                tokio::spawn(certs::keep_current(
                    client,
                    managed,
                    Arc::clone(&certificate),
                    metrics,
                ));
                certificate
            }
        };
        let tls = match certificate.server_config() {
            Ok(tls) => Arc::new(tls),
            Err(error) => {
                tracing::error!(%error, "cannot configure the webhook's TLS");
                return;
            }
        };
        if webhook.endpoints.wait_until_ready().await.is_err() {
            return;
        }
        tracing::info!(%address, "serving the sidecar-injection webhook");
        webhook.metrics.webhook_serving.set(1);
        webhook_server::serve(listener, tls, webhook, shutdown).await;
    }))
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

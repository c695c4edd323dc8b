use clap::Parser;
use llmesh_operator::controller::{self, Settings};

/// llmesh operator: reconciles LlmEndpoints into the ConfigMaps and Secrets that the llmesh
/// sidecar reads.
#[derive(Parser, Debug)]
#[command(name = "llmesh-operator", version)]
struct Cli {
    /// The environment of namespaces without the `llmesh.io/environment` label.
    #[arg(long, env = "LLMESH_DEFAULT_ENVIRONMENT", default_value = "default")]
    default_environment: String,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "LLMESH_WATCH_NAMESPACE")]
    namespace: Option<String>,
    #[arg(long, env = "LLMESH_LOG_FORMAT", value_enum, default_value = "json")]
    log_format: llmesh_sidecar::logging::LogFormat,
    #[arg(long, env = "LLMESH_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    llmesh_sidecar::logging::init(cli.log_format, &cli.log).map_err(anyhow::Error::msg)?;
    let client = kube::Client::try_default().await?;
    tracing::info!(default_environment = %cli.default_environment, namespace = ?cli.namespace, "starting");
    controller::run(
        client,
        Settings {
            default_environment: cli.default_environment,
            namespace: cli.namespace,
        },
    )
    .await;
    tracing::info!("stopped");
    Ok(())
}

//! Runs the test cluster with a node until SIGTERM or SIGINT, for a person to try llmesh on
//! one machine (`scripts/cluster up` starts it in the background). Writes the cluster's
//! kubeconfig to the given path once the node is Ready, and removes it when stopped.
//! `llmesh-cluster --clean` removes what a killed one left (`scripts/cluster down`).

use std::path::PathBuf;

use anyhow::Context as _;
use llmesh_testenv::ControlPlane;
use tokio::signal::unix::{signal, SignalKind};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let argument = std::env::args_os()
        .nth(1)
        .context("usage: llmesh-cluster KUBECONFIG_PATH | --clean")?;
    if argument == "--clean" {
        llmesh_testenv::remove_stale_node()?;
        println!("no node left on this machine");
        return Ok(());
    }
    let kubeconfig = PathBuf::from(argument);
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let plane = ControlPlane::start_with_node().await?;
    std::fs::copy(&plane.kubeconfig, &kubeconfig)
        .with_context(|| format!("write {}", kubeconfig.display()))?;
    println!("ready: {}", plane.server);
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    let _ = std::fs::remove_file(&kubeconfig);
    drop(plane);
    println!("stopped");
    Ok(())
}

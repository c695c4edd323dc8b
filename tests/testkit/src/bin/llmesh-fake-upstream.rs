//! The fake upstream as a process, for benchmarks, the Python SDK tests and its image
//! (`llmesh.local/fake-upstream`). Stops on SIGINT or SIGTERM (what a container's PID 1 gets).

use std::net::SocketAddr;

use clap::Parser;
use llmesh_testkit::{FakeUpstream, Options};

#[derive(Parser)]
struct Cli {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Approximate size of a non-streamed completion body.
    #[arg(long, default_value_t = 1024)]
    body_bytes: usize,
    /// Worker threads (the load generator and the proxy under test need the other cores).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Keep every request, for `GET /_fake/requests` (the SDK tests); off by default, since a
    /// benchmark's upstream would grow without bound.
    #[arg(long)]
    record: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let options = Options {
            body_bytes: cli.body_bytes,
            record: cli.record,
        };
        let upstream = FakeUpstream::start_on(cli.listen, options).await?;
        println!("listening on {}", upstream.addr());
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result?,
            _ = terminate.recv() => {}
        }
        Ok(())
    })
}

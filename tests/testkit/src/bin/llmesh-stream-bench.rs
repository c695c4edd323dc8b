//! Streaming load client: opens N concurrent SSE streams against a fake upstream (directly
//! or through a proxy) and reports time to first chunk and whether events arrived one per
//! HTTP chunk (a proxy that coalesces them delays tokens).
//!
//! Prints one JSON object.

use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use llmesh_testkit::directives;

#[derive(Parser)]
struct Cli {
    /// e.g. http://127.0.0.1:4000/v1/chat/completions
    #[arg(long)]
    url: String,
    #[arg(long, default_value_t = 100)]
    streams: usize,
    #[arg(long, default_value_t = 200)]
    chunks: u32,
    #[arg(long, default_value_t = 5)]
    interval_ms: u32,
    #[arg(long, default_value = "chat")]
    model: String,
}

struct StreamResult {
    first_chunk: Duration,
    events: usize,
    frames: usize,
    frames_with_several_events: usize,
    done: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(cli.streams)
        .build_http();
    let body = serde_json::json!({
        "model": cli.model,
        "stream": true,
        "messages": [{"role": "user", "content": "benchmark"}],
    })
    .to_string();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(cli.streams);
    for _ in 0..cli.streams {
        let request = http::Request::post(&cli.url)
            .header("content-type", "application/json")
            .header(directives::STREAM_CHUNKS, cli.chunks.to_string())
            .header(directives::CHUNK_INTERVAL_MS, cli.interval_ms.to_string())
            .body(Full::new(Bytes::from(body.clone())))?;
        let client = client.clone();
        tasks.push(tokio::spawn(
            async move { one_stream(client, request).await },
        ));
    }
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await??);
    }
    let elapsed = started.elapsed();
    let mut ttft: Vec<f64> = results
        .iter()
        .map(|r| r.first_chunk.as_secs_f64() * 1000.0)
        .collect();
    ttft.sort_by(f64::total_cmp);
    let pct = |p: f64| ttft[((ttft.len() as f64 - 1.0) * p).round() as usize];
    let report = serde_json::json!({
        "streams": results.len(),
        "completed": results.iter().filter(|r| r.done).count(),
        "ttft_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)},
        "events": results.iter().map(|r| r.events).sum::<usize>(),
        "frames": results.iter().map(|r| r.frames).sum::<usize>(),
        "frames_with_several_events": results.iter().map(|r| r.frames_with_several_events).sum::<usize>(),
        "duration_s": elapsed.as_secs_f64(),
    });
    println!("{report}");
    Ok(())
}

async fn one_stream<C>(
    client: Client<C, Full<Bytes>>,
    request: http::Request<Full<Bytes>>,
) -> anyhow::Result<StreamResult>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let sent = Instant::now();
    let response = client.request(request).await?;
    anyhow::ensure!(
        response.status().is_success(),
        "status {}",
        response.status()
    );
    let mut body = response.into_body();
    let mut result = StreamResult {
        first_chunk: Duration::ZERO,
        events: 0,
        frames: 0,
        frames_with_several_events: 0,
        done: false,
    };
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        if result.frames == 0 {
            result.first_chunk = sent.elapsed();
        }
        result.frames += 1;
        let events = data.windows(2).filter(|w| w == b"\n\n").count();
        result.events += events;
        if events > 1 {
            result.frames_with_several_events += 1;
        }
        if data.ends_with(b"data: [DONE]\n\n") {
            result.done = true;
        }
    }
    Ok(result)
}

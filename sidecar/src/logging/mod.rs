//! Log output: human-readable for a terminal, JSON (one object a line) for a cluster. Every
//! line goes through [`sink`], which writes to stderr off the request's thread.

mod json_line;
pub mod request_scope;
mod sink;
mod span_fields;

use std::sync::atomic::{AtomicBool, Ordering};

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

pub use json_line::{hundredths_of_a_millisecond, JsonLine};
pub use sink::{write_line, SinkGuard};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

static JSON_FORMAT: AtomicBool = AtomicBool::new(false);

/// Whether lines are JSON: lines written by hand ([`JsonLine`]) must then match the others.
pub fn is_json() -> bool {
    JSON_FORMAT.load(Ordering::Relaxed)
}

/// `filter` uses `RUST_LOG` syntax, e.g. `info` or `info,llmesh_sidecar=debug`. Keep the
/// guard until the process ends: dropping it writes out what is pending.
pub fn init(format: LogFormat, filter: &str) -> Result<SinkGuard, String> {
    let filter =
        EnvFilter::try_new(filter).map_err(|e| format!("invalid log filter {filter:?}: {e}"))?;
    let guard = sink::start().map_err(|e| format!("cannot start the log writer: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(sink::SinkWriter);
    let result = match format {
        LogFormat::Human => builder.with_target(false).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .fmt_fields(span_fields::JsonSpanFields)
            .try_init(),
    };
    result.map_err(|e| e.to_string())?;
    JSON_FORMAT.store(format == LogFormat::Json, Ordering::Relaxed);
    Ok(guard)
}

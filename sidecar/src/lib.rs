//! llmesh sidecar: a localhost proxy between an app's OpenAI SDK and its LLM providers.

pub mod admin;
pub mod cache;
pub mod config;
pub mod credentials;
pub mod dialect;
pub mod drain;
pub mod error;
mod json_string;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod otlp;
pub mod pod;
pub mod provider;
pub mod proxy;
pub mod redact;
pub mod redis_link;
pub mod reload;
pub mod resilience;
pub mod server;
pub mod snapshot;
pub mod trace;
pub mod upstream_client;
pub mod wait;

#[cfg(test)]
mod proptest_config;
#[cfg(test)]
mod test_support;

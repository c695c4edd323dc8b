//! llmesh operator: turns `LlmEndpoint` resources into the configuration and secrets that
//! the llmesh sidecar of each pod in the namespace reads.

pub mod controller;
pub mod crd;
pub mod lease;
pub mod metrics;
pub mod render;
pub mod webhook;

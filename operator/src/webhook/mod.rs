//! The admission webhook that injects the llmesh sidecar into the pods that ask for it.
//! Every operator replica serves it, leader or not.

pub mod certs;
pub mod config;
pub mod inject;
pub mod server;
pub mod skipped;
pub mod tls;

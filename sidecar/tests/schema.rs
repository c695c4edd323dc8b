//! The published JSON Schemas and the example config stay in step with the code.

mod common;

use std::path::Path;
use std::process::Command;

fn repo_file(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

#[test]
fn committed_schemas_match_the_types() {
    for (kind, file) in [
        ("config", "docs/config.schema.json"),
        ("endpoint", "docs/endpoint.schema.json"),
    ] {
        let out = Command::new(common::BIN)
            .args(["--print-schema", kind])
            .output()
            .unwrap();
        assert!(out.status.success());
        let committed = std::fs::read_to_string(repo_file(file)).unwrap();
        assert!(
            committed == String::from_utf8_lossy(&out.stdout),
            "{file} is out of date: run `cargo run -p llmesh-sidecar -- --print-schema {kind} > {file}`"
        );
    }
}

#[test]
fn example_configs_are_valid() {
    for example in ["examples/mock.yaml", "examples/providers.yaml"] {
        let out = Command::new(common::BIN)
            .args(["--check", "--config"])
            .arg(repo_file(example))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{example}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("configuration is valid"));
    }
}

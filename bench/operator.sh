#!/usr/bin/env bash
# Operator scale benchmark: 1,000 LlmEndpoints in 50 namespaces against a control plane of
# its own (scripts/testenv builds it). Prints a SCALE-REPORT line: each endpoint's create-to-Ready
# lag (p50, p99, max), the operator's CPU and peak RSS, API requests by verb, and a restart's resync.
set -euo pipefail
cd "$(dirname "$0")/.."
LLMESH_TESTENV_BIN=$(scripts/testenv | tail -n 1)
export LLMESH_TESTENV_BIN
cargo test --release --locked -p llmesh-operator --test scale -- --ignored --nocapture 2>&1 | grep -E "SCALE-REPORT|test result|panicked"

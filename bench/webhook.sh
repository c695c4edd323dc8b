#!/usr/bin/env bash
# Injection webhook benchmark: 1,000 pods created through the operator's webhook, 16 at a
# time, against the test control plane (scripts/testenv builds it). Prints a WEBHOOK-REPORT
# line: the webhook's own p50/p99 per pod, the client's create latency and the operator's RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
LLMESH_TESTENV_BIN=$(scripts/testenv | tail -n 1)
export LLMESH_TESTENV_BIN
cargo test --release --locked -p llmesh-operator --test webhook thousand_pods_through_the_webhook -- --ignored --nocapture 2>&1 | grep -E "WEBHOOK-REPORT|test result|panicked"

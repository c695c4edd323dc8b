#!/usr/bin/env bash
# Operator scale benchmark: 1,000 LlmEndpoints in 50 namespaces against a control plane of
# its own (scripts/testenv builds it). Prints a SCALE-REPORT line per run: each endpoint's
# create-to-Ready lag (p50, p99, max), the creates' own latency, the operator's mean reconcile
# time, CPU and peak RSS, API requests and the API server's mean time per request by verb, and a
# restart's resync.
#
# Two runs: the creates as a burst (32 at a time, which saturates the API server on a small
# machine, so every request queues, the test's own creates too), then paced at 100 a second
# (1,000 in 10 s), which the API server keeps up with: the operator's own lag.
set -euo pipefail
cd "$(dirname "$0")/.."
LLMESH_TESTENV_BIN=$(scripts/testenv | tail -n 1)
export LLMESH_TESTENV_BIN
for pace in "" 100; do
  LLMESH_SCALE_CREATES_PER_SECOND=$pace \
    cargo test --release --locked -p llmesh-operator --test scale -- --ignored --nocapture 2>&1 |
    grep -E "SCALE-REPORT|test result|panicked"
done

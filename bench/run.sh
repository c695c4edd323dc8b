#!/usr/bin/env bash
# Sidecar benchmark on loopback: direct vs. llmesh vs. nginx, interleaved.
# Installs its tools (oha from crates.io into bench/.tools, nginx from Debian), builds the
# release binaries, then runs bench/run.py. Extra arguments go to run.py
# (e.g. --seconds 5 --rounds 1). Results: stdout and bench/results/latest.json.
set -euo pipefail
cd "$(dirname "$0")/.."

OHA_VERSION=1.16.0
oha=bench/.tools/bin/oha
if [ ! -x "$oha" ]; then
  cargo install oha --version "$OHA_VERSION" --locked --root bench/.tools
fi
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light
fi
cargo build --release --locked -p llmesh-sidecar -p llmesh-testkit
exec python3 bench/run.py --oha "$oha" "$@"

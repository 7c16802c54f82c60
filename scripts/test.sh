#!/usr/bin/env bash
# Runs the whole test suite. Installs redis-server, and prometheus/promtool for
# tests/prometheus.rs (Debian packages), first when they are missing.
# The tests start their own redis-server processes on free ports; they never touch :6379.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-redis.sh
bash scripts/ensure-deploy-tools.sh
cargo test --locked --all-targets "$@"

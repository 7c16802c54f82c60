#!/usr/bin/env bash
# Runs the whole test suite. Installs redis-server (Debian package) first when it is missing.
# The tests start their own redis-server processes on free ports; they never touch :6379.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-redis.sh
cargo test --locked --all-targets "$@"

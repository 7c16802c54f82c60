#!/usr/bin/env bash
# Runs sidecache in front of a local Redis on 127.0.0.1:6379, starting one (and installing
# redis-server from Debian packages) when none answers there. Extra arguments go to sidecache,
# e.g. scripts/run.sh --listen 127.0.0.1:6380 --log-level debug
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-redis.sh
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    echo "sidecache: starting redis-server on 127.0.0.1:6379 (no persistence)" >&2
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
        --logfile "${TMPDIR:-/tmp}/sidecache-redis.log"
    for _ in $(seq 1 100); do redis-cli -p 6379 ping >/dev/null 2>&1 && break; sleep 0.05; done
fi
exec cargo run --locked --release --bin sidecache -- --upstream redis://127.0.0.1:6379 "$@"

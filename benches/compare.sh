#!/usr/bin/env bash
# Compares sidecache with a direct connection to Redis and with twemproxy (nutcracker), end to end.
#
# Starts, on free loopback ports, one redis-server, sidecache in front of it and nutcracker in
# front of the same Redis, then runs redis-benchmark (GET and SET) against the three targets in
# interleaved rounds (round 1: direct, sidecache, nutcracker; round 2: the same order; ...), so
# slow drift on a shared machine hits every target alike. Reports medians over the rounds:
#
#   -c 50 -n 100000        GET/SET requests per second
#   -c 50 -P 16 -n 400000  GET/SET requests per second, pipelined
#   -c 1 -n 20000          GET/SET p50 latency (added latency of sidecache over direct)
#
# For the -c 50 runs it also reports the CPU each process used per request (Redis and the proxy
# from /proc, redis-benchmark from its wait status) and the throughput that much CPU allows on
# this machine's cores: three processes share them, so this ceiling bounds the ratio to direct.
#
# and, on sidecache before any benchmark traffic: RSS per idle client (500 idle connections)
# and how many upstream connections those clients cost (before and after one PING on 100 of them).
#
# Then the near-cache: a second sidecache ("nearcache") with a [near_cache] rule for the prefix
# "key:" is started, and `-t get -c 50 -n 100000` runs against direct Redis and nearcache in
# interleaved rounds of their own. Without -r, redis-benchmark reads the literal key
# "key:__rand_int__", so every GET hits one hot key, answered from nearcache's memory after the
# first. Nearcache starts only after the rounds above: its invalidation link would otherwise be
# sent an invalidation for the other targets' SETs, adding work to Redis during their runs.
# After its rounds, sidecache_cache_hits_total from its /metrics is printed; zero hits fail.
#
# Usage: benches/compare.sh            (ROUNDS=5 by default; e.g. ROUNDS=3 benches/compare.sh)
# Needs: cargo, redis-server, redis-benchmark, redis-cli, nutcracker, python3, curl. Installs
# redis-server, redis-tools and nutcracker from Debian packages when they are missing.
# Never touches an already running Redis: every process here is started on its own free ports.

set -euo pipefail

ROUNDS=${ROUNDS:-5}
IDLE_CLIENTS=${IDLE_CLIENTS:-500}
PING_CLIENTS=${PING_CLIENTS:-100}
POOL_SIZE=${POOL_SIZE:-2} # sidecache's default upstream.pool_size, only used for the target check
NUTCRACKER_SET=${NUTCRACKER:-}
NUTCRACKER=${NUTCRACKER:-$(command -v nutcracker || echo /usr/sbin/nutcracker)}
HOST=127.0.0.1

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

# On a fresh machine, Redis and twemproxy come from Debian packages, as in the test command.
bash scripts/ensure-redis.sh
if [[ ! -x $NUTCRACKER && -z ${NUTCRACKER_SET:-} ]] && command -v apt-get >/dev/null; then
    echo "compare.sh: installing nutcracker (Debian package)..." >&2
    SUDO=""
    [[ $(id -u) == 0 ]] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nutcracker >/dev/null
    # The package may start a system nutcracker on its default port; this script starts its own.
    if command -v service >/dev/null 2>&1 && service nutcracker status >/dev/null 2>&1; then
        $SUDO service nutcracker stop >/dev/null 2>&1 || true
    fi
    NUTCRACKER=$(command -v nutcracker || echo /usr/sbin/nutcracker)
fi
for tool in cargo redis-server redis-benchmark redis-cli python3 curl; do
    command -v "$tool" >/dev/null || { echo "compare.sh: $tool not found" >&2; exit 1; }
done
[[ -x $NUTCRACKER ]] || { echo "compare.sh: nutcracker not found (set NUTCRACKER=...)" >&2; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/sidecache-compare.XXXXXX")
PIDS=()
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if ((status != 0)); then
        echo "compare.sh: failed (exit $status); logs follow" >&2
        for log in "$WORK"/*.log; do
            [[ -s $log ]] || continue
            echo "--- $log (last 20 lines)" >&2
            tail -n 20 "$log" >&2
        done
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

quote() {
    local out
    printf -v out '%q ' "$@"
    printf '%s' "${out% }"
}
log() { printf '[compare] %s\n' "$*" >&2; }

# Picks N distinct free TCP ports by binding port 0 (all sockets stay open until all are chosen).
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# Waits until a PING on HOST:$1 answers PONG, failing fast if process $3 died.
wait_ping() {
    local port=$1 name=$2 pid=$3 i
    for ((i = 0; i < 200; i++)); do
        if [[ $(redis-cli -h "$HOST" -p "$port" PING 2>/dev/null) == PONG ]]; then
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || { echo "compare.sh: $name exited during startup" >&2; return 1; }
        sleep 0.05
    done
    echo "compare.sh: $name did not answer PING on port $port within 10 s" >&2
    return 1
}

# Reads one un-labelled gauge from sidecache's /metrics (0 when absent).
metric() {
    metric_at "$ADMIN_PORT" "$1"
}

# Reads one series (name with its labels, as exported) from the /metrics on admin port $1.
metric_at() {
    curl -fsS "http://$HOST:$1/metrics" | awk -v name="$2" '$1 == name { v = $2 } END { print v + 0 }'
}

# Waits until the /readyz on admin port $1 answers 200 (for nearcache: coherence established).
wait_ready() {
    local port=$1 name=$2 pid=$3 i
    for ((i = 0; i < 200; i++)); do
        curl -fsS -o /dev/null "http://$HOST:$port/readyz" 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || { echo "compare.sh: $name exited during startup" >&2; return 1; }
        sleep 0.05
    done
    echo "compare.sh: $name not ready within 10 s: $(curl -sS "http://$HOST:$port/readyz" 2>&1)" >&2
    return 1
}

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

redis_clients() {
    redis-cli -h "$HOST" -p "$REDIS_PORT" INFO clients | tr -d '\r' | awk -F: '$1 == "connected_clients" { print $2 }'
}

# ---------------------------------------------------------------------------------------------
log "building: cargo build --release --locked"
cargo build --release --locked >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log" >&2; exit 1; }
SIDECACHE=$ROOT/target/release/sidecache

read -r REDIS_PORT SIDECACHE_PORT ADMIN_PORT NUT_PORT NUT_STATS_PORT NC_PORT NC_ADMIN_PORT <<<"$(free_ports 7)"

REDIS_CMD=(redis-server --bind "$HOST" --port "$REDIS_PORT" --save "" --appendonly no --daemonize no
    --logfile "$WORK/redis.log")
SIDECACHE_CMD=("$SIDECACHE" --listen "$HOST:$SIDECACHE_PORT" --admin-listen "$HOST:$ADMIN_PORT"
    --upstream "redis://$HOST:$REDIS_PORT" --log-level warn)
cat >"$WORK/nutcracker.yml" <<EOF
sidecache_compare:
  listen: $HOST:$NUT_PORT
  hash: fnv1a_64
  distribution: ketama
  redis: true
  server_connections: 1
  servers:
   - $HOST:$REDIS_PORT:1
EOF
NUT_CMD=("$NUTCRACKER" -c "$WORK/nutcracker.yml" -s "$NUT_STATS_PORT" -a "$HOST" -o "$WORK/nutcracker.log"
    -p "$WORK/nutcracker.pid")
"$NUTCRACKER" -t -c "$WORK/nutcracker.yml" >"$WORK/nutcracker-test.log" 2>&1 \
    || { cat "$WORK/nutcracker-test.log" >&2; exit 1; }
# redis-benchmark's key without -r is the literal "key:__rand_int__": the rule covers it.
NC_RULE=bench
cat >"$WORK/nearcache.toml" <<EOF
[near_cache]
[[near_cache.rules]]
name = "$NC_RULE"
prefix = "key:"
EOF
NC_CMD=("$SIDECACHE" --config "$WORK/nearcache.toml" --listen "$HOST:$NC_PORT" --admin-listen "$HOST:$NC_ADMIN_PORT"
    --upstream "redis://$HOST:$REDIS_PORT" --log-level warn)
"$SIDECACHE" --check-config --config "$WORK/nearcache.toml" >"$WORK/nearcache-check.log" 2>&1 \
    || { cat "$WORK/nearcache-check.log" >&2; exit 1; }

log "starting redis-server on $REDIS_PORT"
"${REDIS_CMD[@]}" >"$WORK/redis-stdout.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
wait_ping "$REDIS_PORT" redis-server "$REDIS_PID"

log "starting sidecache on $SIDECACHE_PORT (admin $ADMIN_PORT)"
"${SIDECACHE_CMD[@]}" >"$WORK/sidecache.log" 2>&1 &
SIDECACHE_PID=$!
PIDS+=("$SIDECACHE_PID")
wait_ping "$SIDECACHE_PORT" sidecache "$SIDECACHE_PID"

log "starting nutcracker on $NUT_PORT"
"${NUT_CMD[@]}" >"$WORK/nutcracker-stdout.log" 2>&1 &
NUT_PID=$!
PIDS+=("$NUT_PID")
wait_ping "$NUT_PORT" nutcracker "$NUT_PID"

# ---------------------------------------------------------------------------------------------
# Idle clients: memory and upstream connections, measured before any benchmark traffic.
log "opening $IDLE_CLIENTS idle connections to sidecache"
cat >"$WORK/idle.py" <<'EOF'
import socket, sys
host, port, n, pings = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
socks = [socket.create_connection((host, port)) for _ in range(n)]
print("open", flush=True)
for line in sys.stdin:
    if line.strip() == "ping":
        # All PINGs are sent before any reply is read, so they are in flight together.
        for s in socks[:pings]:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
        for s in socks[:pings]:
            got = b""
            while not got.endswith(b"\r\n"):
                chunk = s.recv(64)
                if not chunk:
                    sys.exit("connection closed before PONG")
                got += chunk
            if got != b"+PONG\r\n":
                sys.exit("unexpected reply %r" % got)
        print("pinged", flush=True)
    else:
        break
EOF

clients_before=$(metric sidecache_client_connections)
upstream_before=$(metric sidecache_upstream_connections)
redis_before=$(redis_clients)
rss_before=$(rss_kib "$SIDECACHE_PID")

coproc IDLE { exec python3 "$WORK/idle.py" "$HOST" "$SIDECACHE_PORT" "$IDLE_CLIENTS" "$PING_CLIENTS"; }
IDLE_PID_=$IDLE_PID
PIDS+=("$IDLE_PID_")
exec {IDLE_OUT}<&"${IDLE[0]}" {IDLE_IN}>&"${IDLE[1]}"
read -r -t 30 reply <&"$IDLE_OUT" || { echo "compare.sh: idle client script failed" >&2; exit 1; }
[[ $reply == open ]] || { echo "compare.sh: idle client script said '$reply'" >&2; exit 1; }

# Wait until sidecache has accepted every connection, then until its RSS stops moving.
for ((i = 0; i < 200; i++)); do
    (($(metric sidecache_client_connections) >= clients_before + IDLE_CLIENTS)) && break
    sleep 0.05
done
clients_idle=$(metric sidecache_client_connections)
rss_after=$(rss_kib "$SIDECACHE_PID")
for ((i = 0; i < 50; i++)); do
    sleep 0.1
    rss_now=$(rss_kib "$SIDECACHE_PID")
    ((rss_now == rss_after)) && break
    rss_after=$rss_now
done
upstream_idle=$(metric sidecache_upstream_connections)
redis_idle=$(redis_clients)

echo ping >&"$IDLE_IN"
read -r -t 30 reply <&"$IDLE_OUT" || { echo "compare.sh: PINGs through idle clients failed" >&2; exit 1; }
[[ $reply == pinged ]] || { echo "compare.sh: idle client script said '$reply'" >&2; exit 1; }
upstream_pinged=$(metric sidecache_upstream_connections)
redis_pinged=$(redis_clients)
rss_pinged=$(rss_kib "$SIDECACHE_PID")

echo exit >&"$IDLE_IN"
exec {IDLE_IN}>&- {IDLE_OUT}<&-
wait "$IDLE_PID_" 2>/dev/null || true
for ((i = 0; i < 200; i++)); do
    (($(metric sidecache_client_connections) <= clients_before)) && break
    sleep 0.05
done

# ---------------------------------------------------------------------------------------------
# Throughput and latency, interleaved rounds.
TARGETS=(direct sidecache nutcracker)
declare -A PORT=([direct]=$REDIS_PORT [sidecache]=$SIDECACHE_PORT [nutcracker]=$NUT_PORT)
SCENARIOS=(c50 p16 c1)
declare -A SCENARIO_ARGS=([c50]="-c 50 -n 100000" [p16]="-c 50 -P 16 -n 400000" [c1]="-c 1 -n 20000")
RESULTS=$WORK/results
mkdir -p "$RESULTS"

# CPU per request: the CPU time Redis, the proxy and redis-benchmark use during each run, read
# from /proc (Redis, proxy) and from the wait status of redis-benchmark (timed.py).
declare -A PROXY_PID=([direct]="" [sidecache]=$SIDECACHE_PID [nutcracker]=$NUT_PID)
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
cat >"$WORK/timed.py" <<'EOF'
import resource, subprocess, sys
# timed.py OUT COMMAND...: runs COMMAND, writes the CPU seconds it used (user + system) to OUT.
code = subprocess.call(sys.argv[2:])
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as f:
    print(usage.ru_utime + usage.ru_stime, file=f)
sys.exit(code)
EOF

for ((round = 1; round <= ROUNDS; round++)); do
    for scenario in "${SCENARIOS[@]}"; do
        for target in "${TARGETS[@]}"; do
            log "round $round/$ROUNDS: $scenario against $target"
            proxy=${PROXY_PID[$target]}
            redis_ticks=$(cpu_ticks "$REDIS_PID")
            proxy_ticks=0
            [[ -z $proxy ]] || proxy_ticks=$(cpu_ticks "$proxy")
            # shellcheck disable=SC2086 # SCENARIO_ARGS holds several words on purpose
            python3 "$WORK/timed.py" "$RESULTS/$target.$scenario.$round.bench-cpu" \
                redis-benchmark -h "$HOST" -p "${PORT[$target]}" -q -t get,set --csv ${SCENARIO_ARGS[$scenario]} \
                >"$RESULTS/$target.$scenario.$round.csv" 2>>"$WORK/redis-benchmark.log"
            redis_ticks=$(($(cpu_ticks "$REDIS_PID") - redis_ticks))
            [[ -z $proxy ]] || proxy_ticks=$(($(cpu_ticks "$proxy") - proxy_ticks))
            echo "$redis_ticks $proxy_ticks" >"$RESULTS/$target.$scenario.$round.ticks"
            grep -q '"GET"' "$RESULTS/$target.$scenario.$round.csv" \
                || { echo "compare.sh: no GET result for $target $scenario" >&2; exit 1; }
        done
    done
done

# ---------------------------------------------------------------------------------------------
# Near-cache: hot-key GET, direct Redis vs nearcache, interleaved rounds.
log "starting nearcache (sidecache with a near-cache rule for key:) on $NC_PORT (admin $NC_ADMIN_PORT)"
"${NC_CMD[@]}" >"$WORK/nearcache.log" 2>&1 &
NC_PID=$!
PIDS+=("$NC_PID")
wait_ping "$NC_PORT" nearcache "$NC_PID"
wait_ready "$NC_ADMIN_PORT" nearcache "$NC_PID"
HOT_TARGETS=(direct nearcache)
PORT[nearcache]=$NC_PORT
HOT_ARGS="-t get -c 50 -n 100000"
# The value the other rounds' SETs left (3 bytes, as redis-benchmark writes by default), so the
# hot key exists even when this part runs alone.
redis-cli -h "$HOST" -p "$REDIS_PORT" SET key:__rand_int__ xxx >/dev/null
nc_hits_before=$(metric_at "$NC_ADMIN_PORT" "sidecache_cache_hits_total{rule=\"$NC_RULE\"}")
nc_misses_before=$(metric_at "$NC_ADMIN_PORT" "sidecache_cache_misses_total{rule=\"$NC_RULE\"}")
for ((round = 1; round <= ROUNDS; round++)); do
    for target in "${HOT_TARGETS[@]}"; do
        log "round $round/$ROUNDS: hot-key GET against $target"
        # shellcheck disable=SC2086 # HOT_ARGS holds several words on purpose
        redis-benchmark -h "$HOST" -p "${PORT[$target]}" -q --csv $HOT_ARGS \
            >"$RESULTS/$target.hot.$round.csv" 2>>"$WORK/redis-benchmark.log"
        grep -q '"GET"' "$RESULTS/$target.hot.$round.csv" \
            || { echo "compare.sh: no GET result for $target hot-key GET" >&2; exit 1; }
    done
done
nc_hits=$(($(metric_at "$NC_ADMIN_PORT" "sidecache_cache_hits_total{rule=\"$NC_RULE\"}") - nc_hits_before))
nc_misses=$(($(metric_at "$NC_ADMIN_PORT" "sidecache_cache_misses_total{rule=\"$NC_RULE\"}") - nc_misses_before))
if ((nc_hits == 0)); then
    echo "compare.sh: nearcache served no hits (sidecache_cache_hits_total{rule=\"$NC_RULE\"} did not move," \
        "misses +$nc_misses): the hot-key figures would measure a plain proxy" >&2
    exit 1
fi

# ---------------------------------------------------------------------------------------------
# Summary.
print_summary() {
    echo "=== sidecache vs direct Redis vs nutcracker: medians of $ROUNDS interleaved rounds ==="
    echo "machine: $(nproc) CPUs, $(uname -sr); $(redis-server --version | cut -d' ' -f1-3); $("$NUTCRACKER" -V 2>&1 | head -n1)"
    echo
    echo "Processes (ports chosen free at start):"
    echo "  redis:      $(quote "${REDIS_CMD[@]}")"
    echo "  sidecache:  $(quote "${SIDECACHE_CMD[@]}")"
    echo "  nutcracker: $(quote "${NUT_CMD[@]}")"
    sed 's/^/              | /' "$WORK/nutcracker.yml"
    echo "Benchmark commands (PORT = $REDIS_PORT direct, $SIDECACHE_PORT sidecache, $NUT_PORT nutcracker):"
    for scenario in "${SCENARIOS[@]}"; do
        echo "  $scenario: redis-benchmark -h $HOST -p PORT -q -t get,set --csv ${SCENARIO_ARGS[$scenario]}"
    done
    echo
    python3 - "$RESULTS" "$ROUNDS" <<'EOF'
import csv, glob, os, statistics, sys

results, rounds = sys.argv[1], int(sys.argv[2])
data = {}  # (target, scenario, test) -> {"rps": [...], "p50": [...]}
for path in sorted(glob.glob(os.path.join(results, "*.csv"))):
    target, scenario, _round, _ = os.path.basename(path).split(".")
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            d = data.setdefault((target, scenario, row["test"]), {"rps": [], "p50": []})
            d["rps"].append(float(row["rps"]))
            d["p50"].append(float(row["p50_latency_ms"]))

def med(target, scenario, test, field):
    return statistics.median(data[(target, scenario, test)][field])

def check(ok):
    return "ok" if ok else "MISSED"

labels = {"c50": "-c 50", "p16": "-c 50 -P 16", "c1": "-c 1"}
targets = {"c50": (0.90, 1.0), "p16": (0.5, 1.5)}
print("Throughput (requests/s, median)      direct  sidecache nutcracker  sc/direct  sc/nutcr  target (sc/direct, sc/nutcr)")
for scenario in ("c50", "p16", "c1"):
    for test in ("GET", "SET"):
        d, s, n = (med(t, scenario, test, "rps") for t in ("direct", "sidecache", "nutcracker"))
        line = f"  {labels[scenario]:<12} {test:<4} {d:>18,.0f} {s:>10,.0f} {n:>10,.0f} {s / d:>10.2f} {s / n:>9.2f}"
        if scenario in targets:
            lo_d, lo_n = targets[scenario]
            line += f"  >= {lo_d:.2f} {check(s / d >= lo_d)}, >= {lo_n:.2f} {check(s / n >= lo_n)}"
        print(line)
print()
print("Latency, -c 1 (p50 ms, median)        direct  sidecache nutcracker  sidecache added p50 over direct (target <= 50 us)")
for test in ("GET", "SET"):
    d, s, n = (med(t, "c1", test, "p50") for t in ("direct", "sidecache", "nutcracker"))
    added = (s - d) * 1000
    print(f"  {test:<17} {d:>18.3f} {s:>10.3f} {n:>10.3f}  {added:+.0f} us {check(added <= 50)}")
print("  (redis-benchmark reports latency with ~8 us resolution at this range)")
print()
print("Per-round figures (rps; p50 ms for -c 1):")
for scenario in ("c50", "p16", "c1"):
    for test in ("GET", "SET"):
        for target in ("direct", "sidecache", "nutcracker"):
            d = data[(target, scenario, test)]
            vals = d["p50"] if scenario == "c1" else d["rps"]
            fmt = "{:.3f}" if scenario == "c1" else "{:,.0f}"
            print(f"  {labels[scenario]:<12} {test:<4} {target:<11} " + "  ".join(fmt.format(v) for v in vals))
EOF
    echo
    python3 - "$RESULTS" "$(getconf CLK_TCK)" "$(nproc)" "${SCENARIO_ARGS[c50]}" <<'EOF'
import glob, os, statistics, sys

# CPU per request of each process during the -c 50 runs (GET and SET together), and the
# throughput that this much CPU allows on this machine's cores when nothing else runs.
results, hz, cpus = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
requests = 2 * int(sys.argv[4].split("-n ")[1].split()[0])  # -t get,set: -n of each
print(f"CPU per request at -c 50 (us, user + system, median of rounds; GET and SET runs together):")
print("  target        redis  proxy  redis-benchmark  total  CPU-bound ceiling (requests/s)")
ceiling = {}
for target in ("direct", "sidecache", "nutcracker"):
    rows = []
    for path in sorted(glob.glob(os.path.join(results, f"{target}.c50.*.ticks"))):
        redis, proxy = (int(v) / hz for v in open(path).read().split())
        bench = float(open(path.replace(".ticks", ".bench-cpu")).read())
        rows.append([v * 1e6 / requests for v in (redis, proxy, bench)])
    r, p, b = (statistics.median(col) for col in zip(*rows))
    total = r + p + b
    ceiling[target] = cpus * 1e6 / total
    print(f"  {target:<11} {r:>7.1f} {p:>6.1f} {b:>16.1f} {total:>6.1f}  {ceiling[target]:>12,.0f}")
print(f"  ceiling of sidecache / ceiling of direct: {ceiling['sidecache'] / ceiling['direct']:.2f}"
      f" (nutcracker: {ceiling['nutcracker'] / ceiling['direct']:.2f})")
EOF
    echo
    local per_client=$(((rss_after - rss_before) * 1024 / IDLE_CLIENTS))
    local verdict=ok
    ((per_client <= 16 * 1024)) || verdict=MISSED
    echo "Idle clients ($IDLE_CLIENTS connections held open by python3, no traffic; measured before the benchmarks):"
    echo "  sidecache_client_connections: $clients_before before, $clients_idle with idle clients"
    echo "  sidecache VmRSS: ${rss_before} KiB before, ${rss_after} KiB with $IDLE_CLIENTS idle clients," \
        "${rss_pinged} KiB after $PING_CLIENTS PINGs"
    printf '  RSS per idle client: %d.%02d KiB (target <= 16 KiB) %s\n' \
        $((per_client / 1024)) $(((per_client % 1024) * 100 / 1024)) "$verdict"
    local up_verdict=ok
    ((upstream_idle <= POOL_SIZE && upstream_pinged <= POOL_SIZE)) || up_verdict=MISSED
    echo "  sidecache_upstream_connections (pooled + dedicated, excludes the health check):"
    echo "    $upstream_before before, $upstream_idle with $IDLE_CLIENTS idle clients," \
        "$upstream_pinged after one PING on each of $PING_CLIENTS of them (target <= pool size $POOL_SIZE) $up_verdict"
    echo "  upstream Redis connected_clients (includes this script's redis-cli, sidecache's health check and nutcracker):"
    echo "    $redis_before before, $redis_idle with idle clients (+$((redis_idle - redis_before)))," \
        "$redis_pinged after the PINGs (+$((redis_pinged - redis_before)))"
    echo
    echo "=== Near-cache: hot-key GET, direct Redis vs sidecache with the near-cache," \
        "medians of $ROUNDS interleaved rounds ==="
    echo "  nearcache: $(quote "${NC_CMD[@]}")"
    sed 's/^/              | /' "$WORK/nearcache.toml"
    echo "  benchmark: redis-benchmark -h $HOST -p PORT -q --csv $HOT_ARGS" \
        "(PORT = $REDIS_PORT direct, $NC_PORT nearcache; every GET reads key:__rand_int__)"
    python3 - "$RESULTS" <<'EOF'
import csv, glob, os, statistics, sys

rps = {}
for target in ("direct", "nearcache"):
    for path in sorted(glob.glob(os.path.join(sys.argv[1], f"{target}.hot.*.csv"))):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row["test"] == "GET":
                    rps.setdefault(target, []).append(float(row["rps"]))
d, n = statistics.median(rps["direct"]), statistics.median(rps["nearcache"])
print("  Throughput (requests/s, median)      direct  nearcache  nc/direct  target")
print(f"  -c 50        GET {d:>19,.0f} {n:>10,.0f} {n / d:>10.2f}  >= 1.00 {'ok' if n / d >= 1.0 else 'MISSED'}")
for target in ("direct", "nearcache"):
    print(f"  per round, {target:<10} " + "  ".join(f"{v:,.0f}" for v in rps[target]))
EOF
    local sent=$((ROUNDS * 100000))
    echo "  nearcache sidecache_cache_hits_total{rule=\"$NC_RULE\"}: +$nc_hits," \
        "sidecache_cache_misses_total: +$nc_misses, of $sent GETs sent"
}
print_summary

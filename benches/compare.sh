#!/usr/bin/env bash
# Side by side: the same `slim-tokio bench` runs against our node and against the reference node
# (the server built into the published slim-bindings wheel), in one run, on this machine.
#
#   benches/compare.sh [--duration SECS] [--sizes "64 1024"] [--round-trips N] [--client app|wire]
#                      [--no-append]
#
# --client: what the publish rows' clients are (`bench --client`): app (default), the app API
# with a router per client, or wire, clients that speak the link alone and cost little beside
# the node, so that the row compares the nodes. The p2p rows always run the session layer.
#
# The reference node leaves TCP_NODELAY off; it is measured as it is and again with TCP_NODELAY
# forced on through an LD_PRELOAD shim (benches/nodelay.c, built here with gcc). Our node sets
# it itself. Each row also measures a plain TCP relay (`slim-tokio tcp-relay`, no protocol) with
# the same clients right before: the floor of this machine at that moment, against which the
# round trips mean something (on this VM it moves with the load: idle cores are slow to wake).
# Prints a markdown table with ratios and appends it to BENCHMARKS.md.
#
# NODE_CPUS / BENCH_CPUS (taskset lists, e.g. 0 and 1) pin the nodes and relay / the bench
# clients. On this VM a wake-up that crosses cores costs ~40 µs per hop, so round trips are
# bimodal unless placement is fixed: NODE_CPUS=0 BENCH_CPUS=0 measures the software,
# NODE_CPUS=0 BENCH_CPUS=1 adds the cross-core wake-ups.
# Needs: cargo, python3 (venv), gcc; installs slim-bindings==3.3.8 into target/interop.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DURATION=5; SIZES="64 1024"; RTT=2000; APPEND=1; CLIENT=app
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION="$2"; shift 2;;
    --sizes) SIZES="$2"; shift 2;;
    --round-trips) RTT="$2"; shift 2;;
    --client) CLIENT="$2"; shift 2;;
    --no-append) APPEND=0; shift;;
    -h|--help) sed -n '2,/^set -e/{/^#/{s/^# \{0,1\}//;p}}' "$0"; exit 0;;
    *) echo "compare: unknown argument $1" >&2; exit 2;;
  esac
done

case "$CLIENT" in app|wire) ;; *) echo "compare: --client is app or wire, not $CLIENT" >&2; exit 2;; esac

cargo build --release -q --bin slim-tokio
CARGO_OUT="${CARGO_TARGET_DIR:-target}"
case "$CARGO_OUT" in /*) ;; *) CARGO_OUT="$ROOT/$CARGO_OUT" ;; esac
BIN="$CARGO_OUT/release/slim-tokio"
VENV="$ROOT/target/interop/venv-3.3.8"
if ! "$VENV/bin/python" -c 'import slim_bindings' 2>/dev/null; then
  python3 -m venv "$VENV" && "$VENV/bin/pip" install -q slim-bindings==3.3.8
fi
SHIM="$ROOT/target/libnodelay.so"
[ -f "$SHIM" ] || gcc -O2 -shared -fPIC -o "$SHIM" benches/nodelay.c -ldl

# Replaces the calling (sub)shell with the command, so a `pin … &` pid is the program's own and
# the EXIT trap stops it: only call it in the background or in a pipeline.
pin() { local cpus=$1; shift; if [ -n "$cpus" ]; then exec taskset -c "$cpus" "$@"; else exec "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
wait_port() { for _ in $(seq 1 100); do python3 -c "import socket; socket.create_connection(('127.0.0.1', $1), 0.2)" 2>/dev/null && return 0; sleep 0.1; done; return 1; }

start_relay() { local port; port=$(free_port); pin "${NODE_CPUS:-}" "$BIN" tcp-relay --listen "127.0.0.1:$port" >/dev/null 2>&1 & PIDS+=($!); wait_port "$port"; echo "$port $!"; }
start_ours() { local port; port=$(free_port); pin "${NODE_CPUS:-}" "$BIN" --endpoint "127.0.0.1:$port" >/dev/null 2>&1 & PIDS+=($!); wait_port "$port"; echo "$port $!"; }
start_ref() { local port; port=$(free_port)
  pin "${NODE_CPUS:-}" env ${1:+LD_PRELOAD=$SHIM} "$VENV/bin/python" tests/interop/refnode.py --port "$port" >/dev/null 2>&1 & PIDS+=($!)
  wait_port "$port"; echo "$port $!"; }

run() { # endpoint-port mode size -> json line
  local client=(); [ "$2" = publish ] && client=(--client "$CLIENT")
  pin "${BENCH_CPUS:-}" "$BIN" bench --endpoint "http://127.0.0.1:$1" --mode "$2" --size "$3" --duration "$DURATION" --round-trips "$RTT" "${client[@]}" --json 2>/dev/null | tail -1
}
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])['$2'])" "$1"; }

# The starters run in a process substitution (a subshell): their PIDS+= is lost, so the
# parent records the pids they print, for the EXIT trap to stop them.
read -r RELAY pid < <(start_relay); PIDS+=("$pid")
read -r OURS pid < <(start_ours); PIDS+=("$pid")
read -r REF pid < <(start_ref ""); PIDS+=("$pid")
read -r REFND pid < <(start_ref nodelay); PIDS+=("$pid")

MACHINE="$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(lscpu | sed -n 's/^Model name: *//p' | head -1)"
TABLE="### compare.sh, $(date -u +%Y-%m-%d\ %H:%M\ UTC)

Machine: $MACHINE (shared, noisy). Clients and node on the same 2 cores, loopback; nodes pinned to CPUs \`${NODE_CPUS:-any}\`, bench clients to \`${BENCH_CPUS:-any}\`; publish rows with \`--client $CLIENT\`. ${DURATION}s per throughput run, $RTT round trips.

| mode | size | ours msgs/s | ref msgs/s | ratio | ref+nodelay msgs/s | ratio | ours p50 µs | ref p50 µs | ratio | ref+nodelay p50 µs | ratio | relay p50 µs | ours − relay µs |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for mode in publish p2p; do
  for size in $SIZES; do
    b=$(run "$RELAY" tcp-relay "$size")
    o=$(run "$OURS" "$mode" "$size"); r=$(run "$REF" "$mode" "$size"); n=$(run "$REFND" "$mode" "$size")
    if [ -z "$o" ] || [ -z "$r" ] || [ -z "$n" ] || [ -z "$b" ]; then
      TABLE="$TABLE
| $mode | $size | run failed | | | | | | | | | | | |"
      continue
    fi
    row=$(python3 - "$o" "$r" "$n" "$b" "$mode" "$size" <<'PY'
import json, sys
o, r, n, b = (json.loads(x) for x in sys.argv[1:5])
ratio = lambda a, b: f"{a / b:.2f}x" if b else "-"
print(f"| {sys.argv[5]} | {sys.argv[6]} | {o['msgs_per_s']:.0f} | {r['msgs_per_s']:.0f} | {ratio(o['msgs_per_s'], r['msgs_per_s'])} "
      f"| {n['msgs_per_s']:.0f} | {ratio(o['msgs_per_s'], n['msgs_per_s'])} "
      f"| {o['p50_us']:.0f} | {r['p50_us']:.0f} | {ratio(r['p50_us'], o['p50_us'])} "
      f"| {n['p50_us']:.0f} | {ratio(n['p50_us'], o['p50_us'])} "
      f"| {b['p50_us']:.0f} | {o['p50_us'] - b['p50_us']:.0f} |")
PY
)
    TABLE="$TABLE
$row"
  done
done
TABLE="$TABLE

Ratios: throughput ours/ref (higher is better for us); latency ref/ours (higher is better for us).
relay: the same clients through a plain TCP relay just before the row (4 socket hops per round
trip, as through a node); ours − relay is what our node and clients add to a round trip."
echo "$TABLE"
if [ "$APPEND" = 1 ]; then printf '\n%s\n' "$TABLE" >> BENCHMARKS.md; fi

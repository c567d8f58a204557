#!/usr/bin/env bash
# Runs every test of the project, from a fresh clone:
#   1. formatting and clippy (warnings are errors);
#   2. all Rust tests (unit, integration over real h2 sockets, doc tests);
#   3. the deterministic simulation over 1000 seeds, and the Sans-IO check (no I/O crate in the
#      cores' dependency trees);
#   4. the interop suite: real PyPI slim-bindings clients (3.3.8 and 2.0.0, installed into
#      target/interop by the suite itself) talking through our slim-tokio node, including our
#      own session layer (slim-tokio request/reply) against theirs;
#   5. the node stops cleanly on SIGTERM;
#   6. our session layer against slim-bindings peers through the reference node (the server
#      built into the slim-bindings wheel).
# Needs: cargo, python3 with venv, access to crates.io and PyPI. Exit 0 iff everything passed.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
export CARGO_TERM_COLOR=never

step() { printf '\n==== %s\n' "$*"; }

step "format"
cargo fmt --all -- --check

step "clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test"
cargo test --workspace

step "simulation: 1000 seeds (release)"
# Deterministic simulation of nodes and session clients over lossy, reordering, partitioned links.
# A failure prints its seed and the command that replays it.
SIM_RUNS="${SIM_RUNS:-1000}" cargo test --release -p slim-core --test sim

step "sans-io dependency check"
scripts/check-sansio.sh
# The smol adapter must build on its own (feature unification in a workspace build hides a missing dependency).
if [ -d adapter-smol ] && grep -q adapter-smol Cargo.toml; then
  cargo build -q -p adapter-smol
fi

step "interop: real slim-bindings clients through slim-tokio"
cargo build -q --bin slim-tokio
# Where cargo put it: CARGO_TARGET_DIR (absolute, or relative to here) when set.
CARGO_OUT="${CARGO_TARGET_DIR:-target}"
case "$CARGO_OUT" in /*) ;; *) CARGO_OUT="$ROOT/$CARGO_OUT" ;; esac
NODE_BIN="$CARGO_OUT/debug/slim-tokio"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p target/interop/logs
NODE_LOG="$ROOT/target/interop/logs/node-$PORT.log"
"$NODE_BIN" --endpoint "127.0.0.1:$PORT" >"$NODE_LOG" 2>&1 &
NODE_PID=$!
cleanup() { kill -KILL "$NODE_PID" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 1 100); do
  grep -q "node ready" "$NODE_LOG" && break
  kill -0 "$NODE_PID" 2>/dev/null || { cat "$NODE_LOG"; echo "node died at start" >&2; exit 1; }
  sleep 0.1
done
interop_status=0
tests/interop/run.sh --endpoint "http://127.0.0.1:$PORT" --slim-bin "$NODE_BIN" || interop_status=$?

step "graceful shutdown"
kill -TERM "$NODE_PID"
shutdown_status=0
for _ in $(seq 1 100); do
  kill -0 "$NODE_PID" 2>/dev/null || break
  sleep 0.1
done
if kill -0 "$NODE_PID" 2>/dev/null; then
  echo "node did not stop within 10 s of SIGTERM" >&2
  shutdown_status=1
else
  wait "$NODE_PID" || shutdown_status=$?
  grep -q "stopped" "$NODE_LOG" || shutdown_status=1
  echo "node stopped (exit $shutdown_status); log: $NODE_LOG"
fi
trap - EXIT

step "interop: our session layer through the reference node"
REF_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
REF_LOG="$ROOT/target/interop/logs/refnode-$REF_PORT.log"
target/interop/venv-3.3.8/bin/python tests/interop/refnode.py --port "$REF_PORT" >"$REF_LOG" 2>&1 &
REF_PID=$!
trap 'kill -KILL "$REF_PID" 2>/dev/null || true' EXIT
reference_status=0
for _ in $(seq 1 150); do
  grep -q "^ready" "$REF_LOG" && break
  kill -0 "$REF_PID" 2>/dev/null || break
  sleep 0.1
done
if grep -q "^ready" "$REF_LOG"; then
  tests/interop/run.sh --endpoint "http://127.0.0.1:$REF_PORT" --slim-bin "$NODE_BIN" \
    --only rust_request,rust_reply,rust_group,rust_member,rust_request_mls,rust_reply_mls,rust_group_mls,rust_member_mls,rust_member_rejoin_mls,rust_group_rejoin_mls,rust_member_soft_close_mls,rust_group_soft_rejoin_mls,rust_request_lossy_mls,rust_group_lossy_mls,rust_member_lossy_mls \
    || reference_status=$?
else
  echo "the reference node did not start (log: $REF_LOG)" >&2
  reference_status=1
fi
kill -TERM "$REF_PID" 2>/dev/null || true
wait "$REF_PID" 2>/dev/null || true
trap - EXIT

if [ "$interop_status" -ne 0 ] || [ "$shutdown_status" -ne 0 ] || [ "$reference_status" -ne 0 ]; then
  echo "FAILED: interop=$interop_status shutdown=$shutdown_status reference=$reference_status" >&2
  exit 1
fi
echo
echo "all tests passed"

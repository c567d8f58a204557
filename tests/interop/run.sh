#!/usr/bin/env bash
# Interop suite: real slim-bindings clients (PyPI) against one SLIM node.
#
#   tests/interop/run.sh --endpoint http://127.0.0.1:PORT [--only CASE[,CASE]] [--timeout S]
#
# Cases: p2p_plain p2p_mls p2p_v200 group_mls anycast (slim-bindings clients only) and
# rust_request rust_reply rust_group rust_member (our session layer against theirs); see
# tests/interop/README.md.
#   --endpoint URL   the node under test (required; h2c, e.g. http://127.0.0.1:46357)
#   --slim-bin PATH  the slim-tokio binary for the rust_* cases (our session layer against
#                    slim-bindings peers); default $SLIM_TOKIO_BIN, else <repo>/target/debug/slim-tokio
#   --only CASE      run only these cases (repeatable or comma-separated)
#   --timeout S      time budget per case in seconds (default 120); on expiry the
#                    case's whole process group is killed and the case FAILs
#
# Venvs: ${SLIM_INTEROP_VENVS:-<repo>/target/interop}/venv-<version> for slim-bindings
# 3.3.8 and 2.0.0 (created with `${PYTHON:-python3} -m venv` + pip; reused when they
# already import exactly that version). Logs: <repo>/target/interop/logs/<run>/.
# Output: one line `PASS|FAIL <case> <seconds>s <detail>` per case, then
# `interop: N passed, M failed`. Exit 0 iff all passed, 1 otherwise, 2 on bad usage.
set -u
SELF="$(readlink -f "$0")"
HERE="$(dirname "$SELF")"
REPO="$(cd "$HERE/../.." && pwd)"
VERSIONS=(3.3.8 2.0.0)
PYTHON="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1

usage() { sed -n '2,/^set -u/{/^#/{s/^# \{0,1\}//;p}}' "$SELF"; }

ENDPOINT=""; TIMEOUT=120; ONLY=()
while [ $# -gt 0 ]; do
  case "$1" in
    --endpoint) [ $# -ge 2 ] || { echo "run.sh: --endpoint needs a URL" >&2; exit 2; }; ENDPOINT="$2"; shift 2;;
    --only) [ $# -ge 2 ] || { echo "run.sh: --only needs a case" >&2; exit 2; }; ONLY+=(--only "$2"); shift 2;;
    --timeout) [ $# -ge 2 ] || { echo "run.sh: --timeout needs seconds" >&2; exit 2; }; TIMEOUT="$2"; shift 2;;
    --slim-bin) [ $# -ge 2 ] || { echo "run.sh: --slim-bin needs a path" >&2; exit 2; }; SLIM_TOKIO_BIN="$2"; shift 2;;
    -h|--help) usage; exit 0;;
    *) echo "run.sh: unknown argument '$1' (see --help)" >&2; exit 2;;
  esac
done
[ -n "$ENDPOINT" ] || { echo "run.sh: --endpoint URL is required (see --help)" >&2; exit 2; }
export SLIM_TOKIO_BIN="${SLIM_TOKIO_BIN:-$REPO/target/debug/slim-tokio}"
case "$TIMEOUT" in ''|*[!0-9.]*) echo "run.sh: --timeout must be a number of seconds" >&2; exit 2;; esac

VENVS="${SLIM_INTEROP_VENVS:-$REPO/target/interop}"
case "$VENVS" in /*) ;; *) VENVS="$PWD/$VENVS";; esac
LOGROOT="$REPO/target/interop/logs"
RUN_LOGS="$LOGROOT/$(date +%Y%m%d-%H%M%S)-$$"
mkdir -p "$RUN_LOGS" "$VENVS" || { echo "run.sh: cannot create $RUN_LOGS / $VENVS" >&2; exit 1; }
ln -sfn "$(basename "$RUN_LOGS")" "$LOGROOT/latest" 2>/dev/null || true

has_version() {  # PYTHON VERSION: does this interpreter import exactly that slim-bindings?
  [ -x "$1" ] && "$1" -c 'import sys, slim_bindings
from importlib.metadata import version
sys.exit(0 if version("slim-bindings") == sys.argv[1] else 1)' "$2" >/dev/null 2>&1
}

PY_ARGS=()
for v in "${VERSIONS[@]}"; do
  dir="$VENVS/venv-$v"; py="$dir/bin/python"; log="$RUN_LOGS/setup-$v.log"
  if ! has_version "$py" "$v"; then
    echo "interop: preparing $dir (slim-bindings==$v)"
    if [ ! -x "$py" ]; then
      if ! "$PYTHON" -m venv "$dir" > "$log" 2>&1; then
        echo "run.sh: ERROR: '$PYTHON -m venv $dir' failed (needs python3 >= 3.10 with venv); log: $log" >&2
        tail -n 3 "$log" | sed 's/^/run.sh:   /' >&2
        exit 1
      fi
    fi
    if ! "$py" -m pip install -q "slim-bindings==$v" >> "$log" 2>&1 || ! has_version "$py" "$v"; then
      echo "run.sh: ERROR: pip could not install slim-bindings==$v into $dir; log: $log" >&2
      grep -v '^[[:space:]]*$' "$log" | tail -n 4 | sed 's/^/run.sh:   /' >&2
      exit 1
    fi
  fi
  PY_ARGS+=(--py "$v=$py")
done

# The runner needs only the standard library; the 3.3.8 venv is a known-good python3.
exec "$VENVS/venv-3.3.8/bin/python" "$HERE/suite.py" run --endpoint "$ENDPOINT" \
  --logs "$RUN_LOGS" --timeout "$TIMEOUT" "${PY_ARGS[@]}" "${ONLY[@]}"

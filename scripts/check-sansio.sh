#!/usr/bin/env bash
# The protocol cores must stay Sans-IO: no async runtime, socket or HTTP crate in their
# dependency tree (shared/design/sansio.md §7). Exit 1 and name the crate if one leaks in.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
for core in slim-proto slim-core; do
  leaked=$(cargo tree -q -p "$core" -e normal --prefix none \
    | grep -oE '^(tokio|tokio-util|smol|async-io|async-net|async-std|h2|hyper|mio|socket2)( |$)' | sort -u | tr '\n' ' ' || true)
  if [ -n "$leaked" ]; then
    echo "check-sansio: $core depends on I/O crates: $leaked" >&2
    status=1
  else
    echo "check-sansio: $core has no I/O crates in its dependency tree"
  fi
done
# adapter-smol may use tokio's I/O traits (h2 needs them) but never its runtime.
runtime=$(cargo tree -q -p adapter-smol -e normal,features -i tokio --prefix none 2>/dev/null \
  | grep -oE '^tokio feature "(rt|rt-multi-thread|net|time)"' | sort -u | tr '\n' ' ' || true)
if [ -n "$runtime" ]; then
  echo "check-sansio: adapter-smol pulls in the tokio runtime: $runtime" >&2
  status=1
else
  echo "check-sansio: adapter-smol uses no tokio runtime"
fi
exit $status

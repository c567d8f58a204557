#!/usr/bin/env python3
"""A/B (NAME may be BIN:CLIENT for bench --client CLIENT): before and after builds interleaved, each its own node and bench. Medians of rounds.
usage: table.py BEFORE AFTER ROUNDS   (binaries $BUILDS/slim-tokio-NAME, default /tmp/ab)
env: NODE_CPUS, BENCH_CPUS (taskset lists), CASES (comma list of publish64,publish1024,multicast64,p2p64,p2pmls1024), DUR"""
import json, os, socket, statistics, subprocess, sys, time
BUILDS = os.environ.get("BUILDS", "/tmp/ab")  # holds slim-tokio-NAME release binaries
before, after, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
ALL = {"publish64": ("publish", 64, []), "publish1024": ("publish", 1024, []),
       "multicast64": ("multicast", 64, ["--subscribers", "10"]),
       "p2p64": ("p2p", 64, []), "p2pmls1024": ("p2p", 1024, ["--mls"])}
cases = os.environ.get("CASES", "publish64,publish1024,multicast64,p2p64,p2pmls1024").split(",")
dur = os.environ.get("DUR", "3")
def pin(cpus): return ["taskset", "-c", cpus] if cpus else []
def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
def wait_port(p):
    for _ in range(100):
        try: socket.create_connection(("127.0.0.1", p), 0.2).close(); return
        except OSError: time.sleep(0.1)
    raise SystemExit("node did not start")
def run(name, case):
    binary, _, client = name.partition(":")
    b = os.path.join(BUILDS, f"slim-tokio-{binary}")
    extra_client = ["--client", client] if client else []
    mode, size, extra = ALL[case]
    port = free_port()
    node = subprocess.Popen(pin(os.environ.get("NODE_CPUS")) + [b, "--endpoint", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        out = subprocess.run(pin(os.environ.get("BENCH_CPUS")) + [b, "bench", "--endpoint", f"http://127.0.0.1:{port}",
              "--mode", mode, "--size", str(size), "--duration", dur, "--round-trips", "2000",
              "--node-pid", str(node.pid), "--json"] + extra + extra_client, capture_output=True, text=True, timeout=120)
        line = [l for l in out.stdout.splitlines() if l.startswith("{")]
        if not line: print(out.stdout, out.stderr, file=sys.stderr); return None
        return json.loads(line[-1])
    finally:
        node.kill(); node.wait()
res = {(n, c): [] for n in (before, after) for c in cases}
for r in range(rounds):
    for c in cases:
        for n in ((before, after) if r % 2 == 0 else (after, before)):
            j = run(n, c)
            if j: res[(n, c)].append(j)
def med(n, c, k):
    v = [j.get(k) for j in res[(n, c)] if j.get(k) is not None]
    return statistics.median(v) if v else float("nan")
print(f"| case | {before} msgs/s | {after} msgs/s | ratio | p50 µs {before} → {after} | node µs/msg {before} → {after} |")
print("|---|---:|---:|---:|---|---|")
for c in cases:
    a, b = med(before, c, "msgs_per_s"), med(after, c, "msgs_per_s")
    print(f"| {c} | {a:,.0f} | {b:,.0f} | {b/a:.2f}× | {med(before,c,'p50_us'):.0f} → {med(after,c,'p50_us'):.0f} | {med(before,c,'node_cpu_us_per_msg'):.2f} → {med(after,c,'node_cpu_us_per_msg'):.2f} |")

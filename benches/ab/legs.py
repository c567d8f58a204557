#!/usr/bin/env python3
"""Where a p2p round trip's time goes, leg by leg, from a perf trace of both processes' syscalls.

usage: legs.py NAME [SECONDS]   (needs root for perf; binary $BUILDS/slim-tokio-NAME)
env: BUILDS (default /tmp/ab), NODE_CPUS (default 0), BENCH_CPUS (default 1)

Starts a node and `bench --mode p2p --count 10 --round-trips 30000`, traces raw syscalls of
both for SECONDS (default 0.5) once the round trips run, and prints the median of each step of
a leg (A -> node -> B, or back): the app process from a read's return to its write, its write,
the node waking, the node from its read to its write, the node's write, the app process waking.
Tracing adds about 1 µs to each syscall.
"""
import os, re, socket, statistics, subprocess, sys, time

BUILDS = os.environ.get("BUILDS", "/tmp/ab")
NR_READ, NR_WRITEV, NR_EPOLL_WAIT = 45, 20, 232  # x86_64: recvfrom, writev, epoll_wait
STEPS = ["app read->write", "app writev", "node wakes", "node read->write", "node writev", "app wakes"]


def pin(cpus):
    return ["taskset", "-c", cpus] if cpus else []


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def trace(name, seconds):
    binary = os.path.join(BUILDS, f"slim-tokio-{name}")
    port = free_port()
    node = subprocess.Popen(pin(os.environ.get("NODE_CPUS", "0")) + [binary, "--endpoint", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.4)
    bench = subprocess.Popen(pin(os.environ.get("BENCH_CPUS", "1")) + [
        binary, "bench", "--endpoint", f"http://127.0.0.1:{port}", "--mode", "p2p",
        "--count", "10", "--round-trips", "30000", "--json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.5)  # connected, session open, round trips running
    data = f"/tmp/legs-{name}-{os.getpid()}.data"
    try:
        subprocess.run(["perf", "record", "-q", "-e", "raw_syscalls:sys_enter,raw_syscalls:sys_exit",
                        "-p", f"{node.pid},{bench.pid}", "-o", data, "--", "sleep", str(seconds)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        text = subprocess.run(["perf", "script", "-i", data, "-F", "pid,time,event,trace"],
                              check=True, capture_output=True, text=True).stdout
    finally:
        bench.kill(); node.kill(); bench.wait(); node.wait()
        if os.path.exists(data):
            os.remove(data)
    return text, node.pid, bench.pid


# (process, syscall entered (else returned), syscall, state before, state after, step it ends)
TRANSITIONS = {
    (p, enter, nr, before): (after, step)
    for p, enter, nr, before, after, step in [
        ("app", True, NR_WRITEV, "app read", "app writing", "app read->write"),
        ("app", False, NR_WRITEV, "app writing", "app wrote", "app writev"),
        ("node", False, NR_EPOLL_WAIT, "app wrote", "node awake", "node wakes"),
        ("node", False, NR_READ, "node awake", "node read", None),
        ("node", True, NR_WRITEV, "node read", "node writing", "node read->write"),
        ("node", False, NR_WRITEV, "node writing", "node wrote", "node writev"),
        ("app", False, NR_EPOLL_WAIT, "node wrote", "app awake", "app wakes"),
        ("app", False, NR_READ, "app awake", "app read", None),
    ]
}


def legs(text, node_pid, bench_pid):
    """Follows each leg through its steps; an app write out of turn starts the next leg."""
    steps = {step: [] for step in STEPS}
    state, mark = None, 0.0
    for line in text.splitlines():
        m = re.match(r"\s*(\d+)\s+([\d.]+):\s+raw_syscalls:sys_(enter|exit):\s+NR (\d+)", line)
        if not m:
            continue
        pid, t, nr = int(m.group(1)), float(m.group(2)) * 1e6, int(m.group(4))
        process, enter = ("app" if pid == bench_pid else "node"), m.group(3) == "enter"
        move = TRANSITIONS.get((process, enter, nr, state))
        if move is None and (process, enter, nr) == ("app", True, NR_WRITEV):
            move = ("app writing", None)
        if move is not None:
            state, step = move
            if step is not None:
                steps[step].append(t - mark)
            mark = t
    return steps


def main():
    name = sys.argv[1]
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
    steps = legs(*trace(name, seconds))
    print(f"| step (per leg, {name}) | legs | median µs | p10–p90 µs |")
    print("|---|---:|---:|---:|")
    total = 0.0
    for step, values in steps.items():
        if not values:
            sys.exit(f"no complete '{step}' step traced: is perf allowed, and did the bench run?")
        values.sort()
        median = statistics.median(values)
        total += median
        p10, p90 = values[len(values) // 10], values[9 * len(values) // 10]
        print(f"| {step} | {len(values)} | {median:.1f} | {p10:.1f}–{p90:.1f} |")
    print(f"\ntwo legs per round trip: {2 * total:.0f} µs (sum of the medians, traced)")


if __name__ == "__main__":
    main()

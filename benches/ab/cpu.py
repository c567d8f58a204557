#!/usr/bin/env python3
"""CPU per round trip (bench process task-clock and node utime+stime), (N2 - N1) difference, builds interleaved.
usage: cpu.py A B ROUNDS   env NODE_CPUS BENCH_CPUS, EXTRA (bench args)"""
import os, subprocess, sys, time, socket, statistics, json
BUILDS = os.environ.get("BUILDS", "/tmp/ab")  # holds slim-tokio-NAME release binaries
names=sys.argv[1:3]; rounds=int(sys.argv[3])
N1,N2=2000,12000
extra=os.environ.get("EXTRA","").split()
def pin(c): return ["taskset","-c",c] if c else []
def free_port():
    s=socket.socket(); s.bind(("127.0.0.1",0)); p=s.getsockname()[1]; s.close(); return p
def node_cpu(pid):
    f=open(f"/proc/{pid}/stat").read().rsplit(")",1)[1].split()
    return (int(f[11])+int(f[12]))/os.sysconf("SC_CLK_TCK")
def run(name, n):
    b=os.path.join(BUILDS, f"slim-tokio-{name}"); port=free_port()
    node=subprocess.Popen(pin(os.environ.get("NODE_CPUS"))+[b,"--endpoint",f"127.0.0.1:{port}"],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try: socket.create_connection(("127.0.0.1",port),0.2).close(); break
            except OSError: time.sleep(0.05)
        c0=node_cpu(node.pid)
        t0=os.times()
        out=subprocess.run(pin(os.environ.get("BENCH_CPUS"))+[b,"bench","--endpoint",f"http://127.0.0.1:{port}","--mode","p2p","--count","10","--round-trips",str(n),"--json"]+extra,capture_output=True,text=True,timeout=300)
        t1=os.times()
        c1=node_cpu(node.pid)
        j=json.loads([l for l in out.stdout.splitlines() if l.startswith("{")][-1])
        return (t1.children_user-t0.children_user)+(t1.children_system-t0.children_system), c1-c0, j["p50_us"]
    finally:
        node.kill(); node.wait()
res={n:{"bench":[],"node":[],"p50":[]} for n in names}
for r in range(rounds):
    for n in (names if r%2==0 else names[::-1]):
        b1,n1,_=run(n,N1); b2,n2,p=run(n,N2)
        res[n]["bench"].append((b2-b1)/(N2-N1)*1e6); res[n]["node"].append((n2-n1)/(N2-N1)*1e6); res[n]["p50"].append(p)
for n in names:
    r=res[n]
    print(f"{n}: bench CPU/RT median {statistics.median(r['bench']):.1f} µs {sorted(round(x) for x in r['bench'])}; node {statistics.median(r['node']):.1f} µs; p50 {statistics.median(r['p50'])} {sorted(r['p50'])}")

#!/usr/bin/env python3
"""Usage: python3 fuzz/seeds/edge_cmin.py fuzz/target/x86_64-unknown-linux-gnu/release/TARGET fuzz/corpus/TARGET MAX_FILES

Greedy set cover of a libFuzzer corpus on coverage *edges* (the COV lines of a merge control
file), ignoring hit-count features, to get a small replay corpus."""
import os, shutil, subprocess, sys, tempfile
binary, corpus, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
empty = tempfile.mkdtemp()
ctl = tempfile.mktemp()
subprocess.run([binary, "-merge=1", f"-merge_control_file={ctl}", empty, corpus],
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
lines = open(ctl).read().split("\n")
n = int(lines[0]); files = lines[2:2 + n]
cov, size = {}, {}
for line in lines[2 + n:]:
    parts = line.split()
    if not parts: continue
    if parts[0] == "STARTED": size[int(parts[1])] = int(parts[2])
    elif parts[0] == "COV": cov[int(parts[1])] = set(parts[2:])
universe = set().union(*cov.values()) if cov else set()
chosen, covered = [], set()
while covered != universe and len(chosen) < limit:
    best = max(cov, key=lambda i: (len(cov[i] - covered), -size.get(i, 0)))
    if not cov[best] - covered: break
    chosen.append(best); covered |= cov[best]
print(f"{corpus}: {len(files)} files, {len(universe)} edges; kept {len(chosen)} files covering {len(covered)} edges, {sum(size[i] for i in chosen)} bytes")
out = tempfile.mkdtemp()
for i in chosen: shutil.copy(files[i], out)
shutil.rmtree(corpus); shutil.copytree(out, corpus)

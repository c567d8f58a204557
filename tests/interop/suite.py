#!/usr/bin/env python3
"""Interop suite: runner and case drivers (standard library only).

    suite.py run  --endpoint URL --py VERSION=PYTHON ... --logs DIR [--only CASE[,CASE]] [--timeout S]
    suite.py case NAME --endpoint URL --py VERSION=PYTHON ... --logs DIR --timeout S

`run` (called by run.sh) starts every selected case as `suite.py case NAME` in
its own process group, kills the whole group when the case exceeds its time
budget, and prints one PASS/FAIL line per case plus the summary line.

`case` drives one case: it starts every client role as a separate role.py
process on the interpreter of the slim-bindings version the role needs,
exchanges JSON lines with them and checks the results.  It writes
<logs>/<case>/result.json ({"ok": bool, "detail": str}); the runner reads it.
"""

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from urllib.parse import urlparse

sys.dont_write_bytecode = True

HERE = os.path.dirname(os.path.realpath(__file__))
ROLE_PY = os.path.join(HERE, "role.py")
NEW, OLD = "3.3.8", "2.0.0"
CASES = ["p2p_plain", "p2p_mls", "p2p_v200", "group_mls", "anycast", "rust_request", "rust_reply",
         "rust_group", "rust_member", "rust_request_mls", "rust_reply_mls", "rust_group_mls",
         "rust_member_mls", "rust_member_rejoin_mls", "rust_group_rejoin_mls",
         "rust_member_soft_close_mls", "rust_group_soft_rejoin_mls", "rust_request_lossy_mls",
         "rust_group_lossy_mls", "rust_member_lossy_mls"]
P2P_EXCHANGES = 100
GROUP_MEMBERS = 3
GROUP_MSGS = 10
REMOVED_GRACE_S = 4.0
ANYCAST_INITIATORS = 2
ANYCAST_SESSIONS_EACH = 3
ANYCAST_MSGS = 10


class CaseFailure(Exception):
    pass


# ================================================================ roles ==

class Role:
    """A role.py child process and the events it reported."""

    def __init__(self, ctx, label, version, role, args):
        self.ctx, self.label, self.version = ctx, label, version
        self.role, self.args = role, args
        self.events = []
        self.proc = None
        self.eof = False
        self.log_path = os.path.join(ctx.logs, f"{label}.log")
        self._changed = asyncio.Event()

    async def start(self):
        python = self.ctx.pythons[self.version]
        cmd = [python, ROLE_PY, self.role, "--endpoint", self.ctx.endpoint,
               "--step-timeout", str(self.ctx.step_timeout), *self.args]
        env = dict(os.environ, SLIM_ITEST_SECRET=self.ctx.secret, PYTHONDONTWRITEBYTECODE="1",
                   NO_COLOR="1")
        with open(self.log_path, "ab") as log:
            log.write(f"# {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=log, env=env, limit=1 << 24)
        self.ctx.note(f"started {self.label} ({self.role}, slim-bindings {self.version}) "
                      f"pid {self.proc.pid}")
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self):
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            self.ctx.event_log.write(f"{self.label} {line.decode(errors='replace').rstrip()}\n")
            try:
                self.events.append(json.loads(line))
            except ValueError:
                pass
            self._changed.set()
        await self.proc.wait()
        self.eof = True
        self._changed.set()

    def of(self, kind, **match):
        return [e for e in self.events
                if e.get("ev") == kind and all(e.get(k) == v for k, v in match.items())]

    def _trouble(self):
        for e in self.events:
            if e.get("ev") == "error":
                return f"{self.label}: {e.get('msg')}"
            if e.get("ev") == "failed":
                return f"{self.label}: {e.get('cmd')} failed: {e.get('msg')}"
        if self.eof:
            return f"{self.label} exited (rc={self.proc.returncode}){self._stderr_tail()}"
        return None

    def _stderr_tail(self):
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - 4000))
                lines = [l for l in f.read().decode(errors="replace").splitlines() if l.strip()]
            return f": {lines[-1].strip()[:160]}" if lines else ""
        except OSError:
            return ""

    async def wait(self, cond, what, timeout=None):
        """Wait until cond() holds; fail on timeout, role error or role exit."""
        limit = self.ctx.left(timeout)
        deadline = time.monotonic() + limit
        while True:
            if cond():
                return
            trouble = self._trouble()
            if trouble:
                raise CaseFailure(f"{what}: {trouble}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise CaseFailure(f"{what}: nothing after {limit:.0f}s ({self.label})")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def event(self, kind, what, timeout=None, **match):
        await self.wait(lambda: self.of(kind, **match), what, timeout)
        return self.of(kind, **match)[-1]

    async def ready(self):
        ev = await self.event("ready", f"{self.label} start-up", timeout=60)
        if ev.get("pkg") != self.version:
            raise CaseFailure(f"{self.label}: runs slim-bindings {ev.get('pkg')}, "
                              f"expected {self.version}")
        return ev

    def send(self, **cmd):
        self.ctx.event_log.write(f"{self.label} <- {json.dumps(cmd)[:300]}\n")
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())

    async def stop(self):
        if self.proc is None:
            return
        if self.proc.returncode is None:
            try:
                self.proc.terminate()
                await asyncio.wait_for(self.proc.wait(), 3)
            except ProcessLookupError:
                pass
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        try:
            await asyncio.wait_for(self._reader, 2)
        except Exception:
            pass


class Context:
    def __init__(self, args):
        self.case = args.name
        self.endpoint = args.endpoint
        self.pythons = dict(args.py)
        self.logs = os.path.join(args.logs, args.name)
        os.makedirs(self.logs, exist_ok=True)
        self.deadline = time.monotonic() + args.timeout - 6  # report before the runner kills us
        self.step_timeout = max(10.0, min(30.0, args.timeout / 4))
        self.tag = os.urandom(4).hex()
        self.seed = random.SystemRandom().randrange(1, 1 << 30)
        self.secret = os.urandom(24).hex()  # 48 characters
        self.rng = random.Random(self.seed)
        self.roles = []
        self.step = "start"
        self.event_log = open(os.path.join(self.logs, "events.log"), "a", buffering=1)
        self.note(f"case {self.case} endpoint {self.endpoint} tag {self.tag} seed {self.seed}")

    def note(self, text):
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def left(self, cap=None):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise CaseFailure(f"case time budget exhausted during: {self.step}")
        return left if cap is None else min(cap, left)

    def name(self, role):
        return f"itest/{self.case}/{role}-{self.tag}"

    def set_step(self, step):
        self.step = step
        self.note(f"step: {step}")

    async def spawn(self, label, version, role, *args):
        r = Role(self, label, version, role, [str(a) for a in args])
        self.roles.append(r)
        return await r.start()

    async def stop_all(self):
        await asyncio.gather(*(r.stop() for r in self.roles), return_exceptions=True)


def preflight(endpoint):
    u = urlparse(endpoint)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise CaseFailure(f"bad endpoint {endpoint!r} (expected http://HOST:PORT)")
    port = u.port or (443 if u.scheme == "https" else 80)
    deadline = time.monotonic() + 5
    while True:
        try:
            with socket.create_connection((u.hostname, port), timeout=1):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise CaseFailure(f"no SLIM node reachable at {endpoint}: {e}")
            time.sleep(0.2)


# ================================================================ cases ==

async def p2p_run(ctx, init_version, resp_version, mls, suffix=""):
    """One responder and one initiator, P2P_EXCHANGES request/replies; returns a summary."""
    resp_name, init_name = ctx.name(f"resp{suffix}"), ctx.name(f"init{suffix}")
    ctx.set_step(f"start responder{suffix} ({resp_version})")
    resp = await ctx.spawn(f"responder{suffix}", resp_version, "responder",
                           "--local", resp_name, "--prefix", "reply")
    await resp.ready()
    ctx.set_step(f"initiator{suffix} ({init_version}) exchanges {P2P_EXCHANGES} messages")
    init = await ctx.spawn(f"initiator{suffix}", init_version, "initiator",
                           "--local", init_name, "--remote", resp_name,
                           "--expect-prefix", "reply", "--count", P2P_EXCHANGES,
                           "--max-size", 4096, "--seed", ctx.seed, *(["--mls"] if mls else []))
    await init.ready()
    result = await init.event("result", ctx.step)
    rep = result["sessions"][0]
    where = f"{init_version}->{resp_version}"
    if rep["errors"]:
        raise CaseFailure(f"{where}: {rep['ok']}/{P2P_EXCHANGES} ok; errors: {rep['errors'][0]}")
    if rep["mismatches"] or rep["ok"] != P2P_EXCHANGES:
        m = rep["mismatches"][:1]
        raise CaseFailure(f"{where}: {rep['ok']}/{P2P_EXCHANGES} replies byte-exact; "
                          f"{len(rep['mismatches'])} corrupted, first {m}")
    sid = rep["sid"]
    ctx.set_step(f"responder{suffix} accounting")
    await resp.wait(lambda: any(e["count"] >= P2P_EXCHANGES for e in resp.of("served", sid=sid)),
                    ctx.step, timeout=10)
    sessions = [e["sid"] for e in resp.of("session")]
    if sessions != [sid]:
        raise CaseFailure(f"{where}: responder saw sessions {sessions}, expected only {sid}")
    for side, ev in (("initiator", init.of("session")[0]), ("responder", resp.of("session")[0])):
        if ev["mls"] != mls:
            raise CaseFailure(f"{where}: {side} session has MLS {'on' if ev['mls'] else 'off'}")
    if resp.of("session")[0]["remote"] != init_name:
        raise CaseFailure(f"{where}: responder's session peer is {resp.of('session')[0]['remote']}"
                          f", expected {init_name}")
    served = resp.of("served", sid=sid)[-1]
    if served["count"] != P2P_EXCHANGES or served["bytes"] != rep["sent_bytes"]:
        raise CaseFailure(f"{where}: responder got {served['count']} msgs/{served['bytes']} B, "
                          f"initiator sent {P2P_EXCHANGES}/{rep['sent_bytes']} B")
    setup = init.of("session")[0].get("setup_ms")
    return f"{where} {P2P_EXCHANGES}/{P2P_EXCHANGES} byte-exact ({rep['sent_bytes']} B, setup {setup:.0f}ms)"


async def case_p2p_plain(ctx):
    return await p2p_run(ctx, NEW, NEW, mls=False)


async def case_p2p_mls(ctx):
    return await p2p_run(ctx, NEW, NEW, mls=True) + " MLS"


async def case_p2p_v200(ctx):
    a = await p2p_run(ctx, NEW, OLD, mls=False, suffix="-a")
    b = await p2p_run(ctx, OLD, NEW, mls=False, suffix="-b")
    return f"{a}; {b}"


def blobs(ctx, label, count, max_size):
    """Distinct binary payloads: a readable header, then random bytes (some empty)."""
    out = []
    for i in range(count):
        size = 0 if i == 1 else ctx.rng.randint(0, max_size)
        out.append(f"{label}|{i}|".encode() + ctx.rng.randbytes(size))
    return out


def hexes(payloads):
    return [p.hex() for p in payloads]


async def case_group_mls(ctx):
    labels = [f"member{i}" for i in range(GROUP_MEMBERS)]
    names = {l: ctx.name(l) for l in labels}
    ctx.set_step("start moderator and members")
    members = [await ctx.spawn(l, NEW, "member", "--local", names[l]) for l in labels]
    mod = await ctx.spawn("moderator", NEW, "moderator", "--local", ctx.name("moderator"),
                          "--channel", ctx.name("chan"), "--mls")
    for r in members + [mod]:
        await r.ready()
    created = await mod.event("created", "moderator creates the GROUP session")
    if not created["mls"]:
        raise CaseFailure("moderator's GROUP session does not run MLS")

    ctx.set_step("invite")
    mod.send(cmd="invite", names=[names[l] for l in labels])
    await mod.event("done", "moderator invites all members", cmd="invite")
    for m in members:
        joined = await m.event("joined", f"{m.label} joins the group")
        if not joined["mls"] or joined["sid"] != created["sid"]:
            raise CaseFailure(f"{m.label} joined session {joined['sid']} (MLS {joined['mls']}), "
                              f"expected {created['sid']} with MLS")

    def got(role):
        return [e["hex"] for e in role.of("msg")]

    def check_sources(role, start, want):
        bad = [e["src"] for e in role.of("msg")[start:] if e["src"] != want(e["hex"])]
        if bad:
            raise CaseFailure(f"{role.label} got messages with source {bad[0]!r}")

    ctx.set_step(f"broadcast {GROUP_MSGS} messages")
    phase1 = hexes(blobs(ctx, "g1", GROUP_MSGS, 2048))
    mod.send(cmd="publish", hex=phase1)
    await mod.event("done", "moderator broadcast", cmd="publish")
    for m in members:
        await m.wait(lambda m=m: len(got(m)) >= GROUP_MSGS, f"{m.label} receives the broadcast")
        if got(m) != phase1:
            raise CaseFailure(f"broadcast: {m.label} got {len(got(m))} msgs, "
                              f"not the {GROUP_MSGS} sent (order/content differs)")
        check_sources(m, 0, lambda h: ctx.name("moderator"))

    ctx.set_step("fan-in: every member publishes once")
    fan = {m.label: hexes(blobs(ctx, f"fan-{m.label}", 1, 1024))[0] for m in members}
    for m in members:
        m.send(cmd="publish", hex=[fan[m.label]])
    for m in members:
        await m.event("done", f"{m.label} publishes", cmd="publish")
    await mod.wait(lambda: len(got(mod)) >= len(members), "moderator receives the fan-in")
    if sorted(got(mod)) != sorted(fan.values()):
        raise CaseFailure(f"fan-in: moderator got {len(got(mod))} msgs, "
                          f"not exactly the {len(members)} published by the members")
    author = {v: names[k] for k, v in fan.items()}
    check_sources(mod, 0, author.get)
    for m in members:
        want = sorted(v for k, v in fan.items() if k != m.label)
        await m.wait(lambda m=m: len(got(m)) >= GROUP_MSGS + len(want),
                     f"{m.label} receives the other members' messages")
        if sorted(got(m)[GROUP_MSGS:]) != want:
            raise CaseFailure(f"fan-in: {m.label} did not get exactly the other members' "
                              f"messages ({len(got(m)) - GROUP_MSGS} received)")
        check_sources(m, GROUP_MSGS, author.get)

    victim, rest = members[0], members[1:]
    ctx.set_step(f"remove {victim.label}")
    before = len(got(victim))
    mod.send(cmd="remove", name=names[victim.label])
    await mod.event("done", f"moderator removes {victim.label}", cmd="remove")
    await victim.event("session_end", f"{victim.label} is notified that its session ended")

    ctx.set_step(f"broadcast {GROUP_MSGS} messages after the removal")
    phase3 = hexes(blobs(ctx, "g3", GROUP_MSGS, 2048))
    mod.send(cmd="publish", hex=phase3)
    await mod.wait(lambda: len(mod.of("done", cmd="publish")) >= 2, "moderator broadcast")
    offset = GROUP_MSGS + len(members) - 1
    for m in rest:
        await m.wait(lambda m=m: len(got(m)) >= offset + GROUP_MSGS,
                     f"{m.label} receives the post-removal broadcast")
    ctx.set_step(f"grace period {REMOVED_GRACE_S:g}s: nothing more may arrive")
    await asyncio.sleep(REMOVED_GRACE_S)
    stray = len(got(victim)) - before
    if stray:
        raise CaseFailure(f"removed member {victim.label} received {stray} msgs after removal")
    for m in rest:
        if got(m)[offset:] != phase3:
            raise CaseFailure(f"post-removal broadcast: {m.label} got {len(got(m)) - offset} "
                              f"msgs, not the {GROUP_MSGS} sent (order/content differs)")
        if got(m)[:GROUP_MSGS] != phase1:
            raise CaseFailure(f"{m.label}: late/duplicate messages in the first broadcast")
    if len(got(mod)) != len(members):
        raise CaseFailure(f"moderator received {len(got(mod))} msgs, expected only the "
                          f"{len(members)} fan-in messages")
    return (f"MLS group: {len(members)} joined, {GROUP_MSGS} broadcast in order, fan-in ok, "
            f"removed {victim.label} (0 msgs after removal), {GROUP_MSGS} more to {len(rest)}")


async def case_anycast(ctx):
    service = ctx.name("svc")
    tags = {"A": f"inst-A-{ctx.tag}", "B": f"inst-B-{ctx.tag}"}
    ctx.set_step("start two responder instances of one service")
    resp = {k: await ctx.spawn(f"responder-{k}", NEW, "responder", "--local", service,
                               "--prefix", tags[k]) for k in tags}
    ids = {}
    for k, r in resp.items():
        ids[k] = (await r.ready())["app_id"]
    if ids["A"] == ids["B"]:
        raise CaseFailure(f"both responder instances got the same instance id {ids['A']}")
    total = ANYCAST_INITIATORS * ANYCAST_SESSIONS_EACH
    ctx.set_step(f"{total} sessions x {ANYCAST_MSGS} msgs to {service}")
    inits = [await ctx.spawn(f"initiator{i}", NEW, "initiator", "--local", ctx.name(f"init{i}"),
                             "--remote", service, "--sessions", ANYCAST_SESSIONS_EACH,
                             "--count", ANYCAST_MSGS, "--max-size", 1024, "--seed", ctx.seed + i)
             for i in range(ANYCAST_INITIATORS)]
    for r in inits:
        await r.ready()
    reports = []
    for r in inits:
        reports += (await r.event("result", f"{r.label} sessions"))["sessions"]
    owner = {}
    for rep in reports:
        sid = rep["sid"]
        if rep["errors"]:
            raise CaseFailure(f"session {sid}: {rep['ok']}/{ANYCAST_MSGS} ok; {rep['errors'][0]}")
        if len(rep["prefixes"]) != 1:
            raise CaseFailure(f"session {sid} not sticky: replies from {rep['prefixes']}")
        inst = next((k for k, t in tags.items() if t == rep["prefixes"][0]), None)
        if inst is None:
            raise CaseFailure(f"session {sid}: reply label {rep['prefixes'][0]!r} is not an instance")
        if rep["mismatches"] or rep["ok"] != ANYCAST_MSGS:
            raise CaseFailure(f"session {sid}: {rep['ok']}/{ANYCAST_MSGS} replies byte-exact")
        if sid in owner:
            raise CaseFailure(f"duplicate session id {sid}")
        owner[sid] = inst
    ctx.set_step("cross-check with the responders")
    for sid, inst in owner.items():
        r = resp[inst]
        await r.wait(lambda r=r, sid=sid: any(e["count"] >= ANYCAST_MSGS
                                              for e in r.of("served", sid=sid)),
                     f"responder-{inst} accounting for session {sid}", timeout=10)
        if r.of("served", sid=sid)[-1]["count"] != ANYCAST_MSGS:
            raise CaseFailure(f"responder-{inst} served {r.of('served', sid=sid)[-1]['count']} "
                              f"msgs of session {sid}, expected {ANYCAST_MSGS}")
    for k, r in resp.items():
        mine = sorted(s for s, i in owner.items() if i == k)
        seen = sorted(e["sid"] for e in r.of("session"))
        if seen != mine:
            raise CaseFailure(f"responder-{k} accepted sessions {seen}, "
                              f"but served (per reply labels) {mine}")
    split = {k: sum(1 for i in owner.values() if i == k) for k in tags}
    return (f"{total} sessions x {ANYCAST_MSGS} msgs, each sticky to one instance; "
            f"served A={split['A']} B={split['B']}")


# ------------------------------------------------ our sessions vs theirs --
# Our own session layer (slim-tokio request/reply, Rust) against slim-bindings peers: the
# binary comes from $SLIM_TOKIO_BIN (run.sh --slim-bin); without it these cases fail.

def slim_bin():
    path = os.environ.get("SLIM_TOKIO_BIN", "")
    if not path or not os.access(path, os.X_OK):
        raise CaseFailure("SLIM_TOKIO_BIN is not an executable slim-tokio (run.sh --slim-bin PATH)")
    return path


async def run_rust(ctx, label, *args, wait=True, stdin=False, log_filter=None):
    """Starts `slim-tokio ARGS`; with wait=True returns (exit code, stdout) when it ends.
    log_filter: its RUST_LOG (when the case watches its log)."""
    log = open(os.path.join(ctx.logs, f"{label}.log"), "ab")
    env = dict(os.environ, NO_COLOR="1")
    if log_filter:
        env["RUST_LOG"] = log_filter
    proc = await asyncio.create_subprocess_exec(
        slim_bin(), *[str(a) for a in args], stdout=asyncio.subprocess.PIPE, stderr=log,
        stdin=asyncio.subprocess.PIPE if stdin else None, env=env)
    ctx.note(f"started {label} (slim-tokio {args[0]}) pid {proc.pid}")
    if not wait:
        return proc, log
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), ctx.left())
    finally:
        if proc.returncode is None:
            proc.kill()
    return proc.returncode, out.decode(errors="replace")


LOSSY_DROP_EVERY = 5


class LossyRelay:
    """`slim-tokio lossy-relay` in front of the node: it drops every LOSSY_DROP_EVERY-th
    session data message (MSG) of each stream direction and passes everything else, so the
    session layers at both ends must recover the losses (RTX_REQUEST / RTX_REPLY, or their
    retransmission timers)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.log_path = os.path.join(ctx.logs, "lossy-relay.log")

    async def start(self):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        upstream = urlparse(self.ctx.endpoint)
        self.proc, self.log = await run_rust(
            self.ctx, "lossy-relay", "lossy-relay", "--listen", f"127.0.0.1:{port}",
            "--upstream", f"{upstream.hostname}:{upstream.port}",
            "--drop-every", LOSSY_DROP_EVERY, wait=False, log_filter="info")
        while b"lossy relay ready" not in open(self.log_path, "rb").read():
            if self.proc.returncode is not None:
                raise CaseFailure(f"the lossy relay exited {self.proc.returncode}")
            self.ctx.left()
            await asyncio.sleep(0.05)
        return f"http://127.0.0.1:{port}"

    def dropped(self, way):
        text = open(self.log_path, "rb").read().decode(errors="replace")
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)
        return sum(1 for line in text.splitlines()
                   if "dropped a data message" in line and f"way={way}" in line.replace('"', ""))

    def require_drops(self, *ways):
        """'N MSGs dropped <way>, …'; fails unless every way had a drop."""
        counts = {way: self.dropped(way) for way in ways}
        if not all(counts.values()):
            raise CaseFailure(f"the lossy relay dropped too little to test recovery: {counts}")
        return ", ".join(f"{n} MSGs dropped {way}" for way, n in counts.items())

    async def stop(self):
        await stop_rust(self.proc, self.log)


def require_recovery(who, recovery, *paths):
    """'<who> <counter> N, …' for ours' session-layer recovery counters (the `recovery` object of
    its JSON report); fails unless each of `paths` (counter names) moved: which way a lost
    message came back, not only that it did."""
    if recovery is None:
        raise CaseFailure(f"{who}: no recovery counters in its report")
    missing = [p for p in paths if not recovery.get(p)]
    if missing:
        raise CaseFailure(f"{who} recovered without {', '.join(missing)}: {recovery}")
    return f"{who} " + ", ".join(f"{p} {recovery[p]}" for p in paths)


async def maybe_lossy(ctx, lossy, run):
    """run(relay) with a LossyRelay (started by run, when it needs its endpoint) or None;
    the relay is stopped afterwards."""
    relay = LossyRelay(ctx) if lossy else None
    try:
        return await run(relay)
    finally:
        if relay and hasattr(relay, "proc"):
            await relay.stop()


def logged(path, text):
    """Whether a process's log file has `text` yet."""
    with open(path, "rb") as f:
        return text.encode() in f.read()


def mls_flag(mls):
    return ["--mls"] if mls else []


def mls_label(mls):
    return " MLS" if mls else ""


async def case_rust_request(ctx, mls=False, lossy=False):
    """slim-tokio request (ours) -> slim-bindings 3.3.8 responder, 100 requests byte-exact.
    lossy: the responder reaches the node through the lossy relay, so requests and replies
    are lost and must be retransmitted (by ours and by theirs)."""
    # Fewer exchanges when lossy: a lost request or reply (one at a time, nothing after it
    # reveals the gap) waits for a retransmission timer, about a second.
    exchanges = 30 if lossy else P2P_EXCHANGES
    return await maybe_lossy(ctx, lossy, lambda relay: rust_request(ctx, mls, relay, exchanges))


async def rust_request(ctx, mls, relay, exchanges):
    resp_name = ctx.name("resp")
    via = ["--endpoint", await relay.start()] if relay else []
    ctx.set_step("start the slim-bindings responder")
    resp = await ctx.spawn("responder", NEW, "responder", "--local", resp_name, "--prefix", "reply",
                           *via)
    await resp.ready()
    ctx.set_step(f"slim-tokio request sends {exchanges} requests")
    code, out = await run_rust(ctx, "rust-request", "request", "--endpoint", ctx.endpoint,
                               "--name", ctx.name("rust-init"), "--to", resp_name,
                               "--count", exchanges, "--size", 1000, "--secret", ctx.secret,
                               "--json", *mls_flag(mls))
    lines = [l for l in out.splitlines() if l.startswith("{")]
    if not lines:
        raise CaseFailure(f"slim-tokio request exited {code} without a JSON summary")
    rep = json.loads(lines[-1])
    if code != 0 or rep["received"] != exchanges or rep["mismatched"]:
        raise CaseFailure(f"slim-tokio request exited {code}: {rep}")
    ctx.set_step("responder accounting")
    await resp.wait(lambda: any(e["count"] >= exchanges for e in resp.of("served")),
                    ctx.step, timeout=10)
    served = [e for e in resp.of("session")]
    if served and served[0].get("mls") is not None and served[0]["mls"] != mls:
        raise CaseFailure(f"responder's session has MLS {'on' if served[0]['mls'] else 'off'}")
    lost = ""
    if relay:
        # A request is alone in flight: the responder sees no gap, so a dropped request can only
        # come back by our sender's timer.
        lost = (f"; {relay.require_drops('to node', 'to client')} (responder side), recovered: "
                f"{require_recovery('ours', rep.get('recovery'), 'data_retransmissions')}")
    return (f"rust->3.3.8 {rep['received']}/{exchanges} byte-exact, "
            f"p50 {rep['p50_us']:.0f}us{mls_label(mls)}{lost}")


async def case_rust_reply(ctx, mls=False):
    """slim-bindings 3.3.8 and 2.0.0 initiators -> slim-tokio reply (ours); with MLS only 3.3.8."""
    rust_name = ctx.name("rust-resp")
    ctx.set_step("start slim-tokio reply")
    proc, log = await run_rust(ctx, "rust-reply", "reply", "--endpoint", ctx.endpoint,
                               "--name", rust_name, "--secret", ctx.secret, *mls_flag(mls),
                               wait=False)
    try:
        log_path = os.path.join(ctx.logs, "rust-reply.log")
        while True:
            with open(log_path, "rb") as f:
                if b"ready: answering sessions" in f.read():
                    break
            if proc.returncode is not None:
                raise CaseFailure(f"slim-tokio reply exited {proc.returncode} (log {log_path})")
            if ctx.left() < 1:
                raise CaseFailure("slim-tokio reply did not get ready")
            await asyncio.sleep(0.1)
        results = []
        for version in ((NEW,) if mls else (NEW, OLD)):
            ctx.set_step(f"{version} initiator exchanges {P2P_EXCHANGES} messages with slim-tokio")
            init = await ctx.spawn(f"initiator-{version}", version, "initiator",
                                   "--local", ctx.name(f"init{version.replace('.', '')}"),
                                   "--remote", rust_name, "--expect-prefix", "reply",
                                   "--count", P2P_EXCHANGES, "--max-size", 4096, "--seed", ctx.seed,
                                   *mls_flag(mls))
            await init.ready()
            rep = (await init.event("result", ctx.step))["sessions"][0]
            if rep["errors"] or rep["mismatches"] or rep["ok"] != P2P_EXCHANGES:
                raise CaseFailure(f"{version}->rust: {rep['ok']}/{P2P_EXCHANGES} ok; "
                                  f"errors {rep['errors'][:1]} mismatches {rep['mismatches'][:1]}")
            results.append(f"{version}->rust {rep['ok']}/{P2P_EXCHANGES} byte-exact{mls_label(mls)}")
        return "; ".join(results)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except asyncio.TimeoutError:
                proc.kill()
        log.close()


class RustEvents:
    """JSON lines from a running slim-tokio (`reply --json`), collected as they come."""

    def __init__(self, proc):
        self.proc, self.events = proc, []
        self.task = asyncio.create_task(self._read())

    async def _read(self):
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                return
            if line.startswith(b"{"):
                self.events.append(json.loads(line))

    def of(self, ev):
        return [e for e in self.events if e.get("ev") == ev]

    async def wait(self, ctx, pred, what):
        while not pred():
            if self.proc.returncode is not None:
                await self.task  # what it printed before it exited
                if pred():
                    return
                raise CaseFailure(f"slim-tokio exited {self.proc.returncode} while waiting: {what}")
            if ctx.left() < 1:
                raise CaseFailure(f"timed out: {what}")
            await asyncio.sleep(0.1)


async def stop_rust(proc, log):
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except asyncio.TimeoutError:
            proc.kill()
    log.close()


async def case_rust_group(ctx, mls=False, lossy=False):
    """slim-tokio group (ours) moderates three slim-bindings 3.3.8 members: invite, broadcast,
    remove one, broadcast again; every remaining member gets everything, in order.
    lossy: member1 reaches the node through the lossy relay; it must ask ours for what it
    misses (RTX_REQUEST / RTX_REPLY) and still get everything in order."""
    return await maybe_lossy(ctx, lossy, lambda relay: rust_group(ctx, mls, relay))


async def rust_group(ctx, mls, relay):
    labels = [f"member{i}" for i in range(GROUP_MEMBERS)]
    names = {l: ctx.name(l) for l in labels}
    ctx.set_step("start members")
    via = ["--endpoint", await relay.start()] if relay else []
    members = [await ctx.spawn(l, NEW, "member", "--local", names[l],
                               *(via if l == "member1" else [])) for l in labels]
    for m in members:
        await m.ready()
    ctx.set_step("slim-tokio group: invite, broadcast, remove member0, broadcast")
    invites = [a for l in labels for a in ("--invite", names[l])]
    code, out = await run_rust(ctx, "rust-group", "group", "--endpoint", ctx.endpoint,
                               "--name", ctx.name("rust-mod"), "--channel", ctx.name("chan"),
                               *invites, "--count", GROUP_MSGS, "--remove", names["member0"],
                               "--secret", ctx.secret, "--json", *mls_flag(mls))
    lines = [l for l in out.splitlines() if l.startswith("{")]
    if code != 0 or not lines:
        raise CaseFailure(f"slim-tokio group exited {code}: {lines[-1:] or 'no summary'}")
    rep = json.loads(lines[-1])
    if rep["sent"] != 2 * GROUP_MSGS or rep["delivered"] != rep["sent"] or rep["members"] != GROUP_MEMBERS:
        raise CaseFailure(f"moderator report {rep}")
    ctx.set_step("members' view")
    victim, rest = members[0], members[1:]
    for m in members:
        joined = (await m.event("joined", f"{m.label} joins"))
        if joined.get("mls") is not None and joined["mls"] != mls:
            raise CaseFailure(f"{m.label} joined with MLS {'on' if joined['mls'] else 'off'}")
    await victim.event("session_end", "member0 is told it was removed")

    def seqs(role):
        return [int(e["hex"][:16], 16) for e in role.of("msg")]

    for m in rest:
        await m.wait(lambda m=m: len(m.of("msg")) >= 2 * GROUP_MSGS, f"{m.label} gets both rounds")
        if seqs(m) != list(range(2 * GROUP_MSGS)):
            raise CaseFailure(f"{m.label} got {seqs(m)}, expected 0..{2 * GROUP_MSGS - 1} in order")
    await asyncio.sleep(REMOVED_GRACE_S)
    if seqs(victim) != list(range(GROUP_MSGS)):
        raise CaseFailure(f"removed member got {seqs(victim)}, expected exactly the first round")
    lost = ""
    if relay:
        # member1 (3.3.8) sees the gaps and asks ours, which answers from its send buffer.
        lost = (f"; {relay.require_drops('to client')} (member1), recovered: "
                f"{require_recovery('ours', rep.get('recovery'), 'rtx_requests_received', 'rtx_replies_sent')}")
    return (f"rust moderator: {GROUP_MEMBERS} 3.3.8 members joined, {GROUP_MSGS} broadcast acked by all, "
            f"member0 removed (nothing after), {GROUP_MSGS} more to {len(rest)}{mls_label(mls)}{lost}")


async def case_rust_member(ctx, mls=False, lossy=False):
    """A slim-bindings 3.3.8 moderator invites slim-tokio (ours) and a 3.3.8 member; broadcast and
    fan-in reach ours; then ours is removed and gets nothing more.
    lossy: ours reaches the node through the lossy relay; it must ask theirs for what it
    misses (RTX_REQUEST / RTX_REPLY) and still get the broadcast in order."""
    return await maybe_lossy(ctx, lossy, lambda relay: rust_member(ctx, mls, relay))


async def rust_member(ctx, mls, relay):
    rust_name, other = ctx.name("rust-member"), ctx.name("member")
    ctx.set_step("start slim-tokio reply (member) and a slim-bindings member")
    endpoint = await relay.start() if relay else ctx.endpoint
    proc, log = await run_rust(ctx, "rust-member", "reply", "--endpoint", endpoint,
                               "--name", rust_name, "--secret", ctx.secret, "--json", *mls_flag(mls),
                               wait=False)
    ours = RustEvents(proc)
    try:
        await ours.wait(ctx, lambda: ours.of("ready"), "slim-tokio reply gets ready")
        mem = await ctx.spawn("member", NEW, "member", "--local", other)
        mod = await ctx.spawn("moderator", NEW, "moderator", "--local", ctx.name("moderator"),
                              "--channel", ctx.name("chan"), *mls_flag(mls))
        await mem.ready()
        await mod.ready()
        created = await mod.event("created", "moderator creates the group")
        ctx.set_step("invite ours and theirs")
        mod.send(cmd="invite", names=[rust_name, other])
        await mod.event("done", "moderator invites both", cmd="invite")
        await ours.wait(ctx, lambda: any(e["group"] for e in ours.of("session")), "ours joins the group")
        if ours.of("session")[0]["session"] != created["sid"]:
            raise CaseFailure(f"ours joined session {ours.of('session')[0]['session']}, not {created['sid']}")
        if ours.of("session")[0].get("mls") != mls:
            raise CaseFailure(f"ours joined with MLS {ours.of('session')[0].get('mls')}, expected {mls}")
        ctx.set_step("broadcast and fan-in")
        phase1 = hexes(blobs(ctx, "g1", GROUP_MSGS, 2048))
        mod.send(cmd="publish", hex=phase1)
        fan = hexes(blobs(ctx, "fan", 1, 512))
        mem.send(cmd="publish", hex=fan)
        want = sorted(phase1 + fan)
        await ours.wait(ctx, lambda: len(ours.of("msg")) >= len(want), "ours receives broadcast and fan-in")
        got = [e["hex"] for e in ours.of("msg")]
        if sorted(got) != want:
            raise CaseFailure(f"ours got {len(got)} msgs, not exactly the {len(want)} sent")
        from_mod = [e["hex"] for e in ours.of("msg") if e["source"].startswith(ctx.name("moderator"))]
        if from_mod != phase1:
            raise CaseFailure("the moderator's broadcast reached ours out of order")
        ctx.set_step("remove ours")
        before = len(ours.of("msg"))
        mod.send(cmd="remove", name=rust_name)
        await mod.event("done", "moderator removes ours", cmd="remove")
        await ours.wait(ctx, lambda: any(e["reason"] == "Removed" for e in ours.of("closed")),
                        "ours is told it was removed")
        mod.send(cmd="publish", hex=hexes(blobs(ctx, "g2", 3, 256)))
        await mem.wait(lambda: len(mem.of("msg")) >= GROUP_MSGS + 3, "the other member gets the rest")
        await asyncio.sleep(REMOVED_GRACE_S)
        if len(ours.of("msg")) != before:
            raise CaseFailure(f"ours received {len(ours.of('msg')) - before} msgs after its removal")
        lost = ""
        if relay:
            # Ours sees the gaps and asks the 3.3.8 moderator, which answers.
            await stop_rust(proc, log)
            await ours.task
            stats = ours.of("stats")
            lost = (f"; {relay.require_drops('to client')} (ours), recovered: "
                    f"{require_recovery('ours', stats[-1].get('recovery') if stats else None, 'rtx_requests_sent', 'rtx_replies_received')}")
        return (f"3.3.8 moderator: ours joined, got {GROUP_MSGS} broadcast in order + fan-in, "
                f"removed (nothing after){mls_label(mls)}{lost}")
    finally:
        await stop_rust(proc, log)


class CutProxy:
    """A TCP relay in front of the node that can cut every connection through it and refuse
    new ones for a while: a network partition, so that a client misses what is sent meanwhile
    (the node drops what it cannot deliver) and has to redial.

    While cut it does not listen, so redials get ECONNREFUSED: slim-bindings redials every 2 s
    on that, but abandons a link for good when a TCP connect succeeds and the HTTP/2 handshake
    then fails (captures/mesh, section 5)."""

    def __init__(self, endpoint):
        u = urlparse(endpoint)
        self.target = (u.hostname, u.port)
        self.live = set()
        self.accepted = 0
        self.server = None
        self.port = 0

    async def start(self):
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{self.port}"

    async def _accept(self, reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        pair = (writer, up_writer)
        self.live.add(pair)

        async def pump(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        finally:
            self.live.discard(pair)

    def cut(self):
        self.server.close()
        for writer, up_writer in list(self.live):
            writer.transport.abort()
            up_writer.transport.abort()

    async def heal(self):
        await self.start()

    async def heal_until_redialled(self, ctx, events, who):
        """Heals, then waits (on `events`, a RustEvents) until `who` connected again."""
        accepted = self.accepted
        await self.heal()
        await events.wait(ctx, lambda: self.accepted > accepted, f"{who} redials through the relay")

    async def stop(self):
        self.cut()


async def case_rust_member_rejoin_mls(ctx, soft=False):
    """Ours, a member of an MLS group moderated by slim-bindings 3.3.8, misses the commit that
    adds a member. Back online, it must find its epoch stale and rejoin through the moderator
    (REJOIN_REQUEST / REJOIN_REPLY), then read what the moderator sends at the new epoch.
    soft=False: ours reaches the node through a relay the case cuts meanwhile (flows g2).
    soft=True: ours goes offline (soft close) and comes back; the others NACK its stale
    epoch (flows g3)."""
    proxy = CutProxy(ctx.endpoint)
    via_proxy = await proxy.start()
    rust_name, m0, m2 = ctx.name("rust-member"), ctx.name("member0"), ctx.name("member2")
    ctx.set_step("start slim-tokio reply (member) and two slim-bindings members")
    proc, log = await run_rust(ctx, "rust-member", "reply",
                               "--endpoint", ctx.endpoint if soft else via_proxy,
                               "--name", rust_name, "--secret", ctx.secret, "--json", "--mls",
                               "--presence-on-stdin", wait=False, stdin=True, log_filter="info")
    ours = RustEvents(proc)
    log_path = os.path.join(ctx.logs, "rust-member.log")

    try:
        await ours.wait(ctx, lambda: ours.of("ready"), "slim-tokio reply gets ready")
        first = await ctx.spawn("member0", NEW, "member", "--local", m0)
        late = await ctx.spawn("member2", NEW, "member", "--local", m2)
        mod = await ctx.spawn("moderator", NEW, "moderator", "--local", ctx.name("moderator"),
                              "--channel", ctx.name("chan"), "--mls")
        for role in (first, late, mod):
            await role.ready()
        await mod.event("created", "moderator creates the group")
        ctx.set_step("invite ours and member0")
        mod.send(cmd="invite", names=[rust_name, m0])
        await mod.event("done", "moderator invites both", cmd="invite")
        await ours.wait(ctx, lambda: ours.of("session"), "ours joins the group")
        before = hexes(blobs(ctx, "before", 3, 512))
        mod.send(cmd="publish", hex=before)
        await ours.wait(ctx, lambda: len(ours.of("msg")) >= len(before), "ours gets the first round")

        def presence(online):
            proc.stdin.write(b"online\n" if online else b"offline\n")
            return ours.wait(ctx, lambda: any(e["online"] == online for e in ours.of("presence")),
                             f"ours goes {'online' if online else 'offline'}")

        if soft:
            ctx.set_step("ours goes offline (soft close); the moderator adds member2 meanwhile")
            await presence(False)
        else:
            ctx.set_step("cut ours off; the moderator adds member2 meanwhile")
            proxy.cut()
        mod.send(cmd="invite", names=[m2])
        # A failed invite fails the wait (the role reports it).
        await mod.wait(lambda: len(mod.of("done", cmd="invite")) >= 2,
                       "the moderator invites member2 while ours is away", timeout=60)
        await late.event("joined", "member2 joins")
        if soft:
            # Offline, ours still applies the group's commits (only data is dropped), so it
            # comes back at the current epoch: the members ACK, no rejoin is needed.
            ctx.set_step("ours comes back online at the group's epoch")
            await presence(True)
        else:
            ctx.set_step("heal; ours redials and must rejoin the MLS group")
            await proxy.heal_until_redialled(ctx, ours, "ours")
            await ours.wait(ctx, lambda: logged(log_path, "rejoined the MLS group"),
                            "ours rejoins the MLS group (REJOIN_REQUEST answered by the moderator)")
        ctx.set_step("broadcast at the new epoch")
        after = hexes(blobs(ctx, "after", 5, 512))
        mod.send(cmd="publish", hex=after)
        await ours.wait(ctx, lambda: len(ours.of("msg")) >= len(before) + len(after),
                        "ours reads the broadcast made after its rejoin")
        got = [e["hex"] for e in ours.of("msg")]
        if got[:len(before)] != before or sorted(got[len(before):]) != sorted(after):
            raise CaseFailure(f"ours got {len(got)} msgs, not the {len(before)}+{len(after)} sent")
        for m in (first, late):
            await m.wait(lambda m=m: len(m.of("msg")) >= len(after) + (len(before) if m is first else 0),
                         f"{m.label} gets the broadcast")
        if not all(e["ok"] for e in ours.of("presence")):
            raise CaseFailure(f"a presence change of ours failed: {ours.of('presence')}")
        how = ("went offline (soft close) while member2 joined (applying its commit), came back"
               if soft else "cut off while member2 joined, redialled, rejoined (remove+add commit)")
        return f"3.3.8 moderator: ours {how} and read {len(after)} msgs at the new epoch"
    finally:
        await stop_rust(proc, log)
        await proxy.stop()


async def case_rust_group_rejoin_mls(ctx, soft=False):
    """Ours moderates an MLS group of slim-bindings 3.3.8 members; member1 misses the commit
    that adds member2. Back online, member1 must rejoin through ours (REJOIN_REQUEST /
    REJOIN_REPLY), and the next round must reach every member, member1 included, in order.
    soft=False: member1 reaches the node through a relay the case cuts meanwhile (flows g2).
    soft=True: member1 goes offline with close_with_mode(SOFT) and comes back with rejoin():
    its UPDATE_PARTICIPANT_STATE is NACKed for its stale epoch, then it rejoins (flows g3)."""
    proxy = CutProxy(ctx.endpoint)
    via_proxy = await proxy.start()
    labels = ["member0", "member1", "member2"]
    names = {l: ctx.name(l) for l in labels}
    ctx.set_step("start members (member1 through a cuttable relay)")
    members = {l: await ctx.spawn(l, NEW, "member", "--local", names[l],
                                  *(["--endpoint", via_proxy] if l == "member1" and not soft else []))
               for l in labels}
    for m in members.values():
        await m.ready()
    ctx.set_step("slim-tokio group invites member0 and member1 and broadcasts a round")
    proc, log = await run_rust(ctx, "rust-group", "group", "--endpoint", ctx.endpoint,
                               "--name", ctx.name("rust-mod"), "--channel", ctx.name("chan"),
                               "--invite", names["member0"], "--invite", names["member1"],
                               "--then-invite", names["member2"], "--count", GROUP_MSGS,
                               "--secret", ctx.secret, "--json", "--mls", "--step-on-stdin",
                               wait=False, stdin=True, log_filter="warn,slim_core::session=info")
    ours = RustEvents(proc)
    log_path = os.path.join(ctx.logs, "rust-group.log")

    def go():
        proc.stdin.write(b"go\n")

    def seqs(role):
        return [int(e["hex"][:16], 16) for e in role.of("msg")]

    try:
        await ours.wait(ctx, lambda: ours.of("step"), "ours finishes the first round")
        for l in ("member0", "member1"):
            m = members[l]
            await m.wait(lambda m=m: len(m.of("msg")) >= GROUP_MSGS, f"{l} gets the first round")
        m1 = members["member1"]
        if soft:
            ctx.set_step("member1 goes offline (soft close); ours adds member2 meanwhile")
            m1.send(cmd="soft_close")
            await m1.event("done", "member1's soft close is acknowledged", cmd="soft_close")
        else:
            ctx.set_step("cut member1 off; ours adds member2 meanwhile")
            proxy.cut()
        go()
        await ours.wait(ctx, lambda: len(ours.of("step")) >= 2, "ours invites member2")
        await members["member2"].event("joined", "member2 joins")
        if soft:
            ctx.set_step("member1 comes back (rejoin()) and must rejoin the MLS group through ours")
            m1.send(cmd="rejoin")
            await m1.event("done", "member1's rejoin() completes", cmd="rejoin")
        else:
            ctx.set_step("heal; member1 redials and must rejoin through ours")
            await proxy.heal_until_redialled(ctx, ours, "member1")
        await ours.wait(ctx, lambda: logged(log_path, "a member rejoins the MLS group"),
                        "member1 asks ours to rejoin (REJOIN_REQUEST) and gets its welcome")
        ctx.set_step("a round at the new epoch")
        go()
        await ours.wait(ctx, lambda: any(l.get("sent") is not None for l in ours.events),
                        "ours finishes the second round")
        rep = next(l for l in ours.events if l.get("sent") is not None)
        # members: the moderator and the three members.
        if rep["sent"] != 2 * GROUP_MSGS or rep["delivered"] != rep["sent"] or rep["members"] != 4:
            raise CaseFailure(f"moderator report {rep}")
        for l in ("member0", "member1"):
            m = members[l]
            await m.wait(lambda m=m: len(m.of("msg")) >= 2 * GROUP_MSGS, f"{l} gets both rounds")
            if seqs(m) != list(range(2 * GROUP_MSGS)):
                raise CaseFailure(f"{l} got {seqs(m)}, expected 0..{2 * GROUP_MSGS - 1} in order")
        m2 = members["member2"]
        await m2.wait(lambda: len(m2.of("msg")) >= GROUP_MSGS, "member2 gets the second round")
        if seqs(m2) != list(range(GROUP_MSGS, 2 * GROUP_MSGS)):
            raise CaseFailure(f"member2 got {seqs(m2)}, expected the second round in order")
        how = ("went offline (soft close) while member2 joined, came back" if soft
               else "cut off while member2 joined, redialled")
        return (f"rust moderator: 3.3.8 member1 {how}, rejoined through ours; "
                f"{GROUP_MSGS} more broadcasts acked by all 3, in order")
    finally:
        await stop_rust(proc, log)
        await proxy.stop()


CASE_FUNCS = {"p2p_plain": case_p2p_plain, "p2p_mls": case_p2p_mls,
              "p2p_v200": case_p2p_v200, "group_mls": case_group_mls, "anycast": case_anycast,
              "rust_request": case_rust_request, "rust_reply": case_rust_reply,
              "rust_group": case_rust_group, "rust_member": case_rust_member,
              "rust_request_mls": lambda ctx: case_rust_request(ctx, mls=True),
              "rust_reply_mls": lambda ctx: case_rust_reply(ctx, mls=True),
              "rust_group_mls": lambda ctx: case_rust_group(ctx, mls=True),
              "rust_member_mls": lambda ctx: case_rust_member(ctx, mls=True),
              "rust_request_lossy_mls": lambda ctx: case_rust_request(ctx, mls=True, lossy=True),
              "rust_group_lossy_mls": lambda ctx: case_rust_group(ctx, mls=True, lossy=True),
              "rust_member_lossy_mls": lambda ctx: case_rust_member(ctx, mls=True, lossy=True),
              "rust_member_rejoin_mls": case_rust_member_rejoin_mls,
              "rust_group_rejoin_mls": case_rust_group_rejoin_mls,
              "rust_member_soft_close_mls": lambda ctx: case_rust_member_rejoin_mls(ctx, soft=True),
              "rust_group_soft_rejoin_mls": lambda ctx: case_rust_group_rejoin_mls(ctx, soft=True)}


async def drive(args):
    ctx = Context(args)
    ok, detail = False, "?"
    try:
        preflight(args.endpoint)
        detail = await asyncio.wait_for(CASE_FUNCS[args.name](ctx), ctx.left())
        ok = True
    except CaseFailure as e:
        detail = str(e)
    except asyncio.TimeoutError:
        detail = f"case time budget exhausted during: {ctx.step}"
    except Exception as e:  # a bug in the suite itself still fails the case
        import traceback
        traceback.print_exc()
        detail = f"driver error in step '{ctx.step}': {type(e).__name__}: {e}"
    finally:
        await ctx.stop_all()
    ctx.note(("PASS " if ok else "FAIL ") + detail)
    with open(os.path.join(ctx.logs, "result.json"), "w") as f:
        json.dump({"ok": ok, "detail": detail}, f)
    return 0 if ok else 1


# =============================================================== runner ==

def kill_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_case(args, name):
    case_logs = os.path.join(args.logs, name)
    os.makedirs(case_logs, exist_ok=True)
    result_path = os.path.join(case_logs, "result.json")
    if os.path.exists(result_path):
        os.unlink(result_path)
    cmd = [sys.executable, os.path.realpath(__file__), "case", name,
           "--endpoint", args.endpoint, "--logs", args.logs, "--timeout", str(args.timeout)]
    for version, python in args.py:
        cmd += ["--py", f"{version}={python}"]
    t0 = time.monotonic()
    timed_out = False
    with open(os.path.join(case_logs, "driver.log"), "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # own process group: killable as a whole
        try:
            proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                pass
        kill_group(proc.pid, signal.SIGKILL)  # whatever of this case is still alive
        proc.wait()
    elapsed = time.monotonic() - t0
    try:
        with open(result_path) as f:
            res = json.load(f)
        ok, detail = bool(res["ok"]), str(res["detail"])
    except (OSError, ValueError, KeyError):
        ok = False
        detail = (f"timed out after {args.timeout:g}s, process group killed"
                  if timed_out else f"driver exited rc={proc.returncode} without a result")
        detail += f" (see {case_logs}/driver.log)"
    if ok and proc.returncode != 0:
        ok, detail = False, f"driver rc={proc.returncode} despite result: {detail}"
    return ok, elapsed, detail


def run_all(args):
    selected = CASES
    if args.only:
        wanted = [c.strip() for c in ",".join(args.only).split(",") if c.strip()]
        unknown = [c for c in wanted if c not in CASES]
        selected = [c for c in CASES if c in wanted]
        if unknown or not selected:
            print(f"run: unknown case(s) {unknown}; cases: {' '.join(CASES)}", file=sys.stderr)
            return 2
    os.makedirs(args.logs, exist_ok=True)
    print(f"interop: endpoint {args.endpoint}, logs {args.logs}", flush=True)
    passed = failed = 0
    for name in selected:
        ok, elapsed, detail = run_case(args, name)
        detail = " ".join(detail.split())[:400]
        print(f"{'PASS' if ok else 'FAIL'} {name} {elapsed:.1f}s {detail}", flush=True)
        passed += ok
        failed += not ok
    print(f"interop: {passed} passed, {failed} failed", flush=True)
    return 0 if failed == 0 else 1


def py_pair(text):
    version, sep, python = text.partition("=")
    if not sep or not python:
        raise argparse.ArgumentTypeError("expected VERSION=PYTHON")
    return version, python


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    for mode in ("run", "case"):
        p = sub.add_parser(mode)
        if mode == "case":
            p.add_argument("name", choices=CASES)
        else:
            p.add_argument("--only", action="append", default=[])
        p.add_argument("--endpoint", required=True)
        p.add_argument("--py", type=py_pair, action="append", required=True)
        p.add_argument("--logs", required=True)
        p.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()
    if args.mode == "run":
        sys.exit(run_all(args))
    sys.exit(asyncio.run(drive(args)))


if __name__ == "__main__":
    main()

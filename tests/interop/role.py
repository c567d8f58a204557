#!/usr/bin/env python3
"""One SLIM client role, run as its own OS process by driver.py.

    <venv>/bin/python role.py ROLE --endpoint URL [role options]

The interpreter decides the slim-bindings version (one venv per version), so
roles of different versions can talk to each other through the node.

Protocol with the driver (both directions: one JSON object per line):
  * events   role -> driver on the ORIGINAL stdout.  Before slim_bindings is
             imported, fd 1 is re-pointed at stderr, so whatever the native
             library prints ends up in the role's log file, never in the
             event stream.
  * commands driver -> role on stdin (moderator / member only).
Binary payloads travel hex-encoded.  The shared secret comes from the
environment variable SLIM_ITEST_SECRET.

Roles:
  responder  accept any number of inbound point-to-point sessions; answer
             every message with PREFIX + b"|" + message on the same session.
  initiator  open --sessions point-to-point sessions to --remote and run
             --count request/reply exchanges on each (sessions run
             concurrently); verify every reply; report one "result" event.
  moderator  create a GROUP session on --channel; obey invite / publish /
             remove commands; report every message it receives.
  member     accept one inbound GROUP session; report every message; obey
             publish commands; report when the session ends.
"""

import argparse
import asyncio
import datetime
import json
import os
import random
import sys
import threading
import time
import traceback

sys.dont_write_bytecode = True

# --- keep the event channel clean: native stdout output goes to stderr ----
_EVENT_FD = os.dup(1)
os.dup2(2, 1)
_events = os.fdopen(_EVENT_FD, "w", buffering=1)
_emit_lock = threading.Lock()


def emit(ev: str, **fields) -> None:
    fields["ev"] = ev
    fields["t"] = round(time.time(), 3)
    line = json.dumps(fields, separators=(",", ":"))
    with _emit_lock:
        _events.write(line + "\n")
        _events.flush()


try:
    import slim_bindings as sb
except Exception as e:  # reported to the driver, which fails the case
    emit("error", where="import", msg=f"cannot import slim_bindings with {sys.executable}: {e!r}")
    os._exit(3)

CONNECT_TIMEOUT_S = float(os.environ.get("SLIM_ITEST_CONNECT_TIMEOUT", "20"))
FOREVER = datetime.timedelta(hours=1)


def td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def pkg_version() -> str:
    try:
        from importlib.metadata import version

        return version("slim-bindings")
    except Exception:
        return "?"


def parse_name(text: str):
    parts = text.split("/")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"name must be org/ns/svc, got {text!r}")
    return sb.Name(*parts)


def show_name(name) -> str:
    try:
        return "/".join(str(c) for c in name.components()[:3])
    except Exception:
        return str(name)


def is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, asyncio.TimeoutError) or "timeout" in text or "timed out" in text


def mls_on(session) -> bool:
    """Whether the session (as the local library sees it) runs MLS."""
    return session.config().mls_settings is not None


def session_config(group: bool, mls: bool):
    mls_settings = None
    if mls:
        mls_settings = sb.MlsSettings(header_integrity_validation_percent=100,
                                      max_seen_control_message_ids_size=None)
    return sb.SessionConfig(
        session_type=sb.SessionType.GROUP if group else sb.SessionType.POINT_TO_POINT,
        max_retries=5,
        interval=td(1.0),
        metadata={},
        mls_settings=mls_settings,
    )


async def wait_done(handle, timeout_s: float, what: str) -> None:
    if handle is None:
        return
    try:
        await asyncio.wait_for(handle.wait_async(), timeout_s)
    except asyncio.TimeoutError:
        raise RuntimeError(f"{what}: no completion within {timeout_s:g}s") from None


def background(coro, what: str) -> asyncio.Task:
    """Run coro as a task; if it dies with an exception, report it as an error event."""
    def done(task):
        if not task.cancelled() and task.exception() is not None:
            e = task.exception()
            emit("error", where=what, msg=f"{type(e).__name__}: {e}"[:300])
    task = asyncio.create_task(coro)
    task.add_done_callback(done)
    return task


class Client:
    """One app with a shared-secret identity, connected to the node."""

    def __init__(self, args):
        self.args = args
        self.app = None
        self.conn = None

    async def start(self, local: str, subscribe: bool = True) -> None:
        tracing = sb.new_tracing_config()
        tracing.log_level = os.environ.get("SLIM_LOG", "warn")
        sb.initialize_with_configs(runtime_config=sb.new_runtime_config(),
                                   tracing_config=tracing,
                                   service_config=[sb.new_service_config()])
        service = sb.get_global_service()
        config = sb.new_insecure_client_config(self.args.endpoint)
        try:
            self.conn = await asyncio.wait_for(service.connect_async(config), CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RuntimeError(f"could not connect to {self.args.endpoint} within "
                               f"{CONNECT_TIMEOUT_S:g}s") from None
        self.app = service.create_app_with_secret(parse_name(local), os.environ["SLIM_ITEST_SECRET"])
        if subscribe:
            await asyncio.wait_for(self.app.subscribe_async(parse_name(local), self.conn), 30)
        emit("ready", role=self.args.role, local=local, app_id=str(self.app.id()),
             pkg=pkg_version(), core=sb.get_version(), pid=os.getpid())

    async def route(self, remote: str) -> None:
        await self.app.set_route_async(parse_name(remote), self.conn)


class Commands:
    """Driver commands arriving on stdin, read by a thread into an asyncio queue."""

    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, args=(loop,), daemon=True).start()

    def _read(self, loop) -> None:
        for line in sys.stdin:
            line = line.strip()
            if line:
                loop.call_soon_threadsafe(self.queue.put_nowait, json.loads(line))
        loop.call_soon_threadsafe(self.queue.put_nowait, {"cmd": "exit"})

    async def next(self) -> dict:
        return await self.queue.get()


# ------------------------------------------------------------- responder --

async def responder(args) -> None:
    client = Client(args)
    await client.start(args.local)
    prefix = args.prefix.encode() + b"|"

    async def serve(session) -> None:
        sid = session.session_id()
        count, nbytes = 0, 0
        while True:
            try:
                msg = await session.get_message_async(FOREVER)
            except Exception as e:
                if is_timeout(e):
                    continue
                emit("session_end", sid=sid, count=count, bytes=nbytes, why=str(e)[:200])
                return
            count += 1
            nbytes += len(msg.payload)
            await session.publish_async(prefix + msg.payload, None, None)
            emit("served", sid=sid, count=count, bytes=nbytes)

    tasks = set()
    while True:
        session = await client.app.listen_for_session_async(None)
        emit("session", sid=session.session_id(), remote=show_name(session.destination()),
             mls=mls_on(session))
        task = background(serve(session), f"responder session {session.session_id()}")
        tasks.add(task)
        task.add_done_callback(tasks.discard)


# ------------------------------------------------------------- initiator --

def make_requests(seed: int, count: int, max_size: int) -> list:
    """Requests of varied sizes (always including 0, 1 and max_size) with
    arbitrary binary content (every byte value, NULs, 0xFF, ...)."""
    rng = random.Random(seed)
    fixed = [0, 1, 2, max_size, max_size - 1, 255, 256, 1024]
    sizes = [s for s in fixed if 0 <= s <= max_size][:count]
    while len(sizes) < count:
        sizes.append(rng.randint(0, max_size))
    rng.shuffle(sizes)
    out = []
    for i, size in enumerate(sizes):
        kind = i % 4
        if kind == 0:
            body = rng.randbytes(size)
        elif kind == 1:
            body = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
        elif kind == 2:
            body = b"\x00" * size
        else:
            body = (b"|\xff\x00reply|\r\n" * (size // 10 + 1))[:size]
        out.append(body)
    return out


async def initiator(args) -> None:
    client = Client(args)
    await client.start(args.local)
    await client.route(args.remote)
    want = args.expect_prefix.encode() + b"|" if args.expect_prefix else None

    sessions = []
    for k in range(args.sessions):
        t0 = time.monotonic()
        created = await client.app.create_session_async(session_config(False, args.mls),
                                                        parse_name(args.remote))
        await wait_done(created.completion, args.step_timeout, f"session {k} setup")
        sessions.append(created.session)
        emit("session", k=k, sid=created.session.session_id(), mls=mls_on(created.session),
             setup_ms=round((time.monotonic() - t0) * 1e3, 1))

    async def exchange(k: int, session) -> dict:
        requests = make_requests(args.seed * 1000 + k, args.count, args.max_size)
        rep = dict(k=k, sid=session.session_id(), ok=0, sent_bytes=0, prefixes=[],
                   mismatches=[], errors=[])
        for i, req in enumerate(requests):
            try:
                await session.publish_async(req, None, None)
                rep["sent_bytes"] += len(req)
                msg = await session.get_message_async(td(args.step_timeout))
            except Exception as e:  # later replies could no longer be matched: stop here
                rep["errors"].append(f"#{i} ({len(req)} B): {type(e).__name__}: {e}"[:200])
                break
            reply = msg.payload
            head, sep, _ = reply.partition(b"|")
            label = head.decode(errors="replace") if sep else None
            if label not in rep["prefixes"]:
                rep["prefixes"].append(label)
            expected_head = want if want is not None else (head + b"|" if sep else None)
            if expected_head is not None and reply == expected_head + req:
                rep["ok"] += 1
            else:
                rep["mismatches"].append(dict(i=i, req_len=len(req), reply_len=len(reply),
                                              reply_head=reply[:24].hex()))
        return rep

    reports = await asyncio.gather(*(exchange(k, s) for k, s in enumerate(sessions)))
    for session in sessions:
        try:
            await wait_done(await client.app.delete_session_async(session), 10, "delete session")
        except Exception as e:  # not an assertion of this suite
            emit("note", msg=f"delete_session: {e}"[:200])
    emit("result", sessions=reports)


# ------------------------------------------------------------- moderator --

async def moderator(args) -> None:
    client = Client(args)
    await client.start(args.local)
    commands = Commands()
    t0 = time.monotonic()
    created = await client.app.create_session_async(session_config(True, args.mls),
                                                    parse_name(args.channel))
    await wait_done(created.completion, args.step_timeout, "group session creation")
    session = created.session
    emit("created", sid=session.session_id(), mls=mls_on(session),
         ms=round((time.monotonic() - t0) * 1e3, 1))

    async def receive() -> None:
        while True:
            try:
                msg = await session.get_message_async(FOREVER)
            except Exception as e:
                if is_timeout(e):
                    continue
                emit("session_end", why=str(e)[:200])
                return
            emit("msg", hex=msg.payload.hex(), src=show_name(msg.context.source_name))

    receiver = background(receive(), f"{args.role} receiver")
    while True:
        cmd = await commands.next()
        op = cmd["cmd"]
        if op == "exit":
            receiver.cancel()
            return
        try:
            if op == "invite":
                for member in cmd["names"]:
                    await client.route(member)
                    handle = await session.invite_async(parse_name(member))
                    await wait_done(handle, args.step_timeout, f"invite {member}")
                    emit("invited", name=member)
            elif op == "publish":
                for payload in cmd["hex"]:
                    await session.publish_async(bytes.fromhex(payload), None, None)
            elif op == "remove":
                handle = await session.remove_async(parse_name(cmd["name"]))
                await wait_done(handle, args.step_timeout, f"remove {cmd['name']}")
            else:
                raise ValueError(f"unknown command {op!r}")
            emit("done", cmd=op)
        except Exception as e:
            emit("failed", cmd=op, msg=str(e)[:300])


# ---------------------------------------------------------------- member --

async def member(args) -> None:
    client = Client(args)
    await client.start(args.local)
    commands = Commands()
    state = {"session": None}

    async def receive() -> None:
        while True:
            session = await client.app.listen_for_session_async(None)
            state["session"] = session
            emit("joined", sid=session.session_id(), channel=show_name(session.destination()),
                 mls=mls_on(session))
            while True:
                try:
                    msg = await session.get_message_async(FOREVER)
                except Exception as e:
                    if is_timeout(e):
                        continue
                    state["session"] = None
                    emit("session_end", why=str(e)[:200])
                    break  # keep listening: anything delivered later must be reported
                emit("msg", hex=msg.payload.hex(), src=show_name(msg.context.source_name))

    receiver = background(receive(), f"{args.role} receiver")
    while True:
        cmd = await commands.next()
        op = cmd["cmd"]
        if op == "exit":
            receiver.cancel()
            return
        try:
            if op == "publish":
                if state["session"] is None:
                    raise RuntimeError("no group session")
                for payload in cmd["hex"]:
                    await state["session"].publish_async(bytes.fromhex(payload), None, None)
            elif op == "soft_close":
                # Goes offline in the group (UPDATE_PARTICIPANT_STATE), keeping the session.
                state["offline"] = state["session"]
                handle = await state["session"].close_with_mode_async(sb.CloseMode.SOFT)
                await wait_done(handle, args.step_timeout, "soft close")
            elif op == "rejoin":
                # Back online; with a stale MLS epoch the others NACK and it rejoins.
                handle = await state["offline"].rejoin_async()
                await wait_done(handle, args.step_timeout, "rejoin")
            else:
                raise ValueError(f"unknown command {op!r}")
            emit("done", cmd=op)
        except Exception as e:
            emit("failed", cmd=op, msg=str(e)[:300])


# ------------------------------------------------------------------ main --

ROLES = {"responder": responder, "initiator": initiator, "moderator": moderator, "member": member}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("role", choices=sorted(ROLES))
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--local", required=True, help="own name org/ns/svc")
    ap.add_argument("--remote", help="initiator: org/ns/svc of the responder(s)")
    ap.add_argument("--channel", help="moderator: org/ns/svc of the group channel")
    ap.add_argument("--prefix", default="reply", help="responder: reply label")
    ap.add_argument("--expect-prefix", default="",
                    help="initiator: required reply label ('' = any label, but one per session)")
    ap.add_argument("--mls", action="store_true")
    ap.add_argument("--sessions", type=int, default=1)
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--max-size", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--step-timeout", type=float, default=30.0)
    args = ap.parse_args()
    if "SLIM_ITEST_SECRET" not in os.environ:
        ap.error("SLIM_ITEST_SECRET is not set")
    rc = 0
    try:
        asyncio.run(ROLES[args.role](args))
    except Exception as e:
        traceback.print_exc()
        text = " ".join(str(e).replace("\\n", " ").split())
        emit("error", where=args.role, msg=f"{type(e).__name__}: {text}"[:300])
        rc = 1
    sys.stderr.flush()
    os._exit(rc)  # do not wait for the native runtime's threads


if __name__ == "__main__":
    main()

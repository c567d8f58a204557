#!/usr/bin/env python3
"""Runs the reference SLIM node: the data-plane server built into the published slim-bindings
wheel, plaintext HTTP/2 on 127.0.0.1:PORT. Prints `ready <port>` once the port accepts
connections and runs until SIGTERM/SIGINT.

    python refnode.py --port 46500        (with the venv's python that has slim-bindings)
"""

import argparse
import asyncio
import os
import signal
import socket
import sys

sys.dont_write_bytecode = True


async def serve(port: int) -> None:
    import slim_bindings as sb

    tracing = sb.new_tracing_config()
    tracing.log_level = os.environ.get("SLIM_LOG", "warn")
    sb.initialize_with_configs(runtime_config=sb.new_runtime_config(), tracing_config=tracing,
                               service_config=[sb.new_service_config()])
    service = sb.get_global_service()
    await service.run_server_async(sb.new_insecure_server_config(f"127.0.0.1:{port}"))
    for _ in range(100):  # the call returns once the listener task is spawned
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            await asyncio.sleep(0.1)
    else:
        raise SystemExit(f"refnode: nothing listens on 127.0.0.1:{port}")
    print(f"ready {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    asyncio.run(serve(args.port))
    os._exit(0)  # the library's native threads would keep the process alive


if __name__ == "__main__":
    main()

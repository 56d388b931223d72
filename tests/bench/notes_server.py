"""The notes example under benchmark, in a process of its own.

``python -m tests.bench.notes_server --authsvc HOST:PORT --org ORG_ID [--mode watch|online]``
with ``AUTHSVC_API_KEY`` set (watch mode). One process, one event loop, one
``NoteStore``, two ``grpc.aio`` servers built by ``examples.notes.service``:

* **protected**: the sidecar's ``AuthInterceptor`` in front, handlers reading
  ``current_session()``: the service as it is meant to run;
* **plain**: no interceptor; the handlers get a fixed session in ``ORG_ID``
  (what a service that trusted its callers would do). Same handlers, same
  store, same process: the difference between the two is the sidecar.
* **passthrough**: as plain, behind a ``grpc.aio.ServerInterceptor`` that
  only calls its continuation: what grpc.aio charges for having any server
  interceptor, so that the sidecar's own share can be told apart.

The sidecar starts with ``gap_margin=0``: only tokens issued before its
revocation stream answered are checked online (the orchestrator mints the
benchmark's tokens after that), so the protected server verifies locally.

Prints one JSON line ``{"protected_port", "plain_port", "passthrough_port",
"pid"}`` once they serve, then runs until SIGTERM/SIGINT or until stdin (the lifeline) closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from authsvc_client.sidecar import Sidecar
from authsvc_client.v1 import resources_pb2
from examples.notes.service import NoteStore, build_server


class Passthrough(grpc.aio.ServerInterceptor):
    """Does nothing: the cost of the interceptor machinery alone."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        return await continuation(handler_call_details)


async def _serve(args: argparse.Namespace) -> None:
    sidecar = Sidecar(
        args.authsvc,
        api_key=os.environ.get("AUTHSVC_API_KEY"),
        mode="online" if args.mode == "online" else "watch",
        online_cache_ttl=args.online_cache_ttl,
        gap_margin=0.0,
    )
    await sidecar.start()
    store = NoteStore()
    fixed = resources_pb2.SessionInfo(
        session_id=str(uuid.uuid4()),
        user_id=str(uuid.uuid4()),
        role=resources_pb2.ROLE_USER,
        org_id=args.org,
        org_role=resources_pb2.ORG_ROLE_MEMBER,
    )
    protected, protected_port = build_server(store, sidecar=sidecar)
    plain, plain_port = build_server(store, sidecar=None, session=lambda: fixed)
    passthrough, passthrough_port = build_server(
        store, sidecar=None, session=lambda: fixed, interceptors=[Passthrough()]
    )
    servers = (protected, plain, passthrough)
    for server in servers:
        await server.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def on_lifeline() -> None:
        try:
            data = os.read(0, 4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(0)
            stop.set()

    loop.add_reader(0, on_lifeline)
    ready = {
        "protected_port": protected_port,
        "plain_port": plain_port,
        "passthrough_port": passthrough_port,
        "pid": os.getpid(),
    }
    print(json.dumps(ready), flush=True)
    await stop.wait()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*(server.stop(1.0) for server in servers))
        await sidecar.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.notes_server")
    parser.add_argument("--authsvc", required=True, help="authsvc's host:port")
    parser.add_argument("--org", required=True, help="the plain server's fixed org")
    parser.add_argument("--mode", choices=["watch", "online"], default="watch")
    parser.add_argument("--online-cache-ttl", type=float, default=2.0)
    args = parser.parse_args(argv)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

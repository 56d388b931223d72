"""The authsvc server under benchmark, in a process of its own.

``python -m tests.bench.server --log-file PATH``, configured like production
through ``AUTHSVC_*`` (the orchestrator sets them). It is ``build_server``
unchanged, plus one bare RPC registered through its ``extra`` hook:
``/bench.Echo/Echo``, a generic unary handler with identity (bytes)
(de)serializers that returns its request. Being on the same server, echo
passes through the same ``EdgeInterceptor`` (request id, access log) as every
authsvc call, so "echo" is the floor of what any RPC costs here.

Prints one JSON line ``{"port": ..., "pid": ...}`` on stdout once it serves
(and the event bus is healthy, so the Authenticate cache is in use), then runs
until SIGTERM/SIGINT or until stdin (the orchestrator's lifeline) closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from typing import Any

import grpc

from authsvc import logs
from authsvc.app import build_server
from authsvc.config import Settings

from .common import ECHO_SERVICE


def _identity(data: bytes) -> bytes:
    return data


async def _echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return request


def register_echo(server: grpc.aio.Server) -> None:
    """The ``extra`` hook of ``build_server``: adds ``/bench.Echo/Echo``."""
    handler = grpc.method_handlers_generic_handler(
        ECHO_SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(
                _echo, request_deserializer=_identity, response_serializer=_identity
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))


async def _serve(settings: Settings) -> None:
    server = await build_server(settings, extra=register_echo)
    await server.start()
    # The Authenticate cache is only honoured while the event bus is healthy
    # (its follower has read the stream recently); wait for that, so warmed
    # tokens really are served from the cache.
    deadline = time.monotonic() + 30
    while not server.core.bus.healthy():
        if time.monotonic() > deadline:
            raise RuntimeError("the event bus did not become healthy within 30 s")
        await asyncio.sleep(0.05)

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
    print(json.dumps({"port": server.port, "pid": os.getpid()}), flush=True)
    await stop.wait()
    with contextlib.suppress(asyncio.CancelledError):
        await server.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.server")
    parser.add_argument("--log-file", required=True, help="where the JSON logs go")
    args = parser.parse_args(argv)
    settings = Settings()
    with open(args.log_file, "a") as stream:
        logs.configure(settings.log_format, settings.log_level, stream)
        asyncio.run(_serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())

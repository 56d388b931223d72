"""The sidecar benchmark's load generator: its own process, asyncio + grpc.aio.

``python -m tests.bench.sidecar_loadgen CONFIG.json OUT.json`` (the
orchestrator, ``tests.bench.sidecar``, writes the config). Steps:

1. create ``notes`` notes through the protected server (CreateNote with the
   benchmark's tokens), and check that one GetNote answers on each server;
2. for each concurrency, "plain" (no interceptor), "passthrough" (an
   interceptor that does nothing) and "sidecar" GetNote share the measured
   time in ``rounds`` interleaved windows each (ABC CBA ...): each window
   opens ``channels`` channels, each its own TCP connection
   (``grpc.use_local_subchannel_pool``), and runs N coroutines that loop one
   call at a time, as ``loadgen.py`` does.

Worker i always sends the same request bytes (GetNote of note i mod notes)
with the same ``authorization`` metadata (token i mod tokens), to both
servers: the bytes on the wire are identical; only the server's work differs.
Stdin is the orchestrator's lifeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from examples.notes import notes_pb2

from .common import exit_on_eof
from .loadgen import (
    CHANNEL_OPTIONS,
    MAX_EXTRA_WARMUP,
    CpuMeter,
    Window,
    _worker,
    log,
    summarize,
)

SERVICE = "/" + notes_pb2.DESCRIPTOR.services_by_name["Notes"].full_name
GET_NOTE = f"{SERVICE}/GetNote"
CREATE_NOTE = f"{SERVICE}/CreateNote"


def _md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def create_notes(target: str, org: str, tokens: list[str], count: int) -> list[str]:
    """``count`` notes in ``org``, written by the benchmark's users in turn."""
    async with grpc.aio.insecure_channel(target) as channel:
        create = channel.unary_unary(
            CREATE_NOTE,
            request_serializer=notes_pb2.CreateNoteRequest.SerializeToString,
            response_deserializer=notes_pb2.CreateNoteResponse.FromString,
        )
        ids = []
        for i in range(count):
            request = notes_pb2.CreateNoteRequest(org_id=org, title=f"note {i}", body="x" * 200)
            response = await create(request, metadata=_md(tokens[i % len(tokens)]))
            ids.append(response.note.id)
        return ids


async def check(target: str, payload: bytes, token: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        get: Any = channel.unary_unary(GET_NOTE)
        reply = await get(payload, metadata=_md(token), timeout=10)
        if not notes_pb2.GetNoteResponse.FromString(reply).note.id:
            raise RuntimeError(f"GetNote on {target} returned no note")


async def run_window(
    *,
    name: str,
    target: str,
    concurrency: int,
    requests: list[tuple[bytes, tuple[tuple[str, str], ...]]],
    cfg: dict[str, Any],
    meter: CpuMeter,
    duration: float,
) -> dict[str, Any]:
    """One measured window; worker i sends ``requests[i % len]`` over and over."""
    channels = [
        grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(cfg["channels"])
    ]
    try:
        await asyncio.gather(*(asyncio.wait_for(ch.channel_ready(), 10) for ch in channels))
        calls: list[Any] = [ch.unary_unary(GET_NOTE) for ch in channels]  # bytes in and out
        w = Window(waiting=concurrency)
        tasks = []
        for i in range(concurrency):
            payload, metadata = requests[i % len(requests)]
            call = functools.partial(calls[i % len(calls)], metadata=metadata)
            pick: Callable[[], bytes | None] = functools.partial(lambda p: p, payload)
            tasks.append(asyncio.create_task(_worker(call, pick, w)))
        await asyncio.sleep(cfg["warmup"])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(w.all_answered.wait(), MAX_EXTRA_WARMUP)
        cpu0 = meter.snapshot()
        w.start = time.perf_counter()
        await asyncio.sleep(duration)
        w.end = time.perf_counter()
        cpu1 = meter.snapshot()
        w.stop = True
        await asyncio.gather(*tasks)
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))
    return {
        "phase": name,
        "concurrency": concurrency,
        "seconds": w.end - w.start,
        "latencies": w.latencies,
        "errors": w.errors,
        "exhausted": False,
        "cpu_s": CpuMeter.delta(cpu0, cpu1),
    }


async def main_async(cfg: dict[str, Any]) -> dict[str, Any]:
    meter = CpuMeter({k: int(v) for k, v in cfg["pids"].items()})
    tokens: list[str] = cfg["tokens"]
    org: str = cfg["org"]
    started = time.perf_counter()
    note_ids = await create_notes(cfg["protected"], org, tokens, cfg["notes"])
    requests = [
        (
            notes_pb2.GetNoteRequest(
                org_id=org, note_id=note_ids[i % len(note_ids)]
            ).SerializeToString(),
            _md(tokens[i % len(tokens)]),
        )
        for i in range(max(len(tokens), len(note_ids)))
    ]
    for target in (cfg["protected"], cfg["plain"], cfg["passthrough"]):
        await check(target, requests[0][0], tokens[0])
    took = time.perf_counter() - started
    log(f"{len(note_ids)} notes created, both servers answer ({took:.1f} s)")

    phases = []
    rounds: int = cfg["rounds"]
    for c in cfg["concurrencies"]:
        trio = [
            (f"plain@{c}", cfg["plain"]),
            (f"passthrough@{c}", cfg["passthrough"]),
            (f"sidecar@{c}", cfg["protected"]),
        ]
        slices: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in trio}
        for r in range(rounds):
            for name, target in trio if r % 2 == 0 else trio[::-1]:
                slices[name].append(
                    await run_window(
                        name=name,
                        target=target,
                        concurrency=c,
                        requests=requests,
                        cfg=cfg,
                        meter=meter,
                        duration=cfg["duration"] / rounds,
                    )
                )
        phases += [summarize(slices[name]) for name, _ in trio]
    return {"phases": phases}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m tests.bench.sidecar_loadgen CONFIG.json OUT.json", file=sys.stderr)
        return 2
    exit_on_eof(0)
    cfg = json.loads(Path(args[0]).read_text())
    results = asyncio.run(main_async(cfg))
    Path(args[1]).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

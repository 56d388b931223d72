"""The load generator: its own process, asyncio + grpc.aio, loopback only.

``python -m tests.bench.loadgen CONFIG.json OUT.json`` (the orchestrator writes
the config). Steps:

1. prepare: ``sessions`` accounts through SignUp (each gives a session and an
   access token); sanity-check one Authenticate and one echo;
2. mint the cold tokens (fresh access tokens for those sessions, signed with
   the server's active key, never sent before) through ``build_core`` on the
   same database and secret;
3. run the phases. A phase opens ``channels`` channels, each with
   ``grpc.use_local_subchannel_pool`` so each has its own TCP connection,
   starts N coroutines that loop one call at a time, warms up (``warmup``
   seconds, and until every coroutine has had an answer), then measures:
   completions in the window, their latencies, errors, and the CPU seconds of
   this process, of the server, of PostgreSQL/Redis and of the rest of the
   machine over exactly that window. For each concurrency, echo and
   Authenticate(hot) share their measured time in ``rounds`` interleaved
   windows (ABBA for 2), then Authenticate(cold) runs; then SignInWithPassword
   at each concurrency;
4. "argon2 alone": argon2-cffi verify in a pool of ``os.cpu_count()`` threads,
   before, between and after the sign-in phases.

Requests are serialized once up front and sent as bytes (responses are not
parsed in the loop), so every RPC costs the client the same and differences
between phases are the server's. Stdin is the orchestrator's lifeline.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import argon2
import grpc
import psutil  # type: ignore[import-untyped]

from authsvc.app import build_core
from authsvc.config import Settings
from authsvc.domain.models import Role
from authsvc.security.jwt_tokens import AccessClaims, AccessTokenCodec
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc

from .common import (
    ARGON2_MEMORY_KIB,
    ARGON2_PARALLELISM,
    ARGON2_TIME_COST,
    ECHO_METHOD,
    exit_on_eof,
)

_AUTH = "/" + auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
AUTHENTICATE = f"{_AUTH}/Authenticate"
SIGN_IN = f"{_AUTH}/SignInWithPassword"
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
CALL_TIMEOUT = 60.0
PASSWORD = "bench-password-0123456789"
MAX_EXTRA_WARMUP = 15.0


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- CPU


OURS = "_ours"  # a snapshot's total of the benchmark's own processes


class CpuMeter:
    """CPU seconds (user + system, all threads) of this process and the others.

    ``pids`` are the server (alone) and PostgreSQL/Redis (each with its
    children: the postmaster's backends). A child that exits between two
    snapshots still counts: its time moves into its parent's ``children_*``
    times, which are included. ``machine`` is the whole machine's busy time;
    ``others`` (in ``delta``) is what processes outside the benchmark used.
    """

    def __init__(self, pids: dict[str, int]) -> None:
        self._me = psutil.Process()
        self._procs = {name: psutil.Process(pid) for name, pid in pids.items()}

    @staticmethod
    def _cpu(proc: psutil.Process) -> float:
        total = 0.0
        procs = [proc]
        with contextlib.suppress(psutil.Error):
            procs += proc.children(recursive=True)
        for p in procs:
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system + t.children_user + t.children_system
        return total

    def snapshot(self) -> dict[str, float]:
        me = self._me.cpu_times()
        out = {"client": me.user + me.system}
        ours = out["client"]
        seen: set[int] = set()
        for name, proc in self._procs.items():
            out[name] = self._cpu(proc)
            if proc.pid not in seen:  # two names for one process count once
                seen.add(proc.pid)
                ours += out[name]
        out[OURS] = ours
        machine = psutil.cpu_times()
        out["machine"] = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
        return out

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        out = {k: round(after[k] - before[k], 3) for k in before}
        out["others"] = round(max(0.0, out["machine"] - out.pop(OURS)), 3)
        return out


# --------------------------------------------------------------------------- phases


@dataclass
class Window:
    start: float = math.inf
    end: float = math.inf
    stop: bool = False
    exhausted: asyncio.Event = field(default_factory=asyncio.Event)
    all_answered: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: int = 0  # workers that have not completed a call yet
    latencies: list[float] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)


Call = Callable[..., Awaitable[bytes]]
Picker = Callable[[], bytes | None]


async def _worker(call: Call, pick: Picker, w: Window) -> None:
    perf = time.perf_counter
    lat = w.latencies
    first = True
    while not w.stop:
        request = pick()
        if request is None:
            w.exhausted.set()
            return
        t0 = perf()
        try:
            await call(request, timeout=CALL_TIMEOUT)
            error = None
        except grpc.aio.AioRpcError as rpc_error:
            error = rpc_error.code().name
        t1 = perf()
        if first:
            first = False
            w.waiting -= 1
            if w.waiting == 0:
                w.all_answered.set()
        if w.start <= t1 < w.end:
            if error is None:
                lat.append(t1 - t0)
            else:
                w.errors[error] += 1


def _cycle(payloads: list[bytes], offset: int, step: int) -> Picker:
    state = {"i": offset}
    n = len(payloads)

    def pick() -> bytes:
        i = state["i"]
        state["i"] = i + step
        return payloads[i % n]

    return pick


def _cycling(payloads: list[bytes], concurrency: int) -> Callable[[int], Picker]:
    """Worker i sends payloads i, i + N, i + 2N, ... (N = concurrency), round and round."""
    return lambda i: _cycle(payloads, i, concurrency)


def _shared(pick: Picker) -> Callable[[int], Picker]:
    return lambda _i: pick


def _pool(payloads: collections.deque[bytes]) -> Picker:
    def pick() -> bytes | None:
        return payloads.popleft() if payloads else None

    return pick


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


@dataclass
class Profiler:
    """Runs ``py-spy record`` on the server during the chosen phases' windows."""

    phases: list[str]
    outdir: str
    rate: int
    native: bool
    pid: int
    proc: subprocess.Popen[bytes] | None = None
    done: set[str] = field(default_factory=set)

    def start(self, name: str, duration: float) -> None:
        """Records the window of ``name`` (its first slice, if it has several)."""
        if name not in self.phases or name in self.done:
            return
        self.done.add(name)
        command = [
            "py-spy",
            "record",
            "--pid",
            str(self.pid),
            "--duration",
            str(max(1, round(duration))),
            "--rate",
            str(self.rate),
            "--format",
            "raw",
            "--output",
            str(Path(self.outdir) / f"py-spy-{name}.txt"),
        ]
        # --nonblocking (no pauses of the server) cannot take native stacks.
        command.append("--native" if self.native else "--nonblocking")
        py_spy = Path(sys.executable).with_name("py-spy")
        if py_spy.exists():
            command[0] = str(py_spy)
        log(f"profiling {name}: {' '.join(command)}")
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def finish(self) -> None:
        if self.proc is None:
            return
        _, err = self.proc.communicate(timeout=60)
        if self.proc.returncode != 0:
            log(f"py-spy failed ({self.proc.returncode}): {err.decode(errors='replace')[-500:]}")
        self.proc = None


async def run_phase(
    *,
    name: str,
    method: str,
    concurrency: int,
    make_picker: Callable[[int], Picker],
    cfg: dict[str, Any],
    meter: CpuMeter,
    profiler: Profiler | None,
    duration: float | None = None,
    target: str | None = None,
) -> dict[str, Any]:
    """One measured window of ``name`` (``duration``, default the configured one;
    ``target``, default the configured one).

    Warm-up: ``warmup`` seconds, and at least until every worker has had one
    answer (a sign-in at concurrency 64 waits behind 63 others for Argon2), so
    the window starts in the steady state.
    """
    duration = cfg["duration"] if duration is None else duration
    channels = [
        grpc.aio.insecure_channel(target or cfg["target"], options=CHANNEL_OPTIONS)
        for _ in range(cfg["channels"])
    ]
    try:
        await asyncio.gather(*(asyncio.wait_for(ch.channel_ready(), 10) for ch in channels))
        calls: list[Call] = [ch.unary_unary(method) for ch in channels]  # bytes in and out
        w = Window(waiting=concurrency)
        tasks = [
            asyncio.create_task(_worker(calls[i % len(calls)], make_picker(i), w))
            for i in range(concurrency)
        ]
        await asyncio.sleep(cfg["warmup"])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(w.all_answered.wait(), MAX_EXTRA_WARMUP)
        if profiler is not None:
            profiler.start(name, duration)
        cpu0 = meter.snapshot()
        w.start = time.perf_counter()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(w.exhausted.wait(), duration)
        w.end = time.perf_counter()
        cpu1 = meter.snapshot()
        w.stop = True
        await asyncio.gather(*tasks)
        if profiler is not None:
            await asyncio.to_thread(profiler.finish)
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))
    return {
        "phase": name,
        "concurrency": concurrency,
        "seconds": w.end - w.start,
        "latencies": w.latencies,
        "errors": w.errors,
        "exhausted": w.exhausted.is_set(),
        "cpu_s": CpuMeter.delta(cpu0, cpu1),
    }


def summarize(slices: list[dict[str, Any]]) -> dict[str, Any]:
    """One phase's result from its measured window(s)."""
    first = slices[0]
    seconds = sum(s["seconds"] for s in slices)
    lat = sorted(x for s in slices for x in s["latencies"])
    errors: collections.Counter[str] = collections.Counter()
    cpu: collections.Counter[str] = collections.Counter()
    for s in slices:
        errors.update(s["errors"])
        cpu.update(s["cpu_s"])
    result = {
        "phase": first["phase"],
        "concurrency": first["concurrency"],
        "windows": len(slices),
        "seconds": round(seconds, 3),
        "calls": len(lat),
        "rps": round(len(lat) / seconds, 1),
        "p50_ms": round(_percentile(lat, 0.50) * 1000, 3),
        "p99_ms": round(_percentile(lat, 0.99) * 1000, 3),
        "errors": dict(errors),
        "exhausted": any(s["exhausted"] for s in slices),
        "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
        "window_rps": [round(len(s["latencies"]) / s["seconds"], 1) for s in slices],
    }
    log(
        f"{result['phase']}: {result['rps']:.0f} rps, p50 {result['p50_ms']:.2f} ms, "
        f"p99 {result['p99_ms']:.2f} ms, errors {sum(errors.values())}"
        + (f" (windows: {result['window_rps']} rps)" if len(slices) > 1 else "")
    )
    return result


# --------------------------------------------------------------------------- argon2 alone


def argon2_alone(seconds: float) -> dict[str, Any]:
    """argon2-cffi verify in a pool of ``os.cpu_count()`` threads for ``seconds``."""
    threads = os.cpu_count() or 1
    hasher = argon2.PasswordHasher(
        time_cost=ARGON2_TIME_COST, memory_cost=ARGON2_MEMORY_KIB, parallelism=ARGON2_PARALLELISM
    )
    encoded = hasher.hash(PASSWORD)
    barrier = threading.Barrier(threads)

    def loop() -> tuple[int, float]:
        hasher.verify(encoded, PASSWORD)  # warm this thread
        barrier.wait()
        start = time.perf_counter()
        count = 0
        while True:
            hasher.verify(encoded, PASSWORD)
            count += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return count, elapsed

    with ThreadPoolExecutor(threads, thread_name_prefix="argon2-alone") as pool:
        results = list(pool.map(lambda _: loop(), range(threads)))
    rate = sum(count / elapsed for count, elapsed in results)
    out = {
        "threads": threads,
        "seconds": round(max(e for _, e in results), 3),
        "verifies": sum(c for c, _ in results),
        "verifies_per_s": round(rate, 2),
    }
    log(f"argon2 alone: {rate:.1f} verifies/s on {threads} threads")
    return out


# --------------------------------------------------------------------------- preparation


@dataclass(frozen=True)
class Account:
    email: str
    user_id: str
    session_id: str
    access_token: str


async def prepare(target: str, count: int, run_id: str) -> list[Account]:
    """``count`` accounts, each signed up (so with a session and an access token)."""
    accounts: list[Account] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        queue = collections.deque(range(count))

        async def sign_up() -> None:
            while queue:
                i = queue.popleft()
                email = f"bench-{run_id}-{i}@example.com"
                reply = await stub.SignUp(
                    auth_pb2.SignUpRequest(email=email, password=PASSWORD), timeout=CALL_TIMEOUT
                )
                accounts.append(
                    Account(
                        email=email,
                        user_id=reply.result.user.id,
                        session_id=reply.result.tokens.session_id,
                        access_token=reply.result.tokens.access_token,
                    )
                )

        await asyncio.gather(*(sign_up() for _ in range(2 * (os.cpu_count() or 1))))
        # Sanity: Authenticate resolves a token, echo echoes.
        first = accounts[0]
        who = await stub.Authenticate(auth_pb2.AuthenticateRequest(access_token=first.access_token))
        if who.session.session_id != first.session_id:
            raise RuntimeError("Authenticate returned the wrong session")
        payload = os.urandom(64)
        echo: Call = channel.unary_unary(ECHO_METHOD)
        if await echo(payload) != payload:
            raise RuntimeError("echo did not echo")
    return accounts


async def mint_tokens(cfg: dict[str, Any], accounts: list[Account], count: int) -> list[str]:
    """Fresh access tokens for the accounts' sessions, as the server would issue them."""
    settings = Settings(
        database_url=cfg["database_url"],
        secret_key=cfg["secret_key"],
        data_dir=Path(cfg["data_dir"]),
        redis_url=None,
        hash_workers=1,
    )
    core = await build_core(settings, create_keys=False)
    try:
        key = core.keys.active
        ttl = timedelta(seconds=settings.access_token_ttl)
        codec = AccessTokenCodec(issuer=settings.issuer, audience=settings.audience, ttl=ttl)
        now = datetime.now(UTC)
        tokens = []
        for i in range(count):
            account = accounts[i % len(accounts)]
            claims = AccessClaims(
                user_id=uuid.UUID(account.user_id),
                session_id=uuid.UUID(account.session_id),
                role=Role.USER,
                issued_at=now,
                expires_at=now + ttl,
            )
            tokens.append(codec.issue(key, claims))  # unique: every token has its own jti
        return tokens
    finally:
        await core.close()


async def warm(target: str, requests: list[bytes]) -> None:
    """Authenticates every token once, so the phase hits the "already seen" path."""
    async with grpc.aio.insecure_channel(target) as channel:
        call: Call = channel.unary_unary(AUTHENTICATE)
        queue = collections.deque(requests)

        async def run() -> None:
            while queue:
                await call(queue.popleft(), timeout=CALL_TIMEOUT)

        await asyncio.gather(*(run() for _ in range(8)))


# --------------------------------------------------------------------------- main


def _auth_request(token: str) -> bytes:
    return auth_pb2.AuthenticateRequest(access_token=token).SerializeToString()


async def main_async(cfg: dict[str, Any]) -> dict[str, Any]:
    target = cfg["target"]
    meter = CpuMeter({k: int(v) for k, v in cfg["pids"].items()})
    profiler = None
    if cfg.get("profile"):
        p = cfg["profile"]
        profiler = Profiler(p["phases"], p["outdir"], p["rate"], p["native"], cfg["pids"]["server"])

    started = time.perf_counter()
    log(f"preparing {cfg['sessions']} accounts (SignUp: one Argon2 hash each)")
    accounts = await prepare(target, cfg["sessions"], uuid.uuid4().hex[:8])
    hot = [_auth_request(a.access_token) for a in accounts]
    signin = [
        auth_pb2.SignInWithPasswordRequest(email=a.email, password=PASSWORD).SerializeToString()
        for a in accounts
    ]
    # Echo carries as many bytes as an Authenticate request.
    echo = [os.urandom(len(hot[0]))] * 64
    concurrencies: list[int] = cfg["concurrencies"]
    cold: dict[int, collections.deque[bytes]] = {}
    if cfg["cold_tokens"] > 0:
        minted = await mint_tokens(cfg, accounts, cfg["cold_tokens"] * len(concurrencies))
        for n, c in enumerate(concurrencies):
            part = minted[n * cfg["cold_tokens"] : (n + 1) * cfg["cold_tokens"]]
            cold[c] = collections.deque(_auth_request(t) for t in part)
    log(f"prepared in {time.perf_counter() - started:.1f} s")

    phases: list[dict[str, Any]] = []

    async def window(
        name: str,
        method: str,
        c: int,
        make: Callable[[int], Picker],
        duration: float,
        to: str | None = None,
    ) -> dict[str, Any]:
        return await run_phase(
            name=name,
            method=method,
            concurrency=c,
            make_picker=make,
            cfg=cfg,
            meter=meter,
            profiler=profiler,
            duration=duration,
            target=to,
        )

    rounds: int = cfg["rounds"]
    for c in concurrencies:
        # echo and Authenticate(hot) share the measured time in ABBA order
        # (rounds=2: echo, auth, auth, echo), so a change in what the rest of
        # the machine does affects both alike; rounds=1: one window each.
        pair = [
            (f"echo@{c}", ECHO_METHOD, _cycling(echo, c)),
            (f"authenticate-hot@{c}", AUTHENTICATE, _cycling(hot, c)),
        ]
        slices: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in pair}
        for r in range(rounds):
            for name, method, make in pair if r % 2 == 0 else pair[::-1]:
                if method == AUTHENTICATE:
                    await warm(target, hot)
                slices[name].append(await window(name, method, c, make, cfg["duration"] / rounds))
        phases += [summarize(slices[name]) for name, _, _ in pair]
        on = cfg.get("metrics_target")
        off = cfg.get("metrics_off_target", target)
        if on:
            # Metrics off (the server above) and on (a second server, same
            # settings plus AUTHSVC_METRICS_LISTEN), interleaved A B B A.
            four = [
                (f"echo@{c}", ECHO_METHOD, _cycling(echo, c), off),
                (f"echo+metrics@{c}", ECHO_METHOD, _cycling(echo, c), on),
                (f"authenticate-hot@{c}", AUTHENTICATE, _cycling(hot, c), off),
                (f"authenticate-hot+metrics@{c}", AUTHENTICATE, _cycling(hot, c), on),
            ]
            compared: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in four}
            for r in range(cfg["metrics_pairs"]):
                for name, method, make, to in four if r % 2 == 0 else four[::-1]:
                    if method == AUTHENTICATE:
                        await warm(to, hot)
                    compared[name].append(
                        await window(name, method, c, make, cfg["metrics_window"], to)
                    )
            for name, *_ in four:
                summary = summarize(compared[name])
                summary["phase"] = "metrics-compare:" + summary["phase"]
                summary["window_rps"] = [
                    round(len(w["latencies"]) / w["seconds"], 1) for w in compared[name]
                ]
                phases.append(summary)
        if c in cold:
            name = f"authenticate-cold@{c}"
            pool = _shared(_pool(cold[c]))
            phases.append(summarize([await window(name, AUTHENTICATE, c, pool, cfg["duration"])]))

    async def argon2_measured() -> dict[str, Any]:
        before = meter.snapshot()
        result = await asyncio.to_thread(argon2_alone, cfg["argon2_seconds"])
        result["cpu_s"] = CpuMeter.delta(before, meter.snapshot())
        return result

    # Each sign-in phase sits between two "argon2 alone" runs, and is compared
    # with their mean: argon2, signin@16, argon2, signin@64, argon2.
    argon2_runs = [await argon2_measured()]
    for c in concurrencies:
        name = f"signin@{c}"
        phases.append(
            summarize([await window(name, SIGN_IN, c, _cycling(signin, c), cfg["duration"])])
        )
        argon2_runs.append(await argon2_measured())
    return {"phases": phases, "argon2_alone": argon2_runs}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m tests.bench.loadgen CONFIG.json OUT.json", file=sys.stderr)
        return 2
    exit_on_eof(0)
    cfg = json.loads(Path(args[0]).read_text())
    results = asyncio.run(main_async(cfg))
    Path(args[1]).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The revocation latency benchmark: ``.venv/bin/python -m tests.bench revocation``.

How long a signed-out session's access token is still accepted by a sidecar
in watch mode: from SignOut returning to the sidecar's first refusal, over
``--rounds`` sign-outs, on each backend:

``embedded``  the default deployment: one authsvc process on its embedded
              storage (SQLite file, in-process event bus); the sidecar watches
              the server that signed the session out.
``postgres``  two authsvc replicas (A and B) on the test suite's PostgreSQL and
              Redis (``tests/infra.py``, as ``python -m tests.bench``); the
              session is signed out on A and the sidecar watches B, so the
              event takes the whole way: A's transaction writes it to the
              outbox, A's relay positions it (a database transaction) and
              appends it to the Redis stream, B's follower reads it (XREAD)
              and B's WatchRevocations stream pushes it to the sidecar.

Each round signs a user up on the signing server (a fresh session), has the
sidecar accept its access token (verified locally and cached), signs it out
(SignOut), and from the moment SignOut returns checks the token with
``Sidecar.authenticate`` (what the interceptors call) until it is refused with
SESSION_REVOKED, sleeping ``--poll-ms`` between checks (default 1 ms, so a
figure may be up to about a millisecond late; ``--poll-ms 0`` checks
continuously, but on a small machine that spinning takes a core from the
servers and makes the figure worse, not finer). A few unmeasured rounds come
first. The SignOut caller and the sidecar share this process and its event
loop (one clock); they use separate connections.

Prints the median, p90 and max per backend and how many rounds were refused
at the very first check (the event was there before SignOut's answer). Exit
status as ``python -m tests.bench``: 0 once it measured, 1 if it could not
run, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from authsvc.storage import migrate
from authsvc_client.errors import AuthsvcError
from authsvc_client.sidecar import Sidecar
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc

from .run import (
    BenchError,
    Child,
    Children,
    Interrupted,
    _clean_env,
    _cpu_model,
    _interrupt,
    _signals_ignored,
    log,
    start_infra,
)
from .sidecar import _ready_line

PASSWORD = "bench-password-0123456789"
REVOKED = "SESSION_REVOKED"
BACKENDS = ("embedded", "postgres")
# Separate connections for the SignOut caller and the sidecar, even to one server.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


@dataclass(frozen=True)
class Replica:
    target: str
    child: Child


def start_replica(
    children: Children, workdir: Path, name: str, settings: dict[str, str]
) -> Replica:
    """One authsvc server process (``tests.bench.server``) on ``settings``."""
    stderr_file = workdir / f"{name}-stderr.log"
    with stderr_file.open("wb") as stderr:
        child = children.start(
            name,
            [
                sys.executable,
                "-m",
                "tests.bench.server",
                "--log-file",
                str(workdir / f"{name}.log"),
            ],
            env={**_clean_env(), **settings},
            stdout=subprocess.PIPE,
            stderr=stderr,
            lifeline_on_stdin=True,
        )
    info = _ready_line(child, stderr_file)
    return Replica(f"127.0.0.1:{info['port']}", child)


def base_settings(workdir: Path, name: str, api_key: str, secret_key: str) -> dict[str, str]:
    return {
        "AUTHSVC_LISTEN": "127.0.0.1:0",
        "AUTHSVC_DATA_DIR": str(workdir / f"{name}-data"),
        "AUTHSVC_SECRET_KEY": secret_key,
        "AUTHSVC_API_KEYS": f"bench:{hashlib.sha256(api_key.encode()).hexdigest()}",
        # Sign-ups are preparation only: Argon2 at its minimum.
        "AUTHSVC_ARGON2_MEMORY_KIB": "1024",
        "AUTHSVC_ARGON2_TIME_COST": "1",
        "AUTHSVC_SIGNIN_ATTEMPTS_PER_IP": "0",
        "AUTHSVC_SIGNIN_ATTEMPTS_PER_EMAIL": "0",
        "AUTHSVC_LOG_FORMAT": "json",
        "AUTHSVC_LOG_LEVEL": "info",
    }


# --------------------------------------------------------------------------- measuring


async def _refused_after(
    sidecar: Sidecar, token: str, poll: float, limit: float
) -> tuple[float, int]:
    """Checks ``token`` from now until the sidecar refuses it as revoked;
    returns the seconds that took and the number of checks made."""
    started = time.perf_counter()
    checks = 0
    while True:
        checks += 1
        try:
            await sidecar.authenticate(token)
        except AuthsvcError as error:
            if error.reason != REVOKED:
                raise BenchError(f"refused with {error.reason}, not {REVOKED}") from None
            return time.perf_counter() - started, checks
        elapsed = time.perf_counter() - started
        if elapsed > limit:
            raise BenchError(f"the sidecar still accepted a signed-out token after {limit:g} s")
        await asyncio.sleep(poll)


async def measure(
    signer: Replica, watched: Replica, api_key: str, rounds: int, warmup: int, poll: float
) -> dict[str, Any]:
    """``rounds`` sign-outs on ``signer``, each timed until the sidecar watching
    ``watched`` refuses the token."""
    run = uuid.uuid4().hex[:8]
    sidecar = Sidecar(watched.target, api_key=api_key)
    await sidecar.start()
    try:
        # A token minted in the second the stream first answered could be
        # taken for one from before it (iat has whole seconds): start after.
        await asyncio.sleep(math.ceil(time.time()) - time.time() + 0.1)
        async with grpc.aio.insecure_channel(signer.target, options=CHANNEL_OPTIONS) as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            latencies: list[float] = []
            first_check = 0
            for i in range(warmup + rounds):
                signed = await stub.SignUp(
                    auth_pb2.SignUpRequest(
                        email=f"revocation-{run}-{i}@example.com", password=PASSWORD
                    )
                )
                token = signed.result.tokens.access_token
                session = await sidecar.authenticate(token)  # accepted, and cached
                if session.session_id != signed.result.tokens.session_id:
                    raise BenchError("the sidecar resolved the wrong session")
                await stub.SignOut(
                    auth_pb2.SignOutRequest(), metadata=(("authorization", f"Bearer {token}"),)
                )
                took, checks = await _refused_after(sidecar, token, poll, limit=10.0)
                if i >= warmup:
                    latencies.append(took)
                    first_check += checks == 1
            if not sidecar.watching:
                raise BenchError("the sidecar's revocation stream was not up throughout")
    finally:
        await sidecar.close()
    return {"latencies_ms": [round(x * 1000, 3) for x in latencies], "first_check": first_check}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarize(backend: str, path: str, measured: dict[str, Any]) -> dict[str, Any]:
    latencies_ms: list[float] = measured["latencies_ms"]
    return {
        "backend": backend,
        "path": path,
        "rounds": len(latencies_ms),
        "refused_at_first_check": measured["first_check"],
        "median_ms": round(statistics.median(latencies_ms), 3),
        "p90_ms": round(_percentile(latencies_ms, 0.90), 3),
        "max_ms": round(max(latencies_ms), 3),
        "min_ms": round(min(latencies_ms), 3),
        "latencies_ms": latencies_ms,
    }


# --------------------------------------------------------------------------- backends


def run_embedded(children: Children, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    api_key = "ak_" + secrets.token_urlsafe(32)
    settings = base_settings(workdir, "embedded", api_key, secrets.token_urlsafe(48))
    log("embedded: starting one authsvc server (SQLite, in-process event bus)")
    server = start_replica(children, workdir, "embedded", settings)
    try:
        measured = asyncio.run(
            measure(server, server, api_key, args.rounds, args.warmup_rounds, args.poll_ms / 1000)
        )
    finally:
        children.stop(server.child)
    return summarize("embedded", "signed out on the server the sidecar watches", measured)


def run_postgres(children: Children, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    infra = start_infra(children, workdir)
    log("postgres: migrating")
    migrate.upgrade(infra.database_url)
    api_key = "ak_" + secrets.token_urlsafe(32)
    secret_key = secrets.token_urlsafe(48)
    shared = {"AUTHSVC_DATABASE_URL": infra.database_url, "AUTHSVC_REDIS_URL": infra.redis_url}
    log("postgres: starting replicas A and B (PostgreSQL + Redis)")
    # One after the other: A creates the signing key, B loads it.
    a = start_replica(
        children,
        workdir,
        "replica-a",
        {**base_settings(workdir, "a", api_key, secret_key), **shared},
    )
    b = start_replica(
        children,
        workdir,
        "replica-b",
        {**base_settings(workdir, "b", api_key, secret_key), **shared},
    )
    measured = asyncio.run(
        measure(a, b, api_key, args.rounds, args.warmup_rounds, args.poll_ms / 1000)
    )
    return summarize("postgres", "signed out on replica A, the sidecar watches replica B", measured)


# --------------------------------------------------------------------------- report


def render(report: dict[str, Any]) -> str:
    machine, cfg = report["machine"], report["config"]
    poll = (
        "checked continuously (yielding to the event loop between checks)"
        if cfg["poll_ms"] == 0
        else f"checked every {cfg['poll_ms']:g} ms"
    )
    lines = [
        f"revocation latency: {machine['cpus']} CPUs ({machine['cpu_model']}), Python "
        f"{machine['python']}, grpcio {machine['grpcio']}",
        f"load average (1/5/15 min): at start {machine['loadavg_start']}, "
        f"at end {machine['loadavg_end']}",
        f"SignOut returned -> the sidecar's (watch mode) first SESSION_REVOKED; {cfg['rounds']} "
        f"rounds per backend after {cfg['warmup_rounds']} unmeasured; the token {poll}",
        "",
    ]
    header = (
        f"{'backend':<10}{'rounds':>7}{'median ms':>11}{'p90 ms':>9}{'max ms':>9}{'min ms':>9}"
        f"{'at once':>9}  path"
    )
    lines.append(header)
    lines.append("-" * (len(header) + 50))
    for r in report["results"]:
        lines.append(
            f"{r['backend']:<10}{r['rounds']:>7}{r['median_ms']:>11.2f}{r['p90_ms']:>9.2f}"
            f"{r['max_ms']:>9.2f}{r['min_ms']:>9.2f}{r['refused_at_first_check']:>9}  {r['path']}"
        )
    lines.append(
        "  at once: rounds refused at the first check (the event was in before SignOut's answer)."
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench revocation",
        description="SignOut returned -> the sidecar's first refusal (a report, not a test)",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        action="append",
        help="embedded and/or postgres (repeatable; default both)",
    )
    parser.add_argument("--rounds", type=int, default=50, help="measured sign-outs per backend")
    parser.add_argument("--warmup-rounds", type=int, default=3, help="unmeasured rounds first")
    parser.add_argument(
        "--poll-ms",
        type=float,
        default=1.0,
        help="milliseconds between checks of the signed-out token (default 1; 0: check "
        "continuously, which on a small machine takes a core from the servers)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    args.backend = args.backend or list(BACKENDS)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.poll_ms < 0:
        parser.error("--poll-ms must not be negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="authsvc-bench-revocation-"))
    children = Children()
    report: dict[str, Any] | None = None
    code = 1
    try:
        machine: dict[str, Any] = {
            "cpus": os.cpu_count(),
            "cpu_model": platform.processor() or _cpu_model(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
        }
        results = []
        for backend in args.backend:
            run = run_embedded if backend == "embedded" else run_postgres
            result = run(children, workdir, args)
            log(
                f"{backend}: median {result['median_ms']:.2f} ms, p90 {result['p90_ms']:.2f} ms, "
                f"max {result['max_ms']:.2f} ms"
            )
            results.append(result)
        machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        report = {
            "machine": machine,
            "config": {
                "rounds": args.rounds,
                "warmup_rounds": args.warmup_rounds,
                "poll_ms": args.poll_ms,
            },
            "results": results,
        }
        code = 0
    except (KeyboardInterrupt, Interrupted):
        log("interrupted; stopping everything")
        code = 130
    except BenchError as error:
        log(f"error: {error}")
    finally:
        with _signals_ignored():
            children.stop_all()
            if args.keep:
                log(f"work directory kept: {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    if report is None:
        return code
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        log(f"results written to {args.json}")
    return code

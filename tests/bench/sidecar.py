"""The sidecar benchmark: ``.venv/bin/python -m tests.bench sidecar``.

What the sidecar costs the service it protects: RPS of the notes example's
GetNote (``clients/examples/notes``) with and without the sidecar's
``AuthInterceptor``, in one run, from one server process:

1. starts authsvc in its own process (``tests.bench.server``, embedded
   storage: the measured path never calls authsvc; Argon2 at its minimum,
   sign-ups are preparation only);
2. signs up ``--users`` users, one of whom creates an org the others join;
3. starts the notes server process (``tests.bench.notes_server``): a sidecar
   in ``--mode`` (watch: local verification, revocations pushed) and two
   servers on one store and one event loop, "sidecar" (the interceptor in
   front), "plain" (no interceptor, a fixed session) and "passthrough" (as
   plain, behind an interceptor that does nothing: grpc.aio's own share);
4. mints each user's access token with SetActiveOrg once the sidecar's
   revocation stream is up (so none needs an online check);
5. runs the load generator process (``tests.bench.sidecar_loadgen``): notes
   are created through the protected server, then plain, passthrough and
   sidecar GetNote alternate in windows (ABC CBA ...) at each concurrency,
   several TCP connections each;
6. prints the table and the ratio sidecar RPS / plain RPS (bar: >= 0.80),
   with passthrough / plain and sidecar / passthrough beside it, and stops
   every process it started.

Exit status as ``python -m tests.bench``: 0 once the measurements ran (a
report, not a test), 1 if the benchmark could not run, 130 when interrupted.
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
import select
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

from authsvc_client.client import AuthsvcClient, SignedIn

from .run import (
    ROOT,
    BenchError,
    Child,
    Children,
    Interrupted,
    _clean_env,
    _cpu_model,
    _interrupt,
    _signals_ignored,
    _tail,
    log,
    phase_named,
    run_loadgen_module,
)

BAR = 0.80
PASSWORD = "bench-password-0123456789"


@dataclass(frozen=True)
class Authsvc:
    target: str
    pid: int
    api_key: str


@dataclass(frozen=True)
class NotesServer:
    protected: str
    plain: str
    passthrough: str
    pid: int


def _env() -> dict[str, str]:
    """The children's environment: ``examples`` (clients/examples) importable."""
    env = _clean_env()
    paths = [str(ROOT / "clients"), *filter(None, [env.get("PYTHONPATH")])]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _ready_line(child: Child, stderr_file: Path, timeout: float = 60.0) -> dict[str, Any]:
    """The JSON line a server child prints on stdout once it serves."""
    assert child.proc.stdout is not None
    fd = child.proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"{child.name} did not start in {timeout:g} s:\n{_tail(stderr_file)}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise BenchError(f"{child.name} exited:\n{_tail(stderr_file)}")
            line += chunk
    info: dict[str, Any] = json.loads(line)
    return info


def start_authsvc(children: Children, workdir: Path) -> Authsvc:
    api_key = "ak_" + secrets.token_urlsafe(32)
    settings = {
        "AUTHSVC_LISTEN": "127.0.0.1:0",
        "AUTHSVC_DATA_DIR": str(workdir / "authsvc-data"),
        "AUTHSVC_SECRET_KEY": secrets.token_urlsafe(48),
        "AUTHSVC_API_KEYS": f"bench:{hashlib.sha256(api_key.encode()).hexdigest()}",
        "AUTHSVC_ARGON2_MEMORY_KIB": "1024",
        "AUTHSVC_ARGON2_TIME_COST": "1",
        "AUTHSVC_SIGNIN_ATTEMPTS_PER_IP": "0",
        "AUTHSVC_SIGNIN_ATTEMPTS_PER_EMAIL": "0",
        "AUTHSVC_LOG_FORMAT": "json",
        "AUTHSVC_LOG_LEVEL": "info",
    }
    stderr_file = workdir / "authsvc-stderr.log"
    log("starting the authsvc server process (embedded storage)")
    with stderr_file.open("wb") as stderr:
        child = children.start(
            "authsvc",
            [
                sys.executable,
                "-m",
                "tests.bench.server",
                "--log-file",
                str(workdir / "authsvc.log"),
            ],
            env={**_env(), **settings},
            stdout=subprocess.PIPE,
            stderr=stderr,
            lifeline_on_stdin=True,
        )
    info = _ready_line(child, stderr_file)
    return Authsvc(f"127.0.0.1:{info['port']}", int(info["pid"]), api_key)


def start_notes(
    children: Children, workdir: Path, authsvc: Authsvc, org: str, args: argparse.Namespace
) -> NotesServer:
    stderr_file = workdir / "notes-stderr.log"
    log(f"starting the notes server process (sidecar in {args.mode} mode)")
    with stderr_file.open("wb") as stderr:
        child = children.start(
            "notes server",
            [
                sys.executable,
                "-m",
                "tests.bench.notes_server",
                "--authsvc",
                authsvc.target,
                "--org",
                org,
                "--mode",
                args.mode,
                "--online-cache-ttl",
                str(args.online_cache_ttl),
            ],
            env={**_env(), "AUTHSVC_API_KEY": authsvc.api_key},
            stdout=subprocess.PIPE,
            stderr=stderr,
            lifeline_on_stdin=True,
        )
    info = _ready_line(child, stderr_file)
    return NotesServer(
        f"127.0.0.1:{info['protected_port']}",
        f"127.0.0.1:{info['plain_port']}",
        f"127.0.0.1:{info['passthrough_port']}",
        int(info["pid"]),
    )


async def prepare_accounts(authsvc: Authsvc, users: int) -> tuple[str, list[str]]:
    """An org and ``users`` members of it; returns the org id and each user's refresh token."""
    run = uuid.uuid4().hex[:8]
    async with AuthsvcClient(authsvc.target, api_key=authsvc.api_key) as client:
        refresh: list[str] = []

        async def sign_up(i: int) -> tuple[str, str]:
            outcome = await client.sign_up(
                email=f"sidecar-{run}-{i}@example.com", password=PASSWORD
            )
            if not isinstance(outcome, SignedIn):
                # The bench's accounts have no second factor: a challenge is a bug.
                raise BenchError(f"sign-up answered a challenge: {outcome.requirements}")
            return outcome.user.id, outcome.tokens.refresh_token

        made = [await sign_up(0)]
        owner_id, _ = made[0]
        org = await client.create_org(name="Bench", slug=f"bench-{run}", creator_id=owner_id)
        made += await asyncio.gather(*(sign_up(i) for i in range(1, users)))
        for user_id, token in made:
            if user_id != owner_id:
                await client.add_org_member(org_id=org.id, user_id=user_id)
            refresh.append(token)
        return org.id, refresh


async def mint_tokens(authsvc: Authsvc, org: str, refresh: list[str]) -> list[str]:
    """Each user's access token with ``org`` active (SetActiveOrg)."""
    async with AuthsvcClient(authsvc.target) as client:
        pairs = [await client.set_active_org(refresh_token=r, org_id=org) for r in refresh]
        return [p.access_token for p in pairs]


def run_loadgen(children: Children, workdir: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    windows = 3 * cfg["rounds"]
    budget = 120 + len(cfg["concurrencies"]) * windows * (cfg["warmup"] + cfg["duration"] + 20)
    return run_loadgen_module(children, workdir, cfg, "tests.bench.sidecar_loadgen", _env(), budget)


# --------------------------------------------------------------------------- report


def _per_call(phase: dict[str, Any], who: str) -> float:
    return float(phase["cpu_s"][who]) / phase["calls"] if phase["calls"] else 0.0


def _ratio(
    results: dict[str, Any], top: str, bottom: str, c: int, bar: float | None
) -> dict[str, Any] | None:
    """``top`` RPS / ``bottom`` RPS at concurrency ``c``, plus the same from the
    notes server's CPU per call (what the RPS ratio would be with the server
    alone and CPU-bound), and that CPU ratio speed-normalized by the client's
    CPU per call (the client does identical work in every phase)."""
    a, b = phase_named(results, f"{top}@{c}"), phase_named(results, f"{bottom}@{c}")
    if not a or not b or not b["rps"]:
        return None
    a_cpu, b_cpu = _per_call(a, "notes"), _per_call(b, "notes")
    a_client, b_client = _per_call(a, "client"), _per_call(b, "client")
    normalized = None
    if a_cpu and a_client and b_client:
        normalized = (b_cpu / b_client) / (a_cpu / a_client)
    value = a["rps"] / b["rps"]
    # Adjacent windows (ABC CBA ...) see much the same machine: their ratios,
    # and the median of those, shrug off what other processes do.
    windows = [round(x / y, 3) for x, y in zip(a["window_rps"], b["window_rps"], strict=True) if y]
    return {
        "name": f"{top} RPS / {bottom} RPS @{c}",
        "value": round(value, 3),
        "bar": bar,
        "meets_bar": None if bar is None else value >= bar,
        "cpu_based_value": round(b_cpu / a_cpu if a_cpu else 0.0, 3),
        "speed_normalized_value": None if normalized is None else round(normalized, 3),
        "window_ratios": windows,
        "median_window_ratio": round(statistics.median(windows), 3) if windows else None,
    }


def compute_ratios(results: dict[str, Any], concurrencies: list[int]) -> list[dict[str, Any]]:
    """The bar (sidecar / plain) at each concurrency, and how it splits: what any
    interceptor costs (passthrough / plain) and what the sidecar's own work
    costs (sidecar / passthrough)."""
    out = []
    for c in concurrencies:
        for top, bottom, bar in (
            ("sidecar", "plain", BAR),
            ("passthrough", "plain", None),
            ("sidecar", "passthrough", None),
        ):
            ratio = _ratio(results, top, bottom, c, bar)
            if ratio is not None:
                out.append(ratio)
    return out


def render(report: dict[str, Any]) -> str:
    machine, cfg = report["machine"], report["config"]
    lines = [
        f"sidecar benchmark: {machine['cpus']} CPUs ({machine['cpu_model']}), Python "
        f"{machine['python']}, grpcio {machine['grpcio']}",
        f"load average (1/5/15 min): at start {machine['loadavg_start']}, "
        f"at end {machine['loadavg_end']}",
        f"notes GetNote, sidecar in {cfg['mode']} mode; {cfg['users']} users/tokens, "
        f"{cfg['notes']} notes, {cfg['channels']} client channels (TCP connections) per window; "
        f"warm-up {cfg['warmup']:g} s + {cfg['duration']:g} s measured per phase in "
        f"{cfg['rounds']} interleaved windows (plain, passthrough, sidecar; then reversed)",
        "",
    ]
    header = (
        f"{'phase':<12}{'conc':>5}{'RPS':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
        f"{'client':>8}{'notes':>8}{'authsvc':>9}{'others':>8}{'notes':>8}{'client':>8}"
    )
    lines.append(f"{'':<52}{'CPU seconds in the measured window':^33}{'us CPU/call':^16}")
    lines.append(header)
    lines.append("-" * len(header))
    for p in report["results"]["phases"]:
        cpu = p["cpu_s"]
        calls = p["calls"]
        lines.append(
            f"{p['phase'].split('@')[0]:<12}{p['concurrency']:>5}{p['rps']:>9.0f}"
            f"{p['p50_ms']:>9.2f}{p['p99_ms']:>9.2f}{sum(p['errors'].values()):>8}"
            f"{cpu['client']:>8.2f}{cpu['notes']:>8.2f}{cpu['authsvc']:>9.2f}{cpu['others']:>8.2f}"
            f"{(cpu['notes'] / calls * 1e6 if calls else math.nan):>8.0f}"
            f"{(cpu['client'] / calls * 1e6 if calls else math.nan):>8.0f}"
        )
        lines.append(f"{'':<12}{'':>5}  windows: {', '.join(f'{r:.0f}' for r in p['window_rps'])}")
    lines.append("")
    lines.append(
        f"{'ratios (this run)':<42}{'RPS':>7}{'bar':>9}{'':<7}{'CPU-based':>11}"
        f"{'speed-normalized':>18}{'median':>8}   per window pair"
    )
    for r in report["ratios"]:
        verdict = {True: "meets", False: "BELOW", None: ""}[r["meets_bar"]]
        bar = "" if r["bar"] is None else ">= " + format(r["bar"], ".2f")
        normalized = r["speed_normalized_value"]
        median = "-" if r["median_window_ratio"] is None else f"{r['median_window_ratio']:.2f}"
        lines.append(
            f"  {r['name']:<40}{r['value']:>7.2f}{bar:>9} {verdict:<6}"
            f"{r['cpu_based_value']:>11.2f}"
            f"{'-' if normalized is None else format(normalized, '.2f'):>18}"
            f"{median:>8}   " + ", ".join(f"{x:.2f}" for x in r["window_ratios"])
        )
    lines.append(
        "  plain: no interceptor; passthrough: an interceptor that does nothing; sidecar: the"
        " AuthInterceptor (the bar compares sidecar with plain)."
    )
    lines.append(
        "  CPU-based: the notes server's CPU per call, inverted (the RPS ratio the server"
        " alone, CPU-bound, would show);"
    )
    lines.append(
        "  speed-normalized: the same with each phase's server CPU per call divided by the"
        " client's (identical client work)."
    )
    lines.append(
        "  median: of the RPS ratios of the window pairs (the phases' windows alternate, so each"
        " pair ran close in time)."
    )
    lines.append("  'others': CPU used meanwhile by processes outside the benchmark.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench sidecar",
        description="the sidecar's cost: the notes example's GetNote with and without it "
        "(a report, not a test)",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--duration", type=float, default=9.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per window")
    parser.add_argument(
        "--concurrency",
        type=int,
        action="append",
        help="concurrency levels (repeatable; default 16 and 64)",
    )
    parser.add_argument("--channels", type=int, default=4, help="client channels per window")
    parser.add_argument(
        "--rounds",
        type=int,
        default=6,
        help="plain, passthrough and sidecar split their measured time into this many "
        "windows each, interleaved A B C C B A ... (default 6)",
    )
    parser.add_argument("--users", type=int, default=32, help="users (tokens) sending calls")
    parser.add_argument("--notes", type=int, default=64, help="notes to read")
    parser.add_argument(
        "--mode",
        choices=["watch", "online"],
        default="watch",
        help="the sidecar's mode (watch: local verification; online: Authenticate per "
        "token, cached --online-cache-ttl seconds)",
    )
    parser.add_argument("--online-cache-ttl", type=float, default=2.0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    args.concurrency = args.concurrency or [16, 64]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="authsvc-bench-sidecar-"))
    children = Children()
    report: dict[str, Any] | None = None
    started = time.monotonic()
    code = 1
    try:
        machine: dict[str, Any] = {
            "cpus": os.cpu_count(),
            "cpu_model": platform.processor() or _cpu_model(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
        }
        authsvc = start_authsvc(children, workdir)
        log(f"authsvc pid {authsvc.pid} on {authsvc.target}; preparing {args.users} users")
        org, refresh = asyncio.run(prepare_accounts(authsvc, args.users))
        notes = start_notes(children, workdir, authsvc, org, args)
        log(f"notes pid {notes.pid}: sidecar on {notes.protected}, plain on {notes.plain}")
        # The sidecar checks online only tokens issued before its stream
        # answered; iat has whole seconds, so mint from the next second on.
        time.sleep(math.ceil(time.time()) - time.time() + 0.1)
        tokens = asyncio.run(mint_tokens(authsvc, org, refresh))
        cfg: dict[str, Any] = {
            "protected": notes.protected,
            "plain": notes.plain,
            "passthrough": notes.passthrough,
            "pids": {"notes": notes.pid, "authsvc": authsvc.pid},
            "org": org,
            "tokens": tokens,
            "notes": args.notes,
            "channels": args.channels,
            "concurrencies": args.concurrency,
            "warmup": args.warmup,
            "duration": args.duration,
            "rounds": args.rounds,
        }
        results = run_loadgen(children, workdir, cfg)
        machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        public = {k: v for k, v in cfg.items() if k not in ("tokens", "org")}
        public |= {"mode": args.mode, "users": args.users}
        report = {
            "machine": machine,
            "config": public,
            "results": results,
            "ratios": compute_ratios(results, args.concurrency),
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
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    print(render(report))
    print(f"total wall time {report['wall_seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        log(f"results written to {args.json}")
    return code

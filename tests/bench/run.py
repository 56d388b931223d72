"""The benchmark's orchestrator: ``.venv/bin/python -m tests.bench``.

Starts PostgreSQL and Redis (the test suite's fixtures, see ``infra_holder``),
migrates, starts the server process, runs the load generator process, prints
the table and the ratios, and stops everything it started: on success, on
error, on Ctrl-C or SIGTERM. Should this process itself be killed outright,
every child notices its lifeline pipe closing and exits (the pytest holding
the databases tears them down; the suite's reaper backs that up).

Exit status: 0 once the measurements ran, whatever they are (a report, not a
test); 1 if the benchmark could not run; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import grpc
import psutil  # type: ignore[import-untyped]

from authsvc.storage import migrate

from .collapsed import summary
from .common import (
    ARGON2_MEMORY_KIB,
    ARGON2_PARALLELISM,
    ARGON2_TIME_COST,
    INFRA_OUT_ENV,
    LIFELINE_FD_ENV,
)

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
AUTH_BAR = 0.85
SIGNIN_BAR = 0.80


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------- child processes


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    lifeline: int | None  # write end of the pipe the child watches
    stop_signal: int = signal.SIGTERM
    grace: float = 15.0


@dataclass
class Children:
    """Every process this run started, stopped in reverse order."""

    items: list[Child] = field(default_factory=list)

    def start(
        self,
        name: str,
        command: list[str],
        *,
        env: dict[str, str],
        stdout: int | IO[Any] | None,
        stderr: int | IO[Any] | None,
        lifeline_on_stdin: bool,
        grace: float = 15.0,
        stop_signal: int = signal.SIGTERM,
    ) -> Child:
        read_end, write_end = os.pipe()
        env = dict(env)
        pass_fds: tuple[int, ...] = ()
        if not lifeline_on_stdin:
            env[LIFELINE_FD_ENV] = str(read_end)
            pass_fds = (read_end,)
        try:
            proc = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdin=read_end if lifeline_on_stdin else subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                pass_fds=pass_fds,
                # Own session: the terminal's Ctrl-C reaches only us, and we
                # stop the children in order.
                start_new_session=True,
            )
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        child = Child(name, proc, write_end, stop_signal, grace)
        self.items.append(child)
        return child

    def stop(self, child: Child) -> int | None:
        """Closes the lifeline (every child stops on that alone) and waits ``grace``;
        then signals and waits ``grace`` again; then kills. Returns the exit code."""
        if child.lifeline is not None:
            with contextlib.suppress(OSError):
                os.close(child.lifeline)
            child.lifeline = None
        proc = child.proc
        try:
            proc.wait(child.grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(child.stop_signal)
            try:
                proc.wait(child.grace)
            except subprocess.TimeoutExpired:
                log(f"{child.name} (pid {proc.pid}) did not stop; killing it")
                proc.kill()
                proc.wait()
        if child in self.items:
            self.items.remove(child)
        return proc.returncode

    def stop_all(self) -> None:
        for child in reversed(list(self.items)):
            try:
                self.stop(child)
            except Exception as error:  # keep stopping the others
                log(f"stopping {child.name} failed: {error!r}")


def _clean_env() -> dict[str, str]:
    """Our environment minus any AUTHSVC_* the caller had set."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AUTHSVC_")}


def _tail(path: Path, size: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return "(no output)"


def _listening_pid(port: int) -> int | None:
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            return int(conn.pid)
    return None


# --------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class Infra:
    database_url: str
    redis_url: str
    postgres_pid: int
    redis_pid: int


def start_infra(children: Children, workdir: Path) -> Infra:
    out = workdir / "infra.json"
    output = workdir / "infra-pytest.log"
    env = _clean_env()
    env[INFRA_OUT_ENV] = str(out)
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(HERE / "infra_holder.py"),
        "-q",
        "-s",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(ROOT),
    ]
    log("starting PostgreSQL and Redis (tests/infra.py fixtures, through pytest)")
    with output.open("wb") as stream:
        child = children.start(
            "infra (pytest)",
            command,
            env=env,
            stdout=stream,
            stderr=subprocess.STDOUT,
            lifeline_on_stdin=False,
            # The test returns when the lifeline closes; the signal is only
            # for a pytest that does not. SIGINT makes pytest tear down.
            stop_signal=signal.SIGINT,
            grace=60.0,
        )
    deadline = time.monotonic() + 180
    while not out.exists():
        if child.proc.poll() is not None:
            raise BenchError(f"the infra pytest exited ({child.proc.returncode}):\n{_tail(output)}")
        if time.monotonic() > deadline:
            raise BenchError(f"PostgreSQL/Redis not up after 180 s:\n{_tail(output)}")
        time.sleep(0.1)
    info = json.loads(out.read_text())
    redis_port = int(info["redis_url"].rsplit(":", 1)[1].split("/")[0])
    pg_pid = _listening_pid(int(info["postgres_port"]))
    redis_pid = _listening_pid(redis_port)
    if pg_pid is None or redis_pid is None:
        raise BenchError("cannot find the PostgreSQL/Redis processes by their ports")
    return Infra(info["database_url"], info["redis_url"], pg_pid, redis_pid)


@dataclass(frozen=True)
class ServerInfo:
    port: int
    pid: int
    log_file: Path
    settings: dict[str, str]
    secret_key: str


def start_server(
    children: Children,
    workdir: Path,
    infra: Infra,
    *,
    secret_key: str | None = None,
    extra: dict[str, str] | None = None,
    name: str = "server",
) -> ServerInfo:
    cores = os.cpu_count() or 1
    settings = {
        "AUTHSVC_LISTEN": "127.0.0.1:0",
        "AUTHSVC_DATA_DIR": str(workdir / "data"),
        "AUTHSVC_DATABASE_URL": infra.database_url,
        "AUTHSVC_REDIS_URL": infra.redis_url,
        "AUTHSVC_SECRET_KEY": secret_key or secrets.token_urlsafe(48),
        "AUTHSVC_ARGON2_MEMORY_KIB": str(ARGON2_MEMORY_KIB),
        "AUTHSVC_ARGON2_TIME_COST": str(ARGON2_TIME_COST),
        "AUTHSVC_ARGON2_PARALLELISM": str(ARGON2_PARALLELISM),
        "AUTHSVC_HASH_WORKERS": str(cores),
        "AUTHSVC_SIGNIN_ATTEMPTS_PER_IP": "0",  # 0: unlimited
        "AUTHSVC_SIGNIN_ATTEMPTS_PER_EMAIL": "0",
        "AUTHSVC_LOG_FORMAT": "json",
        "AUTHSVC_LOG_LEVEL": "info",  # the per-RPC access log stays on
        **(extra or {}),
    }
    log_file = workdir / ("authsvc.log" if name == "server" else f"authsvc-{name}.log")
    stderr_file = workdir / f"{name}-stderr.log"
    log(f"starting the authsvc {name} process")
    with stderr_file.open("wb") as stderr:
        child = children.start(
            name,
            [sys.executable, "-m", "tests.bench.server", "--log-file", str(log_file)],
            env={**_clean_env(), **settings},
            stdout=subprocess.PIPE,
            stderr=stderr,
            lifeline_on_stdin=True,
        )
    assert child.proc.stdout is not None
    fd = child.proc.stdout.fileno()
    deadline = time.monotonic() + 60
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"the server did not start in 60 s:\n{_tail(stderr_file)}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise BenchError(f"the server exited:\n{_tail(stderr_file)}")
            line += chunk
    ready_info = json.loads(line)
    shown = {k: v for k, v in settings.items() if k != "AUTHSVC_SECRET_KEY"}
    shown["AUTHSVC_DATABASE_URL"] = "postgresql+asyncpg://...(test server)"
    return ServerInfo(
        int(ready_info["port"]),
        int(ready_info["pid"]),
        log_file,
        shown,
        settings["AUTHSVC_SECRET_KEY"],
    )


def run_loadgen(
    children: Children, workdir: Path, cfg: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    # Bounded: preparation, the phases and their tails fit easily in this.
    windows = 2 * cfg["rounds"] + 2
    budget = 180 + len(cfg["concurrencies"]) * windows * (cfg["warmup"] + cfg["duration"] + 30)
    return run_loadgen_module(children, workdir, cfg, "tests.bench.loadgen", _clean_env(), budget)


def run_loadgen_module(
    children: Children,
    workdir: Path,
    cfg: dict[str, Any],
    module: str,
    env: dict[str, str],
    budget: float,
) -> dict[str, Any]:
    """Runs a load generator process on ``cfg`` within ``budget`` seconds;
    returns the results it wrote."""
    config_file = workdir / "loadgen-config.json"
    out_file = workdir / "loadgen-results.json"
    config_file.write_text(json.dumps(cfg))
    child = children.start(
        "load generator",
        [sys.executable, "-m", module, str(config_file), str(out_file)],
        env=env,
        stdout=None,
        stderr=None,  # its progress lines go to our stderr
        lifeline_on_stdin=True,
        grace=5.0,
    )
    try:
        child.proc.wait(budget)
    except subprocess.TimeoutExpired:
        raise BenchError(f"the load generator did not finish in {budget:g} s") from None
    code = children.stop(child)
    if code != 0:
        raise BenchError(f"the load generator failed (exit {code})")
    results: dict[str, Any] = json.loads(out_file.read_text())
    return results


# --------------------------------------------------------------------------- report


def phase_named(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((dict(p) for p in results["phases"] if p["phase"] == name), None)


def _server_cpu_per_call(phase: dict[str, Any] | None, who: str = "server") -> float:
    if not phase or not phase["calls"]:
        return 0.0
    return float(phase["cpu_s"][who]) / float(phase["calls"])


def compute_ratios(results: dict[str, Any], concurrencies: list[int]) -> list[dict[str, Any]]:
    """The two bars, from RPS; plus, for each, the same ratio from CPU per call.

    The CPU-based figure (echo's server CPU per call over Authenticate's; one
    verify's CPU over one sign-in's server CPU) is what the RPS ratio would be
    if the server were alone and CPU-bound; it is less sensitive to what other
    processes on the machine do during one window but not another.

    For Authenticate also a speed-normalized figure: the client does exactly
    the same work per call in the echo and the Authenticate phases (same bytes
    out, raw bytes back), so its CPU per call measures how fast the machine
    was in each window; the server's CPU per call divided by the client's
    takes that out.
    """
    ratios = []

    def add(
        name: str,
        value: float,
        cpu_value: float,
        bar: float,
        normalized: float | None = None,
        windows: list[float] | None = None,
    ) -> None:
        ratios.append(
            {
                "name": name,
                "value": round(value, 3),
                "bar": bar,
                "meets_bar": value >= bar,
                "cpu_based_value": round(cpu_value, 3),
                "speed_normalized_value": None if normalized is None else round(normalized, 3),
                "window_ratios": windows or [],
                "median_window_ratio": round(statistics.median(windows), 3) if windows else None,
            }
        )

    for c in concurrencies:
        echo = phase_named(results, f"echo@{c}")
        hot = phase_named(results, f"authenticate-hot@{c}")
        if echo and hot and echo["rps"] > 0:
            hot_cpu = _server_cpu_per_call(hot)
            echo_cpu = _server_cpu_per_call(echo)
            cpu_value = echo_cpu / hot_cpu if hot_cpu else 0.0
            hot_client = _server_cpu_per_call(hot, "client")
            echo_client = _server_cpu_per_call(echo, "client")
            normalized = None
            if hot_cpu and echo_client:
                normalized = (echo_cpu / echo_client) / (hot_cpu / hot_client)
            # The windows run A B B A A B ...: window k of one phase sits next
            # to window k of the other, so their ratio saw much the same machine.
            windows = [
                round(h / e, 3)
                for h, e in zip(hot["window_rps"], echo["window_rps"], strict=True)
                if e
            ]
            add(
                f"Authenticate(hot) RPS / echo RPS @{c}",
                hot["rps"] / echo["rps"],
                cpu_value,
                AUTH_BAR,
                normalized,
                windows,
            )
    for k, c in enumerate(concurrencies):
        signin = phase_named(results, f"signin@{c}")
        # The argon2-alone runs just before and just after this phase.
        runs = results["argon2_alone"][k : k + 2]
        argon2_rate = sum(r["verifies_per_s"] for r in runs) / len(runs)
        verifies = sum(r["verifies"] for r in runs)
        verify_cpu = sum(r["cpu_s"]["client"] for r in runs) / verifies if verifies else 0.0
        if signin and argon2_rate > 0:
            signin_cpu = _server_cpu_per_call(signin)
            cpu_value = verify_cpu / signin_cpu if signin_cpu else 0.0
            add(
                f"SignIn RPS / argon2-alone verifies/s @{c}",
                signin["rps"] / argon2_rate,
                cpu_value,
                SIGNIN_BAR,
            )
    return ratios


COMPARE = "metrics-compare:"
METRICS_BAR = 0.95
METERED = "metrics-on"
UNMETERED = "metrics-off"


def _render_metrics_compare(report: dict[str, Any]) -> list[str]:
    """Metrics on / off (``--metrics``): RPS of each, their ratio, the ratio
    per window pair (on and off windows alternate), and the same comparison
    from each server's CPU per call (off's over on's: what the RPS ratio
    would be with each server alone and CPU-bound), plain and divided by the
    client's CPU per call in the same window (the client does the same work
    for both servers, so this takes out how fast the machine was then)."""
    phases = {
        p["phase"][len(COMPARE) :]: p
        for p in report["results"]["phases"]
        if p["phase"].startswith(COMPARE)
    }
    if not phases:
        return []
    control = report["config"].get("metrics_control", False)
    lines = [
        "metrics on vs off: a second server with AUTHSVC_METRICS_LISTEN"
        + (" -- CONTROL RUN: metrics off on both (A/A)" if control else "")
        + (" -- SWAPPED: the first server has them" if report["config"].get("metrics_swap") else "")
        + ", windows interleaved A B B A",
        "  bar: the median of the window pairs' on/off RPS ratios (each pair ran close in time);",
        "  CPU-based: off's server CPU per call over on's; speed-norm: the same, each divided by",
        "  the client's CPU per call in its windows (same client work for both servers)",
        f"{'phase':<22}{'conc':>5}{'RPS off':>10}{'RPS on':>10}{'total':>8}{'median':>8}"
        f"{'bar':>9}{'':<7}{'CPU-based':>10}{'speed-norm':>11}{'p99 off':>9}{'p99 on':>9}",
    ]
    pair_lines = []
    for name, off in phases.items():
        if "+metrics@" in name:
            continue
        base, _, conc = name.partition("@")
        on = phases.get(f"{base}+metrics@{conc}")
        if on is None or not off["rps"]:
            continue
        ratio = on["rps"] / off["rps"]
        pairs = [
            b / a
            for a, b in zip(off.get("window_rps", []), on.get("window_rps", []), strict=False)
            if a
        ]
        median = statistics.median(pairs) if pairs else ratio
        verdict = "meets" if median >= METRICS_BAR else "BELOW"
        off_cpu = _server_cpu_per_call(off, UNMETERED)
        on_cpu = _server_cpu_per_call(on, METERED)
        cpu_ratio = off_cpu / on_cpu if on_cpu else 0.0
        off_client = _server_cpu_per_call(off, "client")
        on_client = _server_cpu_per_call(on, "client")
        normalized = (
            (off_cpu / off_client) / (on_cpu / on_client)
            if on_cpu and off_client and on_client
            else 0.0
        )
        lines.append(
            f"  {base:<20}{conc:>5}{off['rps']:>10.0f}{on['rps']:>10.0f}{ratio:>8.3f}"
            f"{median:>8.3f}{'>= ' + format(METRICS_BAR, '.2f'):>9} {verdict:<6}"
            f"{cpu_ratio:>10.3f}{normalized:>11.3f}{off['p99_ms']:>9.2f}{on['p99_ms']:>9.2f}"
        )
        pair_lines.append(f"  {base}@{conc}: " + ", ".join(f"{x:.2f}" for x in pairs))
    lines.append("per window pair (on/off RPS):")
    lines += pair_lines
    lines.append("")
    return lines


def render(report: dict[str, Any]) -> str:
    lines = []
    machine = report["machine"]
    lines.append(
        f"authsvc benchmark: {machine['cpus']} CPUs ({machine['cpu_model']}), "
        f"load average at start {machine['loadavg_start']}, at end "
        f"{machine.get('loadavg_end', '-')}, Python {machine['python']}, "
        f"grpcio {machine['grpcio']}"
    )
    cfg = report["config"]
    lines.append(
        f"{cfg['sessions']} sessions, {cfg['channels']} client channels, "
        f"warm-up {cfg['warmup']:g} s + {cfg['duration']:g} s measured per phase "
        f"(echo/auth-hot: {cfg['rounds']} interleaved windows each); "
        f"Argon2id m={ARGON2_MEMORY_KIB} KiB t={ARGON2_TIME_COST} p={ARGON2_PARALLELISM}, "
        f"hash_workers={cfg['hash_workers']}; JSON access log at info"
    )
    lines.append("")
    header = (
        f"{'phase':<24}{'conc':>5}{'RPS':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
        f"{'client':>8}{'server':>8}{'pg':>6}{'redis':>6}{'others':>8}"
        f"{'server':>8}{'client':>8}"
    )
    lines.append(f"{'':<64}{'CPU seconds in the measured window':^36}{'us CPU/call':^16}")
    lines.append(header)
    lines.append("-" * len(header))
    for p in report["results"]["phases"]:
        if p["phase"].startswith(COMPARE):
            continue  # their own table below
        cpu = p["cpu_s"]
        errors = sum(p["errors"].values())
        per_call = cpu["server"] / p["calls"] * 1e6 if p["calls"] else float("nan")
        client_per_call = cpu["client"] / p["calls"] * 1e6 if p["calls"] else float("nan")
        name = p["phase"].split("@")[0] + (" (ran out)" if p["exhausted"] else "")
        lines.append(
            f"{name:<24}{p['concurrency']:>5}{p['rps']:>9.0f}{p['p50_ms']:>9.2f}"
            f"{p['p99_ms']:>9.2f}{errors:>8}{cpu['client']:>8.2f}{cpu['server']:>8.2f}"
            f"{cpu['postgres']:>6.2f}{cpu['redis']:>6.2f}{cpu['others']:>8.2f}"
            f"{per_call:>8.0f}{client_per_call:>8.0f}"
        )
    lines.append("")
    runs = report["results"]["argon2_alone"]
    each = ", ".join(
        f"{r['verifies_per_s']:.1f} (others used {r['cpu_s']['others']:.1f} CPU s)" for r in runs
    )
    lines.append(
        f"argon2 alone, verifies/s ({runs[0]['threads']} threads, ~{runs[0]['seconds']:.0f} s "
        f"each, before/between/after the sign-in phases): {each}"
    )
    lines.append(
        "  each sign-in phase is compared with the mean of the runs just before and after it"
    )
    lines.append("")
    lines.append(
        f"{'ratios (this run)':<46}{'RPS':>7}{'bar':>9}{'':<7}{'CPU-based':>11}"
        f"{'speed-normalized':>18}{'median':>8}   per window pair"
    )
    for r in report["ratios"]:
        verdict = "meets" if r["meets_bar"] else "BELOW"
        normalized = r["speed_normalized_value"]
        median = r.get("median_window_ratio")
        lines.append(
            f"  {r['name']:<44}{r['value']:>7.2f}{'>= ' + format(r['bar'], '.2f'):>9} {verdict:<6}"
            f"{r['cpu_based_value']:>11.2f}"
            f"{'-' if normalized is None else format(normalized, '.2f'):>18}"
            f"{'-' if median is None else format(median, '.2f'):>8}   "
            + ", ".join(f"{x:.2f}" for x in r.get("window_ratios", []))
        )
    lines.append(
        "  CPU-based: from server CPU per call (what RPS would give with the server alone"
        " and CPU-bound);"
    )
    lines.append(
        "  speed-normalized: the same, with each window's server CPU per call divided by the"
        " client's (identical"
    )
    lines.append(
        "  client work in echo and Authenticate), which takes out how fast the machine was"
        " in that window."
    )
    lines.append(
        "  median: of the RPS ratios of the window pairs (echo and Authenticate windows"
        " alternate, so each pair ran"
    )
    lines.append("  close in time); --rounds sets how many pairs.")
    lines.append("  'others': CPU used meanwhile by processes outside the benchmark.")
    lines.append("")
    lines += _render_metrics_compare(report)
    lines.append(f"server log: {report['server_log']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


class Interrupted(BaseException):
    pass


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted()


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description="authsvc benchmark (a report, not a test)",
        epilog="The sidecar's cost on the notes example: python -m tests.bench sidecar; "
        "revocation latency: python -m tests.bench revocation (--help for their options).",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per phase")
    parser.add_argument(
        "--concurrency",
        type=int,
        action="append",
        help="concurrency levels (repeatable; default 16 and 64)",
    )
    parser.add_argument("--sessions", type=int, default=200, help="accounts/sessions to prepare")
    parser.add_argument("--channels", type=int, default=4, help="client channels per phase")
    parser.add_argument(
        "--cold-tokens",
        type=int,
        default=6000,
        help="never-seen tokens per cold Authenticate phase (0: skip that phase)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="echo and Authenticate(hot) split their measured time into this many windows, "
        "interleaved A B B A ... (default 2: ABBA; 1: one window each)",
    )
    parser.add_argument("--argon2-seconds", type=float, default=5.0)
    parser.add_argument(
        "--py-spy",
        metavar="PHASE",
        action="append",
        help="record the server with py-spy during PHASE (e.g. authenticate-hot@64; repeatable)",
    )
    parser.add_argument("--py-spy-rate", type=int, default=200)
    parser.add_argument("--py-spy-native", action="store_true")
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs, profile)"
    )
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="also run a second server with AUTHSVC_METRICS_LISTEN set and compare echo and "
        "Authenticate(hot) RPS with metrics on and off, in interleaved windows",
    )
    parser.add_argument(
        "--metrics-pairs",
        type=int,
        default=24,
        help="with --metrics: how many off/on window pairs per phase (A B B A ...; default 24)",
    )
    parser.add_argument(
        "--metrics-window",
        type=float,
        default=1.0,
        help="with --metrics: seconds measured per window (default 1)",
    )
    parser.add_argument(
        "--metrics-swap",
        action="store_true",
        help="with --metrics: the first server has metrics on and the second off",
    )
    parser.add_argument(
        "--metrics-control",
        action="store_true",
        help="with --metrics: the second server has metrics off too (an A/A run: the noise)",
    )
    args = parser.parse_args(argv)
    args.concurrency = args.concurrency or [16, 64]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C and SIGTERM alike: stop what runs, clean up, exit 130.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="authsvc-bench-"))
    children = Children()
    report: dict[str, Any] | None = None
    started = time.monotonic()
    code = 1
    try:
        machine = {
            "cpus": os.cpu_count(),
            "cpu_model": platform.processor() or _cpu_model(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
        }
        infra = start_infra(children, workdir)
        log("migrating")
        migrate.upgrade(infra.database_url)
        metrics_on = {"AUTHSVC_METRICS_LISTEN": "127.0.0.1:0"}
        # --metrics-swap: the first server (the main table's) has metrics on
        # and the second has them off, the other way round from the default,
        # to show that which process is which does not tilt the comparison.
        server = start_server(
            children, workdir, infra, extra=metrics_on if args.metrics and args.metrics_swap else {}
        )
        log(f"server pid {server.pid} on 127.0.0.1:{server.port}")
        metered = None
        if args.metrics:
            # The same server with /metrics on: compared with the first in
            # interleaved windows (the same database, Redis and secret).
            # --metrics-control: both off, an A/A run that shows how far two
            # identical servers' figures drift apart on this machine.
            metered = start_server(
                children,
                workdir,
                infra,
                secret_key=server.secret_key,
                extra={} if args.metrics_control or args.metrics_swap else metrics_on,
                name="metrics-server",
            )
            log(f"second server pid {metered.pid} on 127.0.0.1:{metered.port}")
        cfg: dict[str, Any] = {
            "target": f"127.0.0.1:{server.port}",
            "pids": {
                "server": server.pid,
                "postgres": infra.postgres_pid,
                "redis": infra.redis_pid,
            },
            "database_url": infra.database_url,
            "secret_key": server.secret_key,
            "data_dir": str(workdir / "loadgen-data"),
            "sessions": args.sessions,
            "channels": args.channels,
            "concurrencies": args.concurrency,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "duration": args.duration,
            "cold_tokens": args.cold_tokens,
            "argon2_seconds": args.argon2_seconds,
            "hash_workers": os.cpu_count() or 1,
        }
        if metered is not None:
            on, off = (server, metered) if args.metrics_swap else (metered, server)
            cfg["metrics_target"] = f"127.0.0.1:{on.port}"
            cfg["metrics_off_target"] = f"127.0.0.1:{off.port}"
            cfg["metrics_pairs"] = args.metrics_pairs
            cfg["metrics_window"] = args.metrics_window
            cfg["metrics_control"] = args.metrics_control
            cfg["metrics_swap"] = args.metrics_swap
            # Each side metered on its own, so each one's CPU per call is known.
            cfg["pids"][METERED] = on.pid
            cfg["pids"][UNMETERED] = off.pid
        if args.py_spy:
            cfg["profile"] = {
                "phases": args.py_spy,
                "outdir": str(workdir),
                "rate": args.py_spy_rate,
                "native": args.py_spy_native,
            }
        results = run_loadgen(children, workdir, cfg, args)
        machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        public_cfg = {k: v for k, v in cfg.items() if k not in ("secret_key", "database_url")}
        report = {
            "machine": machine,
            "config": public_cfg,
            "server_settings": server.settings,
            "results": results,
            "ratios": compute_ratios(results, args.concurrency),
        }
        if args.py_spy:
            report["profile"] = {
                name: _profile_summary(workdir / f"py-spy-{name}.txt", results, name)
                for name in args.py_spy
            }
        code = 0
    except (KeyboardInterrupt, Interrupted):  # KeyboardInterrupt: only before our handler
        log("interrupted; stopping everything")
        code = 130
    except BenchError as error:
        log(f"error: {error}")
    finally:
        with _signals_ignored():
            children.stop_all()
            log_file = workdir / "authsvc.log"
            if report is not None:
                report["server_log"] = _log_summary(log_file, args.keep)
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
    for name, text in report.get("profile", {}).items():
        print(f"\npy-spy profile of the server during {name}:\n{text}")
    return code


def _profile_summary(path: Path, results: dict[str, Any], phase_name: str) -> str:
    phase = phase_named(results, phase_name)
    if phase is None or not path.exists():
        return f"(no profile: no phase {phase_name!r} or py-spy wrote nothing)"
    return summary(path, top=30, calls=phase["calls"], cpu=phase["cpu_s"]["server"])


def _log_summary(path: Path, kept: bool) -> str:
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return "(none)"
    where = str(path) if kept else "(deleted; --keep keeps it)"
    return f"{lines} JSON lines, {size / 1e6:.1f} MB {where}"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"

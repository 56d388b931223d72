"""``authsvc`` as a subprocess, exactly as an operator runs it.

Subprocesses log to their own stderr. Whoever reads a spawned process's
output must hand it to ``assert_no_secrets(text, proc=proc)``, which checks it
like the suite's own log (tests.app.find_leaks); ``run_authsvc`` does. The
suite fails at the end if a spawned process's output was never checked.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests import undeclared
from tests.app import UNCHECKED_PROCESSES, find_leaks, remember_master

VENV_BIN = Path(sys.prefix) / "bin"


def authsvc_bin() -> str:
    """The installed console script (what the README tells operators to run)."""
    found = shutil.which("authsvc", path=str(VENV_BIN))
    if found is None:
        pytest.fail(
            f"the authsvc console script is not in {VENV_BIN}; run ./tests/run --setup-only"
        )
    return found


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without any AUTHSVC_*, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHSVC_")}
    env.update(settings)
    return env


#: pid -> (AUTHSVC_SECRET_KEY, the secret.key file it would make) of each spawned process
_MASTERS_OF: dict[int, tuple[str | None, Path | None]] = {}


def assert_no_secrets(
    text: str, *extra: str, proc: asyncio.subprocess.Process | None = None
) -> None:
    """``text`` (a subprocess's output) shows no secret; ``proc``'s output is
    marked as checked. The error reasons it logged as undeclared are noted
    (``tests.undeclared``)."""
    undeclared.note_output(text)
    if proc is not None:
        UNCHECKED_PROCESSES.pop(proc.pid, None)
        # The process's master secret, configured or made on first start:
        # its subkeys are searched for too.
        configured, key_file = _MASTERS_OF.pop(proc.pid, (None, None))
        if configured:
            remember_master(configured)
        if key_file is not None and key_file.is_file():
            remember_master(key_file.read_text().strip())
    leaks = find_leaks(text, *extra)
    assert not leaks, f"a subprocess's output shows {', '.join(leaks)}"


def env_secrets(env: dict[str, str]) -> list[str]:
    """Secrets handed to a subprocess in its environment (the database password)."""
    url = env.get("AUTHSVC_DATABASE_URL")
    password = urlsplit(url).password if url else None
    return [password] if password and len(password) >= 8 else []


SPAWNED_LIMITS = {
    "AUTHSVC_SIGNIN_ATTEMPTS_PER_IP": "1000000",
    "AUTHSVC_SIGNIN_ATTEMPTS_PER_EMAIL": "1000000",
}


async def spawn_authsvc(
    *args: str,
    env: dict[str, str],
    stdin: bool = False,
    cwd: Path | None = None,
    console_script: bool = True,
) -> asyncio.subprocess.Process:
    """Starts ``authsvc ARGS`` with piped output, without blocking the event loop.

    ``console_script=False`` runs ``python -m authsvc`` instead of the script.
    """
    program = [authsvc_bin()] if console_script else [sys.executable, "-m", "authsvc"]
    # The suite's servers share one Redis and one client address, 127.0.0.1,
    # so the sign-in limits count every test's attempts: as high as the
    # in-process servers' (tests.app.test_settings), unless a test sets them.
    env = {**SPAWNED_LIMITS, **env}
    proc = await asyncio.create_subprocess_exec(
        *program,
        *args,
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=cwd,
    )
    UNCHECKED_PROCESSES[proc.pid] = " ".join(["authsvc", *args])
    data_dir = env.get("AUTHSVC_DATA_DIR")
    key_file = Path(data_dir) if data_dir else (cwd or Path.cwd()) / ".authsvc"
    _MASTERS_OF[proc.pid] = (env.get("AUTHSVC_SECRET_KEY"), key_file / "secret.key")
    return proc


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str


async def run_authsvc(
    *args: str, env: dict[str, str], stdin: str | None = None, seconds: float = 90
) -> Result:
    """Runs ``authsvc ARGS`` to completion; its stderr must hold no secret."""
    proc = await spawn_authsvc(*args, env=env, stdin=stdin is not None)
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(stdin.encode() if stdin is not None else None), seconds
        )
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        assert_no_secrets(err.decode(errors="replace"), *env_secrets(env), proc=proc)
        raise AssertionError(f"authsvc {' '.join(args)} did not finish in {seconds}s") from None
    assert proc.returncode is not None
    result = Result(proc.returncode, out.decode(), err.decode())
    assert_no_secrets(result.stderr, *env_secrets(env), proc=proc)
    return result


async def run_async(
    *cmd: str | Path,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    seconds: float = 60,
) -> tuple[int, str, str]:
    """Runs ``cmd`` to completion without blocking the event loop (a server
    the test runs may be on it): its exit status, stdout and stderr. A run
    longer than ``seconds`` is killed and fails the test."""
    proc = await asyncio.create_subprocess_exec(
        *map(str, cmd),
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), seconds)
    except TimeoutError:
        proc.kill()
        await proc.communicate()
        raise AssertionError(f"{cmd} did not finish in {seconds}s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")

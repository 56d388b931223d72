"""``authsvc-client`` installable alone: its wheel in a fresh virtualenv.

The module builds the wheel of ``clients/`` once (``pip wheel --no-deps``, from a
copy of the distribution's files, so nothing a former build left in the
source tree can slip in), creates a virtualenv (``python -m venv``, no system
site-packages) and installs the wheel there; its dependencies come from the
package index (pip's cache spares the network). Then, in that virtualenv
only:

- nothing of the server is installed, and the client's modules import from it;
- the README's five lines that wire the sidecar into a service run against a
  live authsvc;
- the notes example (``clients/examples/notes``, which stays in the source
  tree and is not in the wheel) runs as its README says: its server behind
  the sidecar, then its demo.

The example's sources are copied out alone, so the source tree's
``authsvc_client`` is not on the path: every import of it is the wheel's.
"""

from __future__ import annotations

import asyncio
import email.parser
import json
import os
import re
import shutil
import sys
import textwrap
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.app import API_KEY, Api, find_leaks, remember
from tests.processes import run_async

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = ROOT / "clients"
SECTION = "## Services that call authsvc"
_FENCE = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)

#: What the wheel may require, by normalised name: (extra or None, name).
REQUIRES = {
    (None, "grpcio"),
    (None, "grpcio-status"),
    (None, "protobuf"),
    (None, "googleapis-common-protos"),
    (None, "pyjwt"),
    ("metrics", "prometheus-client"),
}
#: The server's own dependencies, which a caller must not get.
SERVER_ONLY = (
    "authsvc",
    "sqlalchemy",
    "asyncpg",
    "aiosqlite",
    "alembic",
    "argon2-cffi",
    "redis",
    "structlog",
    "prometheus-client",
    "pydantic-settings",
    "email-validator",
    "opentelemetry-sdk",
    "grpcio-reflection",
    "grpcio-health-checking",
)


@dataclass(frozen=True)
class ClientVenv:
    wheel: Path
    python: Path
    #: holds only ``examples/`` (the notes example), for PYTHONPATH
    examples: Path

    def env(self, **extra: str) -> dict[str, str]:
        """A plain environment for the virtualenv's python: no PYTHONPATH but ours,
        no AUTHSVC_* of this process."""
        drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
        env = {
            k: v for k, v in os.environ.items() if k not in drop and not k.startswith("AUTHSVC_")
        }
        env["PYTHONPATH"] = str(self.examples)
        env.update(extra)
        return env


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


async def run(
    *cmd: str | Path, env: dict[str, str] | None = None, seconds: float = 120
) -> tuple[str, str]:
    """``run_async`` that fails on a non-zero exit: stdout and stderr."""
    code, stdout, stderr = await run_async(*cmd, env=env, seconds=seconds)
    assert code == 0, f"{cmd} exited {code}:\n{stdout}\n{stderr}"
    return stdout, stderr


@pytest.fixture(scope="module")
async def client_venv(tmp_path_factory: pytest.TempPathFactory) -> ClientVenv:
    tmp = tmp_path_factory.mktemp("client-package")
    source = tmp / "clients"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(CLIENTS / name, source / name)
    shutil.copytree(
        CLIENTS / "authsvc_client",
        source / "authsvc_client",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    dist = tmp / "dist"
    await run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, source)
    wheels = sorted(dist.glob("*.whl"))
    assert [w.name for w in wheels] == ["authsvc_client-0.1.0-py3-none-any.whl"]

    venv = tmp / "venv"
    await run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    await run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheels[0])

    examples = tmp / "src"
    shutil.copytree(
        CLIENTS / "examples", examples / "examples", ignore=shutil.ignore_patterns("__pycache__")
    )
    return ClientVenv(wheels[0], python, examples)


# -- the wheel -------------------------------------------------------------------


def test_the_wheel_holds_the_client_package_and_its_stubs(client_venv: ClientVenv) -> None:
    with zipfile.ZipFile(client_venv.wheel) as wheel:
        names = set(wheel.namelist())
        metadata = email.parser.Parser().parsestr(
            wheel.read("authsvc_client-0.1.0.dist-info/METADATA").decode()
        )
    info = "authsvc_client-0.1.0.dist-info/"
    assert {n for n in names if not n.startswith(info)} == {
        p.relative_to(CLIENTS).as_posix()
        for p in (CLIENTS / "authsvc_client").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert "authsvc_client/py.typed" in names
    modules = {n for n in names if n.startswith("authsvc_client/v1/") and n.endswith("_pb2.py")}
    assert len(modules) >= 7
    for module in modules:
        assert f"{module}i" in names, f"{module} has no stub"
        assert module.replace("_pb2.py", "_pb2_grpc.pyi") in names
    assert not any(n.startswith(("examples/", "authsvc/")) for n in names)

    assert metadata["Name"] == "authsvc-client"
    assert metadata["Version"] == "0.1.0"
    lines = metadata.get_all("Requires-Dist") or []
    requires = set()
    for line in lines:
        name = _normalise(re.split(r"[\s\[<>=!~;(]", line, maxsplit=1)[0])
        extra = re.search(r"""extra\s*==\s*["']([^"']+)""", line)
        requires.add((extra.group(1) if extra else None, name))
    assert requires == REQUIRES
    # EdDSA verification needs PyJWT's crypto extra (cryptography).
    assert any(line.lower().startswith("pyjwt[crypto]") for line in lines), lines


async def test_the_venv_has_the_client_and_nothing_of_the_server(
    client_venv: ClientVenv,
) -> None:
    out, _ = await run(
        client_venv.python, "-m", "pip", "list", "--format=json", env=client_venv.env()
    )
    installed = {_normalise(p["name"]): p["version"] for p in json.loads(out)}
    assert installed.get("authsvc-client") == "0.1.0"
    assert {"grpcio", "grpcio-status", "protobuf", "pyjwt", "cryptography"} <= set(installed)
    present = sorted(set(SERVER_ONLY) & set(installed))
    assert not present, f"the client's virtualenv has server dependencies: {present}"

    probe = textwrap.dedent(
        """
        import importlib, json, sys
        names = ["authsvc_client", "authsvc_client.sidecar", "authsvc_client.scoping",
                 "authsvc_client.client", "authsvc_client.errors", "authsvc_client.v1.auth_pb2",
                 "authsvc_client.v1.auth_pb2_grpc"]
        files = {n: importlib.import_module(n).__file__ for n in names}
        server = [m for m in ("authsvc", "sqlalchemy", "redis", "prometheus_client")
                  if m in sys.modules]
        print(json.dumps({"files": files, "prefix": sys.prefix, "server": server}))
        """
    )
    out, _ = await run(client_venv.python, "-c", probe, env=client_venv.env())
    result = json.loads(out)
    assert _same(result["prefix"], client_venv.python.parent.parent)
    for name, file in result["files"].items():
        assert _inside(file, result["prefix"]), f"{name} came from {file}"
    assert result["server"] == []


def _same(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _inside(file: str, prefix: str) -> bool:
    return Path(file).resolve().is_relative_to(Path(prefix).resolve())


# -- the README's five lines -------------------------------------------------------


def readme_wiring() -> str:
    """The README's sidecar wiring: the python block of its "Services that call
    authsvc" section that starts the sidecar."""
    readme = (ROOT / "README.md").read_text()
    at = readme.find(SECTION)
    assert at >= 0, f"README.md has no {SECTION!r} section"
    end = readme.find("\n## ", at + len(SECTION))
    blocks = [b for b in _FENCE.findall(readme[at:end]) if "await sidecar.start()" in b]
    assert len(blocks) == 1, f"{len(blocks)} python blocks start the sidecar, not one"
    block = str(blocks[0])
    code = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(code) == 5, f"the wiring is {len(code)} lines, not five:\n{block}"
    return block


# Runs the README's block in a service of one public and one protected raw
# method, between its last line (closing the sidecar) and the rest.
_HARNESS = """
import asyncio, json, os, sys
import grpc
from authsvc_client.client import AuthsvcClient, SignedIn
from authsvc_client.errors import from_rpc_error


async def who(request, context):
    session = current_session()
    return (session.user_id if session is not None else "-").encode()


async def main():
{before}
    handler = grpc.method_handlers_generic_handler("pkg.Svc", {{
        "Ping": grpc.unary_unary_rpc_method_handler(who),
        "Whoami": grpc.unary_unary_rpc_method_handler(who),
    }})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    out = {{}}
    async with AuthsvcClient(os.environ["AUTHSVC_TARGET"]) as auth:
        signed = await auth.sign_up(email=os.environ["EMAIL"], password=os.environ["PASSWORD"])
        assert isinstance(signed, SignedIn)
    out["user_id"] = signed.user.id
    bearer = [("authorization", "Bearer " + signed.tokens.access_token)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{{port}}") as channel:
        ping = channel.unary_unary("/pkg.Svc/Ping")
        whoami = channel.unary_unary("/pkg.Svc/Whoami")
        out["ping"] = (await ping(b"")).decode()
        try:
            await whoami(b"")
            out["anonymous"] = "answered"
        except grpc.aio.AioRpcError as error:
            out["anonymous"] = [error.code().name, from_rpc_error(error).reason]
        out["whoami"] = (await whoami(b"", metadata=bearer)).decode()
    await server.stop(0)
{after}
    print(json.dumps(out))


asyncio.run(main())
"""


def wiring_script(block: str) -> str:
    lines = block.splitlines()
    imports = [line for line in lines if line.startswith(("from ", "import "))]
    body = [line for line in lines if line not in imports]
    closing = [i for i, line in enumerate(body) if line.startswith("await sidecar.close()")]
    assert len(closing) == 1, "the wiring does not end with closing the sidecar"
    before, after = body[: closing[0]], body[closing[0] :]
    indent = "    "
    return "\n".join(imports) + _HARNESS.format(
        before=textwrap.indent("\n".join(before), indent) or f"{indent}pass",
        after=textwrap.indent("\n".join(after), indent),
    )


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
async def test_the_readmes_five_lines_wire_the_sidecar(
    client_venv: ClientVenv, api: Api, tmp_path: Path
) -> None:
    script = tmp_path / "service.py"
    script.write_text(wiring_script(readme_wiring()))
    password = f"pw-{uuid.uuid4().hex}"
    remember(password)
    env = client_venv.env(
        AUTHSVC_TARGET=api.target,
        AUTHSVC_API_KEY=API_KEY,
        EMAIL=f"wiring-{uuid.uuid4().hex[:8]}@example.com",
        PASSWORD=password,
    )
    out, err = await run(client_venv.python, script, env=env, seconds=60)
    assert not find_leaks(out + err), find_leaks(out + err)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ping"] == "-"  # public: answered, nobody is calling
    assert result["anonymous"] == ["UNAUTHENTICATED", "NOT_AUTHENTICATED"]
    assert result["whoami"] == result["user_id"]


# -- the notes example -----------------------------------------------------------


async def read_port(stream: asyncio.StreamReader, seconds: float) -> tuple[int, list[str]]:
    """The port of the notes server's "notes: serving on port N" line."""
    seen: list[str] = []
    async with asyncio.timeout(seconds):
        while line := (await stream.readline()).decode():
            seen.append(line)
            if found := re.match(r"notes: serving on port (\d+)", line):
                return int(found.group(1)), seen
    raise AssertionError(f"the notes server exited before serving: {seen}")


async def stop(proc: asyncio.subprocess.Process) -> str:
    if proc.returncode is None:
        proc.terminate()
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 15)
    except TimeoutError:
        proc.kill()
        _, err = await proc.communicate()
    return err.decode(errors="replace") if err else ""


def _lines(text: str, expected: Sequence[str]) -> None:
    lines = text.strip().splitlines()
    assert len(lines) == len(expected), lines
    for line, pattern in zip(lines, expected, strict=True):
        assert re.fullmatch(pattern, line), (line, pattern)


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
async def test_the_notes_example_runs_from_the_client_venv(
    client_venv: ClientVenv, api: Api
) -> None:
    env = client_venv.env(AUTHSVC_API_KEY=API_KEY)
    server = await asyncio.create_subprocess_exec(
        str(client_venv.python),
        "-m",
        "examples.notes",
        "--authsvc",
        api.target,
        "--listen",
        "127.0.0.1:0",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert server.stdout is not None
        port, _ = await read_port(server.stdout, 30)
        out, err = await run(
            client_venv.python,
            "-m",
            "examples.notes.demo",
            "--authsvc",
            api.target,
            "--notes",
            f"127.0.0.1:{port}",
            env=env,
            seconds=60,
        )
    finally:
        server_err = await stop(server)
    assert not find_leaks(out + err + server_err), find_leaks(out + err + server_err)
    uuid_ = r"[0-9a-f-]{36}"
    # What the example's README says it prints.
    _lines(
        out,
        [
            rf"ada: user {uuid_}, active org ada-\w+ \({uuid_}\)",
            rf"bob: user {uuid_}, active org bob-\w+ \({uuid_}\)",
            rf"ada created note {uuid_} in ada-\w+",
            r"ada lists \['hello'\] \(naming her org by slug\)",
            r"ada listing bob's org by id: refused before sending: "
            r"PERMISSION_DENIED / ORG_MISMATCH",
            r"ada listing bob's org by slug: refused before sending: "
            r"PERMISSION_DENIED / ORG_MISMATCH",
        ],
    )

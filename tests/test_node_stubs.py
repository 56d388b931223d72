"""The README's "Other languages" section, run: stubs generated from protos/
with a plugin from npm, and a Node caller using them against a live authsvc.

The TypeScript/JavaScript template and the script are the README's blocks as
written. ``buf generate`` runs protoc-gen-es (``@bufbuild/protoc-gen-es``, as
``tests/node/package-lock.json`` pins it; ``tests/run`` installs it into
``.venv/node``) into a temporary directory, so nothing generated is committed;
then Node runs the script, which speaks real gRPC over HTTP/2 through
``@connectrpc/connect-node``'s ``createGrpcTransport``: SignUp,
SignInWithPassword (the SignInResult oneof), Authenticate, and the ErrorInfo
of a wrong password.

The Go template cannot be run here (no Go toolchain); what it relies on is
checked: buf accepts its input, and its ``module=`` option fits the
``go_package`` of every file it generates.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2

from tests.app import Api, find_leaks, remember
from tests.processes import run_async

ROOT = Path(__file__).resolve().parent.parent
NODE_MODULES = Path(sys.prefix) / "node" / "node_modules"
BUF = Path(sys.prefix) / "bin" / "buf"
SECTION = "## Other languages: Go and TypeScript"
PACKAGES = (
    "@bufbuild/protoc-gen-es",
    "@bufbuild/protobuf",
    "@connectrpc/connect",
    "@connectrpc/connect-node",
)


def _blocks(language: str) -> list[str]:
    readme = (ROOT / "README.md").read_text()
    at = readme.find(SECTION)
    assert at >= 0, f"README.md has no {SECTION!r} section"
    end = readme.find("\n## ", at + len(SECTION))
    fence = re.compile(rf"^```{language}\n(.*?)^```$", re.MULTILINE | re.DOTALL)
    return [str(b) for b in fence.findall(readme[at:end])]


def readme_block(language: str, marker: str) -> str:
    """The one ``language`` block of the section that mentions ``marker``."""
    found = [b for b in _blocks(language) if marker in b]
    assert len(found) == 1, f"{len(found)} {language} blocks with {marker!r} in {SECTION!r}"
    return found[0]


@pytest.fixture(scope="module")
def node() -> str:
    found = shutil.which("node")
    if found is None:
        pytest.fail("node is not installed (./tests/run installs nodejs with apt-get)")
    for package in PACKAGES:
        if not (NODE_MODULES / package / "package.json").is_file():
            pytest.fail(f"{package} is not in {NODE_MODULES}: run ./tests/run (npm ci)")
    return found


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(NODE_MODULES / ".bin"), os.environ.get("PATH", "")])
    return {"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), **extra}


async def generate_es(tmp: Path) -> Path:
    """The README's template, run from the repository root into ``tmp``."""
    template = tmp / "buf.gen.yaml"
    template.write_text(readme_block("yaml", "protoc-gen-es"))
    code, out, err = await run_async(
        BUF, "generate", "--template", template, "--output", tmp, cwd=ROOT, env=_env()
    )
    assert code == 0, out + err
    return tmp / "gen"


async def test_protoc_gen_es_generates_every_file_as_an_es_module(
    node: str, tmp_path: Path
) -> None:
    gen = await generate_es(tmp_path)
    protos = sorted(p.relative_to(ROOT / "protos") for p in (ROOT / "protos").rglob("*.proto"))
    expected = {p.with_name(f"{p.stem}_pb.js").as_posix() for p in protos}
    assert {p.relative_to(gen).as_posix() for p in gen.rglob("*.js")} == expected
    auth = (gen / "authsvc" / "v1" / "auth_pb.js").read_text()
    assert "export const AuthService" in auth
    # Relative imports carry their extension: Node's ES modules need it.
    relative = re.findall(r'^import .* from "(\.[^"]+)";$', auth, re.MULTILINE)
    assert relative
    assert all(spec.endswith("_pb.js") for spec in relative), relative


async def test_node_signs_in_and_authenticates_with_the_generated_stubs(
    node: str, api: Api, tmp_path: Path
) -> None:
    await generate_es(tmp_path)
    # An ES module package whose imports of the npm packages resolve (ES
    # modules ignore NODE_PATH: node_modules is found beside the script).
    (tmp_path / "package.json").write_text('{"type": "module"}\n')
    (tmp_path / "node_modules").symlink_to(NODE_MODULES, target_is_directory=True)
    (tmp_path / "signin.mjs").write_text(readme_block("js", "createGrpcTransport"))
    password = f"node stubs {uuid.uuid4().hex}"
    remember(password, f"not {password}")
    env = _env(
        AUTHSVC_TARGET=api.target,
        EMAIL=f"node-{uuid.uuid4().hex[:8]}@example.com",
        PASSWORD=password,
    )
    code, out, err = await run_async(node, "signin.mjs", cwd=tmp_path, env=env)
    assert code == 0, out + err
    assert not find_leaks(out + err), find_leaks(out + err)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    assert re.fullmatch(r"[0-9a-f-]{36}", result["userId"])
    assert result["session"] == result["userId"]
    # 16: UNAUTHENTICATED
    assert result["refused"] == {"code": 16, "reason": "INVALID_CREDENTIALS", "domain": "authsvc"}


async def test_the_go_templates_module_fits_every_go_package(tmp_path: Path) -> None:
    template = readme_block("yaml", "protoc-gen-go")
    modules = set(re.findall(r"^\s*opt: module=(\S+)$", template, re.MULTILINE))
    assert len(modules) == 1, modules
    module = modules.pop()
    assert set(re.findall(r"^\s*- local: (\S+)$", template, re.MULTILINE)) == {
        "protoc-gen-go",
        "protoc-gen-go-grpc",
    }
    directory = re.search(r"^\s*- directory: (\S+)$", template, re.MULTILINE)
    excluded = re.search(r"^\s*exclude_paths: \[([^\]]*)\]", template, re.MULTILINE)
    assert directory
    assert excluded
    image = tmp_path / "image.binpb"
    args: list[str | Path] = [BUF, "build", directory.group(1), "--exclude-imports"]
    for path in excluded.group(1).split(","):
        args += ["--exclude-path", path.strip()]
    code, out, err = await run_async(*args, "-o", image, cwd=ROOT, env=_env())
    assert code == 0, out + err
    files = descriptor_pb2.FileDescriptorSet.FromString(image.read_bytes()).file
    names = sorted(f.name for f in files)
    assert names == sorted(
        p.relative_to(ROOT / "protos").as_posix()
        for p in (ROOT / "protos" / "authsvc").rglob("*.proto")
    )
    for file in files:
        go_package = file.options.go_package.split(";")[0]
        assert go_package.startswith(f"{module}/"), (file.name, go_package)

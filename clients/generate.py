"""Regenerates the Python code for the authsvc.v1 protos.

    python clients/generate.py           # rewrite clients/authsvc_client/v1/
    python clients/generate.py --check   # exit 1 when the committed code is stale

protoc names modules after the proto path (``authsvc.v1.users_pb2``), which
would collide with the server package ``authsvc``; the generated modules live
in ``authsvc_client.v1`` instead, so their cross-imports are made relative.
(protoletariat does this rewrite, but pins protobuf below 6.)
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc_tools

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "clients" / "authsvc_client" / "v1"

# `from authsvc.v1 import users_pb2 as ...` (protoc, grpc) and
# `import authsvc.v1.users_pb2` (mypy-protobuf .pyi).
_FROM_IMPORT = re.compile(r"^from authsvc\.v1 import ", re.MULTILINE)
_PLAIN_IMPORT = re.compile(r"^import authsvc\.v1\.(\w+)$", re.MULTILINE)
_QUALIFIED = re.compile(r"\bauthsvc\.v1\.(\w+_pb2)\b")


def _relativize(text: str) -> str:
    text = _FROM_IMPORT.sub("from . import ", text)
    text = _PLAIN_IMPORT.sub(r"from . import \1", text)
    return _QUALIFIED.sub(r"\1", text)


def generate(dest: Path) -> None:
    # protos/google is vendored googleapis; its Python code comes from the
    # googleapis-common-protos package.
    protos = sorted(p.relative_to(PROTOS).as_posix() for p in (PROTOS / "authsvc").rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        bin_dir = Path(sys.executable).parent
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *protos,
        ]
        subprocess.run(cmd, check=True)  # noqa: S603
        generated = Path(tmp) / "authsvc" / "v1"
        dest.mkdir(parents=True, exist_ok=True)
        for old in dest.iterdir():
            if old.is_file():
                old.unlink()
        for src in sorted(generated.iterdir()):
            (dest / src.name).write_text(_relativize(src.read_text()))
        (dest / "__init__.py").write_text('"""Generated authsvc.v1 messages and stubs."""\n')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the code is stale")
    args = parser.parse_args()
    if not args.check:
        generate(OUT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "v1"
        generate(fresh)
        names = sorted({p.name for p in fresh.iterdir()} | {p.name for p in OUT.glob("*")})
        _, mismatch, errors = filecmp.cmpfiles(fresh, OUT, names, shallow=False)
        stale = [n for n in mismatch + errors if n != "__pycache__"]
        if stale:
            print(f"stale generated code: {', '.join(stale)}; run python clients/generate.py")
            return 1
        print("generated code is up to date")
        return 0


if __name__ == "__main__":
    shutil.rmtree(OUT / "__pycache__", ignore_errors=True)
    sys.exit(main())

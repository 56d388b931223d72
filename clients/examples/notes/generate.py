"""Regenerates the Python code of ``notes.proto`` beside it.

    python clients/examples/notes/generate.py           # rewrite notes_pb2*.py(i)
    python clients/examples/notes/generate.py --check   # exit 1 when they are stale

The generated imports are made to fit where the code lives: ``notes_pb2`` is a
module of this package (``from . import notes_pb2``), and authsvc's options
come from ``authsvc_client.v1``.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc_tools

HERE = Path(__file__).resolve().parent
PROTOS = HERE.parents[2] / "protos"  # authsvc's protos, for the tenant option
NAMES = ("notes_pb2.py", "notes_pb2.pyi", "notes_pb2_grpc.py", "notes_pb2_grpc.pyi")

_REWRITES = [
    (re.compile(r"^import notes_pb2 as ", re.MULTILINE), "from . import notes_pb2 as "),
    (re.compile(r"^import notes_pb2$", re.MULTILINE), "from . import notes_pb2"),
    (re.compile(r"^from authsvc\.v1 import ", re.MULTILINE), "from authsvc_client.v1 import "),
    (re.compile(r"^import authsvc\.v1\.(\w+)$", re.MULTILINE), r"from authsvc_client.v1 import \1"),
    (re.compile(r"\bauthsvc\.v1\.(\w+_pb2)\b"), r"\1"),
]


def generate(dest: Path) -> None:
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(  # noqa: S603
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{HERE}",
                f"-I{PROTOS}",
                f"-I{well_known}",
                f"--python_out={tmp}",
                f"--grpc_python_out={tmp}",
                f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
                f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
                f"--mypy_out={tmp}",
                f"--mypy_grpc_out={tmp}",
                "notes.proto",
            ],
            check=True,
        )
        for name in NAMES:
            text = (Path(tmp) / name).read_text()
            for pattern, replacement in _REWRITES:
                text = pattern.sub(replacement, text)
            (dest / name).write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the code is stale")
    args = parser.parse_args()
    if not args.check:
        generate(HERE)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [n for n in NAMES if (Path(tmp) / n).read_text() != (HERE / n).read_text()]
    if stale:
        print(f"stale generated code: {', '.join(stale)}; run python {Path(__file__).name}")
        return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())

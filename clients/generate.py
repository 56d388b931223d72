"""Regenerates the Python code for the authsvc.v1 protos.

    python clients/generate.py           # rewrite clients/authsvc_client/v1/
    python clients/generate.py --check   # exit 1 when the committed code is stale

It runs ``buf generate`` with the repository's ``buf.gen.yaml`` (local plugins:
protoc's Python generator from grpcio-tools, gRPC's, mypy-protobuf's two), with
this interpreter's bin directory first on PATH so that the template's
``python`` and ``protoc-gen-mypy*`` are those of the environment running this.

protoc names modules after the proto path (``authsvc.v1.users_pb2``), which
would collide with the server package ``authsvc``; the generated modules live
in ``authsvc_client.v1`` instead, so their cross-imports are made relative.
(protoletariat does this rewrite, but pins protobuf below 6.)

``python clients/generate.py --plugin=NAME`` is a protoc plugin (buf.gen.yaml
runs it for ``python`` and ``grpc_python``): it passes the request to
grpcio-tools' protoc as a descriptor set, as buf does for protoc's own
builtins. gRPC's Python generator is compiled into that protoc and is no
builtin buf can proxy; protoc's Python generator goes the same way because buf
fills in every field's ``json_name``, which protoc leaves unset when it reads
the .proto files itself. The generated modules embed their file's descriptor,
which server reflection serves, and grpcurl prints a field by an explicit
``json_name`` (``accessToken``) but by its proto name (``access_token``)
otherwise: the default ones are dropped here, so reflection serves the same
descriptors as ever and grpcurl's JSON keeps the proto field names.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "clients" / "authsvc_client" / "v1"
# Where buf.gen.yaml's plugins write, under buf's --output.
RAW = Path("build") / "python" / "authsvc" / "v1"

# `from authsvc.v1 import users_pb2 as ...` (protoc, grpc) and
# `import authsvc.v1.users_pb2` (mypy-protobuf .pyi).
_FROM_IMPORT = re.compile(r"^from authsvc\.v1 import ", re.MULTILINE)
_PLAIN_IMPORT = re.compile(r"^import authsvc\.v1\.(\w+)$", re.MULTILINE)
_QUALIFIED = re.compile(r"\bauthsvc\.v1\.(\w+_pb2)\b")


def _relativize(text: str) -> str:
    text = _FROM_IMPORT.sub("from . import ", text)
    text = _PLAIN_IMPORT.sub(r"from . import \1", text)
    return _QUALIFIED.sub(r"\1", text)


def _buf() -> str:
    bin_dir = Path(sys.executable).parent
    found = shutil.which("buf", path=str(bin_dir)) or shutil.which("buf")
    if found is None:
        raise SystemExit("buf is not installed (it comes with the dev extra: buf-bin)")
    return found


def generate(dest: Path) -> None:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])}
    with tempfile.TemporaryDirectory() as tmp:
        # mypy-protobuf says "Writing mypy to ..." for every file: shown only
        # when something fails.
        done = subprocess.run(  # noqa: S603
            [_buf(), "generate", "--template", "buf.gen.yaml", "--output", tmp],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            sys.stderr.write(done.stdout + done.stderr)
            raise SystemExit(f"buf generate failed (exit {done.returncode})")
        generated = Path(tmp) / RAW
        dest.mkdir(parents=True, exist_ok=True)
        for old in dest.iterdir():
            if old.is_file():
                old.unlink()
        for src in sorted(generated.iterdir()):
            (dest / src.name).write_text(_relativize(src.read_text()))
        (dest / "__init__.py").write_text('"""Generated authsvc.v1 messages and stubs."""\n')


def run_plugin(name: str) -> int:
    """Answers the CodeGeneratorRequest on stdin with grpcio-tools' ``name`` generator."""
    from google.protobuf import descriptor_pb2
    from google.protobuf.compiler import plugin_pb2
    from grpc_tools import protoc

    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    for file in request.proto_file:
        _drop_default_json_names(file.message_type, file.extension)
    response = plugin_pb2.CodeGeneratorResponse(
        supported_features=plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    )
    with tempfile.TemporaryDirectory() as tmp:
        descriptors = Path(tmp) / "request.binpb"
        descriptors.write_bytes(
            descriptor_pb2.FileDescriptorSet(file=request.proto_file).SerializeToString()
        )
        out = Path(tmp) / "out"
        out.mkdir()
        args = [
            "grpc_tools.protoc",
            f"--descriptor_set_in={descriptors}",
            f"--{name}_out={out}",
            *([f"--{name}_opt={request.parameter}"] if request.parameter else []),
            *request.file_to_generate,
        ]
        if protoc.main(args) != 0:
            response.error = f"grpc_tools.protoc --{name}_out failed"
        else:
            for path in sorted(p for p in out.rglob("*") if p.is_file()):
                response.file.add(name=path.relative_to(out).as_posix(), content=path.read_text())
    sys.stdout.buffer.write(response.SerializeToString())
    return 0


def _drop_default_json_names(messages: Iterable[Any], extensions: Iterable[Any] = ()) -> None:
    for field in extensions:
        if field.json_name == _camel(field.name):
            field.ClearField("json_name")
    for message in messages:
        for field in message.field:
            if field.json_name == _camel(field.name):
                field.ClearField("json_name")
        _drop_default_json_names(message.nested_type, message.extension)


def _camel(name: str) -> str:
    """protoc's default json_name: underscores dropped, the next letter upper-cased."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the code is stale")
    parser.add_argument("--plugin", metavar="NAME", help="run as grpcio-tools' protoc plugin NAME")
    args = parser.parse_args()
    if args.plugin:
        return run_plugin(args.plugin)
    shutil.rmtree(OUT / "__pycache__", ignore_errors=True)
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
    sys.exit(main())

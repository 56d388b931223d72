"""Summarises a ``py-spy record --format raw`` profile (collapsed stacks).

``python -m tests.bench.collapsed FILE [--top N] [--calls N]``: the functions
with the most samples on top of the stack ("self") and anywhere in it
("total"), as a share of all samples; with ``--calls`` (the RPCs completed
during the recording) also the microseconds of CPU per call each one costs,
given the CPU seconds the server used (``--cpu``).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")


def load(path: Path) -> tuple[collections.Counter[str], collections.Counter[str], int]:
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        count = int(match["count"])
        frames = [_short(f) for f in match["stack"].split(";")]
        # Drop the thread/process prefix frame(s) py-spy adds.
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    return own, total, samples


def _short(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py:123)"; line numbers
    # are dropped so one function's lines add up.
    match = re.match(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$", frame)
    if not match:
        return frame
    file = match["file"]
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{match['fn']} ({file})"


def summary(path: Path, top: int = 25, calls: int = 0, cpu: float = 0.0) -> str:
    own, total, samples = load(path)
    if not samples:
        return f"{path}: no samples"
    per_call = cpu / calls * 1e6 if calls and cpu else 0.0
    head = f"{samples} samples"
    if per_call:
        head += f"; {per_call:.0f} us server CPU per call"
    lines = [head]
    for title, counter in (("self", own), ("total (inclusive)", total)):
        lines.append(f"-- top {top} by {title} --")
        for frame, count in counter.most_common(top):
            share = count / samples
            extra = f"  ~{share * per_call:6.1f} us/call" if per_call else ""
            lines.append(f"{share * 100:6.1f}%{extra}  {frame}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.collapsed")
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--calls", type=int, default=0, help="RPCs completed while recording")
    parser.add_argument("--cpu", type=float, default=0.0, help="server CPU seconds meanwhile")
    args = parser.parse_args(argv)
    print(summary(args.file, args.top, args.calls, args.cpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())

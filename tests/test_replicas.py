"""Two replicas on one PostgreSQL and one Redis: revocations cross over.

Postgres backend only. Each replica keeps its own Authenticate cache; a
sign-out or a role change on one must reach the other through the event log
(the Redis stream, or the database's log while Redis is down), and what was
cached before the follower lost the stream is not trusted afterwards.
"""

from __future__ import annotations

import asyncio
import signal
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import grpc
import pytest
from pytest_redis import factories as redis_factories
from pytest_redis.executor import RedisExecutor

from authsvc.security.secrets import sha256
from authsvc.storage.redis_store import RedisEventBus
from authsvc_client.errors import from_rpc_error
from authsvc_client.v1 import auth_pb2, resources_pb2, users_pb2
from tests.app import Api, Backend, bearer, failure, start_api, stop_api
from tests.infra import asyncpg_dsn

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

ROUNDS = 5  # sign-out -> refusal measurements
POLL = 0.003  # seconds between polls of replica B
DEADLINE = 1.0  # B must refuse within this long after SignOut returned on A
# Lower than the default 2 s, but above the event follower's 500 ms blocking
# XREAD: at or below that the bus reports itself unhealthy now and then even
# with Redis up (see test_idle_bus_stays_healthy_with_a_short_max_lag).
MAX_LAG = 0.75

# A redis-server of this module's own, which a test kills (the session's
# `redis_url` server is shared and must stay up).
_doomed_redis_proc = redis_factories.redis_proc(host="127.0.0.1")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def postgres_backend(migrated_postgres: str, redis_url: str) -> Backend:
    return Backend("postgres", {"database_url": migrated_postgres, "redis_url": redis_url})


async def _until(predicate: Callable[[], bool], within: float, what: str) -> float:
    """Polls ``predicate`` every ms; returns how long it took to hold."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > within:
            raise AssertionError(f"not {what} after {within}s")
        await asyncio.sleep(0.001)
    return time.monotonic() - started


async def _start_pair(backend: Backend, tmp: Path, **overrides: Any) -> tuple[Api, Api]:
    a = await start_api(backend, tmp / "a", **overrides)
    try:
        b = await start_api(backend, tmp / "b", **overrides)
    except BaseException:
        await stop_api(a)
        raise
    for api in (a, b):
        # The follower reports healthy after its first read of the stream;
        # caches filled before that would be cleared by its start-up reset.
        await _until(api.server.core.bus.healthy, 5.0, f"{api.target} following the stream")
    return a, b


@pytest.fixture
async def replicas(
    postgres_backend: Backend, tmp_path: Path, log_file: Path
) -> AsyncIterator[tuple[Api, Api]]:
    a, b = await _start_pair(postgres_backend, tmp_path)
    yield a, b
    await stop_api(b)
    await stop_api(a)


async def _authenticate(api: Api, token: str) -> Any:
    return await api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=token), timeout=5)


def _cached(api: Api, token: str) -> bool:
    """Whether ``api`` would answer ``token`` from its Authenticate cache."""
    return api.server.core.cache.get(sha256(token)) is not None


async def _signed_in(api: Api) -> tuple[str, str]:
    """Signs up a user on ``api``; returns (access token, session id)."""
    created = await api.sign_up()
    return created.tokens.access_token, created.tokens.session_id


async def _revoke_in_database(database_url: str, session_id: str) -> None:
    """Revokes a session behind authsvc's back: no event is published."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        status = await conn.execute(
            "UPDATE sessions SET revoked_at = now(), revoke_reason = 'test' WHERE id = $1",
            uuid.UUID(session_id),
        )
    finally:
        await conn.close()
    assert status == "UPDATE 1"


# --------------------------------------------------------------------------- propagation


async def test_sign_out_on_one_replica_is_refused_on_the_other(
    replicas: tuple[Api, Api],
) -> None:
    a, b = replicas
    latencies: list[float] = []
    stale_answers: list[int] = []
    for _ in range(ROUNDS):
        token, session_id = await _signed_in(a)
        # Warm both caches: B must not answer from its cache after sign-out.
        for api in (a, b):
            who = await _authenticate(api, token)
            assert who.session.session_id == session_id
        assert _cached(a, token)
        assert _cached(b, token)

        await a.auth.SignOut(auth_pb2.SignOutRequest(), metadata=bearer(token), timeout=5)
        returned = time.perf_counter()
        stale = 0
        while True:
            try:
                await _authenticate(b, token)
            except grpc.aio.AioRpcError as rpc_error:
                refused = time.perf_counter()
                error = from_rpc_error(rpc_error)
                break
            stale += 1
            assert time.perf_counter() - returned < DEADLINE, (
                f"B still accepts a signed-out token {DEADLINE}s after SignOut returned"
            )
            await asyncio.sleep(POLL)
        assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "SESSION_REVOKED")
        latencies.append(refused - returned)
        stale_answers.append(stale)
        # A refuses it too, and B keeps refusing it.
        error = await failure(_authenticate(a, token))
        assert error.reason == "SESSION_REVOKED"
        error = await failure(_authenticate(b, token))
        assert error.reason == "SESSION_REVOKED"

    assert max(latencies) < DEADLINE
    print(
        "\nsign-out on A -> refusal on B (ms, incl. one Authenticate round trip): "
        + ", ".join(f"{x * 1000:.1f}" for x in latencies)
        + f"; median {statistics.median(latencies) * 1000:.1f}, max {max(latencies) * 1000:.1f}"
        + f"; stale OK answers from B after SignOut returned: {stale_answers}"
    )


async def test_role_change_on_one_replica_shows_on_the_other(
    replicas: tuple[Api, Api],
) -> None:
    a, b = replicas
    admin = await a.admin_token()
    created = await a.sign_up()
    token = created.tokens.access_token
    for api in (a, b):
        who = await _authenticate(api, token)
        assert who.session.role == resources_pb2.ROLE_USER
    assert _cached(b, token)

    await a.users.SetUserRole(
        users_pb2.SetUserRoleRequest(user_id=created.user.id, role=resources_pb2.ROLE_ADMIN),
        metadata=bearer(admin),
        timeout=5,
    )
    returned = time.perf_counter()
    stale = 0
    while True:
        who = await _authenticate(b, token)
        if who.session.role == resources_pb2.ROLE_ADMIN:
            seen = time.perf_counter()
            break
        assert who.session.role == resources_pb2.ROLE_USER
        stale += 1
        assert time.perf_counter() - returned < DEADLINE, (
            f"B still reports the old role {DEADLINE}s after SetUserRole returned"
        )
        await asyncio.sleep(POLL)
    assert (await _authenticate(a, token)).session.role == resources_pb2.ROLE_ADMIN
    print(
        f"\nrole change on A -> new role on B: {(seen - returned) * 1000:.1f} ms "
        f"(incl. one Authenticate round trip); stale answers: {stale}"
    )


# --------------------------------------------------------------------------- Redis outage


@pytest.fixture
def doomed_redis(request: pytest.FixtureRequest) -> RedisExecutor:
    executor: RedisExecutor = request.getfixturevalue("_doomed_redis_proc")
    if executor.process is None or not executor.running():
        pytest.fail("the module's own redis-server is not running (was it killed already?)")
    return executor


async def test_redis_outage_makes_the_other_replica_read_the_database(
    migrated_postgres: str, doomed_redis: RedisExecutor, tmp_path: Path, log_file: Path
) -> None:
    backend = Backend(
        "postgres",
        {
            "database_url": migrated_postgres,
            "redis_url": f"redis://{doomed_redis.host}:{doomed_redis.port}/0",
        },
    )
    a, b = await _start_pair(backend, tmp_path, revocation_max_lag=MAX_LAG)
    try:
        control_token, control_session = await _signed_in(a)
        token, session_id = await _signed_in(a)
        live_token, live_session = await _signed_in(a)
        for t in (control_token, token, live_token):
            await _authenticate(a, t)
            await _authenticate(b, t)
            assert _cached(b, t)

        # Control, with Redis up: a revocation that publishes no event is not
        # seen by B, which answers from its cache. This is the staleness the
        # cache rules guard against when events *can* be missed.
        await _revoke_in_database(migrated_postgres, control_session)
        assert b.server.core.bus.healthy()
        who = await _authenticate(b, control_token)
        assert who.session.session_id == control_session

        # Kill Redis (SIGKILL: no goodbye). B's follower notices, drops what
        # it cached (events may have been missed meanwhile) and follows the
        # database's log instead, so its bus stays healthy.
        killed = time.monotonic()
        await asyncio.to_thread(doomed_redis.kill, True, signal.SIGKILL)
        bus = b.server.core.bus
        assert isinstance(bus, RedisEventBus)
        await _until(lambda: not _cached(b, live_token), MAX_LAG + 1.0, "B's cache dropped")
        dropped_after = time.monotonic() - killed
        assert bus.healthy()

        # What was revoked behind authsvc's back is refused now, and a
        # sign-out on A (its event waits in the database for Redis) reaches B
        # through the database's log within the max lag.
        error = await failure(_authenticate(b, control_token))
        assert error.reason == "SESSION_REVOKED"
        await _authenticate(b, token)
        assert _cached(b, token)
        await a.auth.SignOut(auth_pb2.SignOutRequest(), metadata=bearer(token), timeout=5)
        await _until(lambda: not _cached(b, token), MAX_LAG + 1.0, "B hearing of the sign-out")
        error = await failure(_authenticate(b, token))
        assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "SESSION_REVOKED")
        del session_id

        # Authenticate itself does not need Redis: a live session still works on B.
        who = await _authenticate(b, live_token)
        assert who.session.session_id == live_session
        print(f"\nRedis killed -> B's cache dropped after {dropped_after * 1000:.0f} ms")
    finally:
        await stop_api(b)
        await stop_api(a)


async def test_idle_bus_stays_healthy_with_a_short_max_lag(
    postgres_backend: Backend, tmp_path: Path, log_file: Path
) -> None:
    """With Redis up and no events, the bus must not report itself unhealthy.

    ``revocation_max_lag`` accepts any positive value. An idle, healthy
    stream is not "stale", so the Authenticate cache must not be bypassed;
    yet the follower's XREAD blocks for a fixed 500 ms, so at max_lag <= 0.5 s
    the bus reports itself unhealthy at the end of every idle block (at 0.3 s,
    ~40% of the time).
    """
    max_lag = 0.5
    api = await start_api(postgres_backend, tmp_path, revocation_max_lag=max_lag)
    try:
        bus = api.server.core.bus
        await _until(bus.healthy, 5.0, "following the stream")
        samples = unhealthy = 0
        started = time.monotonic()
        while time.monotonic() - started < 2.0:
            samples += 1
            unhealthy += not bus.healthy()
            await asyncio.sleep(0.002)
        assert unhealthy == 0, (
            f"idle bus with Redis up reported unhealthy in {unhealthy}/{samples} samples "
            f"at revocation_max_lag={max_lag}"
        )
    finally:
        await stop_api(api)

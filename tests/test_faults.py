"""Backend faults: while a backend fails every answer is UNAVAILABLE /
BACKEND_UNAVAILABLE with a RetryInfo (never INTERNAL, never anything else
wrong); afterwards everything works again without restarting authsvc;
nothing committed is lost and nothing revoked comes back.

PostgreSQL faults run on a server private to this module
(``tests.infra.private_postgres``), which the tests restart, stop, make
read-only and give a connection-limited role; the session's server is never
touched. Redis faults run on a redis-server of this module's own
(``test_faults_redis.py``). Each test prints a tally of the answers it got
(method, code, reason: count) and its timings (``-s`` shows them).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import text, update

from authsvc.errors import BackendUnavailable, TransientConflict
from authsvc.security.secrets import sha256
from authsvc.storage import migrate
from authsvc.storage.database import TRANSIENT_ATTEMPTS, SqlDatabase, create_engine
from authsvc.storage.tables import users as users_table
from authsvc_client.errors import from_rpc_error
from authsvc_client.v1 import auth_pb2, users_pb2
from tests.app import PASSWORD, Api, Backend, bearer, remember, start_api, stop_api
from tests.infra import PostgresExecutor, asyncpg_dsn, private_postgres
from tests.scrape import Samples, get, parse, rpc, value

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

#: A client's deadline: an answer that takes longer is a hang (and fails the
#: test as DEADLINE_EXCEEDED).
CALL_TIMEOUT = 20.0
#: "All OK again within 5 s of the backend coming back."
RECOVERY = 5.0
CLIENTS = 16
#: Longer than any of these tests: a rotation whose answer the client never
#: got (the commit went through, the connection died before its
#: acknowledgement) leaves the client holding the rotated token, which it
#: presents again after the outage. Within the grace interval that returns
#: the same successor; after it, the session would be revoked as a reuse
#: (which is the documented trade-off of AUTHSVC_REFRESH_REUSE_GRACE, not a
#: fault of the outage handling). Sized here to cover the longest outage.
REUSE_GRACE = 60.0


# --------------------------------------------------------------------------- answers


@dataclass(frozen=True)
class Answer:
    method: str
    started: float
    ended: float
    code: str
    reason: str
    retry_info: bool

    @property
    def ok(self) -> bool:
        return self.code == "OK"

    @property
    def unavailable(self) -> bool:
        """UNAVAILABLE / BACKEND_UNAVAILABLE with a RetryInfo detail."""
        return (self.code, self.reason) == (
            "UNAVAILABLE",
            "BACKEND_UNAVAILABLE",
        ) and self.retry_info


@dataclass
class Tally:
    """Every answer of a test's calls."""

    answers: list[Answer] = field(default_factory=list)

    async def call(self, method: str, call: Awaitable[Any]) -> Any | None:
        """Awaits a call; records its answer; returns the response, or None."""
        started = time.monotonic()
        try:
            response = await call
        except grpc.aio.AioRpcError as rpc_error:
            error = from_rpc_error(rpc_error)
            retry = error.detail(error_details_pb2.RetryInfo) is not None
            self.answers.append(
                Answer(method, started, time.monotonic(), error.code.name, error.reason, retry)
            )
            return None
        self.answers.append(Answer(method, started, time.monotonic(), "OK", "", False))
        return response

    def counts(self) -> Counter[tuple[str, str, str]]:
        return Counter((a.method, a.code, a.reason) for a in self.answers)

    def report(self, title: str) -> None:
        print(f"\n{title}: {len(self.answers)} answers")
        for (method, code, reason), n in sorted(self.counts().items()):
            print(f"  {method:20} {code:12} {reason or '-':22} {n}")
        failed = [a for a in self.answers if not a.ok]
        if failed:
            slowest = max(a.ended - a.started for a in failed)
            print(f"  slowest failed answer: {slowest:.3f}s")

    def assert_only_unavailable(self, also: Callable[[Answer], bool] = lambda _: False) -> None:
        """No INTERNAL; every failure BACKEND_UNAVAILABLE with a RetryInfo
        (or one ``also`` accepts)."""
        internal = [a for a in self.answers if "INTERNAL" in (a.code, a.reason)]
        assert not internal, f"{len(internal)} INTERNAL answers: {internal[:3]}"
        wrong = [a for a in self.answers if not (a.ok or a.unavailable or also(a))]
        assert not wrong, f"{len(wrong)} wrong answers: {Counter(_key(a) for a in wrong)}"

    def failures(self) -> list[Answer]:
        return [a for a in self.answers if not a.ok]


def _key(a: Answer) -> tuple[str, str, str, bool]:
    return (a.method, a.code, a.reason, a.retry_info)


def unavailable_with_retry(error: Any) -> None:
    """UNAVAILABLE / BACKEND_UNAVAILABLE with a RetryInfo of at least 1 s."""
    assert (error.code, error.reason) == (
        grpc.StatusCode.UNAVAILABLE,
        "BACKEND_UNAVAILABLE",
    ), f"{error.code.name} {error.reason}: {error.message}"
    retry = error.detail(error_details_pb2.RetryInfo)
    assert retry is not None, "no RetryInfo"
    assert retry.retry_delay.seconds >= 1


async def refusal(call: Awaitable[Any]) -> Any:
    """The typed error of a call that must fail."""
    try:
        await call
    except grpc.aio.AioRpcError as rpc_error:
        return from_rpc_error(rpc_error)
    raise AssertionError("the call succeeded")


async def _retried(call: Callable[[], Awaitable[Any]], within: float = 10.0) -> Any:
    """``call()`` until it is not refused with BACKEND_UNAVAILABLE."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as rpc_error:
            error = from_rpc_error(rpc_error)
            if error.reason != "BACKEND_UNAVAILABLE" or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def pg(request: pytest.FixtureRequest) -> Iterator[PostgresExecutor]:
    """This module's own PostgreSQL server, which its tests may break."""
    with private_postgres(request) as executor:
        yield executor


@pytest.fixture
def pg_url(pg: PostgresExecutor) -> Iterator[str]:
    """A migrated database of the test's own on the private server (which is
    running, read-write, when the test starts)."""
    if not pg.executor.running():
        pg.executor.start()
        pg.executor.wait_for_postgres()
    name = f"faults_{uuid.uuid4().hex[:12]}"
    url = pg.server.create_database(name)
    migrate.upgrade(url)
    yield url
    with contextlib.suppress(Exception):
        if not pg.executor.running():
            pg.executor.start()
            pg.executor.wait_for_postgres()
        pg.server.drop_database(name)


@pytest.fixture
async def replicas(
    pg_url: str, redis_url: str, tmp_path: Path, log_file: Path
) -> AsyncIterator[tuple[Api, Api]]:
    """Two servers on the private database and the session's Redis."""
    backend = Backend("postgres", {"database_url": pg_url, "redis_url": redis_url})
    a, b = await two_servers(
        lambda name: start_api(backend, tmp_path / name, refresh_reuse_grace=REUSE_GRACE)
    )
    try:
        yield a, b
    finally:
        await stop_or_dump(b)
        await stop_or_dump(a)


async def two_servers(start: Callable[[str], Awaitable[Api]]) -> tuple[Api, Api]:
    """``start("a")`` and ``start("b")``; the first is stopped again if the
    second cannot start."""
    a = await start("a")
    try:
        return a, await start("b")
    except BaseException:
        await stop_api(a)
        raise


async def stop_or_dump(api: Api, within: float = 40.0) -> None:
    """stop_api, or, if stopping hangs, every task's stack on stderr (a
    server that cannot stop after a fault is a finding, not a test hang)."""
    try:
        await asyncio.wait_for(stop_api(api), within)
    except TimeoutError:
        for task in asyncio.all_tasks():
            task.print_stack(file=sys.stderr)
        raise


async def _admin(pg: PostgresExecutor, dbname: str = "postgres") -> asyncpg.Connection:
    conn = await asyncpg.connect(asyncpg_dsn(pg.server.url(dbname)))
    # Its own transactions stay writable whatever the server's default.
    await conn.execute("SET default_transaction_read_only = off")
    return conn


# --------------------------------------------------------------------------- load


@dataclass
class Client:
    """One of the load's clients: a user, its own session, and the newest
    tokens it got for that session."""

    email: str
    session_id: str
    access: str
    refresh: str
    #: Whether its last RefreshToken was answered OK.
    last_refresh_ok: bool = True
    #: Sessions its OK sign-ins started.
    signed_in: list[str] = field(default_factory=list)


async def _clients(api: Api, n: int) -> list[Client]:
    created = await asyncio.gather(*(api.sign_up() for _ in range(n)))
    return [
        Client(c.user.email, c.tokens.session_id, c.tokens.access_token, c.tokens.refresh_token)
        for c in created
    ]


async def _revoked_session(api: Api) -> tuple[str, str, str]:
    """A session signed out before the load: (session id, access, refresh)."""
    created = await api.sign_up()
    await api.auth.SignOut(auth_pb2.SignOutRequest(), metadata=bearer(created.tokens.access_token))
    return created.tokens.session_id, created.tokens.access_token, created.tokens.refresh_token


async def _load(
    apis: Sequence[Api],
    clients: list[Client],
    revoked: tuple[str, str, str],
    tally: Tally,
    revoked_tally: Tally,
    stop: asyncio.Event,
) -> None:
    """Each client, round robin over the replicas, until ``stop``:
    Authenticate its newest access token, RefreshToken its newest refresh
    token (keeping what it gets), SignInWithPassword. One more client keeps
    presenting a signed-out session's tokens."""

    async def run(i: int, client: Client) -> None:
        turn = i
        while not stop.is_set():
            failed = False

            api = apis[turn % len(apis)]
            turn += 1
            ok = await tally.call(
                "Authenticate",
                api.auth.Authenticate(
                    auth_pb2.AuthenticateRequest(access_token=client.access),
                    timeout=CALL_TIMEOUT,
                ),
            )
            failed |= ok is None

            api = apis[turn % len(apis)]
            turn += 1
            refreshed = await tally.call(
                "RefreshToken",
                api.auth.RefreshToken(
                    auth_pb2.RefreshTokenRequest(refresh_token=client.refresh),
                    timeout=CALL_TIMEOUT,
                ),
            )
            client.last_refresh_ok = refreshed is not None
            if refreshed is not None:
                client.access = refreshed.tokens.access_token
                client.refresh = refreshed.tokens.refresh_token
            failed |= refreshed is None

            api = apis[turn % len(apis)]
            signed = await tally.call(
                "SignInWithPassword",
                api.auth.SignInWithPassword(
                    auth_pb2.SignInWithPasswordRequest(email=client.email, password=PASSWORD),
                    timeout=CALL_TIMEOUT,
                ),
            )
            if signed is not None:
                client.signed_in.append(signed.result.tokens.session_id)
            failed |= signed is None
            # A client backs off a little after a failure (as RetryInfo asks),
            # rather than spinning on refused connections.
            await asyncio.sleep(0.05 if failed else 0)

    async def revoked_prober() -> None:
        _, access, refresh = revoked
        turn = 0
        while not stop.is_set():
            api = apis[turn % len(apis)]
            turn += 1
            await revoked_tally.call(
                "Authenticate",
                api.auth.Authenticate(
                    auth_pb2.AuthenticateRequest(access_token=access), timeout=CALL_TIMEOUT
                ),
            )
            await revoked_tally.call(
                "RefreshToken",
                api.auth.RefreshToken(
                    auth_pb2.RefreshTokenRequest(refresh_token=refresh), timeout=CALL_TIMEOUT
                ),
            )
            await asyncio.sleep(0.02)

    await asyncio.gather(*(run(i, c) for i, c in enumerate(clients)), revoked_prober())


async def _outage_under_load(
    apis: tuple[Api, Api],
    url: str,
    outage: Callable[[], Awaitable[None]],
    title: str,
    before: float = 2.0,
) -> tuple[Tally, float]:
    """Runs the load for ``before`` seconds, then ``outage`` (which returns
    once the backend is back), then RECOVERY + 1.5 s more; checks every
    answer, the recovery and every session. Returns the tally and the time
    the backend was back."""
    a = apis[0]
    clients = await _clients(a, CLIENTS)
    remember(*(c.refresh for c in clients))
    revoked = await _revoked_session(a)
    tally, revoked_tally = Tally(), Tally()
    stop = asyncio.Event()
    load = asyncio.create_task(_load(apis, clients, revoked, tally, revoked_tally, stop))
    try:
        await asyncio.sleep(before)
        assert not load.done()
        fault_started = time.monotonic()
        await outage()
        back = time.monotonic()
        await asyncio.sleep(RECOVERY + 1.5)
    finally:
        stop.set()
        await load
    tally.report(f"{title} ({len(clients)} clients, 2 replicas)")
    revoked_tally.report(f"{title}: a signed-out session's tokens")
    failures = tally.failures()
    if failures:
        last = max(f.ended for f in failures)
        print(
            f"  outage took {back - fault_started:.2f}s; last failed answer "
            f"{last - back:+.2f}s after the backend was back"
        )

    # Every failure is BACKEND_UNAVAILABLE with a RetryInfo, never INTERNAL
    # (RefreshToken included: the grace interval covers a rotation whose
    # answer was lost, so no REFRESH_TOKEN_REUSED either).
    tally.assert_only_unavailable()
    assert failures, "the outage failed no call: it tested nothing"
    for method in ("Authenticate", "RefreshToken", "SignInWithPassword"):
        assert any(a.method == method and a.ok for a in tally.answers if a.started > back)
    # All OK again within RECOVERY of the backend being back.
    late = [a for a in tally.answers if a.started >= back + RECOVERY]
    assert len(late) >= CLIENTS, f"only {len(late)} calls after the recovery window"
    assert all(a.ok for a in late), Counter(_key(a) for a in late if not a.ok)
    # The signed-out session never came back on either replica.
    revoked_tally.assert_only_unavailable(also=lambda a: a.reason == "SESSION_REVOKED")
    assert not any(a.ok for a in revoked_tally.answers)
    assert any(a.reason == "SESSION_REVOKED" for a in revoked_tally.answers if a.started > back)

    await _sessions_intact(url, clients, tally, revoked[0])
    await _still_work(apis, clients)
    return tally, back


async def _sessions_intact(url: str, clients: list[Client], tally: Tally, revoked: str) -> None:
    """What the database holds after the load: every session's refresh
    chain whole, nothing committed lost, nothing revoked but the one."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        rows = await conn.fetch(
            """
            SELECT s.id::text AS id, s.revoked_at IS NOT NULL AS revoked,
                   count(rt.id) AS tokens,
                   count(rt.id) FILTER (WHERE rt.rotated_at IS NULL) AS current,
                   coalesce(max(rt.generation), -1) AS newest,
                   count(DISTINCT rt.generation) AS generations
            FROM sessions s LEFT JOIN refresh_tokens rt ON rt.session_id = s.id
            GROUP BY s.id
            """
        )
        by_id = {r["id"]: r for r in rows}
        for r in rows:
            # One chain per session: generations 0..newest, each once, and
            # exactly one current (unrotated) token.
            assert r["tokens"] == r["generations"] == r["newest"] + 1, dict(r)
            assert r["current"] == 1, dict(r)
        assert [r["id"] for r in rows if r["revoked"]] == [revoked]

        # Nothing an OK answer reported is missing.
        known = {c.session_id for c in clients} | {revoked}
        for client in clients:
            known.update(client.signed_in)
        missing = known - by_id.keys()
        assert not missing, f"{len(missing)} sessions answered OK are not stored"
        # Sessions nobody heard of: sign-ins committed whose answer was lost.
        unheard = by_id.keys() - known
        failed_signins = sum(1 for a in tally.failures() if a.method == "SignInWithPassword")
        print(f"  sign-ins committed but answered BACKEND_UNAVAILABLE: {len(unheard)}")
        assert len(unheard) <= failed_signins

        # Each client's newest refresh token is its session's current one,
        # or (its last rotation committed but the answer was lost) the one
        # just before it.
        lost_rotations = 0
        for client in clients:
            kept = await conn.fetchrow(
                "SELECT generation, rotated_at IS NOT NULL AS rotated FROM refresh_tokens "
                "WHERE token_hash = $1",
                sha256(client.refresh),
            )
            assert kept is not None, "a client's refresh token is not stored"
            newest = by_id[client.session_id]["newest"]
            if kept["rotated"]:
                assert not client.last_refresh_ok
                assert newest == kept["generation"] + 1
                lost_rotations += 1
            else:
                assert newest == kept["generation"]
        grace = await conn.fetchval("SELECT coalesce(sum(grace_uses), 0) FROM refresh_tokens")
        print(
            f"  rotations committed but answered BACKEND_UNAVAILABLE: {lost_rotations} "
            f"still pending, {grace} recovered through the grace interval"
        )
    finally:
        await conn.close()


async def _still_work(apis: tuple[Api, Api], clients: list[Client]) -> None:
    """Every client's session refreshes and authenticates, on both replicas;
    a sign-out on one replica is refused by the other (the outbox runs)."""
    a, b = apis
    for i, client in enumerate(clients):
        response = await apis[i % 2].auth.RefreshToken(
            auth_pb2.RefreshTokenRequest(refresh_token=client.refresh), timeout=CALL_TIMEOUT
        )
        assert response.tokens.session_id == client.session_id
        client.access, client.refresh = response.tokens.access_token, response.tokens.refresh_token
        remember(client.refresh, client.access)
        for api in apis:
            info = await api.auth.Authenticate(
                auth_pb2.AuthenticateRequest(access_token=client.access), timeout=CALL_TIMEOUT
            )
            assert info.session.session_id == client.session_id
    gone = clients[0]
    await b.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=gone.access))
    await a.auth.SignOut(auth_pb2.SignOutRequest(), metadata=bearer(gone.access))
    deadline = time.monotonic() + a.settings.revocation_max_lag + 2.0
    while (reason := await _reason(b, gone.access)) == "":
        assert time.monotonic() < deadline, "replica B still accepts a signed-out session"
        await asyncio.sleep(0.02)
    assert reason == "SESSION_REVOKED"


async def _reason(api: Api, access_token: str) -> str:
    """The reason Authenticate refuses a token with, or "" when it accepts it."""
    try:
        await api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=access_token))
    except grpc.aio.AioRpcError as rpc_error:
        return from_rpc_error(rpc_error).reason
    return ""


# --------------------------------------------------------------------------- 1, 2


def _stopped_for(
    pg: PostgresExecutor, seconds: float, down: list[float] | None = None
) -> Callable[[], Awaitable[None]]:
    """An outage: PostgreSQL stopped for ``seconds``, then started again;
    returns once it accepts connections. ``down`` gets the times it was
    certainly down from and until."""

    async def outage() -> None:
        await asyncio.to_thread(pg.executor.stop)
        if down is not None:
            down.append(time.monotonic())
        await asyncio.sleep(seconds)
        if down is not None:
            down.append(time.monotonic())
        await asyncio.to_thread(pg.executor.start)
        await asyncio.to_thread(pg.executor.wait_for_postgres)

    return outage


async def test_postgres_restarted_under_load(
    replicas: tuple[Api, Api], pg: PostgresExecutor, pg_url: str
) -> None:
    async def restart() -> None:
        await asyncio.to_thread(pg.pg_ctl, "restart", "-m", "fast")

    await _outage_under_load(replicas, pg_url, restart, "pg_ctl restart -m fast")


async def test_postgres_stopped_for_ten_seconds_under_load(
    replicas: tuple[Api, Api], pg: PostgresExecutor, pg_url: str
) -> None:
    """Also: the health check stays SERVING throughout (authsvc's health is
    the process's; the backends' state is in the answers)."""
    health: list[tuple[float, Any]] = []
    stubs: list[Any] = [health_pb2_grpc.HealthStub(api.channel) for api in replicas]
    checking = asyncio.Event()

    async def check_health() -> None:
        while not checking.is_set():
            for stub in stubs:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                health.append((time.monotonic(), reply.status))
            await asyncio.sleep(0.1)

    down: list[float] = []
    stop_for_ten_seconds = _stopped_for(pg, 10.0, down)

    checker = asyncio.create_task(check_health())
    try:
        tally, _ = await _outage_under_load(
            replicas, pg_url, stop_for_ten_seconds, "PostgreSQL stopped for 10 s"
        )
    finally:
        checking.set()
        await checker
    during = [status for at, status in health if down[0] <= at <= down[1]]
    assert len(during) > 20, len(during)
    assert {s for _, s in health} == {health_pb2.HealthCheckResponse.SERVING}
    # While it was down, the calls that needed the database were refused.
    while_down = [a for a in tally.answers if down[0] + 1 <= a.started <= down[1] - 1]
    assert any(a.method == "SignInWithPassword" and a.unavailable for a in while_down)
    assert not any(a.ok for a in while_down if a.method != "Authenticate")


# --------------------------------------------------------------------------- 3


@contextlib.asynccontextmanager
async def _read_only(pg: PostgresExecutor) -> AsyncIterator[None]:
    """The server's transactions default to read-only, as on a standby the
    pool failed over to; every new transaction on every connection sees it."""
    admin = await _admin(pg)
    try:
        await _set_read_only(pg, admin, True)
        try:
            yield
        finally:
            await _set_read_only(pg, admin, False)
    finally:
        await admin.close()


async def _set_read_only(pg: PostgresExecutor, admin: asyncpg.Connection, on: bool) -> None:
    if on:
        await admin.execute("ALTER SYSTEM SET default_transaction_read_only = on")
    else:
        await admin.execute("ALTER SYSTEM RESET default_transaction_read_only")
    await admin.execute("SELECT pg_reload_conf()")
    # A new backend has the postmaster's settings, and the postmaster signals
    # its children right after reloading its own: once a new connection sees
    # the value, every existing one will at its next command.
    want = "on" if on else "off"
    deadline = time.monotonic() + 10
    while True:
        probe = await asyncpg.connect(asyncpg_dsn(pg.server.url("postgres")))
        try:
            if await probe.fetchval("SHOW default_transaction_read_only") == want:
                return
        finally:
            await probe.close()
        assert time.monotonic() < deadline, f"default_transaction_read_only not {want}"
        await asyncio.sleep(0.05)


async def test_a_read_only_server_refuses_writes_with_backend_unavailable(
    pg: PostgresExecutor, pg_url: str, redis_url: str, tmp_path: Path, log_file: Path
) -> None:
    api = await start_api(
        Backend("postgres", {"database_url": pg_url, "redis_url": redis_url}), tmp_path
    )
    try:
        user = await api.sign_up()
        other = await api.sign_up()
        tokens = user.tokens
        async with _read_only(pg):
            before = await api.snapshot()
            writes: dict[str, Callable[[], Awaitable[Any]]] = {
                "SignUp": lambda: api.auth.SignUp(
                    auth_pb2.SignUpRequest(
                        email=f"ro-{uuid.uuid4().hex}@example.com", password=PASSWORD
                    )
                ),
                "SignOut": lambda: api.auth.SignOut(
                    auth_pb2.SignOutRequest(), metadata=bearer(tokens.access_token)
                ),
                "RefreshToken": lambda: api.auth.RefreshToken(
                    auth_pb2.RefreshTokenRequest(refresh_token=tokens.refresh_token)
                ),
                "SignInWithPassword": lambda: api.auth.SignInWithPassword(
                    auth_pb2.SignInWithPasswordRequest(email=other.user.email, password=PASSWORD)
                ),
            }
            # Twice each: the second runs on a fresh connection (the first
            # one's was discarded), which is read-only too.
            for _ in range(2):
                for name, write in writes.items():
                    error = await refusal(write())
                    unavailable_with_retry(error)
                    print(f"read-only: {name} -> {error.code.name} {error.reason}")
            assert await api.snapshot() == before, "a refused write changed stored data"
            # Reads still work.
            api.server.core.cache.clear()
            info = await api.auth.Authenticate(
                auth_pb2.AuthenticateRequest(access_token=tokens.access_token)
            )
            assert info.session.session_id == tokens.session_id
            me = await api.users.GetCurrentUser(
                users_pb2.GetCurrentUserRequest(), metadata=bearer(tokens.access_token)
            )
            assert me.user.id == user.user.id

        # Writable again, without a restart: every write works, and the
        # refused sign-out and refresh had changed nothing.
        await api.sign_up()
        await api.auth.SignInWithPassword(
            auth_pb2.SignInWithPasswordRequest(email=other.user.email, password=PASSWORD)
        )
        rotated = await api.auth.RefreshToken(
            auth_pb2.RefreshTokenRequest(refresh_token=tokens.refresh_token)
        )
        remember(rotated.tokens.refresh_token)
        assert rotated.tokens.session_id == tokens.session_id
        await api.auth.SignOut(auth_pb2.SignOutRequest(), metadata=bearer(tokens.access_token))
        error = await refusal(
            api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=tokens.access_token))
        )
        assert error.reason == "SESSION_REVOKED"
    finally:
        await stop_api(api)


# --------------------------------------------------------------------------- 4


async def test_too_many_connections_answer_backend_unavailable(
    pg: PostgresExecutor, pg_url: str, redis_url: str, tmp_path: Path, log_file: Path
) -> None:
    """A role allowed one connection, a server whose pool wants more: the
    calls that need another connection are refused with BACKEND_UNAVAILABLE;
    raising the limit recovers without a restart."""
    dbname = pg_url.rsplit("/", 1)[1]
    role = f"limited_{uuid.uuid4().hex[:8]}"
    role_password = uuid.uuid4().hex
    admin = await _admin(pg)
    db_admin = await _admin(pg, dbname)
    try:
        await admin.execute(
            f"CREATE ROLE {role} LOGIN PASSWORD '{role_password}' CONNECTION LIMIT 1"
        )
        await admin.execute(f"GRANT CONNECT ON DATABASE {dbname} TO {role}")
        await db_admin.execute(
            f"GRANT USAGE ON SCHEMA public TO {role};"
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role};"
            f"GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {role}"
        )
        url = pg.server.url(dbname).replace(
            f"{pg.server.user}:{pg.server.password}@", f"{role}:{role_password}@"
        )
        api = await start_api(
            Backend("postgres", {"database_url": url, "redis_url": redis_url}),
            tmp_path,
            database_pool_size=4,
        )
        try:
            # One at a time (the relay's polls take the one connection now
            # and then: such a sign-up is refused and made again).
            users = [await _retried(api.sign_up) for _ in range(4)]

            async def burst(tally: Tally) -> None:
                api.server.core.cache.clear()
                calls = [
                    tally.call(
                        "Authenticate",
                        api.auth.Authenticate(
                            auth_pb2.AuthenticateRequest(access_token=u.tokens.access_token),
                            timeout=CALL_TIMEOUT,
                        ),
                    )
                    for u in users
                    for _ in range(4)
                ] + [
                    tally.call(
                        "SignInWithPassword",
                        api.auth.SignInWithPassword(
                            auth_pb2.SignInWithPasswordRequest(
                                email=u.user.email, password=PASSWORD
                            ),
                            timeout=CALL_TIMEOUT,
                        ),
                    )
                    for u in users
                ]
                await asyncio.gather(*calls)

            limited = Tally()
            for _ in range(5):
                await burst(limited)
            limited.report(f"CONNECTION LIMIT 1, pool size 4 ({role})")
            limited.assert_only_unavailable()
            assert limited.failures(), "no call needed a second connection"
            assert any(a.ok for a in limited.answers)

            await admin.execute(f"ALTER ROLE {role} CONNECTION LIMIT -1")
            unlimited = Tally()
            await burst(unlimited)
            unlimited.report("limit lifted")
            assert all(a.ok for a in unlimited.answers), unlimited.counts()
        finally:
            await stop_api(api)
    finally:
        await db_admin.close()
        await admin.close()


# --------------------------------------------------------------------------- 5


@pytest.fixture
async def db(
    make_postgres_db: Callable[..., str], log_file: Path
) -> AsyncIterator[tuple[SqlDatabase, str]]:
    """authsvc's SqlDatabase on a migrated database of the session's server
    (these tests break no server), and that database's URL."""
    url = make_postgres_db()
    await asyncio.to_thread(migrate.upgrade, url)
    database = SqlDatabase(create_engine(url, pool_size=4, pgbouncer=False))
    try:
        yield database, url
    finally:
        await database.close()


async def _two_users(url: str) -> tuple[uuid.UUID, uuid.UUID]:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        ids = (uuid.uuid4(), uuid.uuid4())
        for i, user_id in enumerate(ids):
            await conn.execute(
                "INSERT INTO users (id, email, email_key, password_hash, display_name, role,"
                " email_verified, created_at, updated_at)"
                " VALUES ($1, $2, $2, 'x', '', 'user', false, now(), now())",
                user_id,
                f"lock-{i}-{user_id.hex[:8]}@example.com",
            )
        return ids
    finally:
        await conn.close()


async def _names(url: str, ids: Sequence[uuid.UUID]) -> list[str]:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return [await conn.fetchval("SELECT display_name FROM users WHERE id = $1", i) for i in ids]
    finally:
        await conn.close()


def _mark(user_id: uuid.UUID, mark: str) -> Any:
    return (
        update(users_table)
        .where(users_table.c.id == user_id)
        .values(display_name=users_table.c.display_name + mark)
    )


async def test_a_deadlock_is_run_again_and_both_transactions_commit(
    db: tuple[SqlDatabase, str],
) -> None:
    """Two transactions lock two rows in opposite orders; PostgreSQL aborts
    one with 40P01, ``attempts()`` runs it again, both commit, once each."""
    database, url = db
    a, b = await _two_users(url)
    barrier = asyncio.Barrier(2)
    both_hold_one = asyncio.Event()
    tries = {"ab": 0, "ba": 0}

    async def move(first: uuid.UUID, second: uuid.UUID, name: str) -> None:
        async for attempt in database.attempts():
            async with attempt as tx:
                tries[name] += 1
                await tx.conn.execute(_mark(first, f"[{name}]"))
                if tries[name] == 1:
                    # Both hold their first row before either asks for its second.
                    await barrier.wait()
                    both_hold_one.set()
                await tx.conn.execute(_mark(second, f"[{name}]"))

    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(move(a, b, "ab"), move(b, a, "ba")), 30)
    print(f"\ndeadlock: attempts {tries}, {time.monotonic() - started:.2f}s")
    assert both_hold_one.is_set()
    assert sorted(tries.values()) == [1, 2], tries
    # Both committed, each exactly once (the lost attempt left nothing).
    for name in await _names(url, (a, b)):
        assert sorted(name.replace("][", "] [").split()) == ["[ab]", "[ba]"], name


async def test_a_transaction_that_always_loses_ends_backend_unavailable(
    db: tuple[SqlDatabase, str],
) -> None:
    """Every attempt is made the victim of a real deadlock: another
    connection (deadlock_timeout 10 s) holds row B and waits for row A,
    which the attempt holds; the attempt (deadlock_timeout 20 ms) then asks
    for B, detects the deadlock first and is aborted with 40P01. After
    TRANSIENT_ATTEMPTS of those the caller gets BackendUnavailable, and
    nothing of it was committed."""
    database, url = db
    a, b = await _two_users(url)
    rival = await asyncpg.connect(asyncpg_dsn(url))
    monitor = await asyncpg.connect(asyncpg_dsn(url))
    rival_pid = rival.get_server_pid()
    await rival.execute("SET deadlock_timeout = '10s'")
    tries = 0
    losses: list[str] = []

    async def rival_waits_for(row: uuid.UUID) -> None:
        await rival.execute(
            "UPDATE users SET display_name = display_name || '[rival]' WHERE id = $1", row
        )

    async def waiting_on_a_lock() -> None:
        deadline = time.monotonic() + 10
        while (
            await monitor.fetchval(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", rival_pid
            )
            != "Lock"
        ):
            assert time.monotonic() < deadline, "the rival never waited"
            await asyncio.sleep(0.005)

    async def always_losing() -> None:
        nonlocal tries
        async for attempt in database.attempts():
            async with attempt as tx:
                tries += 1
                await tx.conn.execute(text("SET LOCAL deadlock_timeout = '20ms'"))
                await rival.execute("BEGIN")
                await rival_waits_for(b)  # the rival holds B
                await tx.conn.execute(_mark(a, "[loser]"))  # the attempt holds A
                blocked = asyncio.create_task(rival_waits_for(a))
                await waiting_on_a_lock()
                try:
                    await tx.conn.execute(_mark(b, "[loser]"))
                except Exception as error:
                    losses.append(_state(error))
                    raise
                finally:
                    # The attempt's abort released A: the rival goes on.
                    await asyncio.wait_for(blocked, 10)
                    await rival.execute("ROLLBACK")

    try:
        with pytest.raises(BackendUnavailable) as raised:
            await always_losing()
    finally:
        await rival.close()
        await monitor.close()
    print(f"\nalways losing: {tries} attempts, SQLSTATEs {losses}")
    assert tries == TRANSIENT_ATTEMPTS == 4
    assert losses == ["40P01"] * TRANSIENT_ATTEMPTS
    assert isinstance(raised.value.__cause__, TransientConflict)
    assert raised.value.retry_after is not None
    assert await _names(url, (a, b)) == ["", ""]


def _state(error: BaseException) -> str:
    orig = getattr(error, "orig", None)
    for candidate in (orig, getattr(orig, "__cause__", None)):
        state = getattr(candidate, "sqlstate", None)
        if isinstance(state, str):
            return state
    return type(error).__name__


# --------------------------------------------------------------------------- metrics


async def test_metrics_through_a_postgres_outage_under_load(
    pg: PostgresExecutor, pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Prometheus keeps scraping both replicas while PostgreSQL is stopped
    under load: every scrape answers at once, in the text format; the outbox
    gauges (one count query) are left out while the database cannot answer
    and are back after; the refusals are counted as UNAVAILABLE, none as
    INTERNAL or UNKNOWN; and the sign-ins refused meanwhile as ``unavailable``."""
    backend = Backend("postgres", {"database_url": pg_url, "redis_url": redis_url})
    metered: dict[str, Any] = {"refresh_reuse_grace": REUSE_GRACE, "metrics_listen": "127.0.0.1:0"}
    a, b = await two_servers(lambda name: start_api(backend, tmp_path / name, **metered))

    def scrape(api: Api) -> Samples:
        port = api.server.metrics_port
        assert port is not None
        return parse(get(port, timeout=5))

    scrapes: list[tuple[float, Api, Any]] = []
    scraping = asyncio.Event()

    async def scrape_both() -> None:
        while not scraping.is_set():
            for api in (a, b):
                asked = time.monotonic()
                samples = await asyncio.to_thread(scrape, api)
                # The outbox's query waits at most 1.5 s, the rest is in memory.
                assert time.monotonic() - asked < 4.0
                scrapes.append((asked, api, samples))
            await asyncio.sleep(0.2)

    down: list[float] = []
    stop_for_four_seconds = _stopped_for(pg, 4.0, down)

    scraper = asyncio.create_task(scrape_both())
    try:
        try:
            tally, back = await _outage_under_load(
                (a, b), pg_url, stop_for_four_seconds, "PostgreSQL stopped for 4 s, metrics scraped"
            )
        finally:
            scraping.set()
            await scraper
        final = {id(api): await asyncio.to_thread(scrape, api) for api in (a, b)}
    finally:
        await stop_or_dump(b)
        await stop_or_dump(a)

    def outbox(samples: Any) -> bool:
        return ("authsvc_outbox_depth", frozenset()) in samples

    while_down = [s for at, _, s in scrapes if down[0] + 0.5 <= at <= down[1] - 2.0]
    assert while_down, "no scrape while the database was down"
    assert not any(outbox(s) for s in while_down)
    assert all(outbox(s) for at, _, s in scrapes if at >= back + RECOVERY)
    assert all(outbox(s) for s in final.values())
    # Each refusal is counted by its code, on the replica that answered it;
    # nothing as INTERNAL or UNKNOWN. Only the load signs in, so its sign-in
    # refusals are exactly the ones counted (a signed-out session's prober
    # also calls the other two).
    for method in ("Authenticate", "RefreshToken", "SignInWithPassword"):
        for code in ("UNAVAILABLE", "INTERNAL", "UNKNOWN"):
            counted = sum(
                value(s, "grpc_server_handled_total", **rpc(method), grpc_code=code)
                for s in final.values()
            )
            got = sum(1 for x in tally.answers if x.method == method and x.code == code)
            if method == "SignInWithPassword" or code != "UNAVAILABLE":
                assert counted == got, (method, code, counted, got)
            else:
                assert counted >= got, (method, code, counted, got)
    refused = sum(
        1 for x in tally.answers if x.method == "SignInWithPassword" and x.code == "UNAVAILABLE"
    )
    assert refused
    assert refused == sum(
        value(s, "authsvc_sign_ins_total", outcome="unavailable") for s in final.values()
    )


# --------------------------------------------------------------------------- traces


async def test_traces_through_a_postgres_outage_under_load(
    pg: PostgresExecutor, pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    """With tracing on, a PostgreSQL outage under load still answers only
    UNAVAILABLE (the statement spans' error hook must not turn a connection
    failure into anything else), and the spans say what failed without
    quoting it: the refused RPCs' spans carry status code 14, failed
    statements only an error class (and SQLSTATE), no password anywhere."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from authsvc.tracing import Tracing

    backend = Backend("postgres", {"database_url": pg_url, "redis_url": redis_url})
    exporters: list[InMemorySpanExporter] = []

    async def start(name: str) -> Api:
        exporters.append(InMemorySpanExporter())
        tracing = Tracing.exporting_to(exporters[-1])
        return await start_api(
            backend, tmp_path / name, tracing=tracing, refresh_reuse_grace=REUSE_GRACE
        )

    a, b = await two_servers(start)

    stop_for_four_seconds = _stopped_for(pg, 4.0)

    try:
        tally, _ = await _outage_under_load(
            (a, b), pg_url, stop_for_four_seconds, "PostgreSQL stopped for 4 s, traced"
        )
    finally:
        await stop_or_dump(b)
        await stop_or_dump(a)  # flushes each server's spans to its exporter
    spans = [span for exporter in exporters for span in exporter.get_finished_spans()]
    refused = [
        s
        for s in spans
        if s.name == "/authsvc.v1.AuthService/SignInWithPassword"
        and (s.attributes or {}).get("rpc.grpc.status_code") == grpc.StatusCode.UNAVAILABLE.value[0]
    ]
    assert refused, "no refused sign-in was traced"
    failed = [s for s in spans if s.kind.name == "CLIENT" and s.status.status_code.name == "ERROR"]
    assert failed, "no failed statement was traced"
    for span in failed:
        # A class name and maybe a SQLSTATE: "OperationalError", "DBAPIError SQLSTATE 57P01".
        described = span.status.description or ""
        assert re.fullmatch(r"[A-Za-z_]\w*( SQLSTATE [0-9A-Z]{5})?", described), described
    dumped = "\n".join(span.to_json() for span in spans)
    assert PASSWORD not in dumped
    assert sum(1 for x in tally.answers if not x.ok)

"""Redis faults on the rate-limited RPCs, under load: Redis hanging
(SIGSTOP, later SIGCONT) and Redis stopped (later started again).

Sign-in and sign-up fail closed without their brute-force limit: while Redis
cannot answer they are refused with UNAVAILABLE / BACKEND_UNAVAILABLE and a
RetryInfo, within the bound the request-path client's timeouts set (1 s per
try, 2 retries), and they write nothing; once Redis answers again they work,
without a restart. (Plain Redis-stopped single calls are tested elsewhere.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pytest_redis import factories as redis_factories
from pytest_redis.executor import RedisExecutor

from authsvc.storage import migrate
from authsvc.storage.redis_store import LIMIT_TIMEOUT
from authsvc.tracing import Tracing
from authsvc_client.errors import from_rpc_error
from authsvc_client.v1 import auth_pb2
from tests.app import PASSWORD, Api, Backend, bearer, start_api
from tests.infra import asyncpg_dsn
from tests.scrape import Samples, get, parse, rpc, value
from tests.test_faults import (
    CALL_TIMEOUT,
    CLIENTS,
    RECOVERY,
    Tally,
    stop_or_dump,
    two_servers,
    unavailable_with_retry,
)

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

#: A rate-limit check is bounded as a whole (``LIMIT_TIMEOUT``, 2 s, in
#: authsvc.storage.redis_store), whatever redis-py's retries would take; the
#: rest is slack for a loaded 2-core machine.
REFUSED_WITHIN = LIMIT_TIMEOUT + 1.0
#: Longer than a call's retries, so calls are refused, not just slow.
FAULT_FOR = 6.0

_faults_redis_proc = redis_factories.redis_proc(host="127.0.0.1")


@pytest.fixture
def redis_server(request: pytest.FixtureRequest) -> Iterator[RedisExecutor]:
    """This module's redis-server, running (and never left stopped)."""
    executor: RedisExecutor = request.getfixturevalue("_faults_redis_proc")
    if not executor.running():
        executor.start()
    yield executor
    if executor.process is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(executor.process.pid, signal.SIGCONT)
    if not executor.running():
        executor.start()


@pytest.fixture
def backend(make_postgres_db: Callable[..., str], redis_server: RedisExecutor) -> Backend:
    url = make_postgres_db()
    migrate.upgrade(url)
    return Backend(
        "postgres",
        {"database_url": url, "redis_url": f"redis://{redis_server.host}:{redis_server.port}/0"},
    )


@dataclass
class Observed:
    """What ``observed`` replicas report: their metrics, and their spans
    (each server's, flushed when it stops)."""

    exporters: list[InMemorySpanExporter] = field(default_factory=list)

    def spans(self) -> list[ReadableSpan]:
        return [span for exporter in self.exporters for span in exporter.get_finished_spans()]


@pytest.fixture(params=["plain", "observed"])
async def replicas(
    request: pytest.FixtureRequest, backend: Backend, tmp_path: Path, log_file: Path
) -> AsyncIterator[tuple[Api, Api]]:
    """Two servers; ``observed``: with metrics on and traces to an in-memory
    exporter (the instrumented Redis client must fail the same way)."""
    observed = request.param == "observed"
    seen = Observed()

    async def start(name: str) -> Api:
        if not observed:
            return await start_api(backend, tmp_path / name)
        seen.exporters.append(InMemorySpanExporter())
        return await start_api(
            backend,
            tmp_path / name,
            tracing=Tracing.exporting_to(seen.exporters[-1]),
            metrics_listen="127.0.0.1:0",
        )

    a, b = await two_servers(start)
    request.node.observed = seen if observed else None
    try:
        yield a, b
    finally:
        await stop_or_dump(b)
        await stop_or_dump(a)


async def _scrape(api: Api) -> Samples:
    port = api.server.metrics_port
    assert port is not None
    return parse(await asyncio.to_thread(get, port, timeout=5))


def _redis_pid(executor: RedisExecutor) -> int:
    assert executor.process is not None
    pid = executor.process.pid
    comm = Path(f"/proc/{pid}/comm").read_text().strip()
    assert comm.startswith("redis-server"), comm  # the server itself, not a shell
    return pid


async def _stored(url: str) -> tuple[set[str], set[str]]:
    """The ids of every user and every session in the database."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        users = {str(r[0]) for r in await conn.fetch("SELECT id FROM users")}
        sessions = {str(r[0]) for r in await conn.fetch("SELECT id FROM sessions")}
        return users, sessions
    finally:
        await conn.close()


@pytest.mark.parametrize("fault", ["hung", "stopped"])
async def test_rate_limited_rpcs_under_load_while_redis_fails(
    replicas: tuple[Api, Api],
    backend: Backend,
    redis_server: RedisExecutor,
    fault: str,
    request: pytest.FixtureRequest,
) -> None:
    """Also with metrics and traces on (``observed``): every refusal is
    counted by its code on the replica that gave it, none as INTERNAL or
    UNKNOWN, and the failed Redis commands are traced without their
    arguments."""
    a, b = replicas
    apis = (a, b)
    signed_up = [await a.sign_up() for _ in range(CLIENTS)]
    users = {s.user.id for s in signed_up}
    sessions = {s.tokens.session_id for s in signed_up}
    tally = Tally()
    stop = asyncio.Event()

    async def client(i: int) -> None:
        email = signed_up[i].user.email
        turn = i
        while not stop.is_set():
            api = apis[turn % 2]
            turn += 1
            signed = await tally.call(
                "SignInWithPassword",
                api.auth.SignInWithPassword(
                    auth_pb2.SignInWithPasswordRequest(email=email, password=PASSWORD),
                    timeout=CALL_TIMEOUT,
                ),
            )
            if signed is not None:
                sessions.add(signed.result.tokens.session_id)
            api = apis[turn % 2]
            created = await tally.call(
                "SignUp",
                api.auth.SignUp(
                    auth_pb2.SignUpRequest(
                        email=f"load-{uuid.uuid4().hex[:12]}@example.com", password=PASSWORD
                    ),
                    timeout=CALL_TIMEOUT,
                ),
            )
            if created is not None:
                users.add(created.result.user.id)
                sessions.add(created.result.tokens.session_id)
            if signed is None or created is None:
                await asyncio.sleep(0.05)

    # The fault: returns when Redis is back, and records when it certainly
    # was not answering (stopped or hung) until it was made to again.
    away: list[float] = []
    faulty: Callable[[], Awaitable[None]]
    if fault == "hung":
        pid = _redis_pid(redis_server)

        async def faulty() -> None:
            os.kill(pid, signal.SIGSTOP)
            away.append(time.monotonic())
            try:
                await asyncio.sleep(FAULT_FOR)
            finally:
                away.append(time.monotonic())
                os.kill(pid, signal.SIGCONT)
    else:

        async def faulty() -> None:
            await asyncio.to_thread(redis_server.stop)
            away.append(time.monotonic())
            await asyncio.sleep(FAULT_FOR)
            away.append(time.monotonic())
            await asyncio.to_thread(redis_server.start)

    load = asyncio.gather(*(client(i) for i in range(CLIENTS)))
    try:
        await asyncio.sleep(1.5)
        await faulty()
        back = time.monotonic()
        await asyncio.sleep(RECOVERY + 1.0)
    finally:
        stop.set()
        await load

    tally.report(f"Redis {fault} for {FAULT_FOR:.0f} s ({CLIENTS} clients, 2 replicas)")
    failures = tally.failures()
    slowest = max((f.ended - f.started for f in failures), default=0.0)
    last = max((f.ended for f in failures), default=back) - back
    print(
        f"  slowest refusal {slowest:.2f}s (bound {REFUSED_WITHIN:.1f}s); "
        f"last failed answer {last:+.2f}s after Redis was back"
    )
    tally.assert_only_unavailable()
    assert slowest <= REFUSED_WITHIN, slowest
    assert failures, "Redis failing refused no call: it tested nothing"
    if fault == "stopped":
        # Every call that started while Redis was stopped (but for its last
        # second, in which the retries of a call may reach the restarted
        # server) was refused. A hung Redis that resumes within a call's
        # bound answers it, slowly but OK.
        during = [x for x in tally.answers if away[0] + 0.1 < x.started < away[1] - 1.0]
        assert during, "no call was made while Redis was away"
        assert not any(x.ok for x in during), [x for x in during if x.ok][:3]
        for method in ("SignInWithPassword", "SignUp"):
            assert any(x.method == method and not x.ok for x in during)
    # Working again without a restart, within RECOVERY.
    late = [x for x in tally.answers if x.started >= back + RECOVERY]
    assert len(late) >= CLIENTS
    assert all(x.ok for x in late), tally.counts()
    # Nothing a refused call did was written: the database holds exactly the
    # users and sessions the OK answers reported.
    stored_users, stored_sessions = await _stored(backend.urls["database_url"])
    assert stored_users == users
    assert stored_sessions == sessions

    observed: Observed | None = request.node.observed
    if observed is None:
        return
    scraped = [await _scrape(api) for api in apis]
    for method in ("SignInWithPassword", "SignUp"):
        for code in ("OK", "UNAVAILABLE", "INTERNAL", "UNKNOWN"):
            counted = sum(
                value(s, "grpc_server_handled_total", **rpc(method), grpc_code=code)
                for s in scraped
            )
            got = sum(1 for x in tally.answers if x.method == method and x.code == code)
            if (method, code) == ("SignUp", "OK"):
                got += len(signed_up)  # the accounts made before the load
            assert counted == got, (method, code, counted, got)
    for api in apis:  # the batches queued so far, out to the exporters
        tracing = api.server.tracing
        assert tracing is not None
        assert await asyncio.to_thread(tracing.provider.force_flush)
    spans = observed.spans()
    redis_failed = [
        s
        for s in spans
        if (s.attributes or {}).get("db.system") == "redis" and s.status.status_code.name == "ERROR"
    ]
    # A stopped Redis fails its commands; a hung one's are cancelled by the
    # rate limiter's bound instead. Either way the refused RPCs' spans say so.
    if fault == "stopped":
        assert redis_failed, "no failed Redis command was traced"
    unavailable = grpc.StatusCode.UNAVAILABLE.value[0]
    traced = sum(
        1
        for s in spans
        if s.name == "/authsvc.v1.AuthService/SignInWithPassword"
        and (s.attributes or {}).get("rpc.grpc.status_code") == unavailable
    )
    refused = sum(
        1 for x in tally.answers if x.method == "SignInWithPassword" and x.code == "UNAVAILABLE"
    )
    assert traced == refused, (traced, refused)
    for span in redis_failed:
        statement = str((span.attributes or {}).get("db.statement", ""))
        # One line per command (a pipeline's several): its name, then a "?" per argument.
        for line in statement.splitlines():
            assert all(word == "?" for word in line.split()[1:]), statement
    dumped = "\n".join(span.to_json() for span in spans)
    assert PASSWORD not in dumped
    assert not any(email in dumped for email in (s.user.email for s in signed_up))


async def test_a_hung_redis_refuses_sign_ins_and_sign_ups_within_the_client_timeouts(
    replicas: tuple[Api, Api], redis_server: RedisExecutor
) -> None:
    """Eight sign-ins and sign-ups at once while Redis hangs: each is refused
    with BACKEND_UNAVAILABLE and a RetryInfo, nothing is written, and once
    Redis resumes they work. And each is refused within REFUSED_WITHIN, the
    bound the client's timeouts promise: today that part is a known failure
    (the calls that need a new connection take TRIES**2 timeouts), reported
    as XFAIL with the measured times."""
    a, _ = replicas
    existing = [await a.sign_up() for _ in range(4)]
    before = await a.snapshot()
    pid = _redis_pid(redis_server)

    async def timed(call: Awaitable[object]) -> tuple[object, float]:
        started = time.monotonic()
        try:
            await call
        except grpc.aio.AioRpcError as rpc_error:
            return from_rpc_error(rpc_error), time.monotonic() - started
        raise AssertionError("accepted while Redis hangs")

    os.kill(pid, signal.SIGSTOP)
    try:
        results = await asyncio.gather(
            *(
                timed(
                    a.auth.SignUp(
                        auth_pb2.SignUpRequest(
                            email=f"hang-{uuid.uuid4().hex[:12]}@example.com", password=PASSWORD
                        ),
                        timeout=CALL_TIMEOUT,
                    )
                )
                for _ in range(4)
            ),
            *(
                timed(
                    a.auth.SignInWithPassword(
                        auth_pb2.SignInWithPasswordRequest(email=e.user.email, password=PASSWORD),
                        timeout=CALL_TIMEOUT,
                    )
                )
                for e in existing
            ),
        )
    finally:
        os.kill(pid, signal.SIGCONT)
    for error, _ in results:
        unavailable_with_retry(error)
    assert await a.snapshot() == before, "a refused call changed stored data"
    # Back without a restart.
    await a.sign_up()
    signed = await a.auth.SignInWithPassword(
        auth_pb2.SignInWithPasswordRequest(email=existing[0].user.email, password=PASSWORD)
    )
    await a.auth.SignOut(
        auth_pb2.SignOutRequest(), metadata=bearer(signed.result.tokens.access_token)
    )
    took = sorted(round(t, 2) for _, t in results)
    print(f"\nrefused while Redis hangs, in (s): {took}")
    assert max(took) <= REFUSED_WITHIN, took

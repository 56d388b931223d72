"""authsvc behind a real PgBouncer in transaction pooling mode.

``AUTHSVC_DATABASE_PGBOUNCER=true`` is the setting for that deployment. The
PgBouncer is ``tests.infra``'s: ``pool_mode = transaction``, only
``PGBOUNCER_POOL_SIZE`` (3) server connections for the database, and its own
prepared-statement support off (``max_prepared_statements = 0`` where the
version has it), as on classic transaction pooling. The authsvc server keeps
``database_pool_size`` (10) client connections open to it and more under load,
so its transactions take turns on three server connections. A prepared
statement used in a later round trip than the one that prepared it, after
PgBouncer has given that server connection to another client, meets a server
connection that does not know it.

The traffic is many calls at once, each on its own gRPC channel, after the
server's connection pool has been filled: sign-ups, sign-ins, Authenticate of
fresh tokens (the cold path reads the database), refresh rotations (one per
session, and twenty concurrent refreshes of one token), ListUsers paging with
the API key, RevokeAllSessions.

The control test runs the same traffic with the setting off through the same
PgBouncer, and expects it to fail the way such a deployment fails: INTERNAL
(or UNAVAILABLE) errors whose cause in the server log is a prepared statement
that "does not exist" (or "already exists").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
import pytest

from authsvc.security.secrets import sha256
from authsvc_client.errors import AuthsvcError, from_rpc_error
from authsvc_client.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
    users_pb2,
    users_pb2_grpc,
)
from tests.app import (
    PASSWORD,
    Api,
    Backend,
    bearer,
    failure,
    remember,
    service,
    start_api,
    stop_api,
)
from tests.infra import PgBouncer
from tests.test_refresh import Overlap

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

USERS = 24  # users, and calls at once in most waves
RACERS = 20  # concurrent refreshes of one refresh token
PAGE_SIZE = 5
WALKS = 6  # concurrent ListUsers walks over all pages
# Long enough that the twenty racers always land inside the grace interval,
# however slowly PgBouncer's three server connections serve them.
GRACE = 30.0

T = TypeVar("T")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def bouncer_backend(pgbouncer_dsn: str, redis_url: str, log_file: Path) -> Backend:
    """Settings that put a server on PostgreSQL through PgBouncer, and Redis."""
    return Backend("pgbouncer", {"database_url": pgbouncer_dsn, "redis_url": redis_url})


@pytest.fixture
async def bouncer_api(
    bouncer_backend: Backend, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[Api]]]:
    """Starts servers on PgBouncer (``database_pgbouncer`` as given); stops them at the end."""
    started: list[Api] = []

    async def start(*, pgbouncer: bool) -> Api:
        api = await start_api(
            bouncer_backend,
            tmp_path / f"server-{len(started)}",
            database_pgbouncer=pgbouncer,
            refresh_reuse_grace=GRACE,
        )
        started.append(api)
        return api

    yield start
    for api in reversed(started):
        await stop_api(api)


# --------------------------------------------------------------------------- helpers


@dataclass
class Stubs:
    """The three services on one channel."""

    auth: auth_pb2_grpc.AuthServiceAsyncStub
    users: users_pb2_grpc.UserServiceAsyncStub
    sessions: sessions_pb2_grpc.SessionServiceAsyncStub


async def warm_pool(api: Api) -> int:
    """Opens as many connections as the server's pool keeps (see test_refresh).

    Returns how many: each is a client connection of PgBouncer's. Checking
    them out opens them; no statement is run on them, so they hold none of
    PgBouncer's few server connections meanwhile, and prepared statements
    (which the control test's server breaks on) play no part.
    """
    engine = api.server.core.db.engine
    pool: Any = engine.pool
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(pool.size()):
            await stack.enter_async_context(engine.connect())
    return int(pool.size())


async def at_once(
    api: Api, calls: Sequence[Callable[[Stubs], Awaitable[T]]]
) -> list[T | BaseException]:
    """Runs the calls at the same time, each on a channel of its own.

    Every channel is connected, and the server's pool warm, before the first
    call goes out. Returns each call's response, or the exception it raised.
    """
    channels = [
        grpc.aio.insecure_channel(api.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in calls
    ]
    try:
        await warm_pool(api)
        await asyncio.gather(*(ch.channel_ready() for ch in channels))
        stubs = [
            Stubs(
                cast(Any, auth_pb2_grpc.AuthServiceStub(ch)),
                cast(Any, users_pb2_grpc.UserServiceStub(ch)),
                cast(Any, sessions_pb2_grpc.SessionServiceStub(ch)),
            )
            for ch in channels
        ]
        return await asyncio.gather(
            *(call(s) for call, s in zip(calls, stubs, strict=True)), return_exceptions=True
        )
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))


def typed(error: BaseException) -> AuthsvcError | BaseException:
    return from_rpc_error(error) if isinstance(error, grpc.aio.AioRpcError) else error


class ServerLog:
    """What the servers logged (tests.app's suite log) since this was made."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = path.stat().st_size

    def failures(self) -> list[str]:
        """``method: exception`` of each call that failed with INTERNAL (the last raised)."""
        with self.path.open() as f:
            f.seek(self.start)
            text = f.read()
        out = []
        for line in text.splitlines():
            if '"rpc.failed"' not in line:
                continue
            record = json.loads(line)
            raised = re.findall(r"^[A-Za-z_][\w.]*: .*$", str(record.get("exception", "")), re.M)
            method = str(record.get("method", "")).rsplit("/", 1)[-1]
            out.append(f"{method}: {raised[-1] if raised else '?'}")
        return out

    def prepared_statement_errors(self) -> list[str]:
        return [
            m.group(0)
            for line in self.failures()
            if (m := re.search(r'prepared statement "[^"]*" (does not exist|already exists)', line))
        ]


def ok(results: Sequence[T | BaseException], what: str, log: ServerLog) -> list[T]:
    """The responses; fails naming the errors (and their causes in the server log)."""
    remember_tokens(results)
    errors = [typed(r) for r in results if isinstance(r, BaseException)]
    if errors:
        causes = Counter(
            re.sub(r'"__asyncpg_[^"]*__"', '"__asyncpg_*__"', c) for c in log.failures()
        )
        raise AssertionError(
            f"{len(errors)} of {len(results)} {what} failed, e.g. {errors[0]!r}; "
            f"causes in the server log: {dict(causes)}"
        )
    return [cast(T, r) for r in results]


def remember_tokens(results: Sequence[Any]) -> None:
    """Remembers the tokens of every response that carries some."""
    for result in results:
        if hasattr(result, "tokens"):
            remember(result.tokens.access_token, result.tokens.refresh_token)


# --------------------------------------------------------------------------- traffic


@dataclass
class Person:
    email: str
    user_id: str = ""
    signup: Any = None  # SignInResult of SignUp
    signin: Any = None  # SignInResult of SignInWithPassword
    refreshed: Any = None  # RefreshTokenResponse of signin's refresh token


def _results(answers: Sequence[Any]) -> list[Any]:
    """The SignInResult of each sign-in response; errors as they are."""
    return [a if isinstance(a, BaseException) else a.result for a in answers]


async def sign_up_all(api: Api, people: list[Person]) -> list[Any]:
    """The SignInResult of each sign-up, or the exception it raised."""

    def call(person: Person) -> Callable[[Stubs], Awaitable[Any]]:
        return lambda s: s.auth.SignUp(
            auth_pb2.SignUpRequest(email=person.email, password=PASSWORD)
        )

    return _results(await at_once(api, [call(p) for p in people]))


async def sign_in_all(api: Api, people: list[Person]) -> list[Any]:
    """The SignInResult of each sign-in, or the exception it raised."""

    def call(person: Person) -> Callable[[Stubs], Awaitable[Any]]:
        return lambda s: s.auth.SignInWithPassword(
            auth_pb2.SignInWithPasswordRequest(email=person.email.upper(), password=PASSWORD)
        )

    return _results(await at_once(api, [call(p) for p in people]))


async def authenticate_all(api: Api, tokens: list[str]) -> list[Any]:
    def call(token: str) -> Callable[[Stubs], Awaitable[Any]]:
        return lambda s: s.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=token))

    return await at_once(api, [call(t) for t in tokens])


async def refresh_all(api: Api, tokens: list[str]) -> list[Any]:
    def call(token: str) -> Callable[[Stubs], Awaitable[Any]]:
        return lambda s: s.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=token))

    return await at_once(api, [call(t) for t in tokens])


async def walk_users(stubs: Stubs, prefix: str) -> list[list[Any]]:
    """Every page of ListUsers(email_prefix=prefix), with the API key."""
    pages: list[list[Any]] = []
    token = ""
    while True:
        page = await stubs.users.ListUsers(
            users_pb2.ListUsersRequest(page_size=PAGE_SIZE, page_token=token, email_prefix=prefix),
            metadata=service(),
        )
        pages.append(list(page.users))
        token = page.next_page_token
        if not token:
            return pages


async def revoke_all(api: Api, user_ids: list[str]) -> list[Any]:
    def call(user_id: str) -> Callable[[Stubs], Awaitable[Any]]:
        return lambda s: s.sessions.RevokeAllSessions(
            sessions_pb2.RevokeAllSessionsRequest(user_id=user_id), metadata=service()
        )

    return await at_once(api, [call(u) for u in user_ids])


def new_people(count: int) -> tuple[str, list[Person]]:
    prefix = f"pgb-{uuid.uuid4().hex[:10]}-"
    return prefix, [Person(f"{prefix}{i:03d}@example.com") for i in range(count)]


# --------------------------------------------------------------------------- tests


async def test_pgbouncer_mode_serves_concurrent_traffic(
    bouncer_api: Callable[..., Awaitable[Api]],
    pgbouncer_server: PgBouncer,
    log_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api = await bouncer_api(pgbouncer=True)
    log = ServerLog(log_file)
    prefix, people = new_people(USERS)

    # Sign-ups, all at once.
    signups = ok(await sign_up_all(api, people), "sign-ups", log)
    for person, response in zip(people, signups, strict=True):
        assert response.user.email == person.email
        assert response.tokens.refresh_token.startswith("rt_")
        person.user_id, person.signup = response.user.id, response
    assert len({p.user_id for p in people}) == USERS

    # PgBouncer really pools: the server's warm pool holds more client
    # connections to it than PgBouncer has server connections.
    clients = await warm_pool(api)
    assert clients > pgbouncer_server.pool_size
    dbname = api.server.core.db.engine.url.database
    connected = {
        what: [
            row
            for row in await asyncio.to_thread(pgbouncer_server.show, what)
            if row["database"] == dbname
        ]
        for what in ("clients", "servers")
    }
    assert len(connected["clients"]) >= clients
    assert 0 < len(connected["servers"]) <= pgbouncer_server.pool_size

    # Sign-ins (another session each; email in another case).
    signins = ok(await sign_in_all(api, people), "sign-ins", log)
    for person, response in zip(people, signins, strict=True):
        assert response.user.id == person.user_id
        assert response.tokens.session_id != person.signup.tokens.session_id
        person.signin = response

    # Authenticate of tokens never seen before: the cold path reads the
    # session from the database.
    cold = [p.signin.tokens.access_token for p in people] + [
        p.signup.tokens.access_token for p in people
    ]
    assert not any(api.server.core.cache.get(sha256(t)) for t in cold)
    who = ok(await authenticate_all(api, cold), "cold Authenticate calls", log)
    expected = [(p.user_id, p.signin.tokens.session_id) for p in people] + [
        (p.user_id, p.signup.tokens.session_id) for p in people
    ]
    assert [(w.session.user_id, w.session.session_id) for w in who] == expected
    assert all(w.session.email.startswith(prefix) for w in who)

    # Rotations, one per sign-in session, all at once; then their access tokens.
    refreshed = ok(
        await refresh_all(api, [p.signin.tokens.refresh_token for p in people]),
        "refreshes",
        log,
    )
    for person, response in zip(people, refreshed, strict=True):
        assert response.tokens.session_id == person.signin.tokens.session_id
        assert response.tokens.refresh_token not in (
            person.signin.tokens.refresh_token,
            person.signup.tokens.refresh_token,
        )
        person.refreshed = response
    who = ok(
        await authenticate_all(api, [p.refreshed.tokens.access_token for p in people]),
        "Authenticate calls of rotated tokens",
        log,
    )
    assert [w.session.session_id for w in who] == [p.signin.tokens.session_id for p in people]

    # Twenty refreshes of one token at once: one rotates, the others take the
    # grace path, and all get the same successor.
    racer = people[0].signup.tokens
    racing = Overlap()
    monkeypatch.setattr(api.server.core.auth, "refresh", racing.wrap(api.server.core.auth.refresh))
    raced = ok(await refresh_all(api, [racer.refresh_token] * RACERS), "racing refreshes", log)
    monkeypatch.undo()
    assert racing.most > 1, "the refreshes did not overlap"
    successors = {r.tokens.refresh_token for r in raced}
    assert len(successors) == 1, f"{len(successors)} different successors"
    assert {r.tokens.session_id for r in raced} == {racer.session_id}
    (successor,) = successors
    again = await api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=successor))
    remember(again.tokens.access_token, again.tokens.refresh_token)
    assert again.tokens.session_id == racer.session_id

    # ListUsers with the API key: several walks over all pages at once.
    walks = ok(
        await at_once(api, [lambda s: walk_users(s, prefix)] * WALKS), "ListUsers walks", log
    )
    for pages in walks:
        assert all(len(page) <= PAGE_SIZE for page in pages)
        assert len(pages) == -(-USERS // PAGE_SIZE)
        listed = [u.id for page in pages for u in page]
        assert sorted(listed) == sorted(p.user_id for p in people)  # each once
        times = [u.create_time.ToDatetime() for page in pages for u in page]
        assert times == sorted(times)  # oldest first

    # A user's own call on the pool too: GetCurrentUser with a bearer token.
    me = await api.users.GetCurrentUser(
        users_pb2.GetCurrentUserRequest(), metadata=bearer(people[1].refreshed.tokens.access_token)
    )
    assert me.user.id == people[1].user_id

    # RevokeAllSessions of every user at once: the sign-up and sign-in sessions.
    revoked = ok(await revoke_all(api, [p.user_id for p in people]), "RevokeAllSessions calls", log)
    assert [r.revoked_count for r in revoked] == [2] * USERS
    # Every session is over at once, Authenticate and refresh alike.
    results = await authenticate_all(
        api, [p.refreshed.tokens.access_token for p in people] + [again.tokens.access_token]
    )
    reasons = {
        getattr(typed(r), "reason", repr(r)) if isinstance(r, BaseException) else "OK"
        for r in results
    }
    assert reasons == {"SESSION_REVOKED"}
    error = await failure(
        api.auth.RefreshToken(
            auth_pb2.RefreshTokenRequest(refresh_token=people[2].refreshed.tokens.refresh_token)
        )
    )
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "SESSION_REVOKED")
    assert log.failures() == []


async def test_without_the_setting_the_same_traffic_fails(
    bouncer_api: Callable[..., Awaitable[Api]], log_file: Path
) -> None:
    """The control: through the same PgBouncer, ``database_pgbouncer=False`` breaks.

    asyncpg's and SQLAlchemy's statement caches keep named prepared statements
    per client connection and use them again in later transactions, which
    PgBouncer runs on other server connections. The calls that meet one fail
    as unexpected errors (INTERNAL), or UNAVAILABLE if the driver reports them
    as connection errors; none fails with another code.
    """
    api = await bouncer_api(pgbouncer=False)
    log = ServerLog(log_file)
    prefix, people = new_people(USERS)
    errors: list[BaseException] = []

    def survivors(items: Sequence[Any], results: Sequence[Any]) -> list[tuple[Any, Any]]:
        """(item, response) of the calls that succeeded; the errors go to ``errors``."""
        errors.extend(r for r in results if isinstance(r, BaseException))
        done = [
            (i, r) for i, r in zip(items, results, strict=True) if not isinstance(r, BaseException)
        ]
        remember_tokens(results)
        return done

    # The same waves as above, each on what the previous ones left standing.
    signed_up = survivors(people, await sign_up_all(api, people))
    who = [p for p, _ in signed_up]
    signed_in = survivors(who, await sign_in_all(api, who))
    tokens = [r.tokens for _, r in signed_up + signed_in]
    survivors(tokens, await authenticate_all(api, [t.access_token for t in tokens]))
    survivors(tokens, await refresh_all(api, [t.refresh_token for t in tokens]))
    if tokens:
        racing = [tokens[0].refresh_token] * RACERS
        survivors(racing, await refresh_all(api, racing))
    walks = [lambda s: walk_users(s, prefix)] * WALKS
    survivors(walks, await at_once(api, walks))
    user_ids = [r.user.id for _, r in signed_up]
    survivors(user_ids, await revoke_all(api, user_ids))

    assert errors, "every call succeeded without database_pgbouncer: the control proves nothing"
    codes = {getattr(typed(e), "code", repr(e)) for e in errors}
    assert codes <= {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE}, codes
    assert log.prepared_statement_errors(), log.failures()[:5]

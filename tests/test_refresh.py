"""Refresh-token rotation: reuse detection, the grace interval, and races.

RFC 9700 rotation as the API contract states it (auth.proto, RefreshToken):
each refresh token works once; presenting a spent one after the reuse grace
interval revokes the whole session (committed although the call fails) and
fails with REFRESH_TOKEN_REUSED; inside the grace interval a repeated exchange
returns the session's current refresh token again, at most
``refresh_reuse_grace_count`` times per spent token.

The shared test server runs with ``refresh_reuse_grace=1.0`` s and the default
grace count of 20; tests that need other settings (no grace interval, to see
reuse without waiting one out) start their own server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast

import grpc
import pytest
from sqlalchemy import select

from authsvc.storage.tables import refresh_tokens, sessions, users
from authsvc_client.errors import from_rpc_error
from authsvc_client.v1 import auth_pb2, auth_pb2_grpc
from tests.app import NO_GRACE, PASSWORD, Api, failure, remember

RACERS = 20


# --------------------------------------------------------------------------- helpers


async def refresh(api: Api, token: str) -> auth_pb2.RefreshTokenResponse:
    response = await api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=token))
    remember(response.tokens.access_token, response.tokens.refresh_token)
    return response


async def authenticate(api: Api, access_token: str) -> auth_pb2.AuthenticateResponse:
    return await api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=access_token))


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def token_rows(api: Api, session_id: str) -> list[Any]:
    """The session's refresh_tokens rows, oldest generation first."""
    async with api.server.core.db.reader() as tx:
        result = await tx.conn.execute(
            select(refresh_tokens)
            .where(refresh_tokens.c.session_id == uuid.UUID(session_id))
            .order_by(refresh_tokens.c.generation)
        )
        return list(result)


async def session_row(api: Api, session_id: str) -> Any:
    async with api.server.core.db.reader() as tx:
        result = await tx.conn.execute(
            select(sessions).where(sessions.c.id == uuid.UUID(session_id))
        )
        return result.one()


async def count_users(api: Api) -> int:
    async with api.server.core.db.reader() as tx:
        return len(list(await tx.conn.execute(select(users.c.id))))


def assert_one_current(rows: list[Any], token: str) -> None:
    """Exactly one unrotated row, and it is the hash of ``token``."""
    current = [r for r in rows if r.rotated_at is None]
    assert len(current) == 1, f"{len(current)} unrotated refresh tokens in one session"
    assert current[0].token_hash == digest(token)


async def warm_pool(api: Api) -> None:
    """Fills the server's connection pool with open connections.

    The pool opens connections lazily; racing on a cold pool means the first
    call finishes on the one open connection while the others still connect,
    which hides the race. A warm pool lets as many transactions as it keeps
    connections (``database_pool_size`` on Postgres) really run side by side.
    """
    pool: Any = api.server.core.db.engine.pool
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(pool.size()):
            tx = await stack.enter_async_context(api.server.core.db.reader())
            await tx.ping()


async def concurrently(
    api: Api, count: int, call: Callable[[auth_pb2_grpc.AuthServiceAsyncStub, int], Awaitable[Any]]
) -> list[Any]:
    """Runs ``count`` calls at once, each on its own connection.

    ``grpc.use_local_subchannel_pool`` keeps the channels from sharing one
    subchannel (one HTTP/2 connection), and every channel is connected before
    the first call goes out, so the calls reach the server together. Returns
    each call's response or its ``grpc.aio.AioRpcError``.
    """
    channels = [
        grpc.aio.insecure_channel(api.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(count)
    ]
    try:
        await warm_pool(api)
        await asyncio.gather(*(ch.channel_ready() for ch in channels))
        stubs: list[auth_pb2_grpc.AuthServiceAsyncStub] = [
            cast(Any, auth_pb2_grpc.AuthServiceStub(ch)) for ch in channels
        ]
        return await asyncio.gather(
            *(call(stub, i) for i, stub in enumerate(stubs)), return_exceptions=True
        )
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))


class Overlap:
    """Counts how many calls of a service method run at the same time."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0

    def wrap(self, method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.now += 1
            self.most = max(self.most, self.now)
            try:
                return await method(*args, **kwargs)
            finally:
                self.now -= 1

        return counted


def overlap(monkeypatch: pytest.MonkeyPatch, api: Api, name: str) -> Overlap:
    """Proves a race was one: wraps ``api``'s AuthService.<name> with a counter."""
    counter = Overlap()
    auth = api.server.core.auth
    monkeypatch.setattr(auth, name, counter.wrap(getattr(auth, name)))
    return counter


# --------------------------------------------------------------------------- rotation


async def test_each_refresh_rotates_within_the_same_session(api: Api) -> None:
    created = await api.sign_up()
    sid = created.tokens.session_id
    access = [created.tokens.access_token]
    spent = [created.tokens.refresh_token]
    for _ in range(3):
        response = await refresh(api, spent[-1])
        assert response.tokens.session_id == sid
        assert response.tokens.refresh_token.startswith("rt_")
        assert response.tokens.refresh_token not in spent
        assert response.tokens.access_token not in access
        assert response.tokens.token_type == "Bearer"
        access.append(response.tokens.access_token)
        spent.append(response.tokens.refresh_token)

    # Every access token minted along the way, the first one included, still
    # authenticates: rotation does not end the session.
    for token in access:
        who = await authenticate(api, token)
        assert who.session.session_id == sid
        assert who.session.user_id == created.user.id

    rows = await token_rows(api, sid)
    assert [r.generation for r in rows] == [0, 1, 2, 3]
    assert [r.token_hash for r in rows] == [digest(t) for t in spent]
    assert_one_current(rows, spent[-1])
    assert all(r.rotated_at is not None for r in rows[:-1])
    assert (await session_row(api, sid)).revoked_at is None


# --------------------------------------------------------------------------- reuse detection


async def test_reuse_after_grace_revokes_the_session(own_server: Any) -> None:
    # A server without a grace interval: every reuse is past it at once.
    api = await own_server(**NO_GRACE)
    created = await api.sign_up()
    sid = created.tokens.session_id
    parent = created.tokens.refresh_token
    child = await refresh(api, parent)
    newest = await refresh(api, child.tokens.refresh_token)
    # A second sign-in of the same user: another session, which must survive.
    other = (
        await api.auth.SignInWithPassword(
            auth_pb2.SignInWithPasswordRequest(email=created.user.email, password=PASSWORD)
        )
    ).result
    remember(other.tokens.access_token, other.tokens.refresh_token)
    access = [
        created.tokens.access_token,
        child.tokens.access_token,
        newest.tokens.access_token,
    ]
    # Warm the Authenticate cache: the revocation must beat it.
    for token in access:
        await authenticate(api, token)

    error = await failure(api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=parent)))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "REFRESH_TOKEN_REUSED")

    # The revocation was committed although the call failed, and takes
    # effect at once for every access token of the session.
    for token in access:
        error = await failure(authenticate(api, token))
        assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "SESSION_REVOKED")
    # The thief's or the victim's newest refresh token is dead too.
    error = await failure(refresh(api, newest.tokens.refresh_token))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "SESSION_REVOKED")

    row = await session_row(api, sid)
    assert row.revoked_at is not None
    assert row.revoke_reason == "refresh_token_reused"
    # No token was minted by the failed calls.
    rows = await token_rows(api, sid)
    assert len(rows) == 3
    assert_one_current(rows, newest.tokens.refresh_token)

    # Only that session: the user's other session lives on.
    assert (await session_row(api, other.tokens.session_id)).revoked_at is None
    who = await authenticate(api, other.tokens.access_token)
    assert who.session.session_id == other.tokens.session_id
    await refresh(api, other.tokens.refresh_token)


async def test_reusing_the_current_token_after_grace_is_also_reuse(own_server: Any) -> None:
    """Reuse is about the spent token, whatever generation it is."""
    api = await own_server(**NO_GRACE)
    created = await api.sign_up()
    first = await refresh(api, created.tokens.refresh_token)
    second = await refresh(api, first.tokens.refresh_token)
    error = await failure(refresh(api, first.tokens.refresh_token))
    assert error.reason == "REFRESH_TOKEN_REUSED"
    error = await failure(refresh(api, second.tokens.refresh_token))
    assert error.reason == "SESSION_REVOKED"
    error = await failure(authenticate(api, second.tokens.access_token))
    assert error.reason == "SESSION_REVOKED"


# --------------------------------------------------------------------------- grace interval


async def test_parent_again_inside_grace_returns_the_same_successor(api: Api) -> None:
    created = await api.sign_up()
    sid = created.tokens.session_id
    parent = created.tokens.refresh_token
    first = await refresh(api, parent)
    # The second browser tab, a moment later, with the token it also held.
    again = await refresh(api, parent)
    assert again.tokens.refresh_token == first.tokens.refresh_token
    assert again.tokens.session_id == sid

    # The session is live, and both access tokens work.
    assert (await session_row(api, sid)).revoked_at is None
    for token in (first.tokens.access_token, again.tokens.access_token):
        assert (await authenticate(api, token)).session.session_id == sid
    rows = await token_rows(api, sid)
    assert len(rows) == 2
    assert rows[0].grace_uses == 1
    assert_one_current(rows, first.tokens.refresh_token)

    # The shared successor keeps rotating normally.
    nxt = await refresh(api, first.tokens.refresh_token)
    assert nxt.tokens.refresh_token not in (parent, first.tokens.refresh_token)
    assert_one_current(await token_rows(api, sid), nxt.tokens.refresh_token)


async def test_grandparent_inside_grace_returns_the_newest_token(api: Api) -> None:
    created = await api.sign_up()
    sid = created.tokens.session_id
    parent = created.tokens.refresh_token
    s1 = await refresh(api, parent)
    s2 = await refresh(api, s1.tokens.refresh_token)
    late = await refresh(api, parent)
    assert late.tokens.refresh_token == s2.tokens.refresh_token
    assert late.tokens.session_id == sid
    assert (await session_row(api, sid)).revoked_at is None
    rows = await token_rows(api, sid)
    assert len(rows) == 3
    assert_one_current(rows, s2.tokens.refresh_token)
    # And s1, also spent, inside grace, gets the same newest token.
    again = await refresh(api, s1.tokens.refresh_token)
    assert again.tokens.refresh_token == s2.tokens.refresh_token
    assert (await authenticate(api, again.tokens.access_token)).session.session_id == sid


async def test_grace_count_limits_duplicate_exchanges(own_server: Any) -> None:
    # A long grace interval, so only the count can end it.
    api = await own_server(refresh_reuse_grace_count=2, refresh_reuse_grace=60.0)
    created = await api.sign_up()
    sid = created.tokens.session_id
    parent = created.tokens.refresh_token
    successor = await refresh(api, parent)
    for _ in range(2):
        duplicate = await refresh(api, parent)
        assert duplicate.tokens.refresh_token == successor.tokens.refresh_token
    assert (await token_rows(api, sid))[0].grace_uses == 2

    error = await failure(refresh(api, parent))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "REFRESH_TOKEN_REUSED")
    assert (await session_row(api, sid)).revoked_at is not None
    error = await failure(refresh(api, successor.tokens.refresh_token))
    assert error.reason == "SESSION_REVOKED"
    error = await failure(authenticate(api, successor.tokens.access_token))
    assert error.reason == "SESSION_REVOKED"


async def test_grace_count_zero_means_no_grace(own_server: Any) -> None:
    api = await own_server(refresh_reuse_grace_count=0, refresh_reuse_grace=60.0)
    created = await api.sign_up()
    successor = await refresh(api, created.tokens.refresh_token)
    error = await failure(refresh(api, created.tokens.refresh_token))
    assert error.reason == "REFRESH_TOKEN_REUSED"
    error = await failure(refresh(api, successor.tokens.refresh_token))
    assert error.reason == "SESSION_REVOKED"


# --------------------------------------------------------------------------- races


async def test_concurrent_refreshes_of_one_token_share_one_successor(
    own_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The racers queue on the session's row lock; on a loaded machine the last
    # of them can take longer than the suite's 1 s grace interval to get it,
    # and would then see reuse. What is tested is the sharing, not the bound.
    api = await own_server(refresh_reuse_grace=60.0)
    created = await api.sign_up()
    sid = created.tokens.session_id
    token = created.tokens.refresh_token

    async def call(stub: auth_pb2_grpc.AuthServiceAsyncStub, _: int) -> Any:
        return await stub.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=token))

    racing = overlap(monkeypatch, api, "refresh")
    results = await concurrently(api, RACERS, call)
    monkeypatch.undo()
    assert racing.most > 1, "the refreshes did not overlap"
    for result in results:
        if not isinstance(result, BaseException):
            remember(result.tokens.access_token, result.tokens.refresh_token)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} of {RACERS} refreshes failed: {errors[0]!r}"
    successors = {r.tokens.refresh_token for r in results}
    assert len(successors) == 1, f"{len(successors)} different successors"
    (successor,) = successors
    assert {r.tokens.session_id for r in results} == {sid}

    rows = await token_rows(api, sid)
    assert len(rows) == 2
    assert_one_current(rows, successor)
    # One call rotated, every other one took the grace path.
    assert rows[0].token_hash == digest(token)
    assert rows[0].grace_uses == RACERS - 1
    assert (await session_row(api, sid)).revoked_at is None
    # The shared successor works once more.
    await refresh(api, successor)


async def test_concurrent_sign_ups_of_one_email_create_one_user(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    email = f"racer-{uuid.uuid4().hex[:8]}@example.com"

    async def call(stub: auth_pb2_grpc.AuthServiceAsyncStub, _: int) -> Any:
        return await stub.SignUp(auth_pb2.SignUpRequest(email=email, password=PASSWORD))

    racing = overlap(monkeypatch, api, "sign_up")
    results = await concurrently(api, RACERS, call)
    monkeypatch.undo()
    assert racing.most > 1, "the sign-ups did not overlap"
    won = [r for r in results if not isinstance(r, BaseException)]
    lost = [r for r in results if isinstance(r, BaseException)]
    for response in won:
        remember(response.result.tokens.access_token, response.result.tokens.refresh_token)
    assert len(won) == 1, f"{len(won)} sign-ups of one email succeeded"
    for error in lost:
        assert isinstance(error, grpc.aio.AioRpcError), repr(error)
        typed = from_rpc_error(error)
        assert (typed.code, typed.reason) == (
            grpc.StatusCode.ALREADY_EXISTS,
            "EMAIL_ALREADY_EXISTS",
        )
    assert await count_users(api) == 1
    async with api.server.core.db.reader() as tx:
        user_sessions = list(await tx.conn.execute(select(sessions.c.id)))
    assert len(user_sessions) == 1
    (result,) = (response.result for response in won)
    assert (await authenticate(api, result.tokens.access_token)).session.user_id == result.user.id


# --------------------------------------------------------------------------- unknown tokens


GARBAGE = [
    pytest.param("", id="empty"),
    pytest.param("rt_", id="prefix-only"),
    pytest.param("not-a-refresh-token", id="word"),
    pytest.param("rt_" + "A" * 43, id="well-formed-unknown"),
    pytest.param("rt_" + "x" * 200, id="too-long"),
    pytest.param("rt_ünïcödé-токен", id="non-ascii"),
    pytest.param("rt_\x00\x01\x7f", id="control-chars"),
]


@pytest.mark.parametrize("garbage", GARBAGE)
async def test_unknown_refresh_token_is_invalid_and_changes_nothing(api: Api, garbage: str) -> None:
    created = await api.sign_up()
    await refresh(api, created.tokens.refresh_token)
    before = await api.snapshot()
    error = await failure(refresh(api, garbage))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")
    assert await api.snapshot() == before


async def test_near_miss_refresh_tokens_are_invalid_and_change_nothing(api: Api) -> None:
    created = await api.sign_up()
    live = (await refresh(api, created.tokens.refresh_token)).tokens
    token = live.refresh_token
    near_misses = [
        token[:-1],
        token + "A",
        token.swapcase(),
        " " + token,
        token + "\n",
        token.removeprefix("rt_"),
        live.access_token,  # an access token is not a refresh token
    ]
    before = await api.snapshot()
    for candidate in near_misses:
        error = await failure(refresh(api, candidate))
        assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")
    assert await api.snapshot() == before
    # The genuine token was not spent by any of them.
    await refresh(api, token)

"""Rules that run on time: session lifetime, retired signing keys, the
Authenticate cache's TTL.

Real time, short settings, no fake clock. Each test starts servers of its own
with the setting under test a second or two long, polls until the state
changes (with a bound), and asserts both sides: still accepted just before
the deadline, refused after it, and the change no later than the deadline
plus a poll. The servers run in this process, so ``time.monotonic()`` here and
in the server is one clock; server timestamps are compared with
``time.time()``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from google.protobuf.json_format import MessageToDict
from sqlalchemy import update

from authsvc.storage import migrate
from authsvc.storage.tables import sessions
from authsvc_client.errors import AuthsvcError, from_rpc_error
from authsvc_client.v1 import auth_pb2, sessions_pb2
from tests.app import (
    PASSWORD,
    Api,
    Backend,
    Storage,
    claims,
    failure,
    refreshed,
    refused,
    remember,
    service,
    start_api,
    stop_api,
    who,
)

Start = Callable[..., Awaitable[Api]]

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
POLL = 0.05  # seconds between polls


@pytest.fixture
async def start(backend_urls: Backend, tmp_path: Path, log_file: Path) -> AsyncIterator[Start]:
    """``await start(**settings)``: a server on this backend's store (a SQLite
    file of the test's own, or the session's PostgreSQL database and Redis).

    ``log_file`` routes its logs to the suite's log, which is checked for secrets.
    """
    started: list[Api] = []

    async def start(**overrides: Any) -> Api:
        api = await start_api(backend_urls, tmp_path, **overrides)
        started.append(api)
        # On Redis the event follower reports healthy after its first read of
        # the stream; until then Authenticate bypasses its cache, which would
        # make the cache test pass for the wrong reason.
        await _until(api.server.core.bus.healthy, 5.0, "following the event stream")
        return api

    yield start
    for api in reversed(started):
        await stop_api(api)


@pytest.fixture
def storage(storage: Storage) -> Storage:
    """The key test's store of its own (rotating keys in the session's shared
    database would disturb every other server on it), migrated up front."""
    url = storage.env.get("AUTHSVC_DATABASE_URL")
    if url is not None:
        with ThreadPoolExecutor(1) as pool:  # Alembic's env runs its own event loop
            pool.submit(migrate.upgrade, url).result()
    return storage


async def _until(predicate: Callable[[], bool], within: float, what: str) -> None:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > within:
            raise AssertionError(f"not {what} after {within} s")
        await asyncio.sleep(0.01)


def _seconds(timestamp: Any) -> float:
    """A google.protobuf.Timestamp as POSIX seconds."""
    return float(timestamp.seconds + timestamp.nanos / 1e9)


async def _outcome(call: Awaitable[Any]) -> tuple[Any, AuthsvcError | None]:
    try:
        return await call, None
    except grpc.aio.AioRpcError as error:
        return None, from_rpc_error(error)


async def _listed(api: Api, user_id: str) -> list[Any]:
    """The user's live sessions, as ListSessions (with the API key) shows them."""
    reply = await api.sessions.ListSessions(
        sessions_pb2.ListSessionsRequest(user_id=user_id), metadata=service()
    )
    return list(reply.sessions)


# --------------------------------------------------------------------------- sessions

SESSION_TTL = 3


async def test_a_session_ends_at_its_absolute_lifetime_however_often_it_is_refreshed(
    start: Start,
) -> None:
    api = await start(session_ttl=SESSION_TTL)
    before = time.time()
    created = await api.sign_up()
    after = time.time()
    user_id, session_id = created.user.id, created.tokens.session_id

    # The session's end is fixed at sign-in: sign-in time + AUTHSVC_SESSION_TTL.
    (listed,) = await _listed(api, user_id)
    ends = _seconds(listed.expire_time)
    assert before + SESSION_TTL - 0.001 <= ends <= after + SESSION_TTL + 0.001
    info = await who(api, created.tokens.access_token)
    assert _seconds(info.session_expire_time) == ends
    # An access token never outlives its session (the default 900 s is cut short).
    assert claims(created.tokens.access_token)["exp"] <= ends

    # Refresh right up to the end. Every refresh succeeds, leaves the end where
    # it was, and mints tokens that end with the session at the latest.
    refresh = created.tokens.refresh_token
    last_ok = last_use = 0.0
    error: AuthsvcError | None = None
    while error is None:
        called = time.time()
        assert called < ends + 2.0, "the session still refreshes 2 s after its end"
        tokens, error = await _outcome(refreshed(api, refresh))
        returned = time.time()
        if tokens is None:
            break
        assert called < ends, f"refreshed {called - ends:.3f} s after the session's end"
        last_ok, refresh = called, tokens.refresh_token
        assert tokens.session_id == session_id
        assert _seconds(tokens.expire_time) <= ends
        assert claims(tokens.access_token)["exp"] <= ends
        live = await _listed(api, user_id)
        if not live:  # listed after the end: no longer live
            assert time.time() >= ends, "the session left the list before its end"
            continue
        (listed,) = live
        assert _seconds(listed.expire_time) == ends, "a refresh moved the session's end"
        assert _seconds(listed.last_use_time) > last_use  # the refresh did happen
        last_use = _seconds(listed.last_use_time)
        await asyncio.sleep(POLL)

    # Refused once the end has passed, and not long after it.
    assert error is not None
    assert (error.code, error.reason) == (UNAUTHENTICATED, "SESSION_EXPIRED"), error.message
    assert returned >= ends
    assert called <= ends + 1.0
    # Refreshing kept the session until (nearly) its end: the refusal is the
    # lifetime, not some other failure early on.
    assert last_ok >= ends - 1.0, f"last refresh {ends - last_ok:.2f} s before the end"

    # Expired is final and changes nothing: the same refresh token, again and
    # through SetActiveOrg, is SESSION_EXPIRED (not reuse, not a revocation).
    await refused(
        api,
        lambda: api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=refresh)),
        UNAUTHENTICATED,
        "SESSION_EXPIRED",
    )
    await refused(
        api,
        lambda: api.auth.SetActiveOrg(auth_pb2.SetActiveOrgRequest(refresh_token=refresh)),
        UNAUTHENTICATED,
        "SESSION_EXPIRED",
    )
    # Its access tokens have expired with it, and it is no longer listed.
    error = await failure(
        api.auth.Authenticate(
            auth_pb2.AuthenticateRequest(access_token=created.tokens.access_token)
        )
    )
    assert (error.code, error.reason) == (UNAUTHENTICATED, "TOKEN_EXPIRED")
    assert await _listed(api, user_id) == []

    # Signing in again starts a new session with a lifetime of its own.
    signed = await api.auth.SignInWithPassword(
        auth_pb2.SignInWithPasswordRequest(email=created.user.email, password=PASSWORD)
    )
    remember(signed.result.tokens.access_token, signed.result.tokens.refresh_token)
    (listed,) = await _listed(api, user_id)
    assert listed.id == signed.result.tokens.session_id != session_id
    assert _seconds(listed.expire_time) >= time.time() + SESSION_TTL - 1.0


# --------------------------------------------------------------------------- signing keys

ACCESS_TTL = 2
MARGIN = 1.0  # AUTHSVC_KEY_RETIRE_MARGIN for the key test
RELOAD = 0.2


async def _jwks(api: Api) -> dict[str, dict[str, str]]:
    reply = await api.auth.GetJwks(auth_pb2.GetJwksRequest())
    return {k.kid: MessageToDict(k, preserving_proto_field_name=True) for k in reply.keys}


def _verify_locally(token: str, keys: dict[str, dict[str, str]], api: Api) -> None:
    """Verifies as a third party does: the JWK the token's kid names, via PyJWT."""
    kid = jwt.get_unverified_header(token)["kid"]
    jwt.decode(
        token,
        jwt.PyJWK(keys[kid]).key,
        algorithms=["EdDSA"],
        audience=api.settings.audience,
        issuer=api.settings.issuer,
    )


async def test_a_retired_key_stays_in_the_jwks_until_its_tokens_expire_then_leaves(
    storage: Storage, servers: Start
) -> None:
    """In real time, on a 2 s token lifetime and a 1 s retirement margin: the
    retired key stays while its tokens live, and leaves at the first reload
    after the lifetime and the margin have passed."""
    api = await servers(
        access_token_ttl=ACCESS_TTL, key_reload_interval=RELOAD, key_retire_margin=MARGIN
    )
    await _until(api.server.core.bus.healthy, 5.0, "following the event stream")
    created = await api.sign_up()
    old_token = created.tokens.access_token
    old_kid = jwt.get_unverified_header(old_token)["kid"]
    old_exp = claims(old_token)["exp"]

    new_kid = await api.server.core.keys.rotate()
    retired = time.time()
    assert new_kid != old_kid
    signed = await api.auth.SignInWithPassword(
        auth_pb2.SignInWithPasswordRequest(email=created.user.email, password=PASSWORD)
    )
    remember(signed.result.tokens.access_token, signed.result.tokens.refresh_token)
    new_token = signed.result.tokens.access_token
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid

    # While the old key's token lives, across several key reloads, the JWKS
    # carries the old key and the token verifies locally and online; then it
    # expires: TOKEN_EXPIRED, not TOKEN_INVALID (its key is still known).
    checks, last_check = 0, 0.0
    error: AuthsvcError | None = None
    while True:
        called = time.time()
        assert called < old_exp + 1.5, "the old token outlived its exp"
        keys = await _jwks(api)
        assert set(keys) == {old_kid, new_kid}, "the retired key left before its token expired"
        try:
            _verify_locally(old_token, keys, api)
        except jwt.ExpiredSignatureError:
            assert time.time() >= old_exp
            error = await failure(who(api, old_token))
            break
        _, error = await _outcome(who(api, old_token))
        if error is not None:
            break
        checks, last_check = checks + 1, called
        await asyncio.sleep(POLL)
    assert error is not None
    assert (error.code, error.reason) == (UNAUTHENTICATED, "TOKEN_EXPIRED"), error.message
    assert time.time() >= old_exp
    assert checks >= 5, f"only {checks} checks before the token expired"
    assert last_check >= old_exp - 1.0, "the checks stopped well before the token's end"

    # Every token the old key signed has expired, and the margin has passed:
    # it leaves the JWKS at the next reload (not before), and a token naming
    # it is no longer accepted.
    leaves_after = retired + ACCESS_TTL + MARGIN
    while old_kid in await _jwks(api):
        assert time.time() < leaves_after + RELOAD + 2.0, "the retired key stayed in the JWKS"
        await asyncio.sleep(POLL)
    assert time.time() >= leaves_after - 0.5, "the retired key left within its margin"
    assert set(await _jwks(api)) == {new_kid}
    error = await failure(who(api, old_token))
    assert (error.code, error.reason) == (UNAUTHENTICATED, "TOKEN_INVALID")
    # The active key is unaffected: a token minted now is accepted.
    signed = await api.auth.SignInWithPassword(
        auth_pb2.SignInWithPasswordRequest(email=created.user.email, password=PASSWORD)
    )
    remember(signed.result.tokens.access_token, signed.result.tokens.refresh_token)
    assert jwt.get_unverified_header(signed.result.tokens.access_token)["kid"] == new_kid
    assert (await who(api, signed.result.tokens.access_token)).user_id == created.user.id
    # A replica starting now does not publish it either.
    other = await servers(
        access_token_ttl=ACCESS_TTL, key_reload_interval=RELOAD, key_retire_margin=MARGIN
    )
    assert set(await _jwks(other)) == {new_kid}
    # Stopping a server whose event follower has not yet made its first read
    # of the stream can hang (the cancelled XREVRANGE never returns); let it.
    await _until(other.server.core.bus.healthy, 5.0, "following the event stream")


# --------------------------------------------------------------------------- Authenticate cache

CACHE_TTL = 1.5


async def _revoke_behind_authsvcs_back(api: Api, session_id: str) -> None:
    """Revokes a session in the database directly: no event is published, so
    nothing tells the server's Authenticate cache."""
    async with api.server.core.db.transaction() as tx:
        result = await tx.conn.execute(
            update(sessions)
            .where(sessions.c.id == uuid.UUID(session_id))
            .values(revoked_at=datetime.now(UTC), revoke_reason="test")
        )
    assert result.rowcount == 1


async def test_a_cached_authenticate_answer_lasts_at_most_the_cache_ttl(start: Start) -> None:
    api = await start(auth_cache_ttl=CACHE_TTL)
    created = await api.sign_up()
    token, session_id = created.tokens.access_token, created.tokens.session_id

    resolving = time.monotonic()
    assert (await who(api, token)).session_id == session_id  # resolved and cached
    resolved = time.monotonic()

    await _revoke_behind_authsvcs_back(api, session_id)
    # The revocation is real: anything that reads the database sees it.
    await refused(
        api,
        lambda: api.auth.RefreshToken(
            auth_pb2.RefreshTokenRequest(refresh_token=created.tokens.refresh_token)
        ),
        UNAUTHENTICATED,
        "SESSION_REVOKED",
    )

    # Authenticate answers from its cache (OK) until the entry is TTL old,
    # then reads the database (SESSION_REVOKED).
    accepted: list[float] = []
    while True:
        called = time.monotonic()
        assert called - resolved < CACHE_TTL + 2.0, "the cached answer outlived its TTL by 2 s"
        _, error = await _outcome(who(api, token))
        if error is not None:
            break
        accepted.append(called)
        await asyncio.sleep(0.02)
    assert (error.code, error.reason) == (UNAUTHENTICATED, "SESSION_REVOKED"), error.message
    assert accepted, "refused at once: the cache was not used, so this proves nothing"
    # At most the TTL: the entry was built before `resolved`.
    assert accepted[-1] < resolved + CACHE_TTL, (
        f"accepted {accepted[-1] - resolved:.3f} s after caching (TTL {CACHE_TTL} s)"
    )
    # ...and it was the TTL that ended it: accepted until just before it...
    assert accepted[-1] >= resolving + CACHE_TTL - 0.5, (
        f"refused {called - resolving:.3f} s after caching, well before the TTL"
    )
    # ...and refused right after it.
    assert called <= resolved + CACHE_TTL + 0.5
    # It stays refused.
    error = await failure(who(api, token))
    assert error.reason == "SESSION_REVOKED"

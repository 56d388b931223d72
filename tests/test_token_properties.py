"""Property tests: tokens are tamper-evident, and rotation keeps one live token.

Tampering: a real token from the server with any one byte changed (position
and new byte drawn by Hypothesis) must be refused: access tokens by
Authenticate and refresh tokens by RefreshToken with UNAUTHENTICATED /
TOKEN_INVALID, page tokens by ListUsers with INVALID_ARGUMENT /
INVALID_PAGE_TOKEN.

How a mutated token is sent: the token (ASCII) is encoded to bytes, one byte
is replaced, and the result is decoded with latin-1, so every byte 0x00-0xFF
becomes the one character U+0000-U+00FF. All three tokens travel in protobuf
string fields (not in metadata), which carry any such string as UTF-8, so no
mutation is refused on the client side: every call below reaches the server.
The helper ``rejected`` only accepts a ``grpc.aio.AioRpcError`` and the
assertions require authsvc's own ErrorInfo reason, so a client-side refusal
(which would carry no such reason) would fail the test instead of passing it.

Rotation: a drawn sequence of refreshes with the latest token, refreshes with
an older token inside the grace interval, Authenticate and sign-out is run
against a model of the session; after every step the database must hold
exactly one unrotated refresh token for the session (the model's latest).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, select

from authsvc.storage.tables import refresh_tokens, sessions, users
from authsvc_client.errors import AuthsvcError, from_rpc_error
from authsvc_client.v1 import auth_pb2, users_pb2
from tests.app import Api, Backend, bearer, remember, service, start_api, stop_api

PROPERTY = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
B64URL = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


# --------------------------------------------------------------------------- helpers


async def rejected(call: Awaitable[Any]) -> AuthsvcError:
    """The typed error of a call that must fail with a gRPC status."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        typed = from_rpc_error(error)
    else:
        raise AssertionError("the tampered token was accepted")
    assert typed.code != grpc.StatusCode.OK
    return typed


def mutate(token: str, position: int, byte: int) -> str:
    raw = bytearray(token.encode("ascii"))
    raw[position] = byte
    tampered = raw.decode("latin-1")
    # A presented credential, genuine or not, must not be logged either.
    remember(tampered)
    return tampered


@st.composite
def single_byte_change(draw: st.DrawFn, token: str) -> str:
    """``token`` with one byte replaced by a different one.

    Positions lean toward the edges of the dot-separated segments (where
    base64's slack bits live) and bytes toward the base64url alphabet and the
    separators, where a change is most likely to slip through; any position
    and any byte 0-255 stay possible.
    """
    raw = token.encode("ascii")
    edges = {0, len(raw) - 1}
    for i, ch in enumerate(raw):
        if ch == ord("."):
            edges.update({i - 1, i, i + 1})
    position = draw(
        st.one_of(st.integers(0, len(raw) - 1), st.sampled_from(sorted(edges))), label="position"
    )
    byte = draw(
        st.one_of(st.integers(0, 255), st.sampled_from(B64URL + b".=+/ \x00\x80\xff")).filter(
            lambda b: b != raw[position]
        ),
        label="byte",
    )
    return mutate(token, position, byte)


@pytest.fixture
async def signed_up(api: Api) -> Any:
    created = await api.sign_up()
    return created


@pytest.fixture
async def page_token(api: Api) -> str:
    for _ in range(3):
        await api.sign_up()
    page = await api.users.ListUsers(users_pb2.ListUsersRequest(page_size=1), metadata=service())
    assert len(page.users) == 1
    assert page.next_page_token
    return str(page.next_page_token)


# --------------------------------------------------------------------------- tampering


@PROPERTY
@given(data=st.data())
async def test_any_single_byte_change_breaks_an_access_token(
    api: Api, signed_up: Any, data: st.DataObject
) -> None:
    token = signed_up.tokens.access_token
    # The genuine token still works: the mutations before changed nothing.
    who = await api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=token))
    assert who.session.session_id == signed_up.tokens.session_id
    tampered = data.draw(single_byte_change(token), label="tampered")
    error = await rejected(
        api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=tampered))
    )
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")


@PROPERTY
@given(data=st.data())
async def test_any_single_byte_change_breaks_a_refresh_token(
    api: Api, signed_up: Any, data: st.DataObject
) -> None:
    token = signed_up.tokens.refresh_token
    tampered = data.draw(single_byte_change(token), label="tampered")
    before = await api.snapshot()
    error = await rejected(
        api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=tampered))
    )
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")
    assert await api.snapshot() == before


@PROPERTY
@given(data=st.data())
async def test_any_single_byte_change_breaks_a_page_token(
    api: Api, page_token: str, data: st.DataObject
) -> None:
    genuine = await api.users.ListUsers(
        users_pb2.ListUsersRequest(page_size=1, page_token=page_token), metadata=service()
    )
    assert len(genuine.users) == 1
    tampered = data.draw(single_byte_change(page_token), label="tampered")
    error = await rejected(
        api.users.ListUsers(
            users_pb2.ListUsersRequest(page_size=1, page_token=tampered), metadata=service()
        )
    )
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")


async def test_every_base64_spelling_of_a_segment_end_is_refused(
    api: Api, signed_up: Any, page_token: str
) -> None:
    """Exhaustively, where a change could hide in base64's slack bits.

    The last character of a base64url segment carries unused low bits; a
    lenient decoder maps several spellings to the same bytes. Every other
    alphabet character at the end of every segment must be refused.
    """
    access = signed_up.tokens.access_token
    segment_ends = [i - 1 for i, ch in enumerate(access) if ch == "."] + [len(access) - 1]
    for end in segment_ends:
        for byte in B64URL:
            if byte == ord(access[end]):
                continue
            tampered = mutate(access, end, byte)
            error = await rejected(
                api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=tampered))
            )
            assert error.reason == "TOKEN_INVALID", (end, chr(byte))

    page_ends = [page_token.index(".") - 1, len(page_token) - 1]
    for end in page_ends:
        for byte in B64URL:
            if byte == ord(page_token[end]):
                continue
            tampered = mutate(page_token, end, byte)
            error = await rejected(
                api.users.ListUsers(
                    users_pb2.ListUsersRequest(page_size=1, page_token=tampered),
                    metadata=service(),
                )
            )
            assert error.reason == "INVALID_PAGE_TOKEN", (end, chr(byte))


# --------------------------------------------------------------------------- rotation model

GRACE_COUNT = 2


@pytest.fixture
async def rotation_api(api: Api, backend_urls: Backend, tmp_path: Path) -> AsyncIterator[Api]:
    """A server whose grace interval (60 s) cannot run out during a test, so the
    model is exact; a grace count of 2 makes reuse revocation reachable.
    Requesting ``api`` empties the tables first; on Postgres this server
    shares them, so they are emptied again at the end."""
    own = await start_api(
        backend_urls,
        tmp_path,
        refresh_reuse_grace=60.0,
        refresh_reuse_grace_count=GRACE_COUNT,
    )
    yield own
    await stop_api(own)
    async with api.server.core.db.transaction() as tx:
        for table in (refresh_tokens, sessions, users):
            await tx.conn.execute(delete(table))


@dataclass
class SessionModel:
    """What the session must look like after each step."""

    session_id: str
    access_token: str
    chain: list[str]  # refresh tokens, oldest first; chain[-1] is the live one
    grace_uses: list[int] = field(default_factory=list)
    revoked: bool = False

    def __post_init__(self) -> None:
        self.grace_uses = [0] * len(self.chain)


# (action, n): n picks the older token, counted back from the latest one's
# parent. Weighted so that sequences are long enough to exhaust the grace
# count and sign-out (which ends the interesting part) is rare.
ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["latest"] * 4 + ["older"] * 5 + ["authenticate", "sign_out"]),
        st.integers(0, 3),
    ),
    min_size=1,
    max_size=20,
)


async def _refresh(api: Api, token: str) -> auth_pb2.RefreshTokenResponse | AuthsvcError:
    try:
        response = await api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=token))
    except grpc.aio.AioRpcError as error:
        return from_rpc_error(error)
    remember(response.tokens.access_token, response.tokens.refresh_token)
    return response


async def _check_database(api: Api, model: SessionModel) -> None:
    sid = uuid.UUID(model.session_id)
    async with api.server.core.db.reader() as tx:
        rows = list(
            await tx.conn.execute(
                select(refresh_tokens)
                .where(refresh_tokens.c.session_id == sid)
                .order_by(refresh_tokens.c.generation)
            )
        )
        session = (await tx.conn.execute(select(sessions).where(sessions.c.id == sid))).one()
    unrotated = [r for r in rows if r.rotated_at is None]
    assert len(unrotated) <= 1, f"{len(unrotated)} unrotated refresh tokens in one session"
    assert len(unrotated) == 1
    assert unrotated[0].token_hash == hashlib.sha256(model.chain[-1].encode()).digest()
    assert [r.token_hash for r in rows] == [
        hashlib.sha256(t.encode()).digest() for t in model.chain
    ]
    assert [r.grace_uses for r in rows] == model.grace_uses
    assert (session.revoked_at is not None) == model.revoked


@PROPERTY
@given(actions=ACTIONS)
async def test_rotation_keeps_one_live_refresh_token(
    rotation_api: Api, actions: list[tuple[str, int]]
) -> None:
    api = rotation_api
    created = await api.sign_up()
    model = SessionModel(
        created.tokens.session_id, created.tokens.access_token, [created.tokens.refresh_token]
    )
    await _check_database(api, model)
    for action, n in actions:
        if action == "latest" or (action == "older" and len(model.chain) == 1):
            result = await _refresh(api, model.chain[-1])
            if model.revoked:
                assert isinstance(result, AuthsvcError)
                assert result.reason == "SESSION_REVOKED"
            else:
                assert not isinstance(result, AuthsvcError), result
                assert result.tokens.session_id == model.session_id
                assert result.tokens.refresh_token not in model.chain
                model.chain.append(result.tokens.refresh_token)
                model.grace_uses.append(0)
                model.access_token = result.tokens.access_token
        elif action == "older":
            index = len(model.chain) - 2 - n % (len(model.chain) - 1)
            result = await _refresh(api, model.chain[index])
            if model.revoked:
                assert isinstance(result, AuthsvcError)
                assert result.reason == "SESSION_REVOKED"
            elif model.grace_uses[index] < GRACE_COUNT:
                assert not isinstance(result, AuthsvcError), result
                # Inside grace: the session's current token, whatever the
                # generation of the one presented.
                assert result.tokens.refresh_token == model.chain[-1]
                assert result.tokens.session_id == model.session_id
                model.grace_uses[index] += 1
                model.access_token = result.tokens.access_token
                event(f"grace exchange, {len(model.chain) - 1 - index} generations back")
            else:
                assert isinstance(result, AuthsvcError), result
                assert result.reason == "REFRESH_TOKEN_REUSED"
                model.revoked = True
                event("revoked by reuse")
        elif action == "authenticate":
            request = auth_pb2.AuthenticateRequest(access_token=model.access_token)
            if model.revoked:
                error = await rejected(api.auth.Authenticate(request))
                assert error.reason == "SESSION_REVOKED"
            else:
                who = await api.auth.Authenticate(request)
                assert who.session.session_id == model.session_id
        else:  # sign_out
            call = api.auth.SignOut(auth_pb2.SignOutRequest(), metadata=bearer(model.access_token))
            if model.revoked:
                error = await rejected(call)
                assert error.reason == "SESSION_REVOKED"
            else:
                await call
                model.revoked = True
                event("signed out")
        await _check_database(api, model)

"""Sign-up, sign-in, CompleteSignIn, Authenticate, refresh and sign-out
through a real channel."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2

from authsvc.services.auth import MAX_PENDING_TOKEN
from authsvc_client.errors import from_rpc_error
from authsvc_client.v1 import auth_pb2, resources_pb2, sessions_pb2, users_pb2
from tests.app import PASSWORD, Api, bearer, failure, refreshed, remember


async def test_sign_up_signs_in_and_authenticates(api: Api) -> None:
    created = await api.sign_up("Ada.Lovelace@Example.COM")
    assert created.user.email == "Ada.Lovelace@example.com"
    assert created.user.role == resources_pb2.ROLE_USER
    assert created.tokens.token_type == "Bearer"
    assert created.tokens.expires_in == api.settings.access_token_ttl
    assert created.tokens.refresh_token.startswith("rt_")

    who = await api.auth.Authenticate(
        auth_pb2.AuthenticateRequest(access_token=created.tokens.access_token)
    )
    assert who.session.user_id == created.user.id
    assert who.session.session_id == created.tokens.session_id
    assert who.session.email == created.user.email
    assert who.session.role == resources_pb2.ROLE_USER

    me = await api.users.GetCurrentUser(
        users_pb2.GetCurrentUserRequest(), metadata=bearer(created.tokens.access_token)
    )
    assert me.user.id == created.user.id


async def test_email_is_unique_case_insensitively(api: Api) -> None:
    await api.sign_up("grace@example.com")
    error = await failure(api.sign_up("GRACE@EXAMPLE.COM"))
    assert (error.code, error.reason) == (grpc.StatusCode.ALREADY_EXISTS, "EMAIL_ALREADY_EXISTS")


async def test_sign_in_with_any_case_of_the_email(api: Api) -> None:
    created = await api.sign_up("mixed@example.com")
    signed = await api.auth.SignInWithPassword(
        auth_pb2.SignInWithPasswordRequest(email="MIXED@example.com", password=PASSWORD)
    )
    remember(signed.result.tokens.access_token, signed.result.tokens.refresh_token)
    assert signed.result.user.id == created.user.id
    assert signed.result.tokens.session_id != created.tokens.session_id


async def test_unknown_email_and_wrong_password_fail_alike(api: Api) -> None:
    await api.sign_up("known@example.com")
    wrong = await failure(
        api.auth.SignInWithPassword(
            auth_pb2.SignInWithPasswordRequest(email="known@example.com", password="not it at all")
        )
    )
    unknown = await failure(
        api.auth.SignInWithPassword(
            auth_pb2.SignInWithPasswordRequest(email="nobody@example.com", password="not it at all")
        )
    )
    assert (wrong.code, wrong.reason, wrong.message) == (
        unknown.code,
        unknown.reason,
        unknown.message,
    )
    assert wrong.reason == "INVALID_CREDENTIALS"
    assert wrong.code == grpc.StatusCode.UNAUTHENTICATED


async def test_refresh_rotates_and_keeps_the_session(api: Api) -> None:
    created = await api.sign_up()
    first = await api.auth.RefreshToken(
        auth_pb2.RefreshTokenRequest(refresh_token=created.tokens.refresh_token)
    )
    remember(first.tokens.access_token, first.tokens.refresh_token)
    assert first.tokens.session_id == created.tokens.session_id
    assert first.tokens.refresh_token != created.tokens.refresh_token
    second = await api.auth.RefreshToken(
        auth_pb2.RefreshTokenRequest(refresh_token=first.tokens.refresh_token)
    )
    remember(second.tokens.access_token, second.tokens.refresh_token)
    who = await api.auth.Authenticate(
        auth_pb2.AuthenticateRequest(access_token=second.tokens.access_token)
    )
    assert who.session.session_id == created.tokens.session_id


async def test_sign_out_takes_effect_at_once(api: Api) -> None:
    created = await api.sign_up()
    token = created.tokens.access_token
    # Warm the Authenticate cache first: sign-out must beat it.
    await api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=token))
    await api.auth.SignOut(auth_pb2.SignOutRequest(), metadata=bearer(token))

    error = await failure(api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=token)))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "SESSION_REVOKED")
    error = await failure(
        api.auth.RefreshToken(
            auth_pb2.RefreshTokenRequest(refresh_token=created.tokens.refresh_token)
        )
    )
    assert error.reason == "SESSION_REVOKED"
    error = await failure(
        api.users.GetCurrentUser(users_pb2.GetCurrentUserRequest(), metadata=bearer(token))
    )
    assert error.reason == "SESSION_REVOKED"


async def test_sessions_record_peer_and_user_agent(api: Api) -> None:
    created = await api.sign_up()
    listed = await api.sessions.ListSessions(
        sessions_pb2.ListSessionsRequest(),
        metadata=bearer(created.tokens.access_token),
    )
    (session,) = listed.sessions
    assert session.ip_address == "127.0.0.1"
    assert session.user_agent.startswith("grpc-python")
    assert session.current


# -- CompleteSignIn ----------------------------------------------------------------
#
# No sign-in answers a challenge yet, so no pending token exists: every one
# fails with PENDING_TOKEN_INVALID (auth.proto), however long or strange, and
# an empty one is INVALID_ARGUMENT naming the field. The token is a
# credential: it appears in no status and no log line.


def _pending_tokens() -> dict[str, str]:
    random = secrets.token_urlsafe(32)
    return {
        "random": "pt_" + random,
        "at-the-bound": ("pt_" + secrets.token_urlsafe(MAX_PENDING_TOKEN))[:MAX_PENDING_TOKEN],
        "over-the-bound": ("pt_" + secrets.token_urlsafe(MAX_PENDING_TOKEN))[
            : MAX_PENDING_TOKEN + 1
        ],
        "huge": secrets.token_urlsafe(768 * 1024),  # 1 MiB of text
        "unicode": "pt_\u00fc\u20ac\U0001f600 \u1e9e\u202e\u65e5\u672c\t\n" + random[:20],
        "unicode-huge": "\u65e5\U0001f600" * 100_000 + random[:20],
    }


async def _pending_failure(
    api: Api, request: auth_pb2.CompleteSignInRequest
) -> grpc.aio.AioRpcError:
    try:
        await api.auth.CompleteSignIn(request)
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("CompleteSignIn succeeded")


def _status_text(error: grpc.aio.AioRpcError) -> bytes:
    """Everything the caller receives of a failed call, as bytes."""
    parts: list[bytes] = [
        (error.details() or "").encode("utf-8", "replace"),
        (error.debug_error_string() or "").encode("utf-8", "replace"),
    ]
    for metadata in (error.initial_metadata(), error.trailing_metadata()):
        for key, value in metadata or ():
            parts.append(key.encode())
            parts.append(value if isinstance(value, bytes) else value.encode("utf-8", "replace"))
    return b"\n".join(parts)


def _log_size(log_file: Path) -> int:
    return log_file.stat().st_size


def _read_from(log_file: Path, start: int) -> str:
    with log_file.open("rb") as stream:
        stream.seek(start)
        return stream.read().decode("utf-8", "replace")


async def _access_log_since(log_file: Path, start: int, request_id: str) -> str:
    """The log written from byte ``start`` on, once it holds the call's
    access-log line (written after the status has gone out)."""
    for _ in range(200):
        text = _read_from(log_file, start)
        if any('"rpc"' in line and request_id in line for line in text.splitlines()):
            return text
        await asyncio.sleep(0.02)
    raise AssertionError(f"no access-log line for {request_id}")


@pytest.mark.parametrize("proof", ["none", "new_password"])
@pytest.mark.parametrize("kind", sorted(_pending_tokens()))
async def test_every_pending_token_is_pending_token_invalid(
    api: Api, log_file: Path, kind: str, proof: str
) -> None:
    token = _pending_tokens()[kind]
    if len(token) < 1000:
        remember(token)
    request = auth_pb2.CompleteSignInRequest(pending_token=token)
    if proof == "new_password":
        request.new_password = "a new password that is long enough"
        remember(request.new_password)
    start = _log_size(log_file)
    before = await api.snapshot()

    raw = await _pending_failure(api, request)

    error = from_rpc_error(raw)
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "PENDING_TOKEN_INVALID")
    assert error.detail(error_details_pb2.ErrorInfo) is not None
    assert await api.snapshot() == before
    # The token, or either end of it (a message that quotes a part).
    needles = [token.encode(), token[:20].encode(), token[-20:].encode()]
    if proof == "new_password":
        needles.append(request.new_password.encode())
    sent = _status_text(raw)
    assert not [n for n in needles if n in sent], "the status echoes the request's secrets"
    logged = (await _access_log_since(log_file, start, error.request_id)).encode()
    assert not [n for n in needles if n in logged], "the log shows the request's secrets"


async def test_other_credentials_are_no_pending_token(api: Api) -> None:
    """A live session's refresh and access tokens complete nothing, and the
    refresh token is not spent by trying."""
    created = await api.sign_up()
    for token in (created.tokens.refresh_token, created.tokens.access_token):
        error = from_rpc_error(
            await _pending_failure(api, auth_pb2.CompleteSignInRequest(pending_token=token))
        )
        assert error.reason == "PENDING_TOKEN_INVALID"
    assert (await refreshed(api, created.tokens.refresh_token)).session_id == (
        created.tokens.session_id
    )


@pytest.mark.parametrize("proof", ["none", "new_password"])
async def test_an_empty_pending_token_is_invalid_argument(api: Api, proof: str) -> None:
    request = auth_pb2.CompleteSignInRequest()
    if proof == "new_password":
        request.new_password = "a new password that is long enough"
    error = await failure(api.auth.CompleteSignIn(request))
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    bad_request = error.detail(error_details_pb2.BadRequest)
    assert bad_request is not None, "no google.rpc.BadRequest detail"
    assert [v.field for v in bad_request.field_violations] == ["pending_token"]

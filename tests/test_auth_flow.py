"""Sign-up, sign-in, Authenticate, refresh and sign-out through a real channel."""

from __future__ import annotations

import grpc

from authsvc_client.v1 import auth_pb2, resources_pb2, sessions_pb2, users_pb2
from tests.app import PASSWORD, Api, bearer, failure, remember


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

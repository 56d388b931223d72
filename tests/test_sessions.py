"""SessionService: listing and revoking sign-in sessions, and where a
session's client address and user agent come from."""

from __future__ import annotations

import uuid
from typing import Any

import grpc

from authsvc_client.v1 import auth_pb2, resources_pb2, sessions_pb2, users_pb2
from tests.app import PASSWORD, Api, all_pages, bearer, failure, remember, service

PD = (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
REVOKED = (grpc.StatusCode.UNAUTHENTICATED, "SESSION_REVOKED")


async def _sign_in(api: Api, email: str, metadata: Any = None, **fields: Any) -> Any:
    """Signs in; the SignInResult (``.user``, ``.tokens``)."""
    signed = await api.auth.SignInWithPassword(
        auth_pb2.SignInWithPasswordRequest(email=email, password=PASSWORD, **fields),
        metadata=metadata,
    )
    remember(signed.result.tokens.access_token, signed.result.tokens.refresh_token)
    return signed.result


async def _user_with_sessions(api: Api, count: int) -> tuple[Any, list[Any]]:
    """A user and the token pairs of ``count`` sessions, oldest first."""
    created = await api.sign_up()
    pairs = [created.tokens]
    for _ in range(count - 1):
        pairs.append((await _sign_in(api, created.user.email)).tokens)
    return created, pairs


async def _list(api: Api, metadata: Any, **fields: Any) -> Any:
    return await api.sessions.ListSessions(
        sessions_pb2.ListSessionsRequest(**fields), metadata=metadata
    )


async def _list_all(api: Api, metadata: Any, **fields: Any) -> tuple[list[Any], list[int]]:
    return await all_pages(
        lambda token: _list(api, metadata, page_token=token, **fields), "sessions"
    )


async def _authenticate_fails_revoked(api: Api, token: str) -> None:
    error = await failure(api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=token)))
    assert (error.code, error.reason) == REVOKED


async def _authenticates(api: Api, token: str) -> Any:
    response = await api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=token))
    return response.session


def _newest_first(sessions: list[Any]) -> bool:
    keys = [(s.create_time.seconds, s.create_time.nanos, uuid.UUID(s.id).hex) for s in sessions]
    return keys == sorted(keys, reverse=True)


# -- ListSessions ----------------------------------------------------------------


async def test_user_lists_own_live_sessions_newest_first(api: Api) -> None:
    alice, pairs = await _user_with_sessions(api, 4)
    bob, _ = await _user_with_sessions(api, 2)
    # Revoke Alice's second session: it is no longer listed.
    await api.sessions.RevokeSession(
        sessions_pb2.RevokeSessionRequest(session_id=pairs[1].session_id),
        metadata=bearer(pairs[0].access_token),
    )
    caller = pairs[2]

    for user_id in ("", alice.user.id):
        listed = await _list(api, bearer(caller.access_token), user_id=user_id)
        assert [s.id for s in listed.sessions] == [
            pairs[3].session_id,
            pairs[2].session_id,
            pairs[0].session_id,
        ]
        assert listed.next_page_token == ""
        assert all(s.user_id == alice.user.id for s in listed.sessions)
        assert [s.current for s in listed.sessions] == [False, True, False]
        assert _newest_first(list(listed.sessions))
        for s in listed.sessions:
            assert s.expire_time.ToDatetime() > s.create_time.ToDatetime()
            assert s.last_use_time.ToDatetime() >= s.create_time.ToDatetime()
            assert s.ip_address == "127.0.0.1"
            assert s.org_id == ""

    # Bob sees only his own.
    listed = await _list(api, bearer(bob.tokens.access_token))
    assert {s.user_id for s in listed.sessions} == {bob.user.id}
    assert len(listed.sessions) == 2
    assert [s.current for s in listed.sessions] == [False, True]


async def test_user_may_not_list_another_users_sessions(api: Api) -> None:
    alice = await api.sign_up()
    bob = await api.sign_up()
    error = await failure(_list(api, bearer(alice.tokens.access_token), user_id=bob.user.id))
    assert (error.code, error.reason) == PD


async def test_admin_and_service_list_everyone_or_one_user(api: Api) -> None:
    alice, alice_pairs = await _user_with_sessions(api, 2)
    bob, bob_pairs = await _user_with_sessions(api, 3)
    signed_out = await api.sign_up()
    await api.auth.SignOut(
        auth_pb2.SignOutRequest(), metadata=bearer(signed_out.tokens.access_token)
    )
    admin = await api.admin_token()
    admin_session = (await _authenticates(api, admin)).session_id

    # Admin: every live session, with its own flagged current. The admin
    # account's sign-up session is live too.
    everyone, _ = await _list_all(api, bearer(admin))
    live = {p.session_id for p in alice_pairs + bob_pairs} | {admin_session}
    assert live <= {s.id for s in everyone}
    assert signed_out.tokens.session_id not in {s.id for s in everyone}
    assert len(everyone) == len(live) + 1  # + the admin's sign-up session
    assert _newest_first(everyone)
    assert [s.id for s in everyone if s.current] == [admin_session]

    # Service: the same sessions, none of them current.
    by_service, _ = await _list_all(api, service())
    assert [s.id for s in by_service] == [s.id for s in everyone]
    assert not any(s.current for s in by_service)

    # One user's.
    for metadata in (bearer(admin), service()):
        listed = await _list(api, metadata, user_id=bob.user.id)
        assert [s.id for s in listed.sessions] == [p.session_id for p in reversed(bob_pairs)]
        assert not any(s.current for s in listed.sessions)
        # A user without live sessions, and one that does not exist: empty.
        assert list((await _list(api, metadata, user_id=signed_out.user.id)).sessions) == []
        assert list((await _list(api, metadata, user_id=str(uuid.uuid4()))).sessions) == []
    assert alice.user.id != bob.user.id


async def test_list_sessions_pages(api: Api) -> None:
    alice, pairs = await _user_with_sessions(api, 7)
    other, _ = await _user_with_sessions(api, 2)
    token = pairs[-1].access_token
    newest_first = [p.session_id for p in reversed(pairs)]

    listed, sizes = await _list_all(api, bearer(token), page_size=3)
    assert sizes == [3, 3, 1]
    assert [s.id for s in listed] == newest_first
    assert len({s.id for s in listed}) == 7

    # page_size 0 means 50; above 500 is 500: all on one page.
    for size in (0, 10_000):
        page = await _list(api, bearer(token), page_size=size)
        assert [s.id for s in page.sessions] == newest_first
        assert page.next_page_token == ""

    # Exact multiple: the last page is full and has no next token.
    listed, sizes = await _list_all(api, bearer(token), page_size=7)
    assert sizes == [7]

    # Admin paging through everyone.
    everyone, sizes = await _list_all(api, service(), page_size=4)
    assert sizes == [4, 4, 1]
    assert len({s.id for s in everyone}) == 9
    assert _newest_first(everyone)

    # A session revoked between pages is simply not listed; nothing repeats.
    first = await _list(api, bearer(token), page_size=3)
    await api.sessions.RevokeSession(
        sessions_pb2.RevokeSessionRequest(session_id=newest_first[4]), metadata=bearer(token)
    )
    second = await _list(api, bearer(token), page_size=3, page_token=first.next_page_token)
    assert [s.id for s in second.sessions] == [newest_first[3], newest_first[5], newest_first[6]]
    assert second.next_page_token == ""
    assert other.user.id != alice.user.id


# -- RevokeSession ---------------------------------------------------------------


async def test_revoke_own_session_takes_effect_at_once(api: Api) -> None:
    created, pairs = await _user_with_sessions(api, 2)
    keep, drop = pairs[1], pairs[0]
    # Warm the Authenticate cache first: the revocation must beat it.
    await _authenticates(api, drop.access_token)
    await api.users.GetCurrentUser(
        users_pb2.GetCurrentUserRequest(), metadata=bearer(drop.access_token)
    )

    await api.sessions.RevokeSession(
        sessions_pb2.RevokeSessionRequest(session_id=drop.session_id),
        metadata=bearer(keep.access_token),
    )

    await _authenticate_fails_revoked(api, drop.access_token)
    error = await failure(
        api.users.GetCurrentUser(
            users_pb2.GetCurrentUserRequest(), metadata=bearer(drop.access_token)
        )
    )
    assert (error.code, error.reason) == REVOKED
    error = await failure(
        api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=drop.refresh_token))
    )
    assert (error.code, error.reason) == REVOKED
    # The caller's own session goes on.
    assert (await _authenticates(api, keep.access_token)).user_id == created.user.id

    # Revoking it again succeeds and changes nothing.
    before = await api.snapshot()
    await api.sessions.RevokeSession(
        sessions_pb2.RevokeSessionRequest(session_id=drop.session_id),
        metadata=bearer(keep.access_token),
    )
    assert await api.snapshot() == before


async def test_revoke_the_calling_session(api: Api) -> None:
    created = await api.sign_up()
    token = created.tokens.access_token
    await api.sessions.RevokeSession(
        sessions_pb2.RevokeSessionRequest(session_id=created.tokens.session_id),
        metadata=bearer(token),
    )
    await _authenticate_fails_revoked(api, token)


async def test_revoke_another_users_session_is_denied(api: Api) -> None:
    alice = await api.sign_up()
    bob = await api.sign_up()
    await _authenticates(api, bob.tokens.access_token)
    before = await api.snapshot()
    error = await failure(
        api.sessions.RevokeSession(
            sessions_pb2.RevokeSessionRequest(session_id=bob.tokens.session_id),
            metadata=bearer(alice.tokens.access_token),
        )
    )
    assert (error.code, error.reason) == PD
    assert await api.snapshot() == before
    assert (await _authenticates(api, bob.tokens.access_token)).user_id == bob.user.id


async def test_admin_and_service_revoke_anyones_session(api: Api) -> None:
    admin = await api.admin_token()
    for metadata in (bearer(admin), service()):
        victim = await api.sign_up()
        await _authenticates(api, victim.tokens.access_token)
        await api.sessions.RevokeSession(
            sessions_pb2.RevokeSessionRequest(session_id=victim.tokens.session_id),
            metadata=metadata,
        )
        await _authenticate_fails_revoked(api, victim.tokens.access_token)

        error = await failure(
            api.sessions.RevokeSession(
                sessions_pb2.RevokeSessionRequest(session_id=str(uuid.uuid4())), metadata=metadata
            )
        )
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")


# -- RevokeAllSessions -----------------------------------------------------------


async def test_revoke_all_own_sessions(api: Api) -> None:
    created, pairs = await _user_with_sessions(api, 4)
    bystander = await api.sign_up()
    # One already revoked: it is not counted again.
    await api.sessions.RevokeSession(
        sessions_pb2.RevokeSessionRequest(session_id=pairs[0].session_id),
        metadata=bearer(pairs[1].access_token),
    )
    for pair in pairs[1:]:
        await _authenticates(api, pair.access_token)

    response = await api.sessions.RevokeAllSessions(
        sessions_pb2.RevokeAllSessionsRequest(), metadata=bearer(pairs[3].access_token)
    )
    assert response.revoked_count == 3
    for pair in pairs:
        await _authenticate_fails_revoked(api, pair.access_token)
        error = await failure(
            api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=pair.refresh_token))
        )
        assert (error.code, error.reason) == REVOKED
    assert (await _authenticates(api, bystander.tokens.access_token)).user_id == bystander.user.id
    listed = await _list(api, service(), user_id=created.user.id)
    assert list(listed.sessions) == []


async def test_revoke_all_with_own_id(api: Api) -> None:
    created, pairs = await _user_with_sessions(api, 2)
    response = await api.sessions.RevokeAllSessions(
        sessions_pb2.RevokeAllSessionsRequest(user_id=created.user.id),
        metadata=bearer(pairs[0].access_token),
    )
    assert response.revoked_count == 2
    for pair in pairs:
        await _authenticate_fails_revoked(api, pair.access_token)


async def test_admin_and_service_revoke_all_of_a_user(api: Api) -> None:
    admin = await api.admin_token()
    for metadata in (bearer(admin), service()):
        victim, pairs = await _user_with_sessions(api, 3)
        for pair in pairs:
            await _authenticates(api, pair.access_token)
        response = await api.sessions.RevokeAllSessions(
            sessions_pb2.RevokeAllSessionsRequest(user_id=victim.user.id), metadata=metadata
        )
        assert response.revoked_count == 3
        for pair in pairs:
            await _authenticate_fails_revoked(api, pair.access_token)
        again = await api.sessions.RevokeAllSessions(
            sessions_pb2.RevokeAllSessionsRequest(user_id=victim.user.id), metadata=metadata
        )
        assert again.revoked_count == 0
        error = await failure(
            api.sessions.RevokeAllSessions(
                sessions_pb2.RevokeAllSessionsRequest(user_id=str(uuid.uuid4())), metadata=metadata
            )
        )
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")
    # The admin's own session was not touched.
    await _authenticates(api, admin)


async def test_user_may_not_revoke_all_of_another_user(api: Api) -> None:
    alice = await api.sign_up()
    bob = await api.sign_up()
    before = await api.snapshot()
    error = await failure(
        api.sessions.RevokeAllSessions(
            sessions_pb2.RevokeAllSessionsRequest(user_id=bob.user.id),
            metadata=bearer(alice.tokens.access_token),
        )
    )
    assert (error.code, error.reason) == PD
    assert await api.snapshot() == before


# -- client_info -----------------------------------------------------------------

GATEWAY = resources_pb2.ClientInfo(
    ip_address="203.0.113.7", user_agent="Mozilla/5.0 (Gateway Test)"
)


async def _session_of(api: Api, session_id: str) -> Any:
    listed, _ = await _list_all(api, service())
    return next(s for s in listed if s.id == session_id)


async def test_client_info_is_honoured_with_the_api_key(api: Api) -> None:
    created = await api.sign_up()
    signed = await _sign_in(api, created.user.email, metadata=service(), client_info=GATEWAY)
    session = await _session_of(api, signed.tokens.session_id)
    assert (session.ip_address, session.user_agent) == ("203.0.113.7", "Mozilla/5.0 (Gateway Test)")

    # IPv6 too, and a refresh through the gateway records where it came from.
    refreshed = await api.auth.RefreshToken(
        auth_pb2.RefreshTokenRequest(
            refresh_token=signed.tokens.refresh_token,
            client_info=resources_pb2.ClientInfo(ip_address="2001:db8::1", user_agent="Other/2"),
        ),
        metadata=service(),
    )
    remember(refreshed.tokens.access_token, refreshed.tokens.refresh_token)
    session = await _session_of(api, signed.tokens.session_id)
    assert (session.ip_address, session.user_agent) == ("2001:db8::1", "Other/2")

    # Sign-up through the gateway as well.
    gateway_signup = await api.auth.SignUp(
        auth_pb2.SignUpRequest(
            email="via-gateway@example.com", password=PASSWORD, client_info=GATEWAY
        ),
        metadata=service(),
    )
    remember(gateway_signup.result.tokens.access_token, gateway_signup.result.tokens.refresh_token)
    session = await _session_of(api, gateway_signup.result.tokens.session_id)
    assert (session.ip_address, session.user_agent) == ("203.0.113.7", "Mozilla/5.0 (Gateway Test)")


async def test_client_info_is_ignored_without_the_api_key(api: Api) -> None:
    created = await api.sign_up()
    other = await api.sign_up()
    # Neither anonymously nor with a user's own access token.
    for metadata in (None, bearer(other.tokens.access_token)):
        signed = await _sign_in(api, created.user.email, metadata=metadata, client_info=GATEWAY)
        session = await _session_of(api, signed.tokens.session_id)
        assert session.ip_address == "127.0.0.1"
        assert session.user_agent.startswith("grpc-python")
    # Invalid values are ignored too: they are never looked at.
    signed = await _sign_in(
        api,
        created.user.email,
        client_info=resources_pb2.ClientInfo(ip_address="not-an-ip", user_agent="u" * 10_000),
    )
    session = await _session_of(api, signed.tokens.session_id)
    assert session.ip_address == "127.0.0.1"
    assert session.user_agent.startswith("grpc-python")


async def test_invalid_client_ip_with_the_api_key_is_invalid_argument(api: Api) -> None:
    created = await api.sign_up()
    before = await api.snapshot()
    for ip in ("not-an-ip", "203.0.113.300", "203.0.113.7/24", "::1::2"):
        error = await failure(
            api.auth.SignInWithPassword(
                auth_pb2.SignInWithPasswordRequest(
                    email=created.user.email,
                    password=PASSWORD,
                    client_info=resources_pb2.ClientInfo(ip_address=ip),
                ),
                metadata=service(),
            )
        )
        assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert await api.snapshot() == before

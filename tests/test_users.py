"""UserService: reading, changing, deleting, counting and listing users."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf.field_mask_pb2 import FieldMask

from authsvc.domain.models import Role, User
from authsvc_client.v1 import auth_pb2, resources_pb2, sessions_pb2, users_pb2
from tests.app import PASSWORD, Api, all_pages, bearer, failure, remember, service

PD = (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
USER_NOT_FOUND = (grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")


def _update(user_id: str, paths: list[str], **values: Any) -> users_pb2.UpdateUserRequest:
    return users_pb2.UpdateUserRequest(
        user=resources_pb2.User(id=user_id, **values), update_mask=FieldMask(paths=paths)
    )


async def _who(api: Api, token: str) -> Any:
    response = await api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=token))
    return response.session


async def _sign_up_many(api: Api, emails: list[str], batch: int = 30) -> list[Any]:
    """Signs up through gRPC, ``batch`` at a time; batches run one after another."""
    created: list[Any] = []
    for start in range(0, len(emails), batch):
        chunk = emails[start : start + batch]
        created.extend(await asyncio.gather(*(api.sign_up(e) for e in chunk)))
    return created


async def _list_all(api: Api, metadata: Any, **filters: Any) -> tuple[list[Any], list[int]]:
    """Every page of ListUsers; returns the users and the size of each page."""

    def fetch(token: str) -> Awaitable[Any]:
        request = users_pb2.ListUsersRequest(page_token=token, **filters)
        return api.users.ListUsers(request, metadata=metadata)

    return await all_pages(fetch, "users")


def _sort_key(user: Any) -> tuple[int, int, str]:
    # Keyset order is (create_time, id); ids compare as UUIDs.
    return (user.create_time.seconds, user.create_time.nanos, uuid.UUID(user.id).hex)


# -- GetUser ---------------------------------------------------------------------


async def test_get_user_self_other_admin_and_service(api: Api) -> None:
    alice = await api.sign_up()
    bob = await api.sign_up()
    admin = await api.admin_token()

    own = await api.users.GetUser(
        users_pb2.GetUserRequest(user_id=alice.user.id), metadata=bearer(alice.tokens.access_token)
    )
    assert own.user == alice.user

    error = await failure(
        api.users.GetUser(
            users_pb2.GetUserRequest(user_id=bob.user.id),
            metadata=bearer(alice.tokens.access_token),
        )
    )
    assert (error.code, error.reason) == PD

    for metadata in (bearer(admin), service()):
        got = await api.users.GetUser(
            users_pb2.GetUserRequest(user_id=bob.user.id), metadata=metadata
        )
        assert got.user == bob.user


async def test_get_user_missing_is_user_not_found_for_admin_and_service(api: Api) -> None:
    admin = await api.admin_token()
    for metadata in (bearer(admin), service()):
        error = await failure(
            api.users.GetUser(
                users_pb2.GetUserRequest(user_id=str(uuid.uuid4())), metadata=metadata
            )
        )
        assert (error.code, error.reason) == USER_NOT_FOUND


async def test_get_user_id_accepts_any_case_of_the_uuid(api: Api) -> None:
    created = await api.sign_up()
    got = await api.users.GetUser(
        users_pb2.GetUserRequest(user_id=created.user.id.upper()), metadata=service()
    )
    assert got.user.id == created.user.id


# -- UpdateUser ------------------------------------------------------------------


async def test_user_changes_own_display_name(api: Api) -> None:
    created = await api.sign_up()
    token = created.tokens.access_token
    updated = await api.users.UpdateUser(
        _update(created.user.id, ["display_name"], display_name="  Ada Lovelace  ", email="x@y.z"),
        metadata=bearer(token),
    )
    assert updated.user.display_name == "Ada Lovelace"
    # Fields outside the mask are ignored, not applied.
    assert updated.user.email == created.user.email
    assert updated.user.role == resources_pb2.ROLE_USER
    assert updated.user.create_time == created.user.create_time
    assert updated.user.update_time.ToDatetime() >= created.user.update_time.ToDatetime()
    me = await api.users.GetCurrentUser(users_pb2.GetCurrentUserRequest(), metadata=bearer(token))
    assert me.user == updated.user

    # An empty display name is allowed (it is optional).
    cleared = await api.users.UpdateUser(
        _update(created.user.id, ["display_name"]), metadata=bearer(token)
    )
    assert cleared.user.display_name == ""


async def test_user_may_not_change_own_email_or_role(api: Api) -> None:
    created = await api.sign_up()
    md = bearer(created.tokens.access_token)
    before = await api.snapshot()
    changes: list[tuple[list[str], dict[str, Any]]] = [
        (["email"], {"email": "new-address@example.com"}),
        (["role"], {"role": resources_pb2.ROLE_ADMIN}),
        (["display_name", "role"], {"display_name": "Eve", "role": resources_pb2.ROLE_ADMIN}),
        (["display_name", "email"], {"display_name": "Eve", "email": "eve@example.com"}),
    ]
    for paths, values in changes:
        error = await failure(
            api.users.UpdateUser(_update(created.user.id, paths, **values), metadata=md)
        )
        assert (error.code, error.reason) == PD, paths
    assert await api.snapshot() == before
    who = await _who(api, created.tokens.access_token)
    assert who.role == resources_pb2.ROLE_USER
    assert who.email == created.user.email


async def test_user_may_not_change_another_user(api: Api) -> None:
    alice = await api.sign_up()
    bob = await api.sign_up()
    before = await api.snapshot()
    error = await failure(
        api.users.UpdateUser(
            _update(bob.user.id, ["display_name"], display_name="pwned"),
            metadata=bearer(alice.tokens.access_token),
        )
    )
    assert (error.code, error.reason) == PD
    assert await api.snapshot() == before


async def test_role_change_reaches_existing_tokens_at_once(api: Api) -> None:
    """Authenticate serves the user's role now, not the role the token was
    minted with, and not a cached one."""
    created = await api.sign_up()
    token = created.tokens.access_token
    admin = await api.admin_token()

    for promote_with in (bearer(admin), service()):
        # Warm every cache on the way: Authenticate and the edge's own check.
        assert (await _who(api, token)).role == resources_pb2.ROLE_USER
        error = await failure(
            api.users.CountUsers(users_pb2.CountUsersRequest(), metadata=bearer(token))
        )
        assert (error.code, error.reason) == PD

        promoted = await api.users.UpdateUser(
            _update(created.user.id, ["role"], role=resources_pb2.ROLE_ADMIN), metadata=promote_with
        )
        assert promoted.user.role == resources_pb2.ROLE_ADMIN
        assert (await _who(api, token)).role == resources_pb2.ROLE_ADMIN
        counted = await api.users.CountUsers(users_pb2.CountUsersRequest(), metadata=bearer(token))
        assert counted.count == 2

        demoted = await api.users.UpdateUser(
            _update(created.user.id, ["role"], role=resources_pb2.ROLE_USER), metadata=promote_with
        )
        assert demoted.user.role == resources_pb2.ROLE_USER
        assert (await _who(api, token)).role == resources_pb2.ROLE_USER
        error = await failure(
            api.users.CountUsers(users_pb2.CountUsersRequest(), metadata=bearer(token))
        )
        assert (error.code, error.reason) == PD


async def test_demoted_admin_loses_admin_access_at_once(api: Api) -> None:
    admin = await api.admin_token()
    who = await _who(api, admin)
    assert who.role == resources_pb2.ROLE_ADMIN
    await api.users.CountUsers(users_pb2.CountUsersRequest(), metadata=bearer(admin))
    await api.users.UpdateUser(
        _update(who.user_id, ["role"], role=resources_pb2.ROLE_USER), metadata=service()
    )
    error = await failure(api.users.ListUsers(users_pb2.ListUsersRequest(), metadata=bearer(admin)))
    assert (error.code, error.reason) == PD
    error = await failure(
        api.users.GetUser(
            users_pb2.GetUserRequest(user_id=str(uuid.uuid4())), metadata=bearer(admin)
        )
    )
    assert (error.code, error.reason) == PD


async def test_admin_changes_email(api: Api) -> None:
    created = await api.sign_up("old-address@example.com")
    token = created.tokens.access_token
    admin = await api.admin_token()
    assert (await _who(api, token)).email == "old-address@example.com"

    updated = await api.users.UpdateUser(
        _update(created.user.id, ["email"], email="New.Address@Example.COM"), metadata=bearer(admin)
    )
    assert updated.user.email == "New.Address@example.com"
    assert (await _who(api, token)).email == "New.Address@example.com"

    signed = await api.auth.SignInWithPassword(
        auth_pb2.SignInWithPasswordRequest(email="new.address@example.com", password=PASSWORD)
    )
    remember(signed.result.tokens.access_token, signed.result.tokens.refresh_token)
    assert signed.result.user.id == created.user.id
    error = await failure(
        api.auth.SignInWithPassword(
            auth_pb2.SignInWithPasswordRequest(email="old-address@example.com", password=PASSWORD)
        )
    )
    assert error.reason == "INVALID_CREDENTIALS"
    # The old address is free again.
    await api.sign_up("old-address@example.com")


async def test_admin_email_change_to_an_existing_email_fails(api: Api) -> None:
    taken = await api.sign_up("taken@example.com")
    created = await api.sign_up()
    admin = await api.admin_token()
    before = await api.snapshot()
    for email in ("taken@example.com", "TAKEN@example.com", "Taken@Example.Com"):
        for metadata in (bearer(admin), service()):
            error = await failure(
                api.users.UpdateUser(
                    _update(created.user.id, ["email"], email=email), metadata=metadata
                )
            )
            assert (error.code, error.reason) == (
                grpc.StatusCode.ALREADY_EXISTS,
                "EMAIL_ALREADY_EXISTS",
            ), email
    assert await api.snapshot() == before
    # Its own email (in another case) is no conflict.
    same = await api.users.UpdateUser(
        _update(taken.user.id, ["email"], email="TAKEN@example.com"), metadata=service()
    )
    assert same.user.email == "TAKEN@example.com"


async def test_admin_update_of_a_missing_user_is_user_not_found(api: Api) -> None:
    admin = await api.admin_token()
    before = await api.snapshot()
    for metadata in (bearer(admin), service()):
        error = await failure(
            api.users.UpdateUser(
                _update(str(uuid.uuid4()), ["display_name"], display_name="x"), metadata=metadata
            )
        )
        assert (error.code, error.reason) == USER_NOT_FOUND
    assert await api.snapshot() == before


# -- DeleteUser ------------------------------------------------------------------


async def test_delete_user_revokes_every_session_at_once(api: Api) -> None:
    created = await api.sign_up()
    first = created.tokens.access_token
    second = await api.auth.SignInWithPassword(
        auth_pb2.SignInWithPasswordRequest(email=created.user.email, password=PASSWORD)
    )
    remember(second.result.tokens.access_token, second.result.tokens.refresh_token)
    bystander = await api.sign_up()
    admin = await api.admin_token()
    # Warm the Authenticate cache: deletion must beat it.
    for token in (first, second.result.tokens.access_token):
        assert (await _who(api, token)).user_id == created.user.id

    await api.users.DeleteUser(
        users_pb2.DeleteUserRequest(user_id=created.user.id), metadata=bearer(admin)
    )

    for token in (first, second.result.tokens.access_token):
        error = await failure(
            api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=token))
        )
        assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "SESSION_REVOKED")
        error = await failure(
            api.users.GetCurrentUser(users_pb2.GetCurrentUserRequest(), metadata=bearer(token))
        )
        assert error.code == grpc.StatusCode.UNAUTHENTICATED
    error = await failure(
        api.auth.RefreshToken(
            auth_pb2.RefreshTokenRequest(refresh_token=second.result.tokens.refresh_token)
        )
    )
    assert error.code == grpc.StatusCode.UNAUTHENTICATED

    error = await failure(
        api.users.GetUser(users_pb2.GetUserRequest(user_id=created.user.id), metadata=bearer(admin))
    )
    assert (error.code, error.reason) == USER_NOT_FOUND
    error = await failure(
        api.auth.SignInWithPassword(
            auth_pb2.SignInWithPasswordRequest(email=created.user.email, password=PASSWORD)
        )
    )
    assert error.reason == "INVALID_CREDENTIALS"
    error = await failure(
        api.users.DeleteUser(
            users_pb2.DeleteUserRequest(user_id=created.user.id), metadata=service()
        )
    )
    assert (error.code, error.reason) == USER_NOT_FOUND

    # None of the deleted user's sessions is listed any more; others are.
    listed = await api.sessions.ListSessions(sessions_pb2.ListSessionsRequest(), metadata=service())
    owners = {s.user_id for s in listed.sessions}
    assert created.user.id not in owners
    assert bystander.user.id in owners
    assert (await _who(api, bystander.tokens.access_token)).user_id == bystander.user.id


async def test_delete_user_through_the_api_key(api: Api) -> None:
    created = await api.sign_up()
    await api.users.DeleteUser(
        users_pb2.DeleteUserRequest(user_id=created.user.id), metadata=service()
    )
    error = await failure(
        api.auth.Authenticate(
            auth_pb2.AuthenticateRequest(access_token=created.tokens.access_token)
        )
    )
    assert error.reason == "SESSION_REVOKED"
    counted = await api.users.CountUsers(users_pb2.CountUsersRequest(), metadata=service())
    assert counted.count == 0


async def test_delete_missing_user_is_user_not_found(api: Api) -> None:
    error = await failure(
        api.users.DeleteUser(
            users_pb2.DeleteUserRequest(user_id=str(uuid.uuid4())), metadata=service()
        )
    )
    assert (error.code, error.reason) == USER_NOT_FOUND


# -- CountUsers ------------------------------------------------------------------


async def test_count_users_total_and_by_role(api: Api) -> None:
    empty = await api.users.CountUsers(users_pb2.CountUsersRequest(), metadata=service())
    assert empty.count == 0
    await _sign_up_many(api, [f"count-{i}@example.com" for i in range(5)])
    admin = await api.admin_token()
    await api.admin_token()
    for metadata in (service(), bearer(admin)):
        for role, want in [
            (resources_pb2.ROLE_UNSPECIFIED, 7),
            (resources_pb2.ROLE_USER, 5),
            (resources_pb2.ROLE_ADMIN, 2),
        ]:
            response = await api.users.CountUsers(
                users_pb2.CountUsersRequest(role=role), metadata=metadata
            )
            assert response.count == want, role


# -- ListUsers -------------------------------------------------------------------


async def test_list_users_pages_through_everyone_oldest_first(api: Api) -> None:
    emails = [f"page-{i:03d}-{uuid.uuid4().hex[:6]}@example.com" for i in range(120)]
    created = await _sign_up_many(api, emails, batch=30)
    by_id = {c.user.id: c.user for c in created}

    users, sizes = await _list_all(api, service(), page_size=50)
    assert sizes == [50, 50, 20]
    ids = [u.id for u in users]
    assert len(ids) == len(set(ids)), "a user was listed twice"
    assert set(ids) == set(by_id), "a user was skipped"
    assert [u for u in users] == [by_id[i] for i in ids]
    # Oldest first: the keyset order, and each batch before the next one.
    assert users == sorted(users, key=_sort_key)
    batch_of = {c.user.id: n // 30 for n, c in enumerate(created)}
    batches = [batch_of[i] for i in ids]
    assert batches == sorted(batches)

    # The page token moves on; the first page does not repeat.
    first = await api.users.ListUsers(users_pb2.ListUsersRequest(page_size=50), metadata=service())
    second = await api.users.ListUsers(
        users_pb2.ListUsersRequest(page_size=50, page_token=first.next_page_token),
        metadata=service(),
    )
    assert [u.id for u in first.users] == ids[:50]
    assert [u.id for u in second.users] == ids[50:100]
    third = await api.users.ListUsers(
        users_pb2.ListUsersRequest(page_size=50, page_token=second.next_page_token),
        metadata=service(),
    )
    assert [u.id for u in third.users] == ids[100:]
    assert third.next_page_token == ""

    # page_size 0 means 50.
    default = await api.users.ListUsers(users_pb2.ListUsersRequest(), metadata=service())
    assert [u.id for u in default.users] == ids[:50]
    assert default.next_page_token

    # A page size that is an exact multiple ends with an empty token, not an empty page.
    users_40, sizes_40 = await _list_all(api, service(), page_size=40)
    assert sizes_40 == [40, 40, 40]
    assert [u.id for u in users_40] == ids


async def test_list_users_sees_users_created_while_paging(api: Api) -> None:
    created = [await api.sign_up(f"early-{i}@example.com") for i in range(3)]
    first = await api.users.ListUsers(users_pb2.ListUsersRequest(page_size=2), metadata=service())
    later = await api.sign_up("later@example.com")
    rest = await api.users.ListUsers(
        users_pb2.ListUsersRequest(page_size=2, page_token=first.next_page_token),
        metadata=service(),
    )
    assert [u.id for u in first.users] + [u.id for u in rest.users] == [
        *(c.user.id for c in created),
        later.user.id,
    ]
    assert rest.next_page_token == ""


async def test_list_users_page_size_is_clamped_to_500(api: Api) -> None:
    """Users are inserted straight through the storage layer: 505 sign-ups
    would only test the password hasher."""
    now = datetime.now(UTC)
    async with api.server.core.db.transaction() as tx:
        for i in range(505):
            at = now - timedelta(seconds=505 - i)
            user = User(
                id=uuid.uuid4(),
                email=f"bulk-{i:04d}@example.com",
                display_name="",
                role=Role.USER,
                email_verified=False,
                created_at=at,
                updated_at=at,
            )
            await tx.users.add(user, user.email, "not-a-password-hash")
    big = await api.users.ListUsers(users_pb2.ListUsersRequest(page_size=10000), metadata=service())
    assert len(big.users) == 500
    assert big.users[0].email == "bulk-0000@example.com"
    assert big.users[-1].email == "bulk-0499@example.com"
    assert big.next_page_token
    rest = await api.users.ListUsers(
        users_pb2.ListUsersRequest(page_size=10000, page_token=big.next_page_token),
        metadata=service(),
    )
    assert [u.email for u in rest.users] == [f"bulk-{i:04d}@example.com" for i in range(500, 505)]
    assert rest.next_page_token == ""
    exact = await api.users.ListUsers(users_pb2.ListUsersRequest(page_size=500), metadata=service())
    assert [u.id for u in exact.users] == [u.id for u in big.users]


async def test_list_users_negative_page_size_is_invalid(api: Api) -> None:
    for size in (-1, -(2**31)):
        error = await failure(
            api.users.ListUsers(users_pb2.ListUsersRequest(page_size=size), metadata=service())
        )
        assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


async def test_list_users_filters_by_role(api: Api) -> None:
    users = await _sign_up_many(api, [f"role-{i}@example.com" for i in range(4)])
    admin = await api.admin_token()
    admin_id = (await _who(api, admin)).user_id
    listed, _ = await _list_all(api, service(), role=resources_pb2.ROLE_ADMIN)
    assert [u.id for u in listed] == [admin_id]
    listed, _ = await _list_all(api, service(), role=resources_pb2.ROLE_USER)
    assert {u.id for u in listed} == {c.user.id for c in users}
    listed, sizes = await _list_all(api, service(), role=resources_pb2.ROLE_USER, page_size=3)
    assert sizes == [3, 1]
    assert {u.id for u in listed} == {c.user.id for c in users}
    assert all(u.role == resources_pb2.ROLE_USER for u in listed)


async def test_list_users_filters_by_email_prefix(api: Api) -> None:
    emails = [
        "Alice@example.com",
        "alex@example.com",
        "ALBERT@example.com",
        "bob@example.com",
        "a_b@example.com",
        "axb@example.com",
        "a%c@example.com",
        "abc@example.com",
        "a-b@example.com",
    ]
    # One after another, so oldest-first order is the order of this list.
    created = {e: (await api.sign_up(e)).user for e in emails}

    async def listed(prefix: str, page_size: int = 0) -> list[str]:
        users, _ = await _list_all(api, service(), email_prefix=prefix, page_size=page_size)
        return [u.email for u in users]

    assert await listed("al") == ["Alice@example.com", "alex@example.com", "ALBERT@example.com"]
    assert await listed("AL") == await listed("al")
    assert await listed("aLiCe@EXAMPLE.com") == ["Alice@example.com"]
    assert await listed("al", page_size=1) == await listed("al")
    # `_` and `%` are literal characters, not LIKE wildcards.
    assert await listed("a_") == ["a_b@example.com"]
    assert await listed("a%") == ["a%c@example.com"]
    assert await listed("%") == []
    assert await listed("_") == []
    assert await listed("a-") == ["a-b@example.com"]
    assert await listed("b") == ["bob@example.com"]
    assert await listed("z") == []
    assert len(await listed("")) == len(created)
    # Role and prefix together.
    users, _ = await _list_all(api, service(), email_prefix="a", role=resources_pb2.ROLE_ADMIN)
    assert users == []

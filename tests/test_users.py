"""UserService: reading, changing, deleting, counting and listing users."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, cast

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from google.rpc import error_details_pb2
from sqlalchemy import update

from authsvc.domain.models import Role, User
from authsvc.storage.tables import users
from authsvc_client.v1 import auth_pb2, resources_pb2, sessions_pb2, users_pb2
from tests.app import (
    PASSWORD,
    Api,
    all_pages,
    bearer,
    claims,
    failure,
    refused,
    remember,
    service,
)

PD = (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
IA = (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
USER_NOT_FOUND = (grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")
ETAG_MISMATCH = (grpc.StatusCode.ABORTED, "ETAG_MISMATCH")


def _update(user_id: str, paths: list[str], **values: Any) -> users_pb2.UpdateUserRequest:
    return users_pb2.UpdateUserRequest(
        user=resources_pb2.User(id=user_id, **values), update_mask=FieldMask(paths=paths)
    )


async def changes_nothing(api: Api, call: Callable[[], Awaitable[Any]]) -> Any:
    """Makes a call that must succeed and leave every table (the event log
    included) and Redis key as they were; returns its response."""
    before = await api.snapshot()
    response = await call()
    assert await api.snapshot() == before, "the call changed stored data"
    return response


def _field(name: str, value: str) -> dict[str, Any]:
    return {name: value}


def _violations(error: Any) -> list[str]:
    bad_request = error.detail(error_details_pb2.BadRequest)
    assert bad_request is not None, "INVALID_ARGUMENT without a BadRequest detail"
    return [v.field for v in bad_request.field_violations]


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


async def test_user_changes_own_profile_names(api: Api) -> None:
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

    # Given and family names, each by its own path; the others stay.
    named = await api.users.UpdateUser(
        _update(created.user.id, ["given_name"], given_name=" Ada ", family_name="ignored"),
        metadata=bearer(token),
    )
    assert (named.user.display_name, named.user.given_name, named.user.family_name) == (
        "Ada Lovelace",
        "Ada",
        "",
    )
    both = await api.users.UpdateUser(
        _update(
            created.user.id,
            ["family_name", "display_name"],
            family_name="Lovelace",
            display_name="Countess",
        ),
        metadata=bearer(token),
    )
    assert (both.user.display_name, both.user.given_name, both.user.family_name) == (
        "Countess",
        "Ada",
        "Lovelace",
    )
    got = await api.users.GetUser(
        users_pb2.GetUserRequest(user_id=created.user.id), metadata=service()
    )
    assert got.user == both.user

    # An empty name is allowed (they are optional).
    cleared = await api.users.UpdateUser(
        _update(created.user.id, ["display_name", "given_name", "family_name"]),
        metadata=bearer(token),
    )
    assert (cleared.user.display_name, cleared.user.given_name, cleared.user.family_name) == (
        "",
        "",
        "",
    )


@pytest.mark.parametrize(
    ("paths", "rpc"),
    [
        pytest.param(["email"], "SetUserEmail", id="email"),
        pytest.param(["role"], "SetUserRole", id="role"),
        pytest.param(["display_name", "role"], "SetUserRole", id="name-and-role"),
        pytest.param(["email", "given_name"], "SetUserEmail", id="email-and-name"),
    ],
)
async def test_update_user_keeps_to_profile_fields(api: Api, paths: list[str], rpc: str) -> None:
    """The email and the role have RPCs of their own: UpdateUser refuses them
    as bad input, naming the RPC, for the user and for an admin alike."""
    created = await api.sign_up()
    admin = await api.admin_token()
    values: dict[str, Any] = {
        "email": "new-address@example.com",
        "role": resources_pb2.ROLE_ADMIN,
        "display_name": "Eve",
        "given_name": "Eve",
    }
    request = _update(created.user.id, paths, **{p: values[p] for p in paths})
    for md in (bearer(created.tokens.access_token), bearer(admin), service()):
        error = await refused(api, partial(api.users.UpdateUser, request, metadata=md), *IA)
        assert _violations(error) == ["update_mask"]
        assert rpc in error.message
    who = await _who(api, created.tokens.access_token)
    assert (who.role, who.email) == (resources_pb2.ROLE_USER, created.user.email)


async def test_user_may_not_change_another_user(api: Api) -> None:
    alice = await api.sign_up()
    bob = await api.sign_up()
    for paths in (["display_name"], ["given_name"], ["family_name"]):
        await refused(
            api,
            partial(
                api.users.UpdateUser,
                _update(bob.user.id, paths, display_name="x", given_name="x", family_name="x"),
                metadata=bearer(alice.tokens.access_token),
            ),
            *PD,
        )


async def test_admin_and_service_change_anyones_profile(api: Api) -> None:
    created = await api.sign_up()
    admin = await api.admin_token()
    for md, name in ((bearer(admin), "By Admin"), (service(), "By Service")):
        updated = await api.users.UpdateUser(
            _update(
                created.user.id, ["display_name", "given_name"], display_name=name, given_name=name
            ),
            metadata=md,
        )
        assert (updated.user.display_name, updated.user.given_name) == (name, name)


async def test_admin_update_of_a_missing_user_is_user_not_found(api: Api) -> None:
    admin = await api.admin_token()
    for metadata in (bearer(admin), service()):
        await refused(
            api,
            partial(
                api.users.UpdateUser,
                _update(str(uuid.uuid4()), ["display_name"], display_name="x"),
                metadata=metadata,
            ),
            *USER_NOT_FOUND,
        )


# -- SetUserRole -----------------------------------------------------------------


def _set_role(user_id: str, role: int, etag: str = "") -> users_pb2.SetUserRoleRequest:
    return users_pb2.SetUserRoleRequest(user_id=user_id, role=cast(Any, role), etag=etag)


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

        promoted = await api.users.SetUserRole(
            _set_role(created.user.id, resources_pb2.ROLE_ADMIN), metadata=promote_with
        )
        assert promoted.user.role == resources_pb2.ROLE_ADMIN
        assert (await _who(api, token)).role == resources_pb2.ROLE_ADMIN
        counted = await api.users.CountUsers(users_pb2.CountUsersRequest(), metadata=bearer(token))
        assert counted.count == 2

        demoted = await api.users.SetUserRole(
            _set_role(created.user.id, resources_pb2.ROLE_USER), metadata=promote_with
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
    await api.users.SetUserRole(_set_role(who.user_id, resources_pb2.ROLE_USER), metadata=service())
    error = await failure(api.users.ListUsers(users_pb2.ListUsersRequest(), metadata=bearer(admin)))
    assert (error.code, error.reason) == PD
    error = await failure(
        api.users.GetUser(
            users_pb2.GetUserRequest(user_id=str(uuid.uuid4())), metadata=bearer(admin)
        )
    )
    assert (error.code, error.reason) == PD


async def test_a_role_change_bumps_the_claims_and_the_same_role_changes_nothing(api: Api) -> None:
    created = await api.sign_up()
    before_ver = claims(created.tokens.access_token)["ver"]
    promoted = await api.users.SetUserRole(
        _set_role(created.user.id, resources_pb2.ROLE_ADMIN), metadata=service()
    )
    refreshed = await api.auth.RefreshToken(
        auth_pb2.RefreshTokenRequest(refresh_token=created.tokens.refresh_token)
    )
    payload = claims(refreshed.tokens.access_token)
    assert (payload["role"], payload["ver"] > before_ver) == ("admin", True)

    # The role the user has: no write (same etag, same update time), no event.
    again = await changes_nothing(
        api,
        lambda: api.users.SetUserRole(
            _set_role(created.user.id, resources_pb2.ROLE_ADMIN), metadata=service()
        ),
    )
    assert again.user == promoted.user


@pytest.mark.parametrize("role", [resources_pb2.ROLE_UNSPECIFIED, 3, 99, -1])
async def test_set_user_role_refuses_what_is_not_a_role(api: Api, role: int) -> None:
    created = await api.sign_up()
    error = await refused(
        api,
        lambda: api.users.SetUserRole(_set_role(created.user.id, role), metadata=service()),
        *IA,
    )
    assert _violations(error) == ["role"]


async def test_set_user_role_and_email_need_an_admin(api: Api) -> None:
    """A user's own token is refused, for themselves too; a missing user is
    USER_NOT_FOUND for an admin and the API key."""
    created = await api.sign_up()
    other = await api.sign_up()
    md = bearer(created.tokens.access_token)
    for user_id in (created.user.id, other.user.id, str(uuid.uuid4())):
        await refused(
            api,
            partial(
                api.users.SetUserRole, _set_role(user_id, resources_pb2.ROLE_ADMIN), metadata=md
            ),
            *PD,
        )
        await refused(
            api,
            partial(
                api.users.SetUserEmail,
                users_pb2.SetUserEmailRequest(user_id=user_id, email="mine@example.com"),
                metadata=md,
            ),
            *PD,
        )
    admin = await api.admin_token()
    for admin_md in (bearer(admin), service()):
        missing = str(uuid.uuid4())
        await refused(
            api,
            partial(
                api.users.SetUserRole,
                _set_role(missing, resources_pb2.ROLE_ADMIN),
                metadata=admin_md,
            ),
            *USER_NOT_FOUND,
        )
        await refused(
            api,
            partial(
                api.users.SetUserEmail,
                users_pb2.SetUserEmailRequest(user_id=missing, email="x@example.com"),
                metadata=admin_md,
            ),
            *USER_NOT_FOUND,
        )


# -- SetUserEmail ----------------------------------------------------------------


def _set_email(user_id: str, email: str, etag: str = "") -> users_pb2.SetUserEmailRequest:
    return users_pb2.SetUserEmailRequest(user_id=user_id, email=email, etag=etag)


async def test_admin_changes_email(api: Api) -> None:
    created = await api.sign_up("old-address@example.com")
    token = created.tokens.access_token
    admin = await api.admin_token()
    assert (await _who(api, token)).email == "old-address@example.com"

    updated = await api.users.SetUserEmail(
        _set_email(created.user.id, "New.Address@Example.COM"), metadata=bearer(admin)
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


async def test_a_new_email_is_unconfirmed(api: Api) -> None:
    """A confirmed address (set in the database: no confirmation flow yet)
    stays confirmed through the same address in another case, and is
    unconfirmed once the address is another one."""
    created = await api.sign_up("confirmed@example.com")
    async with api.server.core.db.transaction() as tx:
        await tx.conn.execute(
            update(users)
            .where(users.c.id == uuid.UUID(created.user.id))
            .values(email_verified=True)
        )
    recased = await api.users.SetUserEmail(
        _set_email(created.user.id, "Confirmed@example.com"), metadata=service()
    )
    assert (recased.user.email, recased.user.email_verified) == ("Confirmed@example.com", True)
    moved = await api.users.SetUserEmail(
        _set_email(created.user.id, "elsewhere@example.com"), metadata=service()
    )
    assert (moved.user.email, moved.user.email_verified) == ("elsewhere@example.com", False)
    # The very same address changes nothing.
    same = await changes_nothing(
        api,
        lambda: api.users.SetUserEmail(
            _set_email(created.user.id, "elsewhere@example.com"), metadata=service()
        ),
    )
    assert same.user == moved.user


async def test_admin_email_change_to_an_existing_email_fails(api: Api) -> None:
    taken = await api.sign_up("taken@example.com")
    created = await api.sign_up()
    admin = await api.admin_token()
    for email in ("taken@example.com", "TAKEN@example.com", "Taken@Example.Com"):
        for metadata in (bearer(admin), service()):
            await refused(
                api,
                partial(
                    api.users.SetUserEmail, _set_email(created.user.id, email), metadata=metadata
                ),
                grpc.StatusCode.ALREADY_EXISTS,
                "EMAIL_ALREADY_EXISTS",
            )
    # Its own email (in another case) is no conflict.
    same = await api.users.SetUserEmail(
        _set_email(taken.user.id, "TAKEN@example.com"), metadata=service()
    )
    assert same.user.email == "TAKEN@example.com"


@pytest.mark.parametrize("email", ["", "not-an-email", "a@b", "x" * 300 + "@example.com"])
async def test_set_user_email_refuses_what_is_not_an_email(api: Api, email: str) -> None:
    created = await api.sign_up()
    error = await refused(
        api,
        lambda: api.users.SetUserEmail(_set_email(created.user.id, email), metadata=service()),
        *IA,
    )
    assert _violations(error) == ["email"]


# -- etags -----------------------------------------------------------------------


async def test_every_user_message_carries_its_etag(api: Api) -> None:
    created = await api.sign_up()
    token = created.tokens.access_token
    etag = created.user.etag
    assert re.fullmatch(r"[A-Za-z0-9_-]{16}", etag), etag
    got = await api.users.GetUser(
        users_pb2.GetUserRequest(user_id=created.user.id), metadata=bearer(token)
    )
    me = await api.users.GetCurrentUser(users_pb2.GetCurrentUserRequest(), metadata=bearer(token))
    listed = await api.users.ListUsers(users_pb2.ListUsersRequest(), metadata=service())
    signed = await api.auth.SignInWithPassword(
        auth_pb2.SignInWithPasswordRequest(email=created.user.email, password=PASSWORD)
    )
    assert {got.user.etag, me.user.etag, listed.users[0].etag, signed.result.user.etag} == {etag}
    # Another user's differs.
    assert (await api.sign_up()).user.etag != etag


async def test_every_change_changes_the_etag(api: Api) -> None:
    """Each of these changes content, and each gives a new etag, even when
    they follow each other within one clock tick (the content is hashed)."""
    created = await api.sign_up()
    seen = [created.user.etag]
    steps: list[Callable[[], Awaitable[Any]]] = [
        lambda: api.users.UpdateUser(
            _update(created.user.id, ["display_name"], display_name="A"), metadata=service()
        ),
        lambda: api.users.UpdateUser(
            _update(created.user.id, ["given_name"], given_name="A"), metadata=service()
        ),
        lambda: api.users.UpdateUser(
            _update(created.user.id, ["family_name"], family_name="A"), metadata=service()
        ),
        lambda: api.users.SetUserRole(
            _set_role(created.user.id, resources_pb2.ROLE_ADMIN), metadata=service()
        ),
        lambda: api.users.SetUserEmail(
            _set_email(created.user.id, "changed@example.com"), metadata=service()
        ),
        lambda: api.users.UpdateUser(
            _update(created.user.id, ["display_name"], display_name=""), metadata=service()
        ),
    ]
    for step in steps:
        seen.append((await step()).user.etag)
    assert len(set(seen)) == len(seen), seen
    # A change that changes nothing keeps it.
    same = await changes_nothing(
        api,
        lambda: api.users.UpdateUser(
            _update(created.user.id, ["display_name", "given_name"], given_name="A"),
            metadata=service(),
        ),
    )
    assert same.user.etag == seen[-1]


async def test_a_current_etag_is_honoured_and_a_stale_one_changes_nothing(api: Api) -> None:
    created = await api.sign_up()
    user_id = created.user.id
    stale = created.user.etag
    current = (
        await api.users.UpdateUser(
            _update(user_id, ["display_name"], display_name="First", etag=stale),
            metadata=bearer(created.tokens.access_token),
        )
    ).user.etag
    assert current != stale
    calls: dict[str, Callable[[str], Awaitable[Any]]] = {
        "UpdateUser": lambda etag: api.users.UpdateUser(
            _update(user_id, ["display_name"], display_name="Second", etag=etag),
            metadata=service(),
        ),
        "SetUserRole": lambda etag: api.users.SetUserRole(
            _set_role(user_id, resources_pb2.ROLE_ADMIN, etag), metadata=service()
        ),
        "SetUserEmail": lambda etag: api.users.SetUserEmail(
            _set_email(user_id, "second@example.com", etag), metadata=service()
        ),
        "DeleteUser": lambda etag: api.users.DeleteUser(
            users_pb2.DeleteUserRequest(user_id=user_id, etag=etag), metadata=service()
        ),
        "DeleteUser allow_missing": lambda etag: api.users.DeleteUser(
            users_pb2.DeleteUserRequest(user_id=user_id, etag=etag, allow_missing=True),
            metadata=service(),
        ),
    }
    for name, call in calls.items():
        for etag in (stale, "not-an-etag-of-ours"):
            error = await refused(api, partial(call, etag), *ETAG_MISMATCH)
            assert error.reason == "ETAG_MISMATCH", name
        error = await refused(api, partial(call, "e" * 65), *IA)
        assert _violations(error) == ["user.etag" if name == "UpdateUser" else "etag"], name
    # The current one is taken by each, in turn.
    for name in ("UpdateUser", "SetUserRole", "SetUserEmail"):
        current = (await calls[name](current)).user.etag
    await calls["DeleteUser"](current)
    await refused(
        api,
        lambda: api.users.GetUser(users_pb2.GetUserRequest(user_id=user_id), metadata=service()),
        *USER_NOT_FOUND,
    )


# -- names at sign-up and sign-in ------------------------------------------------


async def test_sign_up_takes_the_names(api: Api) -> None:
    response = await api.auth.SignUp(
        auth_pb2.SignUpRequest(
            email="named@example.com",
            password=PASSWORD,
            display_name=" Ada L. ",
            given_name=" Ada ",
            family_name="Lovelace",
        )
    )
    user = response.result.user
    assert (user.display_name, user.given_name, user.family_name) == ("Ada L.", "Ada", "Lovelace")
    got = await api.users.GetUser(users_pb2.GetUserRequest(user_id=user.id), metadata=service())
    assert got.user == user


async def test_sign_in_fills_in_only_the_names_still_empty(api: Api) -> None:
    created = await api.sign_up()
    email = created.user.email

    async def sign_in(**names: Any) -> Any:
        signed = await api.auth.SignInWithPassword(
            auth_pb2.SignInWithPasswordRequest(email=email, password=PASSWORD, **names)
        )
        return signed.result.user

    async def stored() -> Any:
        return (
            await api.users.GetUser(
                users_pb2.GetUserRequest(user_id=created.user.id), metadata=service()
            )
        ).user

    # No names sent, or empty ones: the user row is not written.
    for names in ({}, {"given_name": "", "family_name": ""}, {"given_name": "   "}):
        assert await sign_in(**names) == created.user
        assert await stored() == created.user

    # A given name fills in the empty one; the family name stays empty.
    filled = await sign_in(given_name=" Ada ")
    assert (filled.given_name, filled.family_name) == ("Ada", "")
    assert filled.etag != created.user.etag
    assert await stored() == filled

    # A set name is never overwritten; an empty one is filled beside it.
    both = await sign_in(given_name="Eve", family_name="Lovelace")
    assert (both.given_name, both.family_name) == ("Ada", "Lovelace")
    assert await stored() == both

    # Both set: nothing to fill, no write (the etag and update time stay).
    users_before = (await api.snapshot())["users"]
    assert await sign_in(given_name="Eve", family_name="Byron") == both
    assert (await api.snapshot())["users"] == users_before

    # A name set with UpdateUser counts as set.
    other = await api.sign_up()
    await api.users.UpdateUser(
        _update(other.user.id, ["family_name"], family_name="Set"), metadata=service()
    )
    email = other.user.email
    got = await sign_in(given_name="G", family_name="F")
    assert (got.given_name, got.family_name) == ("G", "Set")


BAD_NAMES = [
    pytest.param("x" * 201, id="201-chars"),
    pytest.param("x" * (1 << 20), id="1mb"),
    pytest.param("Ada\nL", id="newline"),
    pytest.param("Ada\x00", id="nul"),
    pytest.param("Ada\x7f", id="del"),
    pytest.param("Ada\x85", id="c1-next-line"),
    pytest.param("Ada\u2028L", id="line-separator"),
    pytest.param("\x1b[31mAda", id="escape"),
]
GOOD_NAMES = [
    pytest.param("x" * 200, id="200-chars"),
    pytest.param("Zoë O\u2019Brien-Łukasiewicz", id="accents"),
    pytest.param("山田", id="cjk"),
    pytest.param("👩\u200d💻 Dev", id="emoji-with-zwj"),
    pytest.param("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", id="persian-zwnj"),
]


@pytest.mark.parametrize("field", ["given_name", "family_name"])
@pytest.mark.parametrize("name", BAD_NAMES)
async def test_bad_names_are_refused_at_sign_up_sign_in_and_update(
    api: Api, field: str, name: str
) -> None:
    created = await api.sign_up()
    error = await refused(
        api,
        lambda: api.auth.SignUp(
            auth_pb2.SignUpRequest(
                email="new@example.com", password=PASSWORD, **_field(field, name)
            )
        ),
        *IA,
    )
    assert _violations(error) == [field]
    # At sign-in, before anything is looked up: a known email (with the
    # right password) and an unknown one fail alike.
    answers = []
    for email in (created.user.email, "nobody@example.com"):
        error = await refused(
            api,
            partial(
                api.auth.SignInWithPassword,
                auth_pb2.SignInWithPasswordRequest(
                    email=email, password=PASSWORD, **_field(field, name)
                ),
            ),
            *IA,
        )
        answers.append((error.message, _violations(error)))
    assert answers[0] == answers[1]
    assert answers[0][1] == [field]
    error = await refused(
        api,
        lambda: api.users.UpdateUser(
            _update(created.user.id, [field], **_field(field, name)), metadata=service()
        ),
        *IA,
    )
    assert _violations(error) == [f"user.{field}"]


@pytest.mark.parametrize("name", GOOD_NAMES)
async def test_names_take_any_one_line_of_text(api: Api, name: str) -> None:
    response = await api.auth.SignUp(
        auth_pb2.SignUpRequest(
            email=f"n-{uuid.uuid4().hex[:8]}@example.com",
            password=PASSWORD,
            given_name=name,
            family_name=name,
            display_name=name,
        )
    )
    user = response.result.user
    assert (user.given_name, user.family_name, user.display_name) == (name, name, name)


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


async def test_delete_missing_user_is_user_not_found_unless_allowed(api: Api) -> None:
    admin = await api.admin_token()
    created = await api.sign_up()
    for md in (bearer(admin), service()):
        missing = str(uuid.uuid4())
        await refused(
            api,
            partial(
                api.users.DeleteUser, users_pb2.DeleteUserRequest(user_id=missing), metadata=md
            ),
            *USER_NOT_FOUND,
        )
        # allow_missing: a user that does not exist is no error, with or
        # without an etag, and nothing changes.
        for etag in ("", created.user.etag):
            await changes_nothing(
                api,
                partial(
                    api.users.DeleteUser,
                    users_pb2.DeleteUserRequest(user_id=missing, etag=etag, allow_missing=True),
                    metadata=md,
                ),
            )
    # A retried delete: the first deletes, the second finds nothing.
    request = users_pb2.DeleteUserRequest(
        user_id=created.user.id, etag=created.user.etag, allow_missing=True
    )
    await api.users.DeleteUser(request, metadata=service())
    await changes_nothing(api, lambda: api.users.DeleteUser(request, metadata=service()))
    await refused(
        api,
        lambda: api.users.DeleteUser(
            users_pb2.DeleteUserRequest(user_id=created.user.id), metadata=service()
        ),
        *USER_NOT_FOUND,
    )
    # allow_missing does not open the RPC to users.
    user = await api.sign_up()
    await refused(
        api,
        lambda: api.users.DeleteUser(
            users_pb2.DeleteUserRequest(user_id=str(uuid.uuid4()), allow_missing=True),
            metadata=bearer(user.tokens.access_token),
        ),
        *PD,
    )


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

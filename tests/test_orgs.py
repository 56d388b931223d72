"""OrgService: organizations and memberships over a real channel, on both backends.

What this proves, as orgs.proto states it: the creator of an org becomes its
owner (an API key must name the owner; a user may not name someone else);
an org is named by its id or its slug (the `org` oneof; unset is bad input on
`org_id`), and every org RPC takes the slug, from a user's token and from the
API key; UpdateOrg changes exactly the fields of its mask (the slug included)
and refuses a taken slug; DeleteOrg removes the memberships and takes the org
off every session whose active org it was, at once and for the next refresh,
and needs `force` while the org has members other than the caller (for an
admin or the API key: any member); DeleteOrg and RemoveMember take
`allow_missing`; Org and Member carry etags that change with them, and a
stale one changes nothing; ListOrgs and ListMembers page by cursor with page
tokens bound to their filter, and ListOrgs of one user gives that user's
membership in each org; AddMember / UpdateMember / RemoveMember / GetMember
report what they do; the slug and name rules hold as a table. Every refused
call leaves every table unchanged (``refused``).

Who may do what (the role table) is tests/test_org_roles.py; the active-org
check (ORG_MISMATCH, and the retried deletes that allow_missing lets through
without telling anything of other orgs) is tests/test_tenancy.py; two
changes with one etag at once, tests/test_races.py.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from google.rpc import error_details_pb2

from authsvc_client.v1 import auth_pb2, orgs_pb2, resources_pb2, sessions_pb2, users_pb2
from tests.app import (
    PASSWORD,
    Api,
    OrgRole,
    all_pages,
    bearer,
    claims,
    members_of,
    new_slug,
    org_member,
    org_with_owner,
    refreshed,
    refused,
    remember,
    service,
    set_active_org,
    who,
)

OWNER = resources_pb2.ORG_ROLE_OWNER
ADMIN = resources_pb2.ORG_ROLE_ADMIN
MEMBER = resources_pb2.ORG_ROLE_MEMBER
NO_ROLE = resources_pb2.ORG_ROLE_UNSPECIFIED

IA = (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
PD = (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
MISMATCH = (grpc.StatusCode.PERMISSION_DENIED, "ORG_MISMATCH")
ORG_NOT_FOUND = (grpc.StatusCode.NOT_FOUND, "ORG_NOT_FOUND")
USER_NOT_FOUND = (grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")
MEMBER_NOT_FOUND = (grpc.StatusCode.NOT_FOUND, "MEMBER_NOT_FOUND")
MEMBER_EXISTS = (grpc.StatusCode.ALREADY_EXISTS, "MEMBER_ALREADY_EXISTS")
SLUG_CONFLICT = (grpc.StatusCode.ALREADY_EXISTS, "ORG_SLUG_CONFLICT")
INVALID_PAGE_TOKEN = (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
ETAG_MISMATCH = (grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
HAS_MEMBERS = (grpc.StatusCode.FAILED_PRECONDITION, "ORG_HAS_MEMBERS")

Metadata = tuple[tuple[str, str], ...]


async def changes_nothing(api: Api, call: Callable[[], Awaitable[Any]]) -> Any:
    """Makes a call that must succeed and leave every table and Redis key as
    they were; returns its response."""
    before = await api.snapshot()
    response = await call()
    assert await api.snapshot() == before, "the call changed stored data"
    return response


def _create(api: Api, md: Metadata, slug: str, name: str = "Acme", owner: str = "") -> Any:
    return api.orgs.CreateOrg(
        orgs_pb2.CreateOrgRequest(slug=slug, name=name, owner_user_id=owner), metadata=md
    )


async def _created(api: Api, md: Metadata, slug: str = "", **fields: Any) -> Any:
    return (await _create(api, md, slug or new_slug(), **fields)).org


def _get(api: Api, md: Metadata, **ident: str) -> Any:
    return api.orgs.GetOrg(orgs_pb2.GetOrgRequest(**ident), metadata=md)


def _update(api: Api, md: Metadata, paths: list[str], ident: dict[str, str], **values: Any) -> Any:
    return api.orgs.UpdateOrg(
        orgs_pb2.UpdateOrgRequest(
            values=resources_pb2.Org(**values), update_mask=FieldMask(paths=paths), **ident
        ),
        metadata=md,
    )


def _get_member(api: Api, md: Metadata, org_id: str, user_id: str) -> Any:
    return api.orgs.GetMember(
        orgs_pb2.GetMemberRequest(org_id=org_id, user_id=user_id), metadata=md
    )


def _add(api: Api, md: Metadata, org_id: str, user_id: str, role: OrgRole = NO_ROLE) -> Any:
    return api.orgs.AddMember(
        orgs_pb2.AddMemberRequest(org_id=org_id, user_id=user_id, role=role), metadata=md
    )


def _set_role(api: Api, md: Metadata, org_id: str, user_id: str, role: OrgRole) -> Any:
    return api.orgs.UpdateMember(
        orgs_pb2.UpdateMemberRequest(org_id=org_id, user_id=user_id, role=role), metadata=md
    )


def _remove(api: Api, md: Metadata, org_id: str, user_id: str) -> Any:
    return api.orgs.RemoveMember(
        orgs_pb2.RemoveMemberRequest(org_id=org_id, user_id=user_id), metadata=md
    )


async def _list_orgs(api: Api, md: Metadata, **fields: Any) -> tuple[list[str], list[int]]:
    orgs, sizes = await all_pages(
        lambda token: api.orgs.ListOrgs(
            orgs_pb2.ListOrgsRequest(page_token=token, **fields), metadata=md
        ),
        "orgs",
    )
    return [o.id for o in orgs], sizes


async def _list_members(api: Api, md: Metadata, **fields: Any) -> tuple[list[Any], list[int]]:
    return await all_pages(
        lambda token: api.orgs.ListMembers(
            orgs_pb2.ListMembersRequest(page_token=token, **fields), metadata=md
        ),
        "members",
    )


def _time(ts: Any) -> Any:
    return ts.ToDatetime()


# -- CreateOrg -------------------------------------------------------------------


async def test_user_creates_an_org_and_becomes_its_owner(api: Api) -> None:
    created = await api.sign_up()
    md = bearer(created.tokens.access_token)
    made = []
    for owner in ("", created.user.id):
        slug = new_slug()
        org = (await _create(api, md, slug, name="Acme Corp", owner=owner)).org
        uuid.UUID(org.id)
        assert (org.slug, org.name) == (slug, "Acme Corp")
        assert org.create_time.seconds > 0
        assert _time(org.update_time) >= _time(org.create_time)
        assert await members_of(api, org.id) == {created.user.id: OWNER}
        member = (await _get_member(api, service(), org.id, created.user.id)).member
        assert (member.org_id, member.user_id, member.role) == (org.id, created.user.id, OWNER)
        assert member.email == created.user.email
        # What CreateOrg returned is what is stored.
        assert (await _get(api, service(), org_id=org.id)).org == org
        made.append(org.id)

    # Both are the creator's, oldest first.
    assert (await _list_orgs(api, md))[0] == made
    # Creating an org does not make it the session's active org.
    assert (await who(api, created.tokens.access_token)).org_id == ""


async def test_user_may_not_create_an_org_owned_by_someone_else(api: Api) -> None:
    alice = await api.sign_up()
    bob = await api.sign_up()
    md = bearer(alice.tokens.access_token)
    for owner in (bob.user.id, str(uuid.uuid4())):
        await refused(api, partial(_create, api, md, new_slug(), owner=owner), *PD)


async def test_admin_and_service_create_orgs_for_any_user(api: Api) -> None:
    admin = await api.admin_token()
    admin_id = (await who(api, admin)).user_id
    for md in (bearer(admin), service()):
        bob = await api.sign_up()
        org = await _created(api, md, owner=bob.user.id)
        assert await members_of(api, org.id) == {bob.user.id: OWNER}
        await refused(
            api,
            partial(_create, api, md, new_slug(), owner=str(uuid.uuid4())),
            *USER_NOT_FOUND,
        )
    # An admin token without an owner: the admin owns it.
    org = await _created(api, bearer(admin))
    assert await members_of(api, org.id) == {admin_id: OWNER}


async def test_service_must_name_the_owner(api: Api) -> None:
    error = await refused(api, lambda: _create(api, service(), new_slug()), *IA)
    bad_request = error.detail(error_details_pb2.BadRequest)
    assert bad_request is not None
    assert [v.field for v in bad_request.field_violations] == ["owner_user_id"]


# -- GetOrg ----------------------------------------------------------------------


async def test_get_org_by_id_and_by_slug(api: Api) -> None:
    org, owner = await org_with_owner(api, name="Initech")
    member = await org_member(api, org.id)
    admin = await api.admin_token()
    for md in (owner.md, member.md, bearer(admin), service()):
        assert (await _get(api, md, org_id=org.id)).org == org
        assert (await _get(api, md, org_slug=org.slug)).org == org
    # An org id in any case is the same id.
    assert (await _get(api, service(), org_id=org.id.upper())).org.id == org.id


async def test_get_org_needs_the_org(api: Api) -> None:
    """The `org` oneof unset, or set to an empty id or slug, is bad input on
    `org_id` (a field path; the oneof is none), the message naming both.
    (Both at once cannot be sent: a oneof keeps the last.)"""
    org, owner = await org_with_owner(api)
    admin = await api.admin_token()
    for md in (owner.md, bearer(admin), service()):
        for ident in ({}, {"org_id": ""}, {"org_slug": ""}):
            error = await refused(api, partial(_get, api, md, **ident), *IA)
            assert _violations(error) == ["org_id"]
            assert "org_slug" in error.message
    both = orgs_pb2.GetOrgRequest(org_id=org.id, org_slug=org.slug)
    assert both.WhichOneof("org") == "org_slug"


async def test_a_missing_org_is_org_not_found_for_admin_and_service(api: Api) -> None:
    admin = await api.admin_token()
    user = await api.sign_up()
    missing = str(uuid.uuid4())
    calls = {
        "GetOrg": lambda md, ident: _get(api, md, **ident),
        "UpdateOrg": lambda md, ident: _update(api, md, ["name"], ident, name="x"),
        "DeleteOrg": lambda md, ident: api.orgs.DeleteOrg(
            orgs_pb2.DeleteOrgRequest(**ident), metadata=md
        ),
        "AddMember": lambda md, ident: api.orgs.AddMember(
            orgs_pb2.AddMemberRequest(user_id=user.user.id, **ident), metadata=md
        ),
        "UpdateMember": lambda md, ident: api.orgs.UpdateMember(
            orgs_pb2.UpdateMemberRequest(user_id=user.user.id, role=ADMIN, **ident), metadata=md
        ),
        "RemoveMember": lambda md, ident: api.orgs.RemoveMember(
            orgs_pb2.RemoveMemberRequest(user_id=user.user.id, **ident), metadata=md
        ),
        "GetMember": lambda md, ident: api.orgs.GetMember(
            orgs_pb2.GetMemberRequest(user_id=user.user.id, **ident), metadata=md
        ),
        "ListMembers": lambda md, ident: api.orgs.ListMembers(
            orgs_pb2.ListMembersRequest(**ident), metadata=md
        ),
    }
    for md in (bearer(admin), service()):
        for name, call in calls.items():
            for ident in ({"org_id": missing}, {"org_slug": "no-such-org"}):
                error = await refused(api, partial(call, md, ident), *ORG_NOT_FOUND)
                assert error.reason == "ORG_NOT_FOUND", name


# -- UpdateOrg -------------------------------------------------------------------


async def test_update_org_changes_exactly_the_masked_fields(api: Api) -> None:
    org, owner = await org_with_owner(api, name="Old Name")

    # The name only: the slug in the request is not in the mask, so ignored.
    renamed = (
        await _update(api, owner.md, ["name"], {"org_id": org.id}, name="New Name", slug="ignored")
    ).org
    assert (renamed.id, renamed.slug, renamed.name) == (org.id, org.slug, "New Name")
    assert renamed.create_time == org.create_time
    assert _time(renamed.update_time) >= _time(org.update_time)
    assert (await _get(api, service(), org_id=org.id)).org == renamed

    # The slug, naming the org by its current slug; `org.id` is ignored.
    new = new_slug("renamed")
    moved = (
        await _update(
            api,
            owner.md,
            ["slug"],
            {"org_slug": org.slug},
            slug=new,
            name="ignored",
            id=str(uuid.uuid4()),
        )
    ).org
    assert (moved.id, moved.slug, moved.name) == (org.id, new, "New Name")
    assert (await _get(api, service(), org_slug=new)).org.id == org.id
    await refused(api, lambda: _get(api, service(), org_slug=org.slug), *ORG_NOT_FOUND)
    # The owner's session still acts in it, by id and by the new slug.
    assert (await _get(api, owner.md, org_id=org.id)).org.slug == new
    assert (await _get(api, owner.md, org_slug=new)).org.id == org.id

    # Both at once; and the old slug is free again.
    both = (
        await _update(
            api, owner.md, ["name", "slug"], {"org_id": org.id}, name="Both", slug=org.slug
        )
    ).org
    assert (both.slug, both.name) == (org.slug, "Both")

    # Writing the org's own slug back is no conflict.
    same = (
        await _update(
            api, owner.md, ["name", "slug"], {"org_id": org.id}, name="Same", slug=org.slug
        )
    ).org
    assert (same.slug, same.name) == (org.slug, "Same")


async def test_update_org_to_a_taken_slug_is_a_conflict(api: Api) -> None:
    org, owner = await org_with_owner(api)
    other, _ = await org_with_owner(api)
    for md in (owner.md, service()):
        await refused(
            api,
            partial(_update, api, md, ["slug"], {"org_id": org.id}, slug=other.slug),
            *SLUG_CONFLICT,
        )
        await refused(
            api,
            partial(
                _update, api, md, ["name", "slug"], {"org_id": org.id}, name="x", slug=other.slug
            ),
            *SLUG_CONFLICT,
        )
    assert (await _get(api, service(), org_id=org.id)).org == org


@pytest.mark.parametrize(
    "paths",
    [
        pytest.param([], id="empty"),
        pytest.param(["id"], id="id"),
        pytest.param(["create_time"], id="create-time"),
        pytest.param(["update_time"], id="update-time"),
        pytest.param(["owner"], id="unknown"),
        pytest.param(["name", "bogus"], id="known-and-unknown"),
        pytest.param(["org.name"], id="prefixed"),
    ],
)
async def test_update_org_refuses_bad_masks(api: Api, paths: list[str]) -> None:
    org, owner = await org_with_owner(api)
    error = await refused(
        api, lambda: _update(api, owner.md, paths, {"org_id": org.id}, name="x"), *IA
    )
    bad_request = error.detail(error_details_pb2.BadRequest)
    assert bad_request is not None
    assert [v.field for v in bad_request.field_violations] == ["update_mask"]


# -- DeleteOrg -------------------------------------------------------------------


async def test_delete_org_removes_memberships_and_every_sessions_active_org(api: Api) -> None:
    org, owner = await org_with_owner(api)
    member = await org_member(api, org.id)
    # The member also belongs to another org, active in another session of theirs.
    elsewhere, _ = await org_with_owner(api)
    await _add(api, service(), elsewhere.id, member.id)
    member_elsewhere = await _second_session_in(api, member.user.email, elsewhere.id)

    # Warm every cache on the way: the deletion must beat them.
    for token in (owner.token, member.token, member_elsewhere.access_token):
        assert (await who(api, token)).org_id != ""

    await api.orgs.DeleteOrg(
        orgs_pb2.DeleteOrgRequest(org_id=org.id, force=True), metadata=owner.md
    )

    await refused(api, lambda: _get(api, service(), org_id=org.id), *ORG_NOT_FOUND)
    await refused(api, lambda: _get(api, service(), org_slug=org.slug), *ORG_NOT_FOUND)
    snapshot = await api.snapshot()
    assert not [row for row in snapshot["memberships"] if str(row[0]) == org.id]
    assert not [row for row in snapshot["orgs"] if str(row[0]) == org.id]

    # Sessions whose active org it was: still live, with no org, at once...
    for user, token in ((owner, owner.token), (member, member.token)):
        session = await who(api, token)
        assert (session.user_id, session.org_id, session.org_role) == (user.id, "", NO_ROLE)
    # ... and their next refresh carries none, with a higher claims version
    # (so local verifiers refuse the tokens that still name the org).
    for user in (owner, member):
        pair = await refreshed(api, user.tokens.refresh_token)
        payload = claims(pair.access_token)
        assert "org_id" not in payload
        assert "org_role" not in payload
        assert payload["ver"] > claims(user.token)["ver"]
        assert (await who(api, pair.access_token)).org_id == ""
    listed = await api.sessions.ListSessions(
        sessions_pb2.ListSessionsRequest(user_id=owner.id), metadata=service()
    )
    assert [s.org_id for s in listed.sessions] == [""]

    # The member's session in the other org is untouched.
    session = await who(api, member_elsewhere.access_token)
    assert (session.org_id, session.org_role) == (elsewhere.id, MEMBER)
    assert (await _list_orgs(api, member.md))[0] == [elsewhere.id]

    # The owner's old token (minted with the org) no longer acts in it.
    await refused(api, lambda: _get(api, owner.md, org_id=org.id), *MISMATCH)
    # The org is gone for good; its slug is free again.
    await refused(
        api,
        lambda: api.orgs.DeleteOrg(orgs_pb2.DeleteOrgRequest(org_id=org.id), metadata=service()),
        *ORG_NOT_FOUND,
    )
    again = await _created(api, owner.md, slug=org.slug)
    assert again.id != org.id


async def _second_session_in(api: Api, email: str, org_id: str) -> Any:
    """Signs the user in again and makes ``org_id`` that session's active org."""
    signed = await api.auth.SignInWithPassword(
        auth_pb2.SignInWithPasswordRequest(email=email, password=PASSWORD)
    )
    remember(signed.result.tokens.access_token, signed.result.tokens.refresh_token)
    return await set_active_org(api, signed.result.tokens.refresh_token, org_id)


async def test_delete_org_by_slug_by_admin_and_service(api: Api) -> None:
    admin = await api.admin_token()
    for md in (bearer(admin), service()):
        org, owner = await org_with_owner(api)
        await api.orgs.DeleteOrg(
            orgs_pb2.DeleteOrgRequest(org_slug=org.slug, force=True), metadata=md
        )
        await refused(api, partial(_get, api, service(), org_id=org.id), *ORG_NOT_FOUND)
        assert (await who(api, owner.token)).org_id == ""


# -- ListOrgs --------------------------------------------------------------------


async def test_list_orgs_pages_a_users_orgs_oldest_first(api: Api) -> None:
    alice = await api.sign_up()
    bob = await api.sign_up()
    a_md, b_md = bearer(alice.tokens.access_token), bearer(bob.tokens.access_token)
    # Created in this order: a1 a2 b1 a3 a4 a5 b2. Alice also joins b1.
    a1 = await _created(api, a_md)
    a2 = await _created(api, a_md)
    b1 = await _created(api, b_md)
    a3, a4, a5 = [await _created(api, a_md) for _ in range(3)]
    b2 = await _created(api, b_md)
    await _add(api, service(), b1.id, alice.user.id)
    alices = [a1.id, a2.id, b1.id, a3.id, a4.id, a5.id]
    everyone = [a1.id, a2.id, b1.id, a3.id, a4.id, a5.id, b2.id]

    for fields in ({}, {"user_id": alice.user.id}):
        assert await _list_orgs(api, a_md, page_size=4, **fields) == (alices, [4, 2])
        assert await _list_orgs(api, a_md, page_size=2, **fields) == (alices, [2, 2, 2])
        # 0 means 50; above 500 is 500: one page either way.
        for size in (0, 10_000):
            assert await _list_orgs(api, a_md, page_size=size, **fields) == (alices, [6])
    assert (await _list_orgs(api, b_md))[0] == [b1.id, b2.id]
    listed = await api.orgs.ListOrgs(orgs_pb2.ListOrgsRequest(page_size=1), metadata=a_md)
    assert listed.orgs[0] == a1

    # Nobody else's.
    await refused(
        api,
        lambda: api.orgs.ListOrgs(orgs_pb2.ListOrgsRequest(user_id=bob.user.id), metadata=a_md),
        *PD,
    )

    admin = await api.admin_token()
    for md in (bearer(admin), service()):
        assert await _list_orgs(api, md, page_size=3) == (everyone, [3, 3, 1])
        assert (await _list_orgs(api, md, user_id=alice.user.id))[0] == alices
        assert (await _list_orgs(api, md, user_id=bob.user.id))[0] == [b1.id, b2.id]
        assert (await _list_orgs(api, md, user_id=str(uuid.uuid4())))[0] == []

    # An org deleted between pages is not listed; nothing repeats.
    first = await api.orgs.ListOrgs(orgs_pb2.ListOrgsRequest(page_size=2), metadata=a_md)
    await api.orgs.DeleteOrg(
        orgs_pb2.DeleteOrgRequest(org_id=a3.id, force=True), metadata=service()
    )
    rest = await api.orgs.ListOrgs(
        orgs_pb2.ListOrgsRequest(page_size=10, page_token=first.next_page_token), metadata=a_md
    )
    assert [o.id for o in rest.orgs] == [b1.id, a4.id, a5.id]
    assert rest.next_page_token == ""


async def test_list_orgs_page_tokens_are_bound_to_the_filter(api: Api) -> None:
    alice = await api.sign_up()
    bob = await api.sign_up()
    a_md, b_md = bearer(alice.tokens.access_token), bearer(bob.tokens.access_token)
    for md in (a_md, a_md, b_md, b_md):
        await _created(api, md)

    def page(md: Metadata, **fields: Any) -> Any:
        return api.orgs.ListOrgs(orgs_pb2.ListOrgsRequest(page_size=1, **fields), metadata=md)

    of_alice = (await page(service(), user_id=alice.user.id)).next_page_token
    of_everyone = (await page(service())).next_page_token
    alices_own = (await page(a_md)).next_page_token
    assert all((of_alice, of_everyone, alices_own))
    for md, fields in [
        (service(), {"user_id": bob.user.id, "page_token": of_alice}),
        (service(), {"page_token": of_alice}),
        (service(), {"user_id": alice.user.id, "page_token": of_everyone}),
        (b_md, {"page_token": alices_own}),
        (b_md, {"page_token": of_alice}),
    ]:
        await refused(api, partial(page, md, **fields), *INVALID_PAGE_TOKEN)
    # The same filter takes them.
    assert (await page(service(), user_id=alice.user.id, page_token=of_alice)).orgs
    assert (await page(a_md, user_id=alice.user.id, page_token=alices_own)).orgs


async def test_list_orgs_gives_the_users_membership_in_each(api: Api) -> None:
    alice = await api.sign_up()
    bob = await api.sign_up()
    a_md, b_md = bearer(alice.tokens.access_token), bearer(bob.tokens.access_token)
    a = await _created(api, a_md)
    b = await _created(api, b_md)
    c = await _created(api, b_md)
    await _add(api, service(), b.id, alice.user.id, ADMIN)
    await _add(api, service(), c.id, alice.user.id, MEMBER)
    admin = await api.admin_token()

    async def pages(md: Metadata, **fields: Any) -> tuple[list[Any], list[Any]]:
        orgs: list[Any] = []
        members: list[Any] = []
        token = ""
        while True:
            page = await api.orgs.ListOrgs(
                orgs_pb2.ListOrgsRequest(page_size=2, page_token=token, **fields), metadata=md
            )
            assert len(page.memberships) in (0, len(page.orgs))
            orgs += page.orgs
            members += page.memberships
            token = page.next_page_token
            if not token:
                return orgs, members

    for md, fields in [
        (a_md, {}),
        (a_md, {"user_id": alice.user.id}),
        (bearer(admin), {"user_id": alice.user.id}),
        (service(), {"user_id": alice.user.id}),
    ]:
        orgs, members = await pages(md, **fields)
        assert [o.id for o in orgs] == [a.id, b.id, c.id]
        assert [(m.org_id, m.user_id) for m in members] == [(o.id, alice.user.id) for o in orgs]
        assert [m.role for m in members] == [OWNER, ADMIN, MEMBER]
        assert {m.email for m in members} == {alice.user.email}
        # Each is the membership GetMember answers, etag and all.
        for org, member in zip(orgs, members, strict=True):
            assert (await _get_member(api, service(), org.id, alice.user.id)).member == member
    orgs, members = await pages(service(), user_id=bob.user.id)
    assert ([o.id for o in orgs], [m.role for m in members]) == ([b.id, c.id], [OWNER, OWNER])
    # Every org (an admin or the API key without user_id): no memberships.
    for md in (bearer(admin), service()):
        orgs, members = await pages(md)
        assert [o.id for o in orgs] == [a.id, b.id, c.id]
        assert members == []


# -- etags -----------------------------------------------------------------------

ETAG = re.compile(r"[A-Za-z0-9_-]{16}")


async def test_orgs_and_members_carry_etags_that_change_with_them(api: Api) -> None:
    org, owner = await org_with_owner(api)
    assert ETAG.fullmatch(org.etag), org.etag
    assert (await _get(api, owner.md, org_id=org.id)).org.etag == org.etag
    listed = await api.orgs.ListOrgs(orgs_pb2.ListOrgsRequest(), metadata=owner.md)
    assert (listed.orgs[0].etag, listed.memberships[0].org_id) == (org.etag, org.id)

    renamed = (await _update(api, owner.md, ["name"], {"org_id": org.id}, name="Renamed")).org
    moved = (await _update(api, owner.md, ["slug"], {"org_id": org.id}, slug=new_slug())).org
    assert len({org.etag, renamed.etag, moved.etag}) == 3
    # A change that changes nothing writes nothing: the etag stays.
    same = await changes_nothing(
        api, lambda: _update(api, owner.md, ["name", "slug"], {"org_id": org.id}, **_of(moved))
    )
    assert same.org == moved

    bob = await api.sign_up()
    added = (await _add(api, owner.md, org.id, bob.user.id)).member
    assert ETAG.fullmatch(added.etag), added.etag
    assert (await _get_member(api, owner.md, org.id, bob.user.id)).member.etag == added.etag
    members, _ = await _list_members(api, owner.md, org_id=org.id)
    assert {m.user_id: m.etag for m in members}[bob.user.id] == added.etag
    promoted = (await _set_role(api, owner.md, org.id, bob.user.id, ADMIN)).member
    demoted = (await _set_role(api, owner.md, org.id, bob.user.id, MEMBER)).member
    assert len({added.etag, promoted.etag, demoted.etag}) == 3
    # The member's name is the user's, with the user's etag: renaming the user
    # leaves the membership's etag (and update time) as they were.
    await api.users.UpdateUser(
        users_pb2.UpdateUserRequest(
            user=resources_pb2.User(id=bob.user.id, display_name="Bob"),
            update_mask=FieldMask(paths=["display_name"]),
        ),
        metadata=service(),
    )
    now = (await _get_member(api, owner.md, org.id, bob.user.id)).member
    assert (now.display_name, now.etag, now.update_time) == (
        "Bob",
        demoted.etag,
        demoted.update_time,
    )


def _of(org: Any) -> dict[str, str]:
    return {"name": org.name, "slug": org.slug}


async def test_a_stale_etag_changes_nothing_in_an_org(api: Api) -> None:
    org, owner = await org_with_owner(api)
    bob = await org_member(api, org.id)
    stale_org = org.etag
    current_org = (
        await _update(api, owner.md, ["name"], {"org_id": org.id}, name="New", etag=stale_org)
    ).org.etag
    member = (await _get_member(api, owner.md, org.id, bob.id)).member
    stale_member = member.etag
    current_member = (
        await api.orgs.UpdateMember(
            orgs_pb2.UpdateMemberRequest(
                org_id=org.id, user_id=bob.id, role=ADMIN, etag=stale_member
            ),
            metadata=owner.md,
        )
    ).member.etag
    assert (current_org, current_member) != (stale_org, stale_member)

    calls: dict[str, tuple[Callable[[str], Any], str]] = {
        "UpdateOrg": (
            lambda etag: _update(api, owner.md, ["name"], {"org_id": org.id}, name="X", etag=etag),
            "values.etag",
        ),
        "DeleteOrg": (
            lambda etag: api.orgs.DeleteOrg(
                orgs_pb2.DeleteOrgRequest(org_id=org.id, etag=etag, force=True),
                metadata=owner.md,
            ),
            "etag",
        ),
        "UpdateMember": (
            lambda etag: api.orgs.UpdateMember(
                orgs_pb2.UpdateMemberRequest(org_id=org.id, user_id=bob.id, role=MEMBER, etag=etag),
                metadata=owner.md,
            ),
            "etag",
        ),
        "RemoveMember": (
            lambda etag: api.orgs.RemoveMember(
                orgs_pb2.RemoveMemberRequest(
                    org_id=org.id, user_id=bob.id, etag=etag, allow_missing=True
                ),
                metadata=owner.md,
            ),
            "etag",
        ),
    }
    stale = {"UpdateOrg": stale_org, "DeleteOrg": stale_org}
    for name, (call, field) in calls.items():
        for etag in (stale.get(name, stale_member), "x"):
            error = await refused(api, partial(call, etag), *ETAG_MISMATCH)
            assert error.reason == "ETAG_MISMATCH", name
        error = await refused(api, partial(call, "e" * 65), *IA)
        assert _violations(error) == [field], name
    # The API key is held to the etag too.
    await refused(
        api,
        lambda: api.orgs.UpdateOrg(
            orgs_pb2.UpdateOrgRequest(
                org_id=org.id,
                values=resources_pb2.Org(name="X", etag=stale_org),
                update_mask=FieldMask(paths=["name"]),
            ),
            metadata=service(),
        ),
        *ETAG_MISMATCH,
    )
    # The current ones are taken.
    await calls["UpdateMember"][0](current_member)
    member = (await _get_member(api, owner.md, org.id, bob.id)).member
    await calls["RemoveMember"][0](member.etag)
    assert await members_of(api, org.id) == {owner.id: OWNER}
    current_org = (await calls["UpdateOrg"][0](current_org)).org.etag
    await calls["DeleteOrg"][0](current_org)
    await refused(api, lambda: _get(api, service(), org_id=org.id), *ORG_NOT_FOUND)


# -- force and allow_missing ---------------------------------------------------------


def _delete(api: Api, md: Metadata, **fields: Any) -> Any:
    return api.orgs.DeleteOrg(orgs_pb2.DeleteOrgRequest(**fields), metadata=md)


async def test_deleting_an_org_with_other_members_needs_force(api: Api) -> None:
    org, owner = await org_with_owner(api)
    member = await org_member(api, org.id)
    for fields in ({"org_id": org.id}, {"org_slug": org.slug}, {"org_id": org.id, "force": False}):
        await refused(api, partial(_delete, api, owner.md, **fields), *HAS_MEMBERS)
    await _delete(api, owner.md, org_id=org.id, force=True)
    await refused(api, lambda: _get(api, service(), org_id=org.id), *ORG_NOT_FOUND)
    assert (await who(api, member.token)).org_id == ""

    # An owner alone in the org needs no force.
    alone, sole = await org_with_owner(api)
    await _delete(api, sole.md, org_id=alone.id)
    await refused(api, lambda: _get(api, service(), org_id=alone.id), *ORG_NOT_FOUND)

    # For an admin token or the API key every member is another: the owner too.
    admin = await api.admin_token()
    for md in (bearer(admin), service()):
        target, _ = await org_with_owner(api)
        await refused(api, partial(_delete, api, md, org_id=target.id), *HAS_MEMBERS)
        await _delete(api, md, org_id=target.id, force=True)
        await refused(api, partial(_get, api, service(), org_id=target.id), *ORG_NOT_FOUND)


async def test_delete_org_allow_missing(api: Api) -> None:
    admin = await api.admin_token()
    for md in (bearer(admin), service()):
        for ident in ({"org_id": str(uuid.uuid4())}, {"org_slug": "no-such-org"}):
            await refused(api, partial(_delete, api, md, **ident), *ORG_NOT_FOUND)
            await changes_nothing(api, partial(_delete, api, md, allow_missing=True, **ident))
        # A retried delete, with the etag it was made with.
        org, _ = await org_with_owner(api)
        request = {"org_id": org.id, "etag": org.etag, "force": True, "allow_missing": True}
        await _delete(api, md, **request)
        await changes_nothing(api, partial(_delete, api, md, **request))
        await refused(api, partial(_delete, api, md, org_id=org.id, force=True), *ORG_NOT_FOUND)
    # An org that exists is deleted as without it, under the same rules.
    org, owner = await org_with_owner(api)
    await org_member(api, org.id)
    await refused(
        api, partial(_delete, api, owner.md, org_id=org.id, allow_missing=True), *HAS_MEMBERS
    )


def _remove_member(api: Api, md: Metadata, org_id: str, user_id: str, **fields: Any) -> Any:
    return api.orgs.RemoveMember(
        orgs_pb2.RemoveMemberRequest(org_id=org_id, user_id=user_id, **fields), metadata=md
    )


async def test_remove_member_allow_missing(api: Api) -> None:
    org, owner = await org_with_owner(api)
    bob = await org_member(api, org.id)
    outsider = await api.sign_up()
    admin = await api.admin_token()
    for md in (owner.md, bearer(admin), service()):
        for user_id in (outsider.user.id, str(uuid.uuid4())):
            await refused(api, partial(_remove_member, api, md, org.id, user_id), *MEMBER_NOT_FOUND)
            await changes_nothing(
                api, partial(_remove_member, api, md, org.id, user_id, allow_missing=True)
            )
    # A retried removal: the first removes, the second finds nothing.
    await _remove_member(api, owner.md, org.id, bob.id, allow_missing=True)
    await changes_nothing(
        api, partial(_remove_member, api, owner.md, org.id, bob.id, allow_missing=True)
    )
    assert await members_of(api, org.id) == {owner.id: OWNER}
    # For an admin or the API key, an org that does not exist has no such
    # membership either.
    for md in (bearer(admin), service()):
        missing = str(uuid.uuid4())
        await refused(api, partial(_remove_member, api, md, missing, bob.id), *ORG_NOT_FOUND)
        await changes_nothing(
            api, partial(_remove_member, api, md, missing, bob.id, allow_missing=True)
        )
    # The rules hold as without it: the last owner stays.
    await refused(
        api,
        partial(_remove_member, api, owner.md, org.id, owner.id, allow_missing=True),
        grpc.StatusCode.FAILED_PRECONDITION,
        "LAST_OWNER",
    )


# -- addressing by slug ----------------------------------------------------------


async def test_every_org_rpc_takes_the_slug(api: Api) -> None:
    """Each org-scoped RPC, by slug, from the org's owner (a user token, the
    org active in its session) and from the API key."""
    for md_of in (lambda owner: owner.md, lambda owner: service()):
        org, owner = await org_with_owner(api)
        md = md_of(owner)
        by_slug = {"org_slug": org.slug}
        assert (await _get(api, md, **by_slug)).org == org
        bob = await api.sign_up()
        added = (
            await api.orgs.AddMember(
                orgs_pb2.AddMemberRequest(user_id=bob.user.id, role=ADMIN, **by_slug), metadata=md
            )
        ).member
        assert (added.org_id, added.user_id, added.role) == (org.id, bob.user.id, ADMIN)
        got = await api.orgs.GetMember(
            orgs_pb2.GetMemberRequest(user_id=bob.user.id, **by_slug), metadata=md
        )
        assert got.member == added
        listed = await api.orgs.ListMembers(orgs_pb2.ListMembersRequest(**by_slug), metadata=md)
        assert [m.user_id for m in listed.members] == [owner.id, bob.user.id]
        changed = await api.orgs.UpdateMember(
            orgs_pb2.UpdateMemberRequest(
                user_id=bob.user.id, role=MEMBER, etag=added.etag, **by_slug
            ),
            metadata=md,
        )
        assert changed.member.role == MEMBER
        await api.orgs.RemoveMember(
            orgs_pb2.RemoveMemberRequest(user_id=bob.user.id, etag=changed.member.etag, **by_slug),
            metadata=md,
        )
        assert await members_of(api, org.id) == {owner.id: OWNER}
        renamed = (await _update(api, md, ["name"], by_slug, name="By Slug", etag=org.etag)).org
        assert (renamed.id, renamed.name) == (org.id, "By Slug")
        await api.orgs.DeleteOrg(
            orgs_pb2.DeleteOrgRequest(etag=renamed.etag, force=True, **by_slug), metadata=md
        )
        await refused(api, partial(_get, api, service(), org_id=org.id), *ORG_NOT_FOUND)


# -- members ---------------------------------------------------------------------


async def test_list_members_pages_oldest_membership_first(api: Api) -> None:
    org, owner = await org_with_owner(api)
    joined = [owner.id]
    for _ in range(6):
        user = await api.sign_up()
        await _add(api, owner.md, org.id, user.user.id)
        joined.append(user.user.id)
    member = await org_member(api, org.id)
    joined.append(member.id)
    other, other_owner = await org_with_owner(api)

    for md in (owner.md, member.md, service()):
        members, sizes = await _list_members(api, md, org_id=org.id, page_size=3)
        assert [m.user_id for m in members] == joined
        assert sizes == [3, 3, 2]
        assert {m.org_id for m in members} == {org.id}
        assert [m.role for m in members] == [OWNER] + [MEMBER] * 7
        assert all(m.email.endswith("@example.com") for m in members)
        assert members[0].email == owner.user.email
        members, sizes = await _list_members(api, md, org_slug=org.slug, page_size=0)
        assert ([m.user_id for m in members], sizes) == (joined, [8])

    # A member removed between pages is simply not listed; nothing repeats.
    first = await api.orgs.ListMembers(
        orgs_pb2.ListMembersRequest(org_id=org.id, page_size=3), metadata=owner.md
    )
    await _remove(api, owner.md, org.id, joined[4])
    rest = await api.orgs.ListMembers(
        orgs_pb2.ListMembersRequest(org_id=org.id, page_size=10, page_token=first.next_page_token),
        metadata=owner.md,
    )
    assert [m.user_id for m in rest.members] == joined[3:4] + joined[5:]
    assert rest.next_page_token == ""

    # A page token is bound to its org.
    first = await api.orgs.ListMembers(
        orgs_pb2.ListMembersRequest(org_id=org.id, page_size=1), metadata=service()
    )
    await refused(
        api,
        lambda: api.orgs.ListMembers(
            orgs_pb2.ListMembersRequest(
                org_id=other.id, page_size=1, page_token=first.next_page_token
            ),
            metadata=service(),
        ),
        *INVALID_PAGE_TOKEN,
    )
    assert (await _list_members(api, other_owner.md, org_id=other.id))[0][0].user_id == (
        other_owner.id
    )


async def test_get_member(api: Api) -> None:
    org, owner = await org_with_owner(api)
    member = await org_member(api, org.id, ADMIN)
    other, other_owner = await org_with_owner(api)
    outsider = await api.sign_up()

    got = (await _get_member(api, owner.md, org.id, member.id)).member
    assert (got.org_id, got.user_id, got.role, got.email) == (
        org.id,
        member.id,
        ADMIN,
        member.user.email,
    )
    assert got.create_time.seconds > 0
    assert (await _get_member(api, member.md, org.id, owner.id)).member.role == OWNER
    assert (await _get_member(api, member.md, org.id, member.id)).member == got

    # Not a member of this org (but of another one), not a user, no one at all.
    for user_id in (other_owner.id, outsider.user.id, str(uuid.uuid4())):
        await refused(api, partial(_get_member, api, owner.md, org.id, user_id), *MEMBER_NOT_FOUND)
    assert other.id != org.id


async def test_add_member(api: Api) -> None:
    org, owner = await org_with_owner(api)
    bob = await api.sign_up()
    carol = await api.sign_up()
    # Bob also owns another org: memberships of different orgs are independent.
    await _created(api, bearer(bob.tokens.access_token))

    added = (await _add(api, owner.md, org.id, bob.user.id)).member
    assert (added.org_id, added.user_id, added.role, added.email) == (
        org.id,
        bob.user.id,
        MEMBER,
        bob.user.email,
    )
    assert (await _add(api, owner.md, org.id, carol.user.id, ADMIN)).member.role == ADMIN
    assert await members_of(api, org.id) == {
        owner.id: OWNER,
        bob.user.id: MEMBER,
        carol.user.id: ADMIN,
    }
    assert (await _get_member(api, service(), org.id, bob.user.id)).member == added

    for role in (NO_ROLE, MEMBER, ADMIN, OWNER):
        await refused(api, partial(_add, api, owner.md, org.id, bob.user.id, role), *MEMBER_EXISTS)
    await refused(api, lambda: _add(api, owner.md, org.id, owner.id), *MEMBER_EXISTS)
    await refused(api, lambda: _add(api, owner.md, org.id, str(uuid.uuid4())), *USER_NOT_FOUND)
    await refused(api, lambda: _add(api, service(), org.id, str(uuid.uuid4())), *USER_NOT_FOUND)


async def test_update_member(api: Api) -> None:
    org, owner = await org_with_owner(api)
    bob = await org_member(api, org.id)
    outsider = await api.sign_up()

    promoted = (await _set_role(api, owner.md, org.id, bob.id, ADMIN)).member
    assert (promoted.user_id, promoted.role, promoted.org_id) == (bob.id, ADMIN, org.id)
    assert _time(promoted.update_time) >= _time(promoted.create_time)
    assert (await _get_member(api, service(), org.id, bob.id)).member.role == ADMIN
    demoted = (await _set_role(api, owner.md, org.id, bob.id, MEMBER)).member
    assert demoted.role == MEMBER
    assert demoted.create_time == promoted.create_time

    for user_id in (outsider.user.id, str(uuid.uuid4())):
        await refused(
            api, partial(_set_role, api, owner.md, org.id, user_id, ADMIN), *MEMBER_NOT_FOUND
        )
    await refused(api, lambda: _set_role(api, owner.md, org.id, bob.id, NO_ROLE), *IA)


async def test_remove_member(api: Api) -> None:
    org, owner = await org_with_owner(api)
    bob = await org_member(api, org.id)
    # Bob's membership elsewhere is not touched.
    elsewhere, _ = await org_with_owner(api)
    await _add(api, service(), elsewhere.id, bob.id)

    await _remove(api, owner.md, org.id, bob.id)
    assert await members_of(api, org.id) == {owner.id: OWNER}
    assert bob.id in await members_of(api, elsewhere.id)
    await refused(api, lambda: _get_member(api, owner.md, org.id, bob.id), *MEMBER_NOT_FOUND)
    # Bob is still a user.
    got = await api.users.GetUser(users_pb2.GetUserRequest(user_id=bob.id), metadata=service())
    assert got.user.id == bob.id

    for user_id in (bob.id, str(uuid.uuid4())):
        await refused(api, partial(_remove, api, owner.md, org.id, user_id), *MEMBER_NOT_FOUND)
    await refused(api, lambda: _remove(api, service(), org.id, bob.id), *MEMBER_NOT_FOUND)

    # Removed, Bob can be added back.
    assert (await _add(api, owner.md, org.id, bob.id)).member.role == MEMBER


# -- slug and name rules ---------------------------------------------------------

VALID_SLUGS = [
    pytest.param("abc", id="3-chars"),
    pytest.param("a-1", id="hyphen-digit"),
    pytest.param("123", id="digits"),
    pytest.param("a" * 63, id="63-chars"),
]
INVALID_SLUGS = [
    pytest.param("", id="empty"),
    pytest.param("ab", id="2-chars"),
    pytest.param("a" * 64, id="64-chars"),
    pytest.param("Abc", id="uppercase"),
    pytest.param("ACME", id="all-uppercase"),
    pytest.param("a_b", id="underscore"),
    pytest.param("a b", id="space"),
    pytest.param(" abc", id="leading-space"),
    pytest.param("abc\n", id="trailing-newline"),
    pytest.param("a.b", id="dot"),
    pytest.param("a/b", id="slash"),
    pytest.param("äbc", id="unicode-letter"),
    pytest.param("аbc", id="cyrillic-a"),  # noqa: RUF001 (the point of the case)
    pytest.param("ab\x00c", id="nul"),
    pytest.param("a" * (1 << 20), id="1mb"),
]


def _violations(error: Any) -> list[str]:
    bad_request = error.detail(error_details_pb2.BadRequest)
    assert bad_request is not None, "INVALID_ARGUMENT without a BadRequest detail"
    return [v.field for v in bad_request.field_violations]


@pytest.mark.parametrize("slug", VALID_SLUGS)
async def test_valid_slugs(api: Api, slug: str) -> None:
    created = await api.sign_up()
    org = await _created(api, bearer(created.tokens.access_token), slug=slug)
    assert org.slug == slug
    assert (await _get(api, service(), org_slug=slug)).org.id == org.id
    # And as the new slug of another org, once this one has moved away.
    await _update(api, service(), ["slug"], {"org_id": org.id}, slug=new_slug())
    other, owner = await org_with_owner(api)
    moved = (await _update(api, owner.md, ["slug"], {"org_id": other.id}, slug=slug)).org
    assert moved.slug == slug


@pytest.mark.parametrize("slug", INVALID_SLUGS)
async def test_invalid_slugs(api: Api, slug: str) -> None:
    created = await api.sign_up()
    md = bearer(created.tokens.access_token)
    error = await refused(api, lambda: _create(api, md, slug), *IA)
    assert _violations(error) == ["slug"]
    org, owner = await org_with_owner(api)
    error = await refused(
        api, lambda: _update(api, owner.md, ["slug"], {"org_id": org.id}, slug=slug), *IA
    )
    assert _violations(error) == ["values.slug"]


async def test_a_taken_slug_is_a_conflict(api: Api) -> None:
    org, _ = await org_with_owner(api)
    other = await api.sign_up()
    for md, owner in ((bearer(other.tokens.access_token), ""), (service(), other.user.id)):
        await refused(api, partial(_create, api, md, org.slug, owner=owner), *SLUG_CONFLICT)
    # Slugs are not case-folded: the uppercase form is not a slug at all.
    await refused(
        api,
        lambda: _create(api, bearer(other.tokens.access_token), org.slug.upper()),
        *IA,
    )


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("A", id="1-char"),
        pytest.param("x" * 200, id="200-chars"),
        pytest.param("Ünïcødé GmbH & Co. KG", id="unicode"),
        pytest.param("日本の会社 🚀", id="cjk-emoji"),
    ],
)
async def test_valid_names(api: Api, name: str) -> None:
    created = await api.sign_up()
    org = await _created(api, bearer(created.tokens.access_token), name=name)
    assert org.name == name
    assert (await _get(api, service(), org_id=org.id)).org.name == name


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("", id="empty"),
        pytest.param("x" * 201, id="201-chars"),
        pytest.param("x" * (1 << 20), id="1mb"),
        pytest.param("Acme\nCorp", id="newline"),
        pytest.param("Acme\x00", id="nul"),
        pytest.param("Acme\x1b[31m", id="escape"),
    ],
)
async def test_invalid_names(api: Api, name: str) -> None:
    created = await api.sign_up()
    md = bearer(created.tokens.access_token)
    error = await refused(api, lambda: _create(api, md, new_slug(), name=name), *IA)
    assert _violations(error) == ["name"]
    org, owner = await org_with_owner(api)
    error = await refused(
        api, lambda: _update(api, owner.md, ["name"], {"org_id": org.id}, name=name), *IA
    )
    assert _violations(error) == ["values.name"]

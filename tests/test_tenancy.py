"""Tenant isolation: a user acts only in their session's active org.

The matrix: every org-scoped RPC (each method whose ``(authsvc.v1.access)`` is
ACCESS_ORG, read from the descriptors, so a new one is covered without
editing this file) is called by a user who OWNS both orgs involved, through

* a session whose active org is another org,
* a session with no active org,
* a session whose active org is the target, naming another org,

with the org named by id and by slug, and, for the deletes, with
`allow_missing` too. Each call fails with PERMISSION_DENIED / ORG_MISMATCH and
changes nothing; an org that does not exist answers the same, so a user
cannot probe which orgs exist. As a control, the same request from a session
whose active org is the named one succeeds, so the matrix's requests are ones
the server would otherwise carry out.

Also: a stale org claim is not honoured (a removed member's token, a demoted
owner's token), and a platform admin is not bound to an active org. The one
exception to "only the active org": a delete with `allow_missing` retried
after its first attempt took the org off the caller's session (the owner's
DeleteOrg, a member's leave) succeeds, for the org the access token itself
names (by id, or by the slug it carries) with a role there that may do it,
once what it deletes is gone.
"""

from __future__ import annotations

import importlib
import pkgutil
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

import authsvc_client.v1 as client_v1
from authsvc_client.v1 import auth_pb2, options_pb2, orgs_pb2, resources_pb2
from tests.app import (
    PASSWORD,
    Api,
    OrgUser,
    bearer,
    members_of,
    new_slug,
    org_member,
    org_with_owner,
    refused,
    remember,
    set_active_org,
    who,
)

OWNER = resources_pb2.ORG_ROLE_OWNER
ADMIN = resources_pb2.ORG_ROLE_ADMIN
MEMBER = resources_pb2.ORG_ROLE_MEMBER

MISMATCH = (grpc.StatusCode.PERMISSION_DENIED, "ORG_MISMATCH")
PD = (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")

Metadata = tuple[tuple[str, str], ...]


def _org_scoped() -> Iterator[tuple[ServiceDescriptor, MethodDescriptor]]:
    """Every ACCESS_ORG method of every service of authsvc_client.v1."""
    seen: set[str] = set()
    for info in pkgutil.iter_modules(client_v1.__path__):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"{client_v1.__name__}.{info.name}")
        for svc in module.DESCRIPTOR.services_by_name.values():
            for method in svc.methods:
                access = method.GetOptions().Extensions[options_pb2.access]
                path = f"/{svc.full_name}/{method.name}"
                if access == options_pb2.ACCESS_ORG and path not in seen:
                    seen.add(path)
                    yield svc, method


ORG_SCOPED = sorted(_org_scoped(), key=lambda sm: (sm[0].full_name, sm[1].name))


def test_the_matrix_sees_every_org_scoped_method() -> None:
    names = {method.name for _, method in ORG_SCOPED}
    assert {
        "GetOrg",
        "UpdateOrg",
        "DeleteOrg",
        "AddMember",
        "UpdateMember",
        "RemoveMember",
        "GetMember",
        "ListMembers",
    } <= names
    for _, method in ORG_SCOPED:
        fields = method.input_type.fields_by_name
        assert "org_id" in fields, method.name
        assert "org_slug" in fields, method.name


@dataclass
class World:
    """Two orgs owned by one user, X, who has a session in each and one in none."""

    target: Any  # the org the calls are about
    other: Any  # another org X owns
    in_target: OrgUser  # X, active org: target
    in_other: OrgUser  # X, active org: other
    in_none: OrgUser  # X, no active org
    member: OrgUser  # a member of the target (the user_id of member calls)
    outsider: Any  # a user in no org (the user_id of AddMember)
    stranger: OrgUser  # owner of a third org, active there, not in the target

    @classmethod
    async def make(cls, api: Api) -> World:
        target, in_target = await org_with_owner(api)
        other = (
            await api.orgs.CreateOrg(
                orgs_pb2.CreateOrgRequest(slug=new_slug(), name="Other"), metadata=in_target.md
            )
        ).org
        in_other = OrgUser(in_target.user, await _signed_in(api, in_target, other.id))
        in_none = OrgUser(in_target.user, await _signed_in(api, in_target, ""))
        _, stranger = await org_with_owner(api)
        return cls(
            target=target,
            other=other,
            in_target=in_target,
            in_other=in_other,
            in_none=in_none,
            member=await org_member(api, target.id, MEMBER),
            outsider=(await api.sign_up()).user,
            stranger=stranger,
        )


async def _signed_in(api: Api, user: OrgUser, org_id: str) -> Any:
    """Another session of ``user``, with ``org_id`` active (none when empty)."""
    signed = await api.auth.SignInWithPassword(
        auth_pb2.SignInWithPasswordRequest(email=user.user.email, password=PASSWORD)
    )
    remember(signed.result.tokens.access_token, signed.result.tokens.refresh_token)
    if not org_id:
        return signed.result.tokens
    return await set_active_org(api, signed.result.tokens.refresh_token, org_id)


def _request(method: MethodDescriptor, world: World, **ident: str) -> Any:
    """A request the target's owner may make, naming the org by ``ident``.

    Fields are filled by name, so a new org-scoped method is covered too; give
    it a case here if its request needs more.
    """
    message: Any = GetMessageClass(method.input_type)(**ident)
    fields = method.input_type.fields_by_name
    if "user_id" in fields:
        message.user_id = world.outsider.id if method.name == "AddMember" else world.member.id
    if "role" in fields:
        message.role = ADMIN
    if "update_mask" in fields and "values" in fields:
        message.update_mask.paths.append("name")
        message.values.name = "Renamed"
    if "force" in fields:
        message.force = True  # the target has a member besides its owner
    return message


def _call(
    api: Api, svc: ServiceDescriptor, method: MethodDescriptor, request: Any, md: Metadata
) -> Any:
    stub = api.channel.unary_unary(
        f"/{svc.full_name}/{method.name}",
        request_serializer=GetMessageClass(method.input_type).SerializeToString,
        response_deserializer=GetMessageClass(method.output_type).FromString,
    )
    return stub(request, metadata=md, timeout=30)


def _mismatches(world: World) -> list[tuple[str, Metadata, dict[str, str]]]:
    """(what, caller, org identification): each must be ORG_MISMATCH."""
    t, o = world.target, world.other
    by_id = {"target": {"org_id": t.id}, "other": {"org_id": o.id}}
    by_slug = {"target": {"org_slug": t.slug}, "other": {"org_slug": o.slug}}
    cases = []
    for how, ident in (("id", by_id), ("slug", by_slug)):
        cases += [
            (f"active other org, target by {how}", world.in_other.md, ident["target"]),
            (f"no active org, target by {how}", world.in_none.md, ident["target"]),
            (f"active target, other org by {how}", world.in_target.md, ident["other"]),
            (f"not a member, target by {how}", world.stranger.md, ident["target"]),
        ]
    cases += [
        ("active target, missing org id", world.in_target.md, {"org_id": str(uuid.uuid4())}),
        ("active target, missing org slug", world.in_target.md, {"org_slug": "no-such-org"}),
        ("no active org, missing org id", world.in_none.md, {"org_id": str(uuid.uuid4())}),
    ]
    return cases


@pytest.mark.parametrize(
    ("svc", "method"), ORG_SCOPED, ids=[method.name for _, method in ORG_SCOPED]
)
async def test_org_scoped_method_acts_only_in_the_active_org(
    api: Api, svc: ServiceDescriptor, method: MethodDescriptor
) -> None:
    world = await World.make(api)
    # A delete with allow_missing answers the same: it does not tell a missing
    # org (or membership) from one the caller may not act in.
    lenient = (False, True) if "allow_missing" in method.input_type.fields_by_name else (False,)
    for what, md, ident in _mismatches(world):
        for allow_missing in lenient:
            request = _request(method, world, **ident)
            if allow_missing:
                request.allow_missing = True
            error = await refused(api, partial(_call, api, svc, method, request, md), *MISMATCH)
            assert error.reason == "ORG_MISMATCH", (what, allow_missing)

    # The control: from the target's own session, the same request is carried out.
    await _call(
        api, svc, method, _request(method, world, org_id=world.target.id), world.in_target.md
    )


async def test_a_missing_org_and_another_org_answer_alike(api: Api) -> None:
    """Existence does not leak: a user gets ORG_MISMATCH for an org that does
    not exist, exactly as for one that does, also from the deletes that take
    allow_missing."""
    world = await World.make(api)
    md = world.stranger.md
    for ident in (
        {"org_id": world.other.id},
        {"org_id": str(uuid.uuid4())},
        {"org_slug": world.other.slug},
        {"org_slug": "no-such-org"},
    ):
        for call in (
            partial(api.orgs.GetOrg, orgs_pb2.GetOrgRequest(**ident), metadata=md),
            partial(
                api.orgs.DeleteOrg,
                orgs_pb2.DeleteOrgRequest(force=True, allow_missing=True, **ident),
                metadata=md,
            ),
            partial(
                api.orgs.RemoveMember,
                orgs_pb2.RemoveMemberRequest(
                    user_id=world.stranger.id, allow_missing=True, **ident
                ),
                metadata=md,
            ),
        ):
            await refused(api, call, *MISMATCH)


async def changes_nothing(api: Api, call: Callable[[], Awaitable[Any]]) -> Any:
    """Makes a call that must succeed and leave every table and Redis key as
    they were; returns its response."""
    before = await api.snapshot()
    response = await call()
    assert await api.snapshot() == before, "the call changed stored data"
    return response


async def test_a_retried_delete_of_the_active_org_succeeds_with_allow_missing(api: Api) -> None:
    """The owner's DeleteOrg takes the org off every session, the owner's too,
    so a retry (its answer was lost) comes from a session with no active org.
    With allow_missing it succeeds, because the access token it carries names
    that org with a role that may delete it: the caller learns only that an
    org they were in is gone. Anything else still answers ORG_MISMATCH."""
    org, owner = await org_with_owner(api)
    admin = await org_member(api, org.id, ADMIN)
    member = await org_member(api, org.id, MEMBER)
    request = orgs_pb2.DeleteOrgRequest(
        org_id=org.id, etag=org.etag, force=True, allow_missing=True
    )
    await api.orgs.DeleteOrg(request, metadata=owner.md)
    assert (await who(api, owner.token)).org_id == ""

    await changes_nothing(api, partial(api.orgs.DeleteOrg, request, metadata=owner.md))
    # Without allow_missing, the session is simply not in the org.
    await refused(
        api,
        partial(api.orgs.DeleteOrg, orgs_pb2.DeleteOrgRequest(org_id=org.id), metadata=owner.md),
        *MISMATCH,
    )
    # By slug: the token carries the org's slug too. Even once another org
    # has taken the slug, the retry answers for the token's org (gone), and
    # leaves the new one alone.
    by_slug = orgs_pb2.DeleteOrgRequest(org_slug=org.slug, force=True, allow_missing=True)
    await changes_nothing(api, partial(api.orgs.DeleteOrg, by_slug, metadata=owner.md))
    _, newcomer = await org_with_owner(api, slug=org.slug)
    await changes_nothing(api, partial(api.orgs.DeleteOrg, by_slug, metadata=owner.md))
    got = await api.orgs.GetOrg(orgs_pb2.GetOrgRequest(org_slug=org.slug), metadata=newcomer.md)
    assert got.org.id != org.id
    # The admin's and the member's tokens name the org too, with roles that
    # could not delete it.
    for md in (admin.md, member.md):
        await refused(
            api,
            partial(
                api.orgs.DeleteOrg,
                orgs_pb2.DeleteOrgRequest(org_id=org.id, allow_missing=True),
                metadata=md,
            ),
            *MISMATCH,
        )
    # Removals in the deleted org: the member's own leave, and the admin's
    # removal of the member (its role there may remove members), are done.
    for md, user_id in ((member.md, member.id), (admin.md, member.id)):
        await changes_nothing(
            api,
            partial(
                api.orgs.RemoveMember,
                orgs_pb2.RemoveMemberRequest(org_id=org.id, user_id=user_id, allow_missing=True),
                metadata=md,
            ),
        )
    # The member's role there could not remove the admin.
    await refused(
        api,
        partial(
            api.orgs.RemoveMember,
            orgs_pb2.RemoveMemberRequest(org_id=org.id, user_id=admin.id, allow_missing=True),
            metadata=member.md,
        ),
        *MISMATCH,
    )


async def test_a_retried_leave_succeeds_with_allow_missing(api: Api) -> None:
    """Leaving takes the org off the leaver's sessions; the retry, with the
    same token, succeeds with allow_missing while the membership is gone."""
    org, owner = await org_with_owner(api)
    member = await org_member(api, org.id, MEMBER)
    leave = orgs_pb2.RemoveMemberRequest(org_id=org.id, user_id=member.id, allow_missing=True)
    await api.orgs.RemoveMember(leave, metadata=member.md)
    assert (await who(api, member.token)).org_id == ""
    await changes_nothing(api, partial(api.orgs.RemoveMember, leave, metadata=member.md))
    by_slug = orgs_pb2.RemoveMemberRequest(org_slug=org.slug, user_id=member.id, allow_missing=True)
    await changes_nothing(api, partial(api.orgs.RemoveMember, by_slug, metadata=member.md))
    await refused(
        api,
        partial(
            api.orgs.RemoveMember,
            orgs_pb2.RemoveMemberRequest(org_id=org.id, user_id=member.id),
            metadata=member.md,
        ),
        *MISMATCH,
    )
    # The old token tells nothing of other memberships, nor of the org.
    await refused(
        api,
        partial(
            api.orgs.RemoveMember,
            orgs_pb2.RemoveMemberRequest(org_id=org.id, user_id=owner.id, allow_missing=True),
            metadata=member.md,
        ),
        *MISMATCH,
    )
    await refused(
        api,
        partial(
            api.orgs.DeleteOrg,
            orgs_pb2.DeleteOrgRequest(org_id=org.id, allow_missing=True),
            metadata=member.md,
        ),
        *MISMATCH,
    )
    # Back in the org (but not active in this session), a retry of the old
    # leave is a mismatch again: the membership exists.
    await api.orgs.AddMember(
        orgs_pb2.AddMemberRequest(org_id=org.id, user_id=member.id), metadata=owner.md
    )
    await refused(api, partial(api.orgs.RemoveMember, leave, metadata=member.md), *MISMATCH)
    assert await members_of(api, org.id) == {owner.id: OWNER, member.id: MEMBER}


async def test_a_removed_members_token_no_longer_acts_in_the_org(api: Api) -> None:
    """The token was minted with the org in its claims; the claim is stale at
    once and is not honoured."""
    org, owner = await org_with_owner(api)
    member = await org_member(api, org.id, ADMIN)
    await api.orgs.GetOrg(orgs_pb2.GetOrgRequest(org_id=org.id), metadata=member.md)

    await api.orgs.RemoveMember(
        orgs_pb2.RemoveMemberRequest(org_id=org.id, user_id=member.id), metadata=owner.md
    )

    checks: list[tuple[Any, Any]] = [
        (orgs_pb2.GetOrgRequest(org_id=org.id), api.orgs.GetOrg),
        (orgs_pb2.ListMembersRequest(org_slug=org.slug), api.orgs.ListMembers),
        (
            orgs_pb2.AddMemberRequest(org_id=org.id, user_id=member.id, role=ADMIN),
            api.orgs.AddMember,
        ),
    ]
    for request, call in checks:
        await refused(api, partial(call, request, metadata=member.md), *MISMATCH)
    assert await members_of(api, org.id) == {owner.id: OWNER}


async def test_a_demoted_owners_token_loses_the_owners_rights_at_once(api: Api) -> None:
    org, owner = await org_with_owner(api)
    second = await org_member(api, org.id, OWNER)
    await api.orgs.UpdateMember(
        orgs_pb2.UpdateMemberRequest(org_id=org.id, user_id=second.id, role=ADMIN),
        metadata=second.md,
    )
    assert (await members_of(api, org.id))[second.id] == ADMIN

    # Demoted to member: the token still says "owner", the live role rules.
    await api.orgs.UpdateMember(
        orgs_pb2.UpdateMemberRequest(org_id=org.id, user_id=second.id, role=MEMBER),
        metadata=owner.md,
    )
    await refused(
        api,
        lambda: api.orgs.DeleteOrg(orgs_pb2.DeleteOrgRequest(org_id=org.id), metadata=second.md),
        *PD,
    )
    await refused(
        api,
        lambda: api.orgs.UpdateMember(
            orgs_pb2.UpdateMemberRequest(org_id=org.id, user_id=owner.id, role=MEMBER),
            metadata=second.md,
        ),
        *PD,
    )
    # Reading is still a member's right.
    got = await api.orgs.GetOrg(orgs_pb2.GetOrgRequest(org_id=org.id), metadata=second.md)
    assert got.org.id == org.id


async def test_a_platform_admin_is_not_bound_to_an_active_org(api: Api) -> None:
    """A platform admin acts on any org, with no active org or another one
    (the API key, which has no session at all, is in test_org_roles)."""
    org, owner = await org_with_owner(api)
    admin_token = await api.admin_token()
    admin_id = (
        await api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=admin_token))
    ).session.user_id
    own, admin_owner = await _admins_own_org(api, admin_token)
    for md in (bearer(admin_token), admin_owner.md):
        got = await api.orgs.GetOrg(orgs_pb2.GetOrgRequest(org_slug=org.slug), metadata=md)
        assert got.org.id == org.id
    await api.orgs.AddMember(
        orgs_pb2.AddMemberRequest(org_id=org.id, user_id=admin_id), metadata=admin_owner.md
    )
    assert (await members_of(api, org.id))[admin_id] == MEMBER
    assert own.id != org.id
    assert owner.id != admin_id


async def _admins_own_org(api: Api, admin_token: str) -> tuple[Any, OrgUser]:
    """An org the platform admin owns, active in a new session of theirs."""
    who = await api.auth.Authenticate(auth_pb2.AuthenticateRequest(access_token=admin_token))
    org = (
        await api.orgs.CreateOrg(
            orgs_pb2.CreateOrgRequest(slug=new_slug(), name="Admin's"),
            metadata=bearer(admin_token),
        )
    ).org
    signed = await api.auth.SignInWithPassword(
        auth_pb2.SignInWithPasswordRequest(email=who.session.email, password=PASSWORD)
    )
    remember(signed.result.tokens.access_token, signed.result.tokens.refresh_token)
    tokens = await set_active_org(api, signed.result.tokens.refresh_token, org.id)
    user = resources_pb2.User(id=who.session.user_id, email=who.session.email)
    return org, OrgUser(user, tokens)

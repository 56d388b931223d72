"""The org role table, cell by cell, and the last-owner rule.

``TABLE`` below is the role table of OrgService (orgs.proto) as data, one row
per action and one column per caller: a member, an admin and an owner of the
org (each through a session whose active org it is), a platform admin's token
(no active org) and the service API key. Each cell is a test of its own on a
fresh org: an allowed call must have its effect; a refused one must fail with
PERMISSION_DENIED and change nothing. ``test_the_table_is_the_documented_one``
holds the member/admin/owner columns to the table in the proto comment.

The last owner can neither be removed nor demoted (LAST_OWNER), also by
leaving, and also when two owners demote or remove each other at the same
moment on real Postgres (the row lock on the org serializes them).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from authsvc_client.errors import from_rpc_error
from authsvc_client.v1 import auth_pb2, orgs_pb2, orgs_pb2_grpc, resources_pb2
from tests.app import (
    Api,
    OrgRole,
    OrgUser,
    bearer,
    claims,
    members_of,
    org_member,
    org_with_owner,
    refused,
    remember,
    service,
    set_active_org,
    who,
)

OWNER = resources_pb2.ORG_ROLE_OWNER
ADMIN = resources_pb2.ORG_ROLE_ADMIN
MEMBER = resources_pb2.ORG_ROLE_MEMBER

PD = (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
LAST_OWNER = (grpc.StatusCode.FAILED_PRECONDITION, "LAST_OWNER")
ORG_NOT_FOUND = (grpc.StatusCode.NOT_FOUND, "ORG_NOT_FOUND")

Metadata = tuple[tuple[str, str], ...]


@dataclass
class Cast:
    """An org with two of each role, an outsider to add, and the callers."""

    org: Any
    owner: OrgUser
    owner2: OrgUser
    admin: OrgUser
    admin2: OrgUser
    member: OrgUser
    member2: OrgUser
    outsider: Any  # resources_pb2.User
    platform_admin: str  # access token, no active org

    @classmethod
    async def make(cls, api: Api) -> Cast:
        org, owner = await org_with_owner(api)
        return cls(
            org=org,
            owner=owner,
            owner2=await org_member(api, org.id, OWNER),
            admin=await org_member(api, org.id, ADMIN),
            admin2=await org_member(api, org.id, ADMIN),
            member=await org_member(api, org.id, MEMBER),
            member2=await org_member(api, org.id, MEMBER),
            outsider=(await api.sign_up()).user,
            platform_admin=await api.admin_token(),
        )

    def caller(self, name: str) -> tuple[Metadata, str]:
        """The metadata of a caller and their user id ("" for the API key)."""
        if name == "platform_admin":
            return bearer(self.platform_admin), ""
        if name == "api_key":
            return service(), ""
        user: OrgUser = getattr(self, name)
        return user.md, user.id

    def roles(self) -> dict[str, OrgRole]:
        """Every member's role as the cast was made."""
        return {
            u.id: role
            for u, role in [
                (self.owner, OWNER),
                (self.owner2, OWNER),
                (self.admin, ADMIN),
                (self.admin2, ADMIN),
                (self.member, MEMBER),
                (self.member2, MEMBER),
            ]
        }


# An action starts its call from (api, cast, caller metadata, caller id), and
# proves its effect from (api, cast, response, caller id).
Call = Callable[[Api, Cast, Metadata, str], Any]
Effect = Callable[[Api, Cast, Any, str], Awaitable[None]]


@dataclass(frozen=True)
class Action:
    row: str  # the row of the proto's table this action is an instance of
    call: Call
    effect: Effect


def _get_org(api: Api, c: Cast, md: Metadata, _: str) -> Any:
    return api.orgs.GetOrg(orgs_pb2.GetOrgRequest(org_id=c.org.id), metadata=md)


def _list_members(api: Api, c: Cast, md: Metadata, _: str) -> Any:
    return api.orgs.ListMembers(orgs_pb2.ListMembersRequest(org_id=c.org.id), metadata=md)


def _get_member(api: Api, c: Cast, md: Metadata, _: str) -> Any:
    return api.orgs.GetMember(
        orgs_pb2.GetMemberRequest(org_id=c.org.id, user_id=c.member2.id), metadata=md
    )


def _update_org(api: Api, c: Cast, md: Metadata, _: str) -> Any:
    return api.orgs.UpdateOrg(
        orgs_pb2.UpdateOrgRequest(
            org_id=c.org.id,
            values=resources_pb2.Org(name="Renamed"),
            update_mask=FieldMask(paths=["name"]),
        ),
        metadata=md,
    )


def _delete_org(api: Api, c: Cast, md: Metadata, _: str) -> Any:
    return api.orgs.DeleteOrg(orgs_pb2.DeleteOrgRequest(org_id=c.org.id, force=True), metadata=md)


def _add(role: OrgRole) -> Call:
    def call(api: Api, c: Cast, md: Metadata, _: str) -> Any:
        return api.orgs.AddMember(
            orgs_pb2.AddMemberRequest(org_id=c.org.id, user_id=c.outsider.id, role=role),
            metadata=md,
        )

    return call


def _set_role(target: str, role: OrgRole) -> Call:
    def call(api: Api, c: Cast, md: Metadata, _: str) -> Any:
        user: OrgUser = getattr(c, target)
        return api.orgs.UpdateMember(
            orgs_pb2.UpdateMemberRequest(org_id=c.org.id, user_id=user.id, role=role),
            metadata=md,
        )

    return call


def _remove(target: str) -> Call:
    def call(api: Api, c: Cast, md: Metadata, caller_id: str) -> Any:
        user_id = caller_id if target == "self" else getattr(c, target).id
        return api.orgs.RemoveMember(
            orgs_pb2.RemoveMemberRequest(org_id=c.org.id, user_id=user_id), metadata=md
        )

    return call


# -- effects ---------------------------------------------------------------------


async def _read_org(api: Api, c: Cast, response: Any, _: str) -> None:
    assert response.org == c.org


async def _listed_members(api: Api, c: Cast, response: Any, _: str) -> None:
    assert {m.user_id: m.role for m in response.members} == c.roles()


async def _got_member(api: Api, c: Cast, response: Any, _: str) -> None:
    assert (response.member.user_id, response.member.role) == (c.member2.id, MEMBER)


async def _renamed(api: Api, c: Cast, response: Any, _: str) -> None:
    got = await api.orgs.GetOrg(orgs_pb2.GetOrgRequest(org_id=c.org.id), metadata=service())
    assert got.org.name == "Renamed"


async def _deleted(api: Api, c: Cast, response: Any, _: str) -> None:
    await refused(
        api,
        lambda: api.orgs.GetOrg(orgs_pb2.GetOrgRequest(org_id=c.org.id), metadata=service()),
        *ORG_NOT_FOUND,
    )


def _now(changes: Callable[[Cast, str], dict[str, OrgRole | None]]) -> Effect:
    """The members are the cast's, changed as ``changes`` says (None: gone)."""

    async def effect(api: Api, c: Cast, response: Any, caller_id: str) -> None:
        want: dict[str, OrgRole | None] = {**c.roles(), **changes(c, caller_id)}
        assert await members_of(api, c.org.id) == {k: v for k, v in want.items() if v is not None}

    return effect


READ = "read the org, its members, one member"
LEAVE = "leave the org (remove oneself)"
UPDATE = "update the org's name or slug"
ADD = "add a member or admin"
REROLE = "change a role between member and admin"
REMOVE = "remove a member or admin"
OWNERS = "add an owner, make or unmake an owner"
REMOVE_OWNER = "remove an owner"
DELETE = "delete the org"

ACTIONS: dict[str, Action] = {
    "read-org": Action(READ, _get_org, _read_org),
    "list-members": Action(READ, _list_members, _listed_members),
    "get-member": Action(READ, _get_member, _got_member),
    "leave": Action(LEAVE, _remove("self"), _now(lambda c, me: {me: None})),
    "update-org": Action(UPDATE, _update_org, _renamed),
    "add-member": Action(ADD, _add(MEMBER), _now(lambda c, _: {c.outsider.id: MEMBER})),
    "add-admin": Action(ADD, _add(ADMIN), _now(lambda c, _: {c.outsider.id: ADMIN})),
    "member-to-admin": Action(
        REROLE, _set_role("member2", ADMIN), _now(lambda c, _: {c.member2.id: ADMIN})
    ),
    "admin-to-member": Action(
        REROLE, _set_role("admin2", MEMBER), _now(lambda c, _: {c.admin2.id: MEMBER})
    ),
    "remove-member": Action(REMOVE, _remove("member2"), _now(lambda c, _: {c.member2.id: None})),
    "remove-admin": Action(REMOVE, _remove("admin2"), _now(lambda c, _: {c.admin2.id: None})),
    "add-owner": Action(OWNERS, _add(OWNER), _now(lambda c, _: {c.outsider.id: OWNER})),
    "make-owner": Action(
        OWNERS, _set_role("member2", OWNER), _now(lambda c, _: {c.member2.id: OWNER})
    ),
    "make-admin-owner": Action(
        OWNERS, _set_role("admin2", OWNER), _now(lambda c, _: {c.admin2.id: OWNER})
    ),
    "unmake-owner": Action(
        OWNERS, _set_role("owner2", ADMIN), _now(lambda c, _: {c.owner2.id: ADMIN})
    ),
    "owner-to-member": Action(
        OWNERS, _set_role("owner2", MEMBER), _now(lambda c, _: {c.owner2.id: MEMBER})
    ),
    "remove-owner": Action(REMOVE_OWNER, _remove("owner2"), _now(lambda c, _: {c.owner2.id: None})),
    "delete-org": Action(DELETE, _delete_org, _deleted),
}

CALLERS = ("member", "admin", "owner", "platform_admin", "api_key")
Y, N = True, False
NA = None  # the platform admin and the API key are not members: nothing to leave

# action           member admin owner platform_admin api_key
TABLE: dict[str, tuple[bool | None, ...]] = {
    "read-org": (Y, Y, Y, Y, Y),
    "list-members": (Y, Y, Y, Y, Y),
    "get-member": (Y, Y, Y, Y, Y),
    "leave": (Y, Y, Y, NA, NA),
    "update-org": (N, Y, Y, Y, Y),
    "add-member": (N, Y, Y, Y, Y),
    "add-admin": (N, Y, Y, Y, Y),
    "member-to-admin": (N, Y, Y, Y, Y),
    "admin-to-member": (N, Y, Y, Y, Y),
    "remove-member": (N, Y, Y, Y, Y),
    "remove-admin": (N, Y, Y, Y, Y),
    "add-owner": (N, N, Y, Y, Y),
    "make-owner": (N, N, Y, Y, Y),
    "make-admin-owner": (N, N, Y, Y, Y),
    "unmake-owner": (N, N, Y, Y, Y),
    "owner-to-member": (N, N, Y, Y, Y),
    "remove-owner": (N, N, Y, Y, Y),
    "delete-org": (N, N, Y, Y, Y),
}

CELLS = [
    pytest.param(action, caller, allowed, id=f"{action}-by-{caller}")
    for action, row in TABLE.items()
    for caller, allowed in zip(CALLERS, row, strict=True)
    if allowed is not None
]


def test_every_action_is_in_the_table() -> None:
    assert set(TABLE) == set(ACTIONS)


def _documented_table() -> dict[str, tuple[bool, bool, bool]]:
    """The role table of the OrgService comment in orgs.proto."""
    proto = Path(__file__).resolve().parent.parent / "protos/authsvc/v1/orgs.proto"
    rows: dict[str, tuple[bool, bool, bool]] = {}
    for line in proto.read_text().splitlines():
        match = re.fullmatch(r"\s*//\s*\|(.+)\|(.+)\|(.+)\|(.+)\|\s*", line)
        if not match:
            continue
        action, *cells = (part.strip() for part in match.groups())
        if action == "action" or set(action) <= {"-"}:
            continue
        assert all(cell in ("yes", "no") for cell in cells), line
        rows[action] = (cells[0] == "yes", cells[1] == "yes", cells[2] == "yes")
    return rows


def test_the_table_is_the_documented_one() -> None:
    documented = _documented_table()
    assert len(documented) == 9, documented
    covered = {action.row for action in ACTIONS.values()}
    assert covered == set(documented), "an action of the proto's table is not tested"
    for name, action in ACTIONS.items():
        member, admin, owner = TABLE[name][:3]
        assert (member, admin, owner) == documented[action.row], name
        # A platform admin and an API key may do everything.
        assert all(cell in (Y, NA) for cell in TABLE[name][3:]), name


@pytest.mark.parametrize(("action", "caller", "allowed"), CELLS)
async def test_role_table_cell(api: Api, action: str, caller: str, allowed: bool) -> None:
    cast_ = await Cast.make(api)
    md, caller_id = cast_.caller(caller)
    spec = ACTIONS[action]
    if allowed:
        response = await spec.call(api, cast_, md, caller_id)
        await spec.effect(api, cast_, response, caller_id)
    else:
        await refused(api, lambda: spec.call(api, cast_, md, caller_id), *PD)
        assert await members_of(api, cast_.org.id) == cast_.roles()


# -- the last owner ----------------------------------------------------------------


def _update_member(api: Api, md: Metadata, org_id: str, user_id: str, role: OrgRole) -> Any:
    return api.orgs.UpdateMember(
        orgs_pb2.UpdateMemberRequest(org_id=org_id, user_id=user_id, role=role), metadata=md
    )


def _remove_member(api: Api, md: Metadata, org_id: str, user_id: str) -> Any:
    return api.orgs.RemoveMember(
        orgs_pb2.RemoveMemberRequest(org_id=org_id, user_id=user_id), metadata=md
    )


async def test_the_last_owner_can_be_neither_removed_nor_demoted(api: Api) -> None:
    org, owner = await org_with_owner(api)
    admin = await org_member(api, org.id, ADMIN)
    platform_admin = await api.admin_token()
    for md in (owner.md, bearer(platform_admin), service()):
        for role in (ADMIN, MEMBER):
            await refused(
                api, partial(_update_member, api, md, org.id, owner.id, role), *LAST_OWNER
            )
        # For the owner's own token this is leaving as the last owner.
        await refused(api, partial(_remove_member, api, md, org.id, owner.id), *LAST_OWNER)
    assert await members_of(api, org.id) == {owner.id: OWNER, admin.id: ADMIN}

    # Staying owner is no demotion.
    kept = await _update_member(api, owner.md, org.id, owner.id, OWNER)
    assert kept.member.role == OWNER

    # With a second owner the first may step down; then the second is the last.
    await _update_member(api, owner.md, org.id, admin.id, OWNER)
    await _update_member(api, owner.md, org.id, owner.id, MEMBER)
    assert await members_of(api, org.id) == {owner.id: MEMBER, admin.id: OWNER}
    await refused(api, lambda: _update_member(api, admin.md, org.id, admin.id, ADMIN), *LAST_OWNER)
    await refused(api, lambda: _remove_member(api, admin.md, org.id, admin.id), *LAST_OWNER)
    await refused(api, lambda: _remove_member(api, service(), org.id, admin.id), *LAST_OWNER)
    # Leaving works once another owner exists.
    await _update_member(api, admin.md, org.id, owner.id, OWNER)
    await _remove_member(api, admin.md, org.id, admin.id)
    assert await members_of(api, org.id) == {owner.id: OWNER}


# -- the last-owner race on real Postgres -------------------------------------------

ROUNDS = 20


def postgres_only(test: Any) -> Any:
    """Runs ``test`` on the postgres backend only (the row lock is Postgres')."""
    test = pytest.mark.parametrize("backend", ["postgres"], indirect=True)(test)
    return pytest.mark.redis(pytest.mark.postgres(test))


async def _warm_pool(api: Api) -> None:
    """Opens as many database connections as the pool keeps, so the racing
    transactions really run side by side instead of queueing for a connect."""
    pool: Any = api.server.core.db.engine.pool
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(pool.size()):
            tx = await stack.enter_async_context(api.server.core.db.reader())
            await tx.ping()


@contextlib.asynccontextmanager
async def _two_channels(api: Api) -> Any:
    """Two stubs on connections of their own, connected before any call."""
    channels = [
        grpc.aio.insecure_channel(api.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(2)
    ]
    try:
        await asyncio.gather(*(ch.channel_ready() for ch in channels))
        yield [cast(Any, orgs_pb2_grpc.OrgServiceStub(ch)) for ch in channels]
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))


def _outcomes(results: list[Any]) -> list[tuple[grpc.StatusCode, str]]:
    out = []
    for result in results:
        if isinstance(result, grpc.aio.AioRpcError):
            error = from_rpc_error(result)
            out.append((error.code, error.reason))
        elif isinstance(result, BaseException):
            raise result
        else:
            out.append((grpc.StatusCode.OK, ""))
    return out


async def _race(
    api: Api, calls: list[Callable[[Any], Awaitable[Any]]]
) -> list[tuple[grpc.StatusCode, str]]:
    async with _two_channels(api) as stubs:
        await _warm_pool(api)
        results = await asyncio.gather(
            *(call(stub) for call, stub in zip(calls, stubs, strict=True)), return_exceptions=True
        )
    return _outcomes(list(results))


def _one_won(outcomes: list[tuple[grpc.StatusCode, str]], losing: set[Any]) -> int:
    """Exactly one call succeeded and the other lost for an allowed reason;
    returns the index of the winner."""
    won = [i for i, outcome in enumerate(outcomes) if outcome[0] == grpc.StatusCode.OK]
    assert len(won) == 1, f"outcomes: {outcomes}"
    (loser,) = [o for o in outcomes if o[0] != grpc.StatusCode.OK]
    assert loser in losing, f"the loser failed with {loser}"
    return won[0]


async def _two_owners(api: Api) -> tuple[Any, OrgUser, OrgUser]:
    org, first = await org_with_owner(api)
    second = await org_member(api, org.id, OWNER)
    return org, first, second


def _owners(members: dict[str, OrgRole]) -> list[str]:
    return [user_id for user_id, role in members.items() if role == OWNER]


def _demote(org_id: str, user_id: str, md: Metadata) -> Callable[[Any], Awaitable[Any]]:
    return lambda stub: stub.UpdateMember(
        orgs_pb2.UpdateMemberRequest(org_id=org_id, user_id=user_id, role=ADMIN), metadata=md
    )


def _evict(org_id: str, user_id: str, md: Metadata) -> Callable[[Any], Awaitable[Any]]:
    return lambda stub: stub.RemoveMember(
        orgs_pb2.RemoveMemberRequest(org_id=org_id, user_id=user_id), metadata=md
    )


async def _back_in_as_owner(api: Api, org_id: str, user: OrgUser) -> None:
    """Adds a removed owner back and makes the org their session's active org."""
    await api.orgs.AddMember(
        orgs_pb2.AddMemberRequest(org_id=org_id, user_id=user.id, role=OWNER), metadata=service()
    )
    user.tokens = await set_active_org(api, user.tokens.refresh_token, org_id)


@postgres_only
async def test_two_owners_demoting_each_other_leave_one_owner(api: Api) -> None:
    org, first, second = await _two_owners(api)
    for _ in range(ROUNDS):
        outcomes = await _race(
            api,
            [_demote(org.id, second.id, first.md), _demote(org.id, first.id, second.md)],
        )
        # The loser is no longer an owner by the time its call is decided
        # (PERMISSION_DENIED), or its target is the last owner (LAST_OWNER).
        winner = _one_won(outcomes, {PD, LAST_OWNER})
        members = await members_of(api, org.id)
        assert _owners(members) == [(first, second)[winner].id]
        demoted = (second, first)[winner]
        assert members[demoted.id] == ADMIN
        await _update_member(api, service(), org.id, demoted.id, OWNER)


@postgres_only
async def test_demoting_both_owners_at_once_leaves_one_owner(api: Api) -> None:
    """The API key demotes both owners at the same moment: no permission check
    can decide this race, only the lock on the org."""
    org, first, second = await _two_owners(api)
    for _ in range(ROUNDS):
        outcomes = await _race(
            api, [_demote(org.id, first.id, service()), _demote(org.id, second.id, service())]
        )
        winner = _one_won(outcomes, {LAST_OWNER})
        demoted = (first, second)[winner]
        assert _owners(await members_of(api, org.id)) == [(second, first)[winner].id]
        await _update_member(api, service(), org.id, demoted.id, OWNER)


@postgres_only
async def test_two_owners_removing_each_other_leave_one_owner(api: Api) -> None:
    org, first, second = await _two_owners(api)
    for _ in range(ROUNDS):
        outcomes = await _race(
            api, [_evict(org.id, second.id, first.md), _evict(org.id, first.id, second.md)]
        )
        # The loser was removed first: its session has no active org any more
        # (ORG_MISMATCH), or it is refused as a non-owner, or as the last owner.
        winner = _one_won(
            outcomes, {PD, LAST_OWNER, (grpc.StatusCode.PERMISSION_DENIED, "ORG_MISMATCH")}
        )
        kept, removed = (first, second) if winner == 0 else (second, first)
        assert await members_of(api, org.id) == {kept.id: OWNER}
        # Back in, with the org active again on the removed owner's session.
        await _back_in_as_owner(api, org.id, removed)


@postgres_only
async def test_removing_both_owners_at_once_leaves_one_owner(api: Api) -> None:
    org, first, second = await _two_owners(api)
    for _ in range(ROUNDS):
        outcomes = await _race(
            api, [_evict(org.id, first.id, service()), _evict(org.id, second.id, service())]
        )
        winner = _one_won(outcomes, {LAST_OWNER})
        removed = (first, second)[winner]
        kept = (second, first)[winner]
        assert await members_of(api, org.id) == {kept.id: OWNER}
        await _back_in_as_owner(api, org.id, removed)


@postgres_only
async def test_a_switch_racing_the_removal_never_leaves_a_live_org_claim(api: Api) -> None:
    """SetActiveOrg reads the membership, then writes the session; RemoveMember
    deletes the membership, then clears and bumps the sessions. Run at the
    same moment, the switch either fails (MEMBER_NOT_FOUND) or its token is
    below the version the removal published, so no verifier honours it."""
    await _warm_pool(api)
    org, _ = await org_with_owner(api)
    switched = refused = 0
    # At least ROUNDS races, and on until a switch has got through: the checks
    # of a switched session below must have run, not only the refusals.
    while switched + refused < ROUNDS or (not switched and refused < 10 * ROUNDS):
        created = await api.sign_up()
        await api.orgs.AddMember(
            orgs_pb2.AddMemberRequest(org_id=org.id, user_id=created.user.id), metadata=service()
        )
        switch, removal = await asyncio.gather(
            api.auth.SetActiveOrg(
                auth_pb2.SetActiveOrgRequest(
                    refresh_token=created.tokens.refresh_token, org_id=org.id
                )
            ),
            api.orgs.RemoveMember(
                orgs_pb2.RemoveMemberRequest(org_id=org.id, user_id=created.user.id),
                metadata=service(),
            ),
            return_exceptions=True,
        )
        assert not isinstance(removal, BaseException), removal
        if isinstance(switch, BaseException):
            assert isinstance(switch, grpc.aio.AioRpcError)
            assert from_rpc_error(switch).reason == "MEMBER_NOT_FOUND"
            refused += 1
            continue
        switched += 1
        remember(switch.tokens.access_token, switch.tokens.refresh_token)
        async with api.server.core.db.reader() as tx:
            session = await tx.sessions.get(uuid.UUID(switch.tokens.session_id))
        assert session is not None
        assert session.org_id is None
        assert claims(switch.tokens.access_token)["ver"] < session.claims_version
        assert (await who(api, switch.tokens.access_token)).org_id == ""
    print(f"\nswitch racing removal: {switched} switched, {refused} refused")
    assert switched, f"no switch got through in {refused} races: its checks never ran"

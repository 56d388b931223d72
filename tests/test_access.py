"""Every RPC against every kind of credential, each cell exact.

The API contract (``protos/authsvc/v1/options.proto``) says every authsvc
method declares exactly one ``(authsvc.v1.access)`` and that the server checks
the caller's credential against it before the handler runs; the README's
access table and the OrgService role table say who may do what. The walk
reads the methods and their declarations from the generated descriptors and
calls each one with each credential kind of ``tests/access_kinds.py``: one
test per cell (method x kind, on both backends): ``test_refused``,
``test_allowed_read`` or ``test_allowed``, by the cell's expected answer.

Each cell sends a VALID request: one that succeeds for a caller allowed to
make it, built on real objects (users, sessions, orgs, members). Each cell
expects one exact answer, derived from the declaration and the kind by
:func:`expected`: OK, or a gRPC code and an ErrorInfo reason. A refused call
must change no stored row (``refused``); an allowed one must have its effect
(each request's ``check``). A method added later without a request here
fails ``test_every_method_has_a_request``.

Public methods ignore a bearer (``options.proto``, ACCESS_PUBLIC: the
credential is in the request) and still check an API key. CompleteSignIn
answers PENDING_TOKEN_INVALID to every caller it admits: no sign-in issues a
challenge yet.

Stale tokens: the server has no TOKEN_STALE of its own (that is the sidecar's
answer, from WatchRevocations). A stale token still verifies, and the server
acts on the live session, user and membership ("Authenticate ... reports the
user's current role"; "the role is the one the membership holds now, not the
one in the token"). So a demoted platform admin's token gets exactly what a
plain user's gets, and a demoted org admin's token exactly what a member's
gets.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import json
import pkgutil
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

import authsvc_client.v1 as client_v1
from authsvc_client.v1 import (
    auth_pb2,
    options_pb2,
    orgs_pb2,
    resources_pb2,
    sessions_pb2,
    users_pb2,
)
from tests.access_kinds import (
    ADMIN as ORG_ADMIN,
)
from tests.access_kinds import (
    KIND,
    KINDS,
    MEMBER,
    OWNER,
    Caller,
    Kind,
    World,
    credential,
)
from tests.app import (
    PASSWORD,
    Api,
    OrgRole,
    OrgUser,
    bearer,
    claims,
    failure,
    members_of,
    new_slug,
    refused,
    remember,
    service,
    who,
)

PUBLIC = options_pb2.ACCESS_PUBLIC
USER = options_pb2.ACCESS_USER
SELF_OR_ADMIN = options_pb2.ACCESS_SELF_OR_ADMIN
ADMIN = options_pb2.ACCESS_ADMIN
ORG = options_pb2.ACCESS_ORG

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED

Metadata = tuple[tuple[str, str], ...]


def _services() -> list[ServiceDescriptor]:
    """Every service of every generated ``*_pb2`` module of authsvc_client.v1."""
    found: dict[str, ServiceDescriptor] = {}
    for module_info in pkgutil.iter_modules(client_v1.__path__):
        if not module_info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"{client_v1.__name__}.{module_info.name}")
        for svc in module.DESCRIPTOR.services_by_name.values():
            found[svc.full_name] = svc
    return [found[name] for name in sorted(found)]


def _methods() -> Iterator[tuple[ServiceDescriptor, MethodDescriptor]]:
    for svc in _services():
        for method in svc.methods:
            yield svc, method


def declared_access(method: MethodDescriptor) -> int:
    return int(method.GetOptions().Extensions[options_pb2.access])


def _path(svc: ServiceDescriptor, method: MethodDescriptor) -> str:
    return f"/{svc.full_name}/{method.name}"


def descriptor_methods() -> set[str]:
    return {_path(svc, method) for svc, method in _methods()}


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    reason: str

    def __str__(self) -> str:
        return f"{self.code.name}/{self.reason or '-'}"


OK = Outcome(grpc.StatusCode.OK, "")
NOT_AUTHENTICATED = Outcome(UNAUTHENTICATED, "NOT_AUTHENTICATED")
DENIED = Outcome(PERMISSION_DENIED, "PERMISSION_DENIED")
MISMATCH = Outcome(PERMISSION_DENIED, "ORG_MISMATCH")

# The lowest org role each org-scoped request below needs, from the role
# table of the README and orgs.proto (not from the server's REQUIRED_ROLE:
# this is the documented contract the server is held to).
ORG_NEEDS: dict[str, OrgRole] = {
    "GetOrg": MEMBER,  # read the org
    "UpdateOrg": ORG_ADMIN,  # update the org's name
    "DeleteOrg": OWNER,  # delete the org
    "AddMember": ORG_ADMIN,  # add a member
    "UpdateMember": ORG_ADMIN,  # change a role from member to admin
    "RemoveMember": ORG_ADMIN,  # remove a member (not oneself)
    "GetMember": MEMBER,  # read one member
    "ListMembers": MEMBER,  # read its members
}
RANK = {MEMBER: 1, ORG_ADMIN: 2, OWNER: 3}


# What a public method answers a caller it admits, when not OK: no sign-in
# answers a challenge yet, so no pending token is valid.
PUBLIC_ANSWERS: dict[str, Outcome] = {
    "CompleteSignIn": Outcome(UNAUTHENTICATED, "PENDING_TOKEN_INVALID"),
}


def expected(access: int, method: str, kind: Kind) -> Outcome:
    """The one answer the contract allows for this method and credential."""
    if kind.fails_with and (access != PUBLIC or kind.api_key_checked):
        # Every credential sent is checked before the request is read (an
        # API key does not excuse a bad token), except a bearer on a public
        # method, which is ignored: there the credential is in the request.
        return Outcome(UNAUTHENTICATED, kind.fails_with)
    if access == PUBLIC:
        return PUBLIC_ANSWERS.get(method, OK)
    if access == USER:
        # A user's access token; an API key alone is not a user.
        return OK if kind.token else NOT_AUTHENTICATED
    if not (kind.token or kind.service):
        return NOT_AUTHENTICATED
    if kind.service or kind.platform_admin:
        # "an admin token or x-api-key for anyone's" / "for any org".
        return OK
    # A user's own token, not a platform admin's (as the server sees it now).
    if access == ADMIN:
        return DENIED
    if access == SELF_OR_ADMIN:
        return OK if kind.own else DENIED
    if access == ORG:
        # The org named must be the session's active one, decided before any
        # lookup; then the live role must be high enough.
        if kind.org_role is None or not kind.own:
            return MISMATCH
        return OK if RANK[kind.org_role] >= RANK[ORG_NEEDS[method]] else DENIED
    raise AssertionError(f"unknown access {access}")


# -- the requests ------------------------------------------------------------------

Check = Callable[[Any], Awaitable[None]]


@dataclass
class Prepared:
    """A request, and how to see that it took effect."""

    request: Message
    check: Check


Build = Callable[[World, Caller], Awaitable[Prepared]]
REQUESTS: dict[str, Build] = {}


def request(path: str) -> Callable[[Build], Build]:
    def register(build: Build) -> Build:
        REQUESTS[path] = build
        return build

    return register


async def _target_user(w: World, c: Caller) -> OrgUser:
    """Whom a request about a user names: the caller, or another user."""
    if c.own:
        assert c.user is not None
        return c.user
    return await w.victim()


async def _revoked(api: Api, token: str) -> None:
    error = await failure(who(api, token))
    assert (error.code, error.reason) == (UNAUTHENTICATED, "SESSION_REVOKED")


# AuthService


@request("/authsvc.v1.AuthService/SignUp")
async def _sign_up(w: World, c: Caller) -> Prepared:
    email = f"new-{uuid.uuid4().hex[:12]}@example.com"

    async def check(r: Any) -> None:
        tokens = r.result.tokens
        remember(tokens.access_token, tokens.refresh_token)
        assert r.result.user.email == email
        assert (await who(w.api, tokens.access_token)).user_id == r.result.user.id

    return Prepared(auth_pb2.SignUpRequest(email=email, password=PASSWORD), check)


@request("/authsvc.v1.AuthService/SignInWithPassword")
async def _sign_in(w: World, c: Caller) -> Prepared:
    victim = await w.victim()

    async def check(r: Any) -> None:
        tokens = r.result.tokens
        remember(tokens.access_token, tokens.refresh_token)
        assert r.result.user.id == victim.id
        seen = await who(w.api, tokens.access_token)
        assert (seen.user_id, seen.session_id) == (victim.id, tokens.session_id)

    req = auth_pb2.SignInWithPasswordRequest(email=victim.user.email, password=PASSWORD)
    return Prepared(req, check)


@request("/authsvc.v1.AuthService/CompleteSignIn")
async def _complete_sign_in(w: World, c: Caller) -> Prepared:
    # A well-formed request; no pending token is valid yet (PUBLIC_ANSWERS).
    pending = f"pt_{uuid.uuid4().hex}{uuid.uuid4().hex}"
    remember(pending)

    async def check(r: Any) -> None:
        raise AssertionError("no sign-in is pending, yet CompleteSignIn succeeded")

    return Prepared(auth_pb2.CompleteSignInRequest(pending_token=pending), check)


@request("/authsvc.v1.AuthService/RefreshToken")
async def _refresh(w: World, c: Caller) -> Prepared:
    victim = await w.victim()

    async def check(r: Any) -> None:
        remember(r.tokens.access_token, r.tokens.refresh_token)
        assert r.tokens.refresh_token != victim.tokens.refresh_token
        assert r.tokens.session_id == victim.tokens.session_id
        assert (await who(w.api, r.tokens.access_token)).user_id == victim.id

    return Prepared(auth_pb2.RefreshTokenRequest(refresh_token=victim.tokens.refresh_token), check)


@request("/authsvc.v1.AuthService/SignOut")
async def _sign_out(w: World, c: Caller) -> Prepared:
    async def check(r: Any) -> None:
        assert c.user is not None
        await _revoked(w.api, c.user.token)

    return Prepared(auth_pb2.SignOutRequest(), check)


@request("/authsvc.v1.AuthService/Authenticate")
async def _authenticate(w: World, c: Caller) -> Prepared:
    victim = await w.victim()

    async def check(r: Any) -> None:
        assert (r.session.user_id, r.session.session_id) == (victim.id, victim.tokens.session_id)

    return Prepared(auth_pb2.AuthenticateRequest(access_token=victim.token), check)


@request("/authsvc.v1.AuthService/GetJwks")
async def _jwks(w: World, c: Caller) -> Prepared:
    async def check(r: Any) -> None:
        assert w.api.server.core.keys.active.kid in {k.kid for k in r.keys}

    return Prepared(auth_pb2.GetJwksRequest(), check)


@request("/authsvc.v1.AuthService/SetActiveOrg")
async def _set_active_org(w: World, c: Caller) -> Prepared:
    victim = await w.victim()
    org = await w.victim_org()

    async def check(r: Any) -> None:
        remember(r.tokens.access_token, r.tokens.refresh_token)
        assert claims(r.tokens.access_token)["org_id"] == org.id
        assert (await who(w.api, r.tokens.access_token)).org_role == OWNER

    req = auth_pb2.SetActiveOrgRequest(refresh_token=victim.tokens.refresh_token, org_id=org.id)
    return Prepared(req, check)


@request("/authsvc.v1.AuthService/WatchRevocations")
async def _watch(w: World, c: Caller) -> Prepared:
    async def check(r: Any) -> None:
        # The first response of a watch from now: no replay, a position.
        assert not r.revocations
        assert r.position
        assert r.retention_seconds > 0

    return Prepared(auth_pb2.WatchRevocationsRequest(after=""), check)


# UserService


@request("/authsvc.v1.UserService/GetUser")
async def _get_user(w: World, c: Caller) -> Prepared:
    target = await _target_user(w, c)

    async def check(r: Any) -> None:
        assert r.user.id == target.id

    return Prepared(users_pb2.GetUserRequest(user_id=target.id), check)


@request("/authsvc.v1.UserService/GetCurrentUser")
async def _get_current_user(w: World, c: Caller) -> Prepared:
    async def check(r: Any) -> None:
        assert c.user is not None
        assert r.user.id == c.user.id

    return Prepared(users_pb2.GetCurrentUserRequest(), check)


async def _user_ids(api: Api) -> set[str]:
    return {str(row[0]) for row in (await api.snapshot())["users"]}


@request("/authsvc.v1.UserService/ListUsers")
async def _list_users(w: World, c: Caller) -> Prepared:
    await w.victim()

    async def check(r: Any) -> None:
        assert {u.id for u in r.users} == await _user_ids(w.api)

    return Prepared(users_pb2.ListUsersRequest(page_size=500), check)


@request("/authsvc.v1.UserService/UpdateUser")
async def _update_user(w: World, c: Caller) -> Prepared:
    target = await _target_user(w, c)

    async def check(r: Any) -> None:
        assert r.user.display_name == "Renamed"
        got = await w.api.users.GetUser(
            users_pb2.GetUserRequest(user_id=target.id), metadata=service()
        )
        assert got.user.display_name == "Renamed"

    req = users_pb2.UpdateUserRequest(
        user=resources_pb2.User(id=target.id, display_name="Renamed"),
        update_mask=FieldMask(paths=["display_name"]),
    )
    return Prepared(req, check)


@request("/authsvc.v1.UserService/SetUserRole")
async def _set_user_role(w: World, c: Caller) -> Prepared:
    victim = await w.victim()

    async def check(r: Any) -> None:
        assert (r.user.id, r.user.role) == (victim.id, resources_pb2.ROLE_ADMIN)
        got = await w.api.users.GetUser(
            users_pb2.GetUserRequest(user_id=victim.id), metadata=service()
        )
        assert got.user.role == resources_pb2.ROLE_ADMIN
        # At the user's next Authenticate, not at token expiry.
        assert (await who(w.api, victim.token)).role == resources_pb2.ROLE_ADMIN

    req = users_pb2.SetUserRoleRequest(user_id=victim.id, role=resources_pb2.ROLE_ADMIN)
    return Prepared(req, check)


@request("/authsvc.v1.UserService/SetUserEmail")
async def _set_user_email(w: World, c: Caller) -> Prepared:
    victim = await w.victim()
    email = f"moved-{uuid.uuid4().hex[:12]}@example.com"

    async def check(r: Any) -> None:
        assert (r.user.id, r.user.email) == (victim.id, email)
        got = await w.api.users.GetUser(
            users_pb2.GetUserRequest(user_id=victim.id), metadata=service()
        )
        assert got.user.email == email
        assert (await who(w.api, victim.token)).email == email

    return Prepared(users_pb2.SetUserEmailRequest(user_id=victim.id, email=email), check)


@request("/authsvc.v1.UserService/DeleteUser")
async def _delete_user(w: World, c: Caller) -> Prepared:
    victim = await w.victim()

    async def check(r: Any) -> None:
        error = await failure(
            w.api.users.GetUser(users_pb2.GetUserRequest(user_id=victim.id), metadata=service())
        )
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")
        await _revoked(w.api, victim.token)

    return Prepared(users_pb2.DeleteUserRequest(user_id=victim.id), check)


@request("/authsvc.v1.UserService/CountUsers")
async def _count_users(w: World, c: Caller) -> Prepared:
    await w.victim()

    async def check(r: Any) -> None:
        assert r.count == len(await _user_ids(w.api))

    return Prepared(users_pb2.CountUsersRequest(), check)


# SessionService


@request("/authsvc.v1.SessionService/ListSessions")
async def _list_sessions(w: World, c: Caller) -> Prepared:
    target = await _target_user(w, c)

    async def check(r: Any) -> None:
        assert target.tokens.session_id in {s.id for s in r.sessions}
        assert {s.user_id for s in r.sessions} == {target.id}

    return Prepared(sessions_pb2.ListSessionsRequest(user_id=target.id), check)


@request("/authsvc.v1.SessionService/RevokeSession")
async def _revoke_session(w: World, c: Caller) -> Prepared:
    target = await _target_user(w, c)

    async def check(r: Any) -> None:
        await _revoked(w.api, target.token)

    return Prepared(sessions_pb2.RevokeSessionRequest(session_id=target.tokens.session_id), check)


@request("/authsvc.v1.SessionService/RevokeAllSessions")
async def _revoke_all(w: World, c: Caller) -> Prepared:
    target = await _target_user(w, c)

    async def check(r: Any) -> None:
        assert r.revoked_count >= 1
        await _revoked(w.api, target.token)

    return Prepared(sessions_pb2.RevokeAllSessionsRequest(user_id=target.id), check)


# OrgService: requests about users


@request("/authsvc.v1.OrgService/CreateOrg")
async def _create_org(w: World, c: Caller) -> Prepared:
    target = await _target_user(w, c)
    slug = new_slug("walk")

    async def check(r: Any) -> None:
        assert r.org.slug == slug
        assert await members_of(w.api, r.org.id) == {target.id: OWNER}

    req = orgs_pb2.CreateOrgRequest(slug=slug, name="Walked", owner_user_id=target.id)
    return Prepared(req, check)


@request("/authsvc.v1.OrgService/ListOrgs")
async def _list_orgs(w: World, c: Caller) -> Prepared:
    target = await _target_user(w, c)

    async def check(r: Any) -> None:
        assert {o.id for o in r.orgs} == w.orgs_of.get(target.id, set())

    return Prepared(orgs_pb2.ListOrgsRequest(user_id=target.id), check)


# OrgService: org-scoped requests, about org A (the caller's own) or B


@request("/authsvc.v1.OrgService/GetOrg")
async def _get_org(w: World, c: Caller) -> Prepared:
    org = await w.org(c.letter)

    async def check(r: Any) -> None:
        assert (r.org.id, r.org.slug) == (org.id, org.slug)

    return Prepared(orgs_pb2.GetOrgRequest(org_id=org.id), check)


@request("/authsvc.v1.OrgService/UpdateOrg")
async def _update_org(w: World, c: Caller) -> Prepared:
    org = await w.org(c.letter)

    async def check(r: Any) -> None:
        got = await w.api.orgs.GetOrg(orgs_pb2.GetOrgRequest(org_id=org.id), metadata=service())
        assert got.org.name == r.org.name == "Renamed"

    req = orgs_pb2.UpdateOrgRequest(
        org_id=org.id,
        values=resources_pb2.Org(name="Renamed"),
        update_mask=FieldMask(paths=["name"]),
    )
    return Prepared(req, check)


@request("/authsvc.v1.OrgService/DeleteOrg")
async def _delete_org(w: World, c: Caller) -> Prepared:
    org = await w.org(c.letter)

    async def check(r: Any) -> None:
        error = await failure(
            w.api.orgs.GetOrg(orgs_pb2.GetOrgRequest(org_id=org.id), metadata=service())
        )
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "ORG_NOT_FOUND")
        # Its members' sessions lost it as their active org.
        owner = await w.in_org(c.letter, OWNER)
        assert (await who(w.api, owner.token)).org_id == ""

    # With force: the org has members besides the caller (AIP-135).
    return Prepared(orgs_pb2.DeleteOrgRequest(org_id=org.id, force=True), check)


@request("/authsvc.v1.OrgService/AddMember")
async def _add_member(w: World, c: Caller) -> Prepared:
    org = await w.org(c.letter)
    outsider = await w.outsider()

    async def check(r: Any) -> None:
        assert await members_of(w.api, org.id) == {**w.members[org.id], outsider.id: MEMBER}

    req = orgs_pb2.AddMemberRequest(org_id=org.id, user_id=outsider.id, role=MEMBER)
    return Prepared(req, check)


@request("/authsvc.v1.OrgService/UpdateMember")
async def _update_member(w: World, c: Caller) -> Prepared:
    org = await w.org(c.letter)
    spare = await w.spare(c.letter)

    async def check(r: Any) -> None:
        assert r.member.role == ORG_ADMIN
        assert await members_of(w.api, org.id) == {**w.members[org.id], spare.id: ORG_ADMIN}

    req = orgs_pb2.UpdateMemberRequest(org_id=org.id, user_id=spare.id, role=ORG_ADMIN)
    return Prepared(req, check)


@request("/authsvc.v1.OrgService/RemoveMember")
async def _remove_member(w: World, c: Caller) -> Prepared:
    org = await w.org(c.letter)
    spare = await w.spare(c.letter)

    async def check(r: Any) -> None:
        left = {u: role for u, role in w.members[org.id].items() if u != spare.id}
        assert await members_of(w.api, org.id) == left

    return Prepared(orgs_pb2.RemoveMemberRequest(org_id=org.id, user_id=spare.id), check)


@request("/authsvc.v1.OrgService/GetMember")
async def _get_member(w: World, c: Caller) -> Prepared:
    org = await w.org(c.letter)
    spare = await w.spare(c.letter)

    async def check(r: Any) -> None:
        assert (r.member.org_id, r.member.user_id, r.member.role) == (org.id, spare.id, MEMBER)

    return Prepared(orgs_pb2.GetMemberRequest(org_id=org.id, user_id=spare.id), check)


@request("/authsvc.v1.OrgService/ListMembers")
async def _list_members(w: World, c: Caller) -> Prepared:
    org = await w.org(c.letter)
    await w.spare(c.letter)

    async def check(r: Any) -> None:
        assert {m.user_id: m.role for m in r.members} == w.members[org.id]

    return Prepared(orgs_pb2.ListMembersRequest(org_id=org.id), check)


async def invoke(api: Api, method: MethodDescriptor, req: Message, md: Metadata | None) -> Any:
    """Calls ``method`` by its path; a server stream answers with its first response."""
    assert req.DESCRIPTOR is method.input_type, method.full_name
    path = f"/{method.containing_service.full_name}/{method.name}"
    kwargs: Any = {
        "request_serializer": type(req).SerializeToString,
        "response_deserializer": GetMessageClass(method.output_type).FromString,
    }
    if not method.server_streaming:
        return await api.channel.unary_unary(path, **kwargs)(req, metadata=md, timeout=30)
    call = api.channel.unary_stream(path, **kwargs)(req, metadata=md, timeout=30)
    try:
        first = await asyncio.wait_for(call.read(), timeout=10)
    finally:
        call.cancel()
    assert first is not grpc.aio.EOF, f"{path} ended without a response"
    return first


# -- the tests ---------------------------------------------------------------------


def test_every_method_declares_an_access() -> None:
    methods = list(_methods())
    assert methods, "no services found in authsvc_client.v1"
    undeclared = [_path(s, m) for s, m in methods if declared_access(m) == 0]
    assert not undeclared, f"methods without (authsvc.v1.access): {undeclared}"
    known = set(options_pb2.Access.values()) - {options_pb2.ACCESS_UNSPECIFIED}
    unknown = [_path(s, m) for s, m in methods if declared_access(m) not in known]
    assert not unknown, f"methods with an access value the proto does not define: {unknown}"


def test_the_walk_sees_the_known_services_and_what_the_server_serves() -> None:
    from authsvc.api.access import access_table
    from authsvc.app import SERVICES

    names = {svc.full_name for svc in _services()}
    assert {
        "authsvc.v1.AuthService",
        "authsvc.v1.UserService",
        "authsvc.v1.SessionService",
        "authsvc.v1.OrgService",
    } <= names
    # The server's own table holds exactly the methods of the descriptors.
    assert set(access_table(SERVICES)) == descriptor_methods()


def test_every_method_has_a_request() -> None:
    """The walk covers every method: a new one needs a valid request here (and,
    if org-scoped, the role it needs)."""
    assert set(REQUESTS) == descriptor_methods(), sorted(set(REQUESTS) ^ descriptor_methods())
    org_scoped = {m.name for _, m in _methods() if declared_access(m) == ORG}
    assert set(ORG_NEEDS) == org_scoped
    assert descriptor_methods() >= READS


def test_expected_answers_of_some_cells_spelled_out() -> None:
    """A few cells of ``expected`` written out by hand, from the README, so a
    slip in its rules cannot go unnoticed by agreeing with the server."""
    cells = {
        ("SignUp", "none"): OK,
        # A bearer on a public method is ignored; an API key is checked.
        ("GetJwks", "revoked"): OK,
        ("SetActiveOrg", "expired"): OK,
        ("RefreshToken", "api_key_malformed"): OK,
        ("SignUp", "bad_api_key"): Outcome(UNAUTHENTICATED, "API_KEY_INVALID"),
        ("SignInWithPassword", "bad_api_key"): Outcome(UNAUTHENTICATED, "API_KEY_INVALID"),
        ("CompleteSignIn", "none"): Outcome(UNAUTHENTICATED, "PENDING_TOKEN_INVALID"),
        ("CompleteSignIn", "malformed"): Outcome(UNAUTHENTICATED, "PENDING_TOKEN_INVALID"),
        ("SetUserRole", "org_owner"): DENIED,
        ("SetUserRole", "user"): DENIED,
        ("SetUserEmail", "api_key"): OK,
        ("SetUserEmail", "stale_admin"): DENIED,
        ("SetUserEmail", "expired"): Outcome(UNAUTHENTICATED, "TOKEN_EXPIRED"),
        ("SignOut", "api_key"): NOT_AUTHENTICATED,
        ("SignOut", "api_key_user"): OK,
        ("CountUsers", "api_key_malformed"): Outcome(UNAUTHENTICATED, "TOKEN_INVALID"),
        ("CountUsers", "stale_admin"): DENIED,
        ("ListUsers", "org_owner"): DENIED,
        ("WatchRevocations", "api_key"): OK,
        ("GetUser", "user"): OK,
        ("GetUser", "user_other"): DENIED,
        ("RevokeSession", "org_admin_other"): DENIED,
        ("CreateOrg", "platform_admin"): OK,
        ("GetOrg", "user"): MISMATCH,
        ("GetOrg", "stale_admin"): MISMATCH,
        ("GetOrg", "org_member"): OK,
        ("GetOrg", "org_owner_other"): MISMATCH,
        ("UpdateOrg", "org_member"): DENIED,
        ("UpdateOrg", "stale_org_admin"): DENIED,
        ("UpdateOrg", "org_admin"): OK,
        ("DeleteOrg", "org_admin"): DENIED,
        ("DeleteOrg", "org_owner"): OK,
        ("DeleteOrg", "api_key"): OK,
        ("RemoveMember", "org_member"): DENIED,
        ("ListMembers", "none"): NOT_AUTHENTICATED,
        ("ListMembers", "bad_api_key"): Outcome(UNAUTHENTICATED, "API_KEY_INVALID"),
        ("AddMember", "foreign_key"): Outcome(UNAUTHENTICATED, "TOKEN_INVALID"),
    }
    by_name = {m.name: m for _, m in _methods()}
    for (name, kind), want in cells.items():
        got = expected(declared_access(by_name[name]), name, KIND[kind])
        assert got == want, (name, kind, str(got))


def test_declared_access_matches_the_documented_contract() -> None:
    """The access of each method as its proto comment documents it; a change of
    declaration must be a deliberate change of this table too."""
    documented = {
        "/authsvc.v1.AuthService/SignUp": PUBLIC,
        "/authsvc.v1.AuthService/SignInWithPassword": PUBLIC,
        "/authsvc.v1.AuthService/CompleteSignIn": PUBLIC,
        "/authsvc.v1.AuthService/RefreshToken": PUBLIC,
        "/authsvc.v1.AuthService/SignOut": USER,
        "/authsvc.v1.AuthService/Authenticate": PUBLIC,
        "/authsvc.v1.AuthService/GetJwks": PUBLIC,
        "/authsvc.v1.AuthService/SetActiveOrg": PUBLIC,
        "/authsvc.v1.AuthService/WatchRevocations": ADMIN,
        "/authsvc.v1.UserService/GetUser": SELF_OR_ADMIN,
        "/authsvc.v1.UserService/GetCurrentUser": USER,
        "/authsvc.v1.UserService/ListUsers": ADMIN,
        "/authsvc.v1.UserService/UpdateUser": SELF_OR_ADMIN,
        "/authsvc.v1.UserService/SetUserRole": ADMIN,
        "/authsvc.v1.UserService/SetUserEmail": ADMIN,
        "/authsvc.v1.UserService/DeleteUser": ADMIN,
        "/authsvc.v1.UserService/CountUsers": ADMIN,
        "/authsvc.v1.SessionService/ListSessions": SELF_OR_ADMIN,
        "/authsvc.v1.SessionService/RevokeSession": SELF_OR_ADMIN,
        "/authsvc.v1.SessionService/RevokeAllSessions": SELF_OR_ADMIN,
        "/authsvc.v1.OrgService/CreateOrg": SELF_OR_ADMIN,
        "/authsvc.v1.OrgService/GetOrg": ORG,
        "/authsvc.v1.OrgService/UpdateOrg": ORG,
        "/authsvc.v1.OrgService/DeleteOrg": ORG,
        "/authsvc.v1.OrgService/ListOrgs": SELF_OR_ADMIN,
        "/authsvc.v1.OrgService/AddMember": ORG,
        "/authsvc.v1.OrgService/UpdateMember": ORG,
        "/authsvc.v1.OrgService/RemoveMember": ORG,
        "/authsvc.v1.OrgService/GetMember": ORG,
        "/authsvc.v1.OrgService/ListMembers": ORG,
    }
    declared = {_path(s, m): declared_access(m) for s, m in _methods()}
    for path, access in documented.items():
        assert declared.get(path) == access, path
    # Every method is in the table: a new one needs a deliberate entry.
    assert set(declared) == set(documented), sorted(set(declared) ^ set(documented))


# The methods that change no stored row when they succeed (a test below
# holds them to it): their allowed cells may share a world too.
READS = frozenset(
    {
        "/authsvc.v1.AuthService/Authenticate",
        "/authsvc.v1.AuthService/GetJwks",
        "/authsvc.v1.AuthService/WatchRevocations",
        "/authsvc.v1.UserService/GetUser",
        "/authsvc.v1.UserService/GetCurrentUser",
        "/authsvc.v1.UserService/ListUsers",
        "/authsvc.v1.UserService/CountUsers",
        "/authsvc.v1.SessionService/ListSessions",
        "/authsvc.v1.OrgService/ListOrgs",
        "/authsvc.v1.OrgService/GetOrg",
        "/authsvc.v1.OrgService/GetMember",
        "/authsvc.v1.OrgService/ListMembers",
    }
)


def _cells(allowed: bool, reads: bool | None = None) -> list[Any]:
    """The cells whose expected answer is OK (``allowed``) or a refusal; of
    the allowed, those of READS or the others."""
    return [
        pytest.param(method, kind, id=f"{svc.name}.{method.name}-{kind.name}")
        for svc, method in _methods()
        for kind in KINDS
        if (expected(declared_access(method), method.name, kind) == OK) is allowed
        and (reads is None or (_path(svc, method) in READS) is reads)
    ]


@pytest.fixture(scope="module")
def shared_worlds() -> dict[int, World]:
    """Per server, the world the refused cells share."""
    return {}


@pytest.fixture
async def shared(_api_server: Api, shared_worlds: dict[int, World]) -> World:
    """The world the refused cells and the allowed reads of this server share.

    A refusal must change nothing, and so must a read; each such cell proves
    that it did not (snapshots of every table), so these cells need no world
    of their own: they share one, built by the first of them. Its objects are
    stored next to whatever the last test left (the tables are not emptied
    for these cells); once anything empties them (a test using ``api``), the
    next cell builds a new world. A cell that fails drops it, so a wrongful
    change cannot reach the next cells.
    """
    key = id(_api_server)
    world = shared_worlds.get(key)
    if world is None or not await world.intact():
        world = shared_worlds[key] = World(_api_server)
        await world.mark()
    return world


def _path_of(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


@pytest.mark.parametrize(("method", "kind"), _cells(allowed=False))
async def test_refused(
    shared: World, shared_worlds: dict[int, World], method: MethodDescriptor, kind: Kind
) -> None:
    """The exact code and reason, and no stored row changed."""
    api = shared.api
    try:
        who_calls = await credential(shared, kind)
        prepared = await REQUESTS[_path_of(method)](shared, who_calls)
        want = expected(declared_access(method), method.name, kind)
        await refused(
            api,
            lambda: invoke(api, method, prepared.request, who_calls.md),
            want.code,
            want.reason,
        )
    except Exception:
        shared_worlds.pop(id(api), None)
        raise


@pytest.mark.parametrize(("method", "kind"), _cells(allowed=True, reads=True))
async def test_allowed_read(
    shared: World, shared_worlds: dict[int, World], method: MethodDescriptor, kind: Kind
) -> None:
    """OK, the answer is the one asked for, and no stored row changed."""
    api = shared.api
    try:
        who_calls = await credential(shared, kind)
        prepared = await REQUESTS[_path_of(method)](shared, who_calls)
        before = await api.snapshot()
        response = await invoke(api, method, prepared.request, who_calls.md)
        assert await api.snapshot() == before, "a read changed stored data"
        await prepared.check(response)
    except Exception:
        shared_worlds.pop(id(api), None)
        raise


@pytest.mark.parametrize(("method", "kind"), _cells(allowed=True, reads=False))
async def test_allowed(api: Api, method: MethodDescriptor, kind: Kind) -> None:
    """OK, and the call had its effect; on a world of its own (an allowed call
    may delete what it names)."""
    world = World(api)
    who_calls = await credential(world, kind)
    prepared = await REQUESTS[_path_of(method)](world, who_calls)
    response = await invoke(api, method, prepared.request, who_calls.md)
    await prepared.check(response)


MALFORMED_BEARERS = {
    "not-a-jwt": "Bearer not-a-jwt",
    "basic": "Basic dXNlcjpjb3JyZWN0IGhvcnNl",
    "three-dots": "Bearer a.b.c",
    "no-token": "Bearer",
    "unknown-kid": "",  # filled in by the test: a well-formed JWT naming no key of the server
}
# One method of each access level but public (which ignores a bearer).
SAMPLES = (
    "/authsvc.v1.AuthService/SignOut",
    "/authsvc.v1.UserService/GetUser",
    "/authsvc.v1.UserService/CountUsers",
    "/authsvc.v1.OrgService/GetOrg",
)


def _method(path: str) -> MethodDescriptor:
    for svc, method in _methods():
        if _path(svc, method) == path:
            return method
    raise AssertionError(path)


@pytest.mark.parametrize("path", SAMPLES)
@pytest.mark.parametrize("variant", sorted(MALFORMED_BEARERS))
async def test_malformed_authorization_is_token_invalid(
    shared: World, path: str, variant: str
) -> None:
    """Each way an authorization header can be malformed, on one method of each
    access level, with a request a platform admin could make."""
    world = shared
    api = world.api
    admin = await credential(world, KIND["platform_admin"])
    header = MALFORMED_BEARERS[variant]
    if variant == "unknown-kid":
        foreign = await world.foreign_token()
        header = "Bearer " + _with_kid(foreign, "no-such-kid")
    prepared = await REQUESTS[path](world, admin)
    method = _method(path)
    await refused(
        api,
        lambda: invoke(api, method, prepared.request, (("authorization", header),)),
        UNAUTHENTICATED,
        "TOKEN_INVALID",
    )


def _with_kid(token: str, kid: str) -> str:
    """The token with its header's kid replaced (its signature no longer matches
    anything, but the server refuses it for the unknown key first)."""
    header_b64, payload, signature = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(header_b64 + "=" * (-len(header_b64) % 4)))
    header["kid"] = kid
    raw = json.dumps(header, separators=(",", ":")).encode()
    new_header = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    remember(f"{new_header}.{payload}.{signature}")
    return f"{new_header}.{payload}.{signature}"


async def test_permission_is_checked_before_existence(api: Api) -> None:
    """A plain user gets the same answer for someone else's id and for an id
    that does not exist, so ids cannot be probed."""
    caller = await api.sign_up()
    other = await api.sign_up()
    md = bearer(caller.tokens.access_token)
    missing = str(uuid.uuid4())
    existing_user = other.user.id
    existing_session = other.tokens.session_id

    def call(name: str, user_id: str, session_id: str) -> Any:
        if name == "GetUser":
            return api.users.GetUser(users_pb2.GetUserRequest(user_id=user_id), metadata=md)
        if name == "UpdateUser":
            return api.users.UpdateUser(
                users_pb2.UpdateUserRequest(
                    user=resources_pb2.User(id=user_id, display_name="Mallory"),
                    update_mask=FieldMask(paths=["display_name"]),
                ),
                metadata=md,
            )
        if name == "RevokeSession":
            return api.sessions.RevokeSession(
                sessions_pb2.RevokeSessionRequest(session_id=session_id), metadata=md
            )
        if name == "RevokeAllSessions":
            return api.sessions.RevokeAllSessions(
                sessions_pb2.RevokeAllSessionsRequest(user_id=user_id), metadata=md
            )
        assert name == "ListSessions"
        return api.sessions.ListSessions(
            sessions_pb2.ListSessionsRequest(user_id=user_id), metadata=md
        )

    before = await api.snapshot()
    for name in ("GetUser", "UpdateUser", "RevokeSession", "RevokeAllSessions", "ListSessions"):
        error = await failure(call(name, missing, str(uuid.uuid4())))
        assert (error.code, error.reason) == (PERMISSION_DENIED, "PERMISSION_DENIED"), name
        missing_answer = (error.code, error.reason, error.message)
        error = await failure(call(name, existing_user, existing_session))
        assert (error.code, error.reason, error.message) == missing_answer, name
    assert await api.snapshot() == before

    # The other user is untouched: their session still authenticates.
    who = await api.auth.Authenticate(
        auth_pb2.AuthenticateRequest(access_token=other.tokens.access_token)
    )
    assert who.session.user_id == other.user.id


async def test_signed_in_admin_and_service_see_existence(api: Api) -> None:
    """The same calls by an admin or a service report what does not exist."""
    admin = await api.admin_token()
    missing = str(uuid.uuid4())
    for md in (bearer(admin), service()):
        error = await failure(
            api.users.GetUser(users_pb2.GetUserRequest(user_id=missing), metadata=md)
        )
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")
        error = await failure(
            api.sessions.RevokeSession(
                sessions_pb2.RevokeSessionRequest(session_id=missing), metadata=md
            )
        )
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
        error = await failure(
            api.sessions.RevokeAllSessions(
                sessions_pb2.RevokeAllSessionsRequest(user_id=missing), metadata=md
            )
        )
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")

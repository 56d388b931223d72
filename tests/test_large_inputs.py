"""Every RPC, fed the largest and oddest inputs it accepts, answers OK or with
its ErrorInfo: never INTERNAL, never RESOURCE_EXHAUSTED without an ErrorInfo
(what a client sees when an error's trailers pass its metadata limit).

The RPCs come from the service descriptors (``authsvc.app.SERVICES``); each
starts from a valid request (``BUILDERS``, one per RPC: a test fails if an RPC
has none), and then every string field of it, at any depth, in turn, and all
of them at once, is filled up to the server's 4 MiB receive limit with NUL
characters, two-byte, four-byte or plain ASCII characters; repeated fields
get one huge entry or thousands of 5,000-character ones; a huge unknown field
is added to each. Calls carry an admin's token (so they get past the access
check to the validation), and again a user's own token; the channel is a
default one (default client metadata limits).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message
from google.rpc import error_details_pb2

from authsvc.app import SERVICES
from authsvc_client.errors import from_rpc_error
from authsvc_client.v1 import auth_pb2, orgs_pb2, resources_pb2, sessions_pb2, users_pb2
from tests.app import PASSWORD, Api, OrgUser, new_slug, org_member, org_with_owner, remember

MIB = 1 << 20
# The server takes messages up to 4 MiB; a little room for tags and lengths.
BUDGET = 4 * MIB - 4096
CONTENTS = {"nul": "\x00", "e-acute": "\u00e9", "emoji": "\U0001f600", "a": "a"}
MASK_PATHS = ["a" * 5000, "\x00" * 2048, "\u00e9" * 1500, "\U0001f600" * 1000]
UNKNOWN_FIELD = 1000  # a field number no request uses

Metadata = tuple[tuple[str, str], ...]


@dataclass
class Ctx:
    """The fixtures the valid requests are made of."""

    api: Api
    admin: str  # an admin's access token
    owner: OrgUser  # owns ``org``, which is active in the owner's session
    member: OrgUser  # a member of ``org``
    org: Any
    victim: Any  # a SignInResult of the owner: spent by RefreshToken & co.

    @classmethod
    async def make(cls, api: Api) -> Ctx:
        admin = await api.admin_token()
        org, owner = await org_with_owner(api, name="Acme")
        member = await org_member(api, org.id)
        victim = await api.auth.SignInWithPassword(
            auth_pb2.SignInWithPasswordRequest(email=owner.user.email, password=PASSWORD)
        )
        remember(victim.result.tokens.access_token, victim.result.tokens.refresh_token)
        return cls(api, admin, owner, member, org, victim.result)


# One valid request per RPC (a failure on it is fine: only its shape matters).
BUILDERS: dict[str, Callable[[Ctx], Message]] = {
    "AuthService.SignUp": lambda c: auth_pb2.SignUpRequest(
        email=f"new-{uuid.uuid4().hex[:8]}@example.com",
        password="a perfectly fine password",
        display_name="New",
        given_name="Ada",
        family_name="Lovelace",
        client_info=resources_pb2.ClientInfo(ip_address="203.0.113.9", user_agent="ua/1"),
    ),
    "AuthService.SignInWithPassword": lambda c: auth_pb2.SignInWithPasswordRequest(
        email=c.owner.user.email,
        password=PASSWORD,
        given_name="Ada",
        family_name="Lovelace",
        client_info=resources_pb2.ClientInfo(ip_address="203.0.113.9", user_agent="ua/1"),
    ),
    "AuthService.CompleteSignIn": lambda c: auth_pb2.CompleteSignInRequest(
        pending_token="pt_not-a-pending-token",
        new_password="a perfectly fine password",
        client_info=resources_pb2.ClientInfo(ip_address="203.0.113.9", user_agent="ua/1"),
    ),
    "AuthService.RefreshToken": lambda c: auth_pb2.RefreshTokenRequest(
        refresh_token=c.victim.tokens.refresh_token,
        client_info=resources_pb2.ClientInfo(ip_address="203.0.113.9", user_agent="ua/1"),
    ),
    "AuthService.SignOut": lambda c: auth_pb2.SignOutRequest(),
    "AuthService.Authenticate": lambda c: auth_pb2.AuthenticateRequest(access_token=c.owner.token),
    "AuthService.SetActiveOrg": lambda c: auth_pb2.SetActiveOrgRequest(
        refresh_token=c.victim.tokens.refresh_token,
        org_id=c.org.id,
        client_info=resources_pb2.ClientInfo(ip_address="203.0.113.9", user_agent="ua/1"),
    ),
    "AuthService.WatchRevocations": lambda c: auth_pb2.WatchRevocationsRequest(after="0-0"),
    "AuthService.GetJwks": lambda c: auth_pb2.GetJwksRequest(),
    "UserService.GetUser": lambda c: users_pb2.GetUserRequest(user_id=c.owner.id),
    "UserService.GetCurrentUser": lambda c: users_pb2.GetCurrentUserRequest(),
    "UserService.ListUsers": lambda c: users_pb2.ListUsersRequest(
        email_prefix="a", page_size=10, page_token=""
    ),
    "UserService.UpdateUser": lambda c: users_pb2.UpdateUserRequest(
        user=resources_pb2.User(
            id=c.owner.id,
            display_name="Renamed",
            given_name="Ada",
            family_name="Lovelace",
            email=c.owner.user.email,
            etag=c.owner.user.etag,
        ),
        update_mask=FieldMask(paths=["display_name", "given_name", "family_name"]),
    ),
    "UserService.SetUserRole": lambda c: users_pb2.SetUserRoleRequest(
        user_id=c.member.id, role=resources_pb2.ROLE_USER, etag=c.member.user.etag
    ),
    "UserService.SetUserEmail": lambda c: users_pb2.SetUserEmailRequest(
        user_id=c.member.id, email=c.member.user.email, etag=c.member.user.etag
    ),
    "UserService.DeleteUser": lambda c: users_pb2.DeleteUserRequest(
        user_id=c.member.id, etag=c.member.user.etag
    ),
    "UserService.CountUsers": lambda c: users_pb2.CountUsersRequest(),
    "SessionService.ListSessions": lambda c: sessions_pb2.ListSessionsRequest(
        user_id=c.owner.id, page_size=10
    ),
    "SessionService.RevokeSession": lambda c: sessions_pb2.RevokeSessionRequest(
        session_id=c.victim.tokens.session_id
    ),
    "SessionService.RevokeAllSessions": lambda c: sessions_pb2.RevokeAllSessionsRequest(
        user_id=c.member.id
    ),
    "OrgService.CreateOrg": lambda c: orgs_pb2.CreateOrgRequest(
        slug=new_slug(), name="Another", owner_user_id=c.owner.id
    ),
    "OrgService.GetOrg": lambda c: orgs_pb2.GetOrgRequest(org_id=c.org.id),
    "OrgService.UpdateOrg": lambda c: orgs_pb2.UpdateOrgRequest(
        org_id=c.org.id,
        values=resources_pb2.Org(name="Renamed", slug=c.org.slug, etag=c.org.etag),
        update_mask=FieldMask(paths=["name"]),
    ),
    "OrgService.DeleteOrg": lambda c: orgs_pb2.DeleteOrgRequest(
        org_slug="no-such-org", etag=c.org.etag, force=True, allow_missing=True
    ),
    "OrgService.ListOrgs": lambda c: orgs_pb2.ListOrgsRequest(user_id=c.owner.id, page_size=5),
    "OrgService.AddMember": lambda c: orgs_pb2.AddMemberRequest(
        org_id=c.org.id, user_id=c.member.id, role=resources_pb2.ORG_ROLE_MEMBER
    ),
    "OrgService.UpdateMember": lambda c: orgs_pb2.UpdateMemberRequest(
        org_id=c.org.id, user_id=c.member.id, role=resources_pb2.ORG_ROLE_ADMIN, etag="e"
    ),
    "OrgService.RemoveMember": lambda c: orgs_pb2.RemoveMemberRequest(
        org_id=c.org.id, user_id=c.member.id, etag="e", allow_missing=True
    ),
    "OrgService.GetMember": lambda c: orgs_pb2.GetMemberRequest(
        org_id=c.org.id, user_id=c.member.id
    ),
    "OrgService.ListMembers": lambda c: orgs_pb2.ListMembersRequest(org_id=c.org.id, page_size=5),
}


def _methods() -> list[tuple[str, MethodDescriptor]]:
    return [(f"{s.name}.{m.name}", m) for s in SERVICES for m in s.methods]


# -- generic filling ---------------------------------------------------------------

Leaf = tuple[tuple[str, ...], FieldDescriptor]


def _leaves(descriptor: Descriptor, prefix: tuple[str, ...] = (), depth: int = 0) -> list[Leaf]:
    """Every string and bytes field of the message type, at any depth."""
    out: list[Leaf] = []
    for f in descriptor.fields:
        path = (*prefix, f.name)
        if f.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
            out.append((path, f))
        elif f.type == FieldDescriptor.TYPE_MESSAGE and depth < 3:
            out += _leaves(cast(Descriptor, f.message_type), path, depth + 1)
    return out


def _is_repeated(f: FieldDescriptor) -> bool:
    # `is_repeated` replaces `label` (gone in protobuf 7).
    flag = getattr(f, "is_repeated", None)
    return bool(getattr(f, "label", 0) == 3 if flag is None else flag)


def _set(message: Message, path: tuple[str, ...], f: FieldDescriptor, values: list[str]) -> None:
    target: Any = message
    for name in path[:-1]:
        target = getattr(target, name)
    name = path[-1]
    as_field = [v.encode() if f.type == FieldDescriptor.TYPE_BYTES else v for v in values]
    if _is_repeated(f):
        del getattr(target, name)[:]
        getattr(target, name).extend(as_field)
    else:
        setattr(target, name, as_field[0])


def _huge(char: str, size: int) -> str:
    """As many ``char`` as fit in ``size`` bytes of UTF-8."""
    return char * max(0, size // len(char.encode()))


def _fill(base: Message, leaves: list[Leaf], char: str, entry: int | None = None) -> Message:
    """``base`` with each of ``leaves`` filled with ``char``, the budget shared
    among them; a repeated leaf gets entries of ``entry`` characters if given,
    else one huge entry."""
    message = type(base)()
    message.CopyFrom(base)
    share = (BUDGET - base.ByteSize()) // max(1, len(leaves)) - 16
    for path, f in leaves:
        if _is_repeated(f) and entry is not None:
            item = _huge(char, entry * len(char.encode()))
            count = max(1, share // (len(item.encode()) + 4))
            _set(message, path, f, [item] * count)
        else:
            _set(message, path, f, [_huge(char, share)])
    assert message.ByteSize() <= 4 * MIB, message.ByteSize()
    return message


def _with_unknown_field(body: bytes, size: int) -> bytes:
    """``body`` plus a length-delimited field the message type does not have."""
    tag = (UNKNOWN_FIELD << 3) | 2
    return body + _varint(tag) + _varint(size) + b"\x00" * size


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _requests(base: Message) -> Iterator[tuple[str, bytes]]:
    """(name, serialized request) of every input a request is fed."""
    leaves = _leaves(cast(Descriptor, base.DESCRIPTOR))
    yield "valid", base.SerializeToString()
    yield "unknown-field", _with_unknown_field(base.SerializeToString(), BUDGET - base.ByteSize())
    for content, char in CONTENTS.items():
        for path, f in leaves:
            name = ".".join(path)
            yield f"{name}={content}", _fill(base, [(path, f)], char).SerializeToString()
            if _is_repeated(f):
                yield (
                    f"{name}=many-5000-{content}",
                    _fill(base, [(path, f)], char, entry=5000).SerializeToString(),
                )
        if leaves:
            yield f"all={content}", _fill(base, leaves, char).SerializeToString()
    for path, f in leaves:
        if path[-1] == "paths":  # a FieldMask: the unknown paths of the report
            for text in MASK_PATHS:
                message = type(base)()
                message.CopyFrom(base)
                _set(message, path, f, [*_parent(message, path).paths, text])
                yield f"{'.'.join(path)}+{text[:1]!r}x{len(text)}", message.SerializeToString()
            tiny = type(base)()
            tiny.CopyFrom(base)
            _set(tiny, path, f, [f"p{i}" for i in range(100_000)])
            yield f"{'.'.join(path)}=100000-short", tiny.SerializeToString()


def _parent(message: Message, path: tuple[str, ...]) -> Any:
    target: Any = message
    for name in path[:-1]:
        target = getattr(target, name)
    return target


# -- calling ----------------------------------------------------------------------


async def _answer(
    channel: grpc.aio.Channel, rpc: str, method: MethodDescriptor, body: bytes, md: Metadata
) -> str | None:
    """None if the answer is acceptable, else what is wrong with it."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.server_streaming:
            call = channel.unary_stream(path, lambda b: b, lambda b: b)(body, metadata=md)
            try:
                await call.read()
            finally:
                call.cancel()
        else:
            await channel.unary_unary(path, lambda b: b, lambda b: b)(body, metadata=md)
    except grpc.aio.AioRpcError as rpc_error:
        error = from_rpc_error(rpc_error)
        info = error.detail(error_details_pb2.ErrorInfo)
        if error.code == grpc.StatusCode.INTERNAL:
            return f"INTERNAL ({error.message[:100]!r})"
        if info is None or not error.reason:
            return f"{error.code.name} without an ErrorInfo ({error.message[:100]!r})"
    return None


async def test_every_rpc_answers_huge_and_odd_inputs_with_an_error_info(api: Api) -> None:
    assert set(BUILDERS) == {rpc for rpc, _ in _methods()}, "an RPC without a request builder"
    ctx = await Ctx.make(api)
    admin: Metadata = (("authorization", f"Bearer {ctx.admin}"),)
    problems: list[str] = []
    calls = 0
    async with grpc.aio.insecure_channel(api.target) as channel:
        for rpc, method in _methods():
            base = BUILDERS[rpc](ctx)
            for name, body in _requests(base):
                callers = (("admin", admin), ("user", ctx.owner.md))
                if rpc == "AuthService.SignOut":
                    # It would end the admin's or the owner's session (and
                    # leave the owner's later calls nothing but SESSION_REVOKED):
                    # it signs out the victim.
                    victim = (("authorization", f"Bearer {ctx.victim.tokens.access_token}"),)
                    callers = (("admin", victim), ("user", victim))
                for who, metadata in callers:
                    calls += 1
                    problem = await _answer(channel, rpc, method, body, metadata)
                    if problem is not None:
                        problems.append(f"{rpc} {name} as {who}: {problem}")
    assert not problems, "\n".join(problems[:40])
    assert calls > 500

"""``authsvc_client.scoping``: the seed's tenant helpers and the tenant-scoping
client interceptors, over real channels.

"Nothing is sent" is proved two ways: against a probe server that records
every call it receives (grpc.aio and classic), and against authsvc itself,
whose access log records every RPC it receives by request id.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from authsvc_client.errors import AuthsvcError, OrgMismatch, from_rpc_error
from authsvc_client.scoping import (
    Credentials,
    SyncTenantScopeInterceptor,
    TenantScopeInterceptor,
    aio_interceptors,
    assert_same_org,
    inbound_credentials,
    is_authorized,
    is_org_authorized,
    is_same_org,
    session_from_token,
    tenant_fields,
    token_credentials,
)
from authsvc_client.v1 import auth_pb2, orgs_pb2, resources_pb2
from tests.app import Api, org_with_owner

ORG_A = str(uuid.UUID(int=0xA))
ORG_B = str(uuid.UUID(int=0xB))
PD = grpc.StatusCode.PERMISSION_DENIED


def session(
    role: int = resources_pb2.ROLE_USER, org_id: str = "", org_role: int = 0
) -> resources_pb2.SessionInfo:
    return resources_pb2.SessionInfo(
        session_id=str(uuid.uuid4()),
        user_id=str(uuid.uuid4()),
        role=role,  # type: ignore[arg-type]
        org_id=org_id,
        org_role=org_role,  # type: ignore[arg-type]
    )


# -- the helpers ---------------------------------------------------------------

USER = session()
ADMIN = session(resources_pb2.ROLE_ADMIN)
A_OWNER = session(org_id=ORG_A, org_role=resources_pb2.ORG_ROLE_OWNER)
A_MEMBER = session(org_id=ORG_A, org_role=resources_pb2.ORG_ROLE_MEMBER)
NO_ORG = session()


@pytest.mark.parametrize(
    ("who", "roles", "expected"),
    [
        (USER, ("user",), True),
        (USER, ("admin",), False),
        (USER, ("user", "admin"), True),
        (USER, (), False),
        (ADMIN, ("admin",), True),
        (ADMIN, ("ADMIN",), True),
        (ADMIN, ("role_admin",), True),
        (ADMIN, (resources_pb2.ROLE_ADMIN,), True),
        (USER, (resources_pb2.ROLE_ADMIN,), False),
        (ADMIN, ("user", resources_pb2.ROLE_ADMIN), True),
        (session(resources_pb2.ROLE_UNSPECIFIED), ("user", "admin"), False),
    ],
)
def test_is_authorized(who: Any, roles: tuple[Any, ...], expected: bool) -> None:
    assert is_authorized(who, *roles) is expected


@pytest.mark.parametrize("bad", ["amdin", "", "owner", 0, 7, True, None])
def test_unknown_roles_raise_rather_than_match_nothing(bad: Any) -> None:
    with pytest.raises(ValueError, match="role"):
        is_authorized(ADMIN, bad)
    with pytest.raises(ValueError, match="role"):
        is_org_authorized(A_OWNER, ORG_A, "owner", "user" if bad == "owner" else bad)


@pytest.mark.parametrize(
    ("who", "org", "roles", "expected"),
    [
        (A_OWNER, ORG_A, ("owner",), True),
        (A_OWNER, uuid.UUID(ORG_A), ("owner",), True),
        (A_OWNER, ORG_A, ("admin", "member"), False),
        (A_OWNER, ORG_A, (resources_pb2.ORG_ROLE_OWNER,), True),
        (A_OWNER, ORG_A, ("ORG_ROLE_OWNER",), True),
        (A_MEMBER, ORG_A, ("owner", "admin", "member"), True),
        (A_MEMBER, ORG_A, ("owner", "admin"), False),
        (A_OWNER, ORG_B, ("owner", "admin", "member"), False),
        (NO_ORG, ORG_A, ("owner", "admin", "member"), False),
        (NO_ORG, "", ("owner", "admin", "member"), False),
        (A_OWNER, "", ("owner",), False),
        (A_OWNER, ORG_A, (), False),
    ],
)
def test_is_org_authorized(who: Any, org: Any, roles: tuple[Any, ...], expected: bool) -> None:
    assert is_org_authorized(who, org, *roles) is expected


@pytest.mark.parametrize(
    ("who", "org", "same"),
    [
        (A_OWNER, ORG_A, True),
        (A_OWNER, uuid.UUID(ORG_A), True),
        (A_MEMBER, ORG_A, True),
        (A_OWNER, ORG_B, False),
        (A_OWNER, uuid.UUID(ORG_B), False),
        # Ids compare as UUIDs: case and braces do not matter...
        (A_OWNER, ORG_A.upper(), True),
        (A_OWNER, "{" + ORG_A + "}", True),
        (A_OWNER, "{" + ORG_A.upper() + "}", True),
        (session(org_id=ORG_A.upper()), ORG_A, True),
        (session(org_id="{" + ORG_A + "}"), uuid.UUID(ORG_A), True),
        (A_OWNER, "{" + ORG_B + "}", False),
        # ... other spellings uuid.UUID() takes are strings, and differ.
        (A_OWNER, ORG_A.replace("-", ""), False),
        (A_OWNER, "urn:uuid:" + ORG_A, False),
        (A_OWNER, "{" + ORG_A, False),
        (A_OWNER, ORG_A + "}", False),
        (A_OWNER, " " + ORG_A, False),
        (A_OWNER, ORG_A + "\n", False),
        # Ids that are not UUIDs compare exactly.
        (session(org_id="acme"), "acme", True),
        (session(org_id="acme"), "ACME", False),
        (session(org_id="acme"), "acme ", False),
        (A_OWNER, "", False),
        (NO_ORG, ORG_A, False),
        (NO_ORG, "", False),  # no org on either side is not "the same org"
        (None, ORG_A, False),
    ],
)
def test_is_same_org_and_assert_same_org(who: Any, org: Any, same: bool) -> None:
    if who is not None:
        assert is_same_org(who, org) is same
    if same:
        assert_same_org(who, org)
        return
    with pytest.raises(OrgMismatch) as raised:
        assert_same_org(who, org)
    error = raised.value
    assert isinstance(error, AuthsvcError)
    assert (error.code, error.reason) == (PD, "ORG_MISMATCH")


# -- a probe proto with tenant fields at every depth ------------------------------


def _probe_file() -> descriptor_pb2.FileDescriptorProto:
    """``scopetest.v1``, built as a descriptor (the same as compiling a .proto)::

    message Inner  { string org_id = 1; string other = 2; }
    message Marked { string tenant = 1 [(authsvc.v1.tenant) = true];
                     string org_id = 2 [(authsvc.v1.tenant) = false]; }
    message Outer {
      string name = 1; Inner inner = 2; repeated Inner many = 3;
      map<string, Inner> by_key = 4; Marked marked = 5;
      repeated string orgs = 6 [(authsvc.v1.tenant) = true];
      Outer child = 7;                      // recursive
      oneof pick { Inner picked = 8; string word = 9; }
      map<string, string> labels = 10;      // values are not tenant fields
      int64 org_count = 11;                 // not a string
    }
    message Plain { string name = 1; Plain next = 2; }
    """
    from authsvc_client.v1 import options_pb2

    f = descriptor_pb2.FieldDescriptorProto
    string, message, repeated = f.TYPE_STRING, f.TYPE_MESSAGE, f.LABEL_REPEATED
    proto = descriptor_pb2.FileDescriptorProto(
        name="tests/scopetest.proto",
        package="scopetest.v1",
        syntax="proto3",
        dependency=["authsvc/v1/options.proto"],
    )

    def add(msg: Any, name: str, number: int, kind: int, type_name: str = "", **kw: Any) -> Any:
        new = msg.field.add(name=name, number=number, type=kind, label=kw.pop("label", 1), **kw)
        if type_name:
            new.type_name = f".scopetest.v1.{type_name}"
        return new

    inner = proto.message_type.add(name="Inner")
    add(inner, "org_id", 1, string)
    add(inner, "other", 2, string)
    marked = proto.message_type.add(name="Marked")
    add(marked, "tenant", 1, string).options.Extensions[options_pb2.tenant] = True
    add(marked, "org_id", 2, string).options.Extensions[options_pb2.tenant] = False
    outer = proto.message_type.add(name="Outer")
    for name, value_type, value_kind in (
        ("ByKeyEntry", "Inner", message),
        ("LabelsEntry", "", string),
    ):
        entry = outer.nested_type.add(name=name)
        entry.options.map_entry = True
        add(entry, "key", 1, string)
        add(entry, "value", 2, value_kind, value_type)
    outer.oneof_decl.add(name="pick")
    add(outer, "name", 1, string)
    add(outer, "inner", 2, message, "Inner")
    add(outer, "many", 3, message, "Inner", label=repeated)
    add(outer, "by_key", 4, message, "Outer.ByKeyEntry", label=repeated)
    add(outer, "marked", 5, message, "Marked")
    add(outer, "orgs", 6, string, label=repeated).options.Extensions[options_pb2.tenant] = True
    add(outer, "child", 7, message, "Outer")
    add(outer, "picked", 8, message, "Inner", oneof_index=0)
    add(outer, "word", 9, string, oneof_index=0)
    add(outer, "labels", 10, message, "Outer.LabelsEntry", label=repeated)
    add(outer, "org_count", 11, f.TYPE_INT64)
    plain = proto.message_type.add(name="Plain")
    add(plain, "name", 1, string)
    add(plain, "next", 2, message, "Plain")
    return proto


_pool = descriptor_pool.Default()
try:
    _pool.FindFileByName("tests/scopetest.proto")
except KeyError:
    _pool.Add(_probe_file())
Inner = message_factory.GetMessageClass(_pool.FindMessageTypeByName("scopetest.v1.Inner"))
Marked = message_factory.GetMessageClass(_pool.FindMessageTypeByName("scopetest.v1.Marked"))
Outer = message_factory.GetMessageClass(_pool.FindMessageTypeByName("scopetest.v1.Outer"))
Plain = message_factory.GetMessageClass(_pool.FindMessageTypeByName("scopetest.v1.Plain"))
UNARY = "/scopetest.v1.Probe/Call"
STREAM = "/scopetest.v1.Probe/Stream"


def test_tenant_fields_found_by_name_and_by_option() -> None:
    assert sorted(tenant_fields(Outer.DESCRIPTOR)) == [
        "scopetest.v1.Inner.org_id",
        "scopetest.v1.Marked.tenant",
        "scopetest.v1.Outer.orgs",
    ]
    assert tenant_fields(Plain.DESCRIPTOR) == []
    # authsvc's own: the org-scoped requests name the tenant by org_id;
    # SetActiveOrgRequest.org_id (the org to switch to) and Member.org_id
    # are exempt; CreateOrg names no org yet.
    assert tenant_fields(orgs_pb2.GetOrgRequest.DESCRIPTOR) == ["authsvc.v1.GetOrgRequest.org_id"]
    assert tenant_fields(orgs_pb2.UpdateOrgRequest.DESCRIPTOR) == [
        "authsvc.v1.UpdateOrgRequest.org_id"
    ]
    assert tenant_fields(auth_pb2.SetActiveOrgRequest.DESCRIPTOR) == []
    assert tenant_fields(orgs_pb2.ListMembersResponse.DESCRIPTOR) == []
    assert tenant_fields(orgs_pb2.CreateOrgRequest.DESCRIPTOR) == []


# Each case: a request, and whether a session whose active org is A may send it.
CASES: list[tuple[str, Message, bool]] = [
    ("empty", Outer(), True),
    ("no tenant field set", Outer(name=ORG_B, inner=Inner(other=ORG_B)), True),
    ("nested org_id = active", Outer(inner=Inner(org_id=ORG_A)), True),
    ("nested org_id = other", Outer(inner=Inner(org_id=ORG_B)), False),
    ("nested org_id set but empty", Outer(inner=Inner(org_id="")), True),
    ("repeated, all active or empty", Outer(many=[Inner(org_id=ORG_A), Inner()]), True),
    ("repeated, one other", Outer(many=[Inner(org_id=ORG_A), Inner(org_id=ORG_B)]), False),
    ("map value, other", Outer(by_key={"k": Inner(org_id=ORG_B)}), False),
    ("map value, active", Outer(by_key={"k": Inner(org_id=ORG_A)}), True),
    ("map<string,string> is not a tenant field", Outer(labels={"org_id": ORG_B}), True),
    ("option-marked field = other", Outer(marked=Marked(tenant=ORG_B)), False),
    ("option-marked field = active", Outer(marked=Marked(tenant=ORG_A)), True),
    ("org_id exempted by the option", Outer(marked=Marked(org_id=ORG_B)), True),
    ("repeated option-marked strings", Outer(orgs=[ORG_A, ORG_B]), False),
    ("repeated option-marked strings, active", Outer(orgs=[ORG_A, ORG_A]), True),
    ("three levels down", Outer(child=Outer(child=Outer(inner=Inner(org_id=ORG_B)))), False),
    (
        "three levels down, active",
        Outer(child=Outer(child=Outer(marked=Marked(tenant=ORG_A)))),
        True,
    ),
    ("oneof member, other", Outer(picked=Inner(org_id=ORG_B)), False),
    ("oneof, the other member set", Outer(word=ORG_B), True),
    ("not a UUID either", Outer(inner=Inner(org_id="acme")), False),
    ("case does not matter", Outer(inner=Inner(org_id=ORG_A.upper())), True),
    ("braces do not matter", Outer(inner=Inner(org_id="{" + ORG_A + "}")), True),
    ("other in braces", Outer(inner=Inner(org_id="{" + ORG_B.upper() + "}")), False),
    ("no hyphens is another string", Outer(inner=Inner(org_id=ORG_A.replace("-", ""))), False),
    ("urn: is another string", Outer(inner=Inner(org_id="urn:uuid:" + ORG_A)), False),
    ("repeated, active in two spellings", Outer(orgs=[ORG_A, ORG_A.upper()]), True),
]


# -- the probe servers ------------------------------------------------------------


@dataclass
class Probe:
    """A server that records every call it receives (method, request, metadata)."""

    target: str
    calls: list[tuple[str, Any, dict[str, Any]]] = field(default_factory=list)


Calls = list[tuple[str, Any, dict[str, Any]]]
_SERDE: dict[str, Any] = {
    "request_deserializer": Outer.FromString,
    "response_serializer": Outer.SerializeToString,
}


def _record(calls: Calls, method: str, request: Any, context: Any) -> None:
    calls.append((method, request, dict(context.invocation_metadata())))


def _aio_handlers(calls: Calls) -> grpc.GenericRpcHandler:
    async def unary(request: Any, context: Any) -> Any:
        _record(calls, UNARY, request, context)
        return request

    async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
        _record(calls, STREAM, request, context)
        yield request
        yield request

    return grpc.method_handlers_generic_handler(
        "scopetest.v1.Probe",
        {
            "Call": grpc.unary_unary_rpc_method_handler(unary, **_SERDE),
            "Stream": grpc.unary_stream_rpc_method_handler(stream, **_SERDE),
        },
    )


def _sync_handlers(calls: Calls) -> grpc.GenericRpcHandler:
    def unary(request: Any, context: Any) -> Any:
        _record(calls, UNARY, request, context)
        return request

    def stream(request: Any, context: Any) -> Iterator[Any]:
        _record(calls, STREAM, request, context)
        yield request
        yield request

    return grpc.method_handlers_generic_handler(
        "scopetest.v1.Probe",
        {
            "Call": grpc.unary_unary_rpc_method_handler(unary, **_SERDE),
            "Stream": grpc.unary_stream_rpc_method_handler(stream, **_SERDE),
        },
    )


@pytest.fixture
async def probe() -> AsyncIterator[Probe]:
    server = grpc.aio.server()
    calls: Calls = []
    server.add_generic_rpc_handlers((_aio_handlers(calls),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield Probe(f"127.0.0.1:{port}", calls)
    await server.stop(0)


@pytest.fixture
def sync_probe() -> Iterator[Probe]:
    server = grpc.server(futures.ThreadPoolExecutor(4))
    calls: Calls = []
    server.add_generic_rpc_handlers((_sync_handlers(calls),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield Probe(f"127.0.0.1:{port}", calls)
    server.stop(0)


def fake_token(org_id: str = "", org_role: str = "", role: str = "user") -> str:
    """A JWT-shaped token (unsigned: the probe does not verify, and the
    interceptor only reads claims)."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    claims: dict[str, Any] = {
        "sub": str(uuid.uuid4()),
        "sid": str(uuid.uuid4()),
        "role": role,
        "exp": int(time.time()) + 900,
    }
    if org_id:
        claims |= {"org_id": org_id, "org_role": org_role or "member"}
    return f"{part({'alg': 'EdDSA', 'kid': 'k'})}.{part(claims)}.c2ln"


def _serde() -> dict[str, Any]:
    return {
        "request_serializer": Outer.SerializeToString,
        "response_deserializer": Outer.FromString,
    }


async def _refused_aio(call: Any) -> grpc.aio.AioRpcError:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("the call was not refused")


def _check_refusal(error: Any) -> AuthsvcError:
    typed = from_rpc_error(error)
    assert isinstance(typed, OrgMismatch)
    assert (typed.code, typed.reason) == (PD, "ORG_MISMATCH")
    assert typed.metadata["origin"] == "client"
    assert typed.metadata["field"]
    return typed


# -- grpc.aio -------------------------------------------------------------------


@pytest.mark.parametrize(("case", "request_", "allowed"), CASES, ids=[c[0] for c in CASES])
async def test_aio_unary_refuses_other_orgs_locally(
    probe: Probe, case: str, request_: Message, allowed: bool
) -> None:
    token = fake_token(ORG_A, "member")
    async with grpc.aio.insecure_channel(
        probe.target, interceptors=aio_interceptors(token_credentials(token))
    ) as channel:
        call = channel.unary_unary(UNARY, **_serde())
        if allowed:
            reply = await call(request_, metadata=(("x-trace", "t1"),))
            assert reply == request_
            [(method, received, metadata)] = probe.calls
            assert (method, received) == (UNARY, request_)
            assert metadata["authorization"] == f"Bearer {token}"
            assert metadata["x-trace"] == "t1"  # the caller's own metadata is kept
        else:
            error = await _refused_aio(call(request_))
            assert error.code() == PD
            _check_refusal(error)
            assert probe.calls == [], "a refused request reached the server"


@pytest.mark.parametrize(("case", "request_", "allowed"), CASES, ids=[c[0] for c in CASES])
async def test_aio_stream_refuses_other_orgs_locally(
    probe: Probe, case: str, request_: Message, allowed: bool
) -> None:
    token = fake_token(ORG_A, "admin")
    async with grpc.aio.insecure_channel(
        probe.target, interceptors=aio_interceptors(token_credentials(token))
    ) as channel:
        call = channel.unary_stream(STREAM, **_serde())(request_)
        if allowed:
            assert [r async for r in call] == [request_, request_]
            [(method, _, metadata)] = probe.calls
            assert method == STREAM
            assert metadata["authorization"] == f"Bearer {token}"
        else:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                _ = [r async for r in call]
            assert await call.code() == PD  # the call object itself reports the refusal
            _check_refusal(raised.value)
            assert probe.calls == []


@pytest.mark.parametrize("request_", [Outer(inner=Inner(org_id=ORG_A)), Outer(orgs=[ORG_A])])
async def test_without_an_active_org_every_named_org_is_refused(
    probe: Probe, request_: Message
) -> None:
    token = fake_token()  # a session without an active org
    async with grpc.aio.insecure_channel(
        probe.target, interceptors=[TenantScopeInterceptor(token_credentials(token))]
    ) as channel:
        call = channel.unary_unary(UNARY, **_serde())
        error = await _refused_aio(call(request_))
        assert "no active org" in _check_refusal(error).message
        # A request that names no org still goes, with the token.
        await call(Outer(name="x"))
    assert [m["authorization"] for _, _, m in probe.calls] == [f"Bearer {token}"]


async def test_without_credentials_nothing_is_attached_and_named_orgs_are_refused(
    probe: Probe,
) -> None:
    # Outside a call served behind the sidecar, the default source finds no caller.
    assert inbound_credentials() is None
    async with grpc.aio.insecure_channel(probe.target, interceptors=aio_interceptors()) as channel:
        call = channel.unary_unary(UNARY, **_serde())
        _check_refusal(await _refused_aio(call(Outer(inner=Inner(org_id=ORG_A)))))
        await call(Outer(name="x"), metadata=(("authorization", "Bearer smuggled"),))
    [(_, _, metadata)] = probe.calls
    # The interceptor owns the credential: one the call carried is dropped,
    # so what was checked is what is sent.
    assert "authorization" not in metadata


async def test_the_interceptors_credential_replaces_the_calls(probe: Probe) -> None:
    token = fake_token(ORG_A)
    async with grpc.aio.insecure_channel(
        probe.target, interceptors=aio_interceptors(token_credentials(token))
    ) as channel:
        call = channel.unary_unary(UNARY, **_serde())
        await call(Outer(), metadata=(("authorization", f"Bearer {fake_token(ORG_B)}"),))
    [(_, _, metadata)] = probe.calls
    assert metadata["authorization"] == f"Bearer {token}"


async def test_a_token_source_follows_the_current_token(probe: Probe) -> None:
    first, second = fake_token(ORG_A), fake_token(ORG_B)
    current = {"token": first}
    source = token_credentials(lambda: current["token"])
    async with grpc.aio.insecure_channel(probe.target, interceptors=aio_interceptors(source)) as ch:
        call = ch.unary_unary(UNARY, **_serde())
        await call(Outer(inner=Inner(org_id=ORG_A)))
        current["token"] = second  # e.g. after SetActiveOrg
        _check_refusal(await _refused_aio(call(Outer(inner=Inner(org_id=ORG_A)))))
        await call(Outer(inner=Inner(org_id=ORG_B)))
    assert [m["authorization"] for _, _, m in probe.calls] == [
        f"Bearer {first}",
        f"Bearer {second}",
    ]


async def test_a_callable_source_of_credentials(probe: Probe) -> None:
    creds = Credentials(
        "opaque-token", session(org_id=ORG_B, org_role=resources_pb2.ORG_ROLE_OWNER)
    )
    async with grpc.aio.insecure_channel(
        probe.target, interceptors=aio_interceptors(lambda: creds)
    ) as channel:
        call = channel.unary_unary(UNARY, **_serde())
        _check_refusal(await _refused_aio(call(Outer(inner=Inner(org_id=ORG_A)))))
        await call(Outer(inner=Inner(org_id=ORG_B)))
    assert [m["authorization"] for _, _, m in probe.calls] == ["Bearer opaque-token"]


async def test_serialized_requests_cannot_be_checked_and_are_not_sent(probe: Probe) -> None:
    async with grpc.aio.insecure_channel(
        probe.target, interceptors=aio_interceptors(token_credentials(fake_token(ORG_A)))
    ) as channel:
        raw: Any = channel.unary_unary(UNARY)  # bytes in, bytes out
        with pytest.raises(TypeError, match="protobuf messages"):
            await raw(Outer(inner=Inner(org_id=ORG_B)).SerializeToString())
    assert probe.calls == []


def test_session_from_token() -> None:
    info = session_from_token(fake_token(ORG_A, "owner", role="admin"))
    assert (info.org_id, info.org_role, info.role) == (
        ORG_A,
        resources_pb2.ORG_ROLE_OWNER,
        resources_pb2.ROLE_ADMIN,
    )
    assert info.expire_time.seconds > time.time()
    bare = session_from_token(fake_token())
    assert (bare.org_id, bare.org_role) == ("", resources_pb2.ORG_ROLE_UNSPECIFIED)
    for bad in ("", "a.b", "not.a.jwt", "a.e30.c"):  # e30 = "{}": no sub/sid
        with pytest.raises(ValueError, match=r"JWT|claims"):
            token_credentials(bad)


# -- classic grpc -----------------------------------------------------------------


@pytest.mark.parametrize(("case", "request_", "allowed"), CASES, ids=[c[0] for c in CASES])
def test_sync_interceptor_refuses_other_orgs_locally(
    sync_probe: Probe, case: str, request_: Message, allowed: bool
) -> None:
    token = fake_token(ORG_A)
    interceptor = SyncTenantScopeInterceptor(token_credentials(token))
    with grpc.insecure_channel(sync_probe.target) as plain:
        channel = grpc.intercept_channel(plain, interceptor)
        unary = channel.unary_unary(UNARY, **_serde())
        stream = channel.unary_stream(STREAM, **_serde())
        if allowed:
            assert unary(request_) == request_
            assert list(stream(request_)) == [request_, request_]
            assert [(m, md["authorization"]) for m, _, md in sync_probe.calls] == [
                (UNARY, f"Bearer {token}"),
                (STREAM, f"Bearer {token}"),
            ]
            return
        with pytest.raises(grpc.RpcError) as raised:
            unary(request_)
        assert isinstance(raised.value, grpc.Call)
        assert raised.value.code() == PD
        _check_refusal(raised.value)
        with pytest.raises(grpc.RpcError) as raised:
            list(stream(request_))
        _check_refusal(raised.value)
        assert sync_probe.calls == []


# -- against authsvc --------------------------------------------------------------


def _logged(log_file: Path, request_id: str) -> bool:
    return request_id in log_file.read_text()


async def test_against_authsvc_a_foreign_org_never_reaches_the_server(
    api: Api, log_file: Path
) -> None:
    org_a, owner_a = await org_with_owner(api)
    org_b, _ = await org_with_owner(api)
    channel = grpc.aio.insecure_channel(
        api.target, interceptors=aio_interceptors(token_credentials(owner_a.token))
    )
    from authsvc_client.v1 import orgs_pb2_grpc

    orgs = orgs_pb2_grpc.OrgServiceStub(channel)
    try:
        # Refused locally: authsvc's access log, which has a line for every
        # RPC it receives, never sees the request id; no row changes.
        before = await api.snapshot()
        refused_id = uuid.uuid4().hex
        error = await _refused_aio(
            orgs.RemoveMember(
                orgs_pb2.RemoveMemberRequest(org_id=org_b.id, user_id=owner_a.id),
                metadata=(("x-request-id", refused_id),),
            )
        )
        _check_refusal(error)
        assert await api.snapshot() == before

        # The matching org goes through, with the interceptor's token.
        passed_id = uuid.uuid4().hex
        got = await orgs.GetOrg(
            orgs_pb2.GetOrgRequest(org_id=org_a.id), metadata=(("x-request-id", passed_id),)
        )
        assert got.org.id == org_a.id
        # The access-log line is written after the answer goes out: wait for
        # it. Once the later call's line is there, the refused call would
        # have had its line too, had it reached the server.
        deadline = time.monotonic() + 5.0
        while not _logged(log_file, passed_id):
            assert time.monotonic() < deadline, "the passing call was never logged"
            await asyncio.sleep(0.01)
        assert not _logged(log_file, refused_id)

        # org_slug is not a tenant field (the interceptor cannot resolve
        # slugs): authsvc itself refuses another org's slug.
        slug_error = await _refused_aio(orgs.GetOrg(orgs_pb2.GetOrgRequest(org_slug=org_b.slug)))
        assert from_rpc_error(slug_error).metadata.get("origin") != "client"
        assert isinstance(from_rpc_error(slug_error), OrgMismatch)
    finally:
        await channel.close()


async def test_against_authsvc_set_active_org_names_another_org_and_is_sent(api: Api) -> None:
    _, owner_a = await org_with_owner(api)
    org_b, _ = await org_with_owner(api)
    channel = grpc.aio.insecure_channel(
        api.target, interceptors=aio_interceptors(token_credentials(owner_a.token))
    )
    from authsvc_client.v1 import auth_pb2_grpc

    auth = auth_pb2_grpc.AuthServiceStub(channel)
    try:
        # SetActiveOrgRequest.org_id is marked (authsvc.v1.tenant) = false: it
        # names the org to switch to, so it goes to the server, which refuses
        # a non-member.
        error = await _refused_aio(
            auth.SetActiveOrg(
                auth_pb2.SetActiveOrgRequest(
                    refresh_token=owner_a.tokens.refresh_token, org_id=org_b.id
                )
            )
        )
        typed = from_rpc_error(error)
        assert typed.reason == "MEMBER_NOT_FOUND"
    finally:
        await channel.close()


async def test_against_authsvc_the_active_org_in_another_case_is_sent_and_served(
    api: Api, log_file: Path
) -> None:
    """The client compares org ids as UUIDs, as authsvc does: the active org
    spelled in upper case passes the local check and authsvc serves it; in
    braces it passes too, and authsvc (which takes only canonical ids) refuses
    it as INVALID_ARGUMENT, not as another org."""
    org_a, owner_a = await org_with_owner(api)
    channel = grpc.aio.insecure_channel(
        api.target, interceptors=aio_interceptors(token_credentials(owner_a.token))
    )
    from authsvc_client.v1 import orgs_pb2_grpc

    orgs = orgs_pb2_grpc.OrgServiceStub(channel)
    try:
        got = await orgs.GetOrg(orgs_pb2.GetOrgRequest(org_id=org_a.id.upper()))
        assert got.org.id == org_a.id
        sent_id = uuid.uuid4().hex
        error = from_rpc_error(
            await _refused_aio(
                orgs.GetOrg(
                    orgs_pb2.GetOrgRequest(org_id="{" + org_a.id + "}"),
                    metadata=(("x-request-id", sent_id),),
                )
            )
        )
        assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        assert _logged(log_file, sent_id)
    finally:
        await channel.close()

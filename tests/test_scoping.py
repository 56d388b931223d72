"""``authsvc_client.scoping``: the seed's tenant helpers and the tenant-scoping
client interceptors, over real channels.

"Nothing is sent" is proved two ways: against a probe server that records
every call it receives (grpc.aio and classic), and against authsvc itself,
whose access log records every RPC it receives by request id.

Tenant fields hold an org id or an org slug (the ``(authsvc.v1.tenant)``
option's ``TenantKey``, or the field's name); a slug is checked against the
``org_slug`` claim of the caller's token.
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
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message

from authsvc_client.errors import AuthsvcError, OrgMismatch, from_rpc_error
from authsvc_client.scoping import (
    Credentials,
    LocalRpcError,
    SyncTenantScopeInterceptor,
    TenantScopeInterceptor,
    aio_interceptors,
    assert_same_org,
    inbound_credentials,
    is_authorized,
    is_org_authorized,
    is_same_org,
    is_same_org_slug,
    session_from_token,
    tenant_fields,
    token_credentials,
)
from authsvc_client.v1 import auth_pb2, options_pb2, orgs_pb2, orgs_pb2_grpc, resources_pb2
from tests.app import Api, new_slug, org_with_owner, refreshed, service

ORG_A = str(uuid.UUID(int=0xA))
ORG_B = str(uuid.UUID(int=0xB))
SLUG_A, SLUG_B = "org-a", "org-b"
PD = grpc.StatusCode.PERMISSION_DENIED


def session(
    role: int = resources_pb2.ROLE_USER, org_id: str = "", org_role: int = 0, org_slug: str = ""
) -> resources_pb2.SessionInfo:
    return resources_pb2.SessionInfo(
        session_id=str(uuid.uuid4()),
        user_id=str(uuid.uuid4()),
        role=role,  # type: ignore[arg-type]
        org_id=org_id,
        org_slug=org_slug,
        org_role=org_role,  # type: ignore[arg-type]
    )


# -- the helpers ---------------------------------------------------------------

USER = session()
ADMIN = session(resources_pb2.ROLE_ADMIN)
A_OWNER = session(org_id=ORG_A, org_role=resources_pb2.ORG_ROLE_OWNER, org_slug=SLUG_A)
A_MEMBER = session(org_id=ORG_A, org_role=resources_pb2.ORG_ROLE_MEMBER, org_slug=SLUG_A)
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


@pytest.mark.parametrize(
    ("who", "slug", "same"),
    [
        (A_OWNER, SLUG_A, True),
        (A_MEMBER, SLUG_A, True),
        (A_OWNER, SLUG_B, False),
        (A_OWNER, SLUG_A.upper(), False),  # slugs are lowercase; never folded
        (A_OWNER, SLUG_A + " ", False),
        (A_OWNER, ORG_A, False),  # an id is not a slug
        (A_OWNER, "", False),
        (session(org_id=ORG_A), SLUG_A, False),  # a token without the slug claim
        (session(org_id=ORG_A), "", False),
        (NO_ORG, SLUG_A, False),
        (session(org_slug=SLUG_A), SLUG_A, False),  # a slug without an org is none
        (None, SLUG_A, False),
    ],
)
def test_is_same_org_slug_and_assert_same_org_by_slug(who: Any, slug: str, same: bool) -> None:
    if who is not None:
        assert is_same_org_slug(who, slug) is same
    if same:
        assert_same_org(who, slug=slug)
        return
    with pytest.raises(OrgMismatch):
        assert_same_org(who, slug=slug)


def test_assert_same_org_takes_an_id_or_a_slug_not_both() -> None:
    with pytest.raises(ValueError, match="not both"):
        assert_same_org(A_OWNER, ORG_A, slug=SLUG_A)
    with pytest.raises(OrgMismatch):
        assert_same_org(A_OWNER)  # names no org


# -- a probe proto with tenant fields at every depth ------------------------------


ORG_ID, ORG_SLUG = options_pb2.TENANT_KEY_ORG_ID, options_pb2.TENANT_KEY_ORG_SLUG
NONE, UNSPECIFIED = options_pb2.TENANT_KEY_NONE, options_pb2.TENANT_KEY_UNSPECIFIED
#: A TenantKey a newer options.proto may add: this client does not know it.
FUTURE_KEY = 99


def _defaulted_file() -> descriptor_pb2.FileDescriptorProto:
    """``scopetest2.v1``, a proto2 file: a tenant field with a default value::

    message Defaulted { optional string org_id = 1 [default = "<ORG_B>"]; }
    """
    f = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="tests/scopetest2.proto", package="scopetest2.v1", syntax="proto2"
    )
    defaulted = proto.message_type.add(name="Defaulted")
    defaulted.field.add(
        name="org_id", number=1, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL, default_value=ORG_B
    )
    return proto


def _probe_file() -> descriptor_pb2.FileDescriptorProto:
    """``scopetest.v1``, built as a descriptor (the same as compiling a .proto)::

    message Inner  { string org_id = 1; string other = 2; string org_slug = 3; }
    message Marked { string tenant = 1 [(authsvc.v1.tenant) = TENANT_KEY_ORG_ID];
                     string org_id = 2 [(authsvc.v1.tenant) = TENANT_KEY_NONE];
                     string handle = 3 [(authsvc.v1.tenant) = TENANT_KEY_ORG_SLUG];
                     string org_slug = 4 [(authsvc.v1.tenant) = TENANT_KEY_NONE];
                     string future = 5 [(authsvc.v1.tenant) = 99]; }  // a newer key
    message Keyed  {
      oneof org { string org_id = 1 [(authsvc.v1.tenant) = TENANT_KEY_ORG_ID];
                  string org_slug = 2 [(authsvc.v1.tenant) = TENANT_KEY_UNSPECIFIED]; }
      string label = 3 [(authsvc.v1.tenant) = TENANT_KEY_UNSPECIFIED];
    }
    message Outer {
      string name = 1; Inner inner = 2; repeated Inner many = 3;
      map<string, Inner> by_key = 4; Marked marked = 5;
      repeated string orgs = 6 [(authsvc.v1.tenant) = TENANT_KEY_ORG_ID];
      Outer child = 7;                      // recursive
      oneof pick { Inner picked = 8; string word = 9; }
      map<string, string> labels = 10;      // values are not tenant fields
      int64 org_count = 11;                 // not a string
      Keyed keyed = 12;
      scopetest2.v1.Defaulted defaulted = 13;
      repeated string slugs = 14 [(authsvc.v1.tenant) = TENANT_KEY_ORG_SLUG];
    }
    message Plain { string name = 1; Plain next = 2; }
    """
    f = descriptor_pb2.FieldDescriptorProto
    string, message, repeated = f.TYPE_STRING, f.TYPE_MESSAGE, f.LABEL_REPEATED
    proto = descriptor_pb2.FileDescriptorProto(
        name="tests/scopetest.proto",
        package="scopetest.v1",
        syntax="proto3",
        dependency=["authsvc/v1/options.proto", "tests/scopetest2.proto"],
    )

    def add(msg: Any, name: str, number: int, kind: int, type_name: str = "", **kw: Any) -> Any:
        new = msg.field.add(name=name, number=number, type=kind, label=kw.pop("label", 1), **kw)
        if type_name:
            new.type_name = type_name if "." in type_name else f".scopetest.v1.{type_name}"
        return new

    def key(field: Any, value: int) -> None:
        field.options.Extensions[options_pb2.tenant] = value

    inner = proto.message_type.add(name="Inner")
    add(inner, "org_id", 1, string)
    add(inner, "other", 2, string)
    add(inner, "org_slug", 3, string)
    marked = proto.message_type.add(name="Marked")
    key(add(marked, "tenant", 1, string), ORG_ID)
    key(add(marked, "org_id", 2, string), NONE)
    key(add(marked, "handle", 3, string), ORG_SLUG)
    key(add(marked, "org_slug", 4, string), NONE)
    key(add(marked, "future", 5, string), FUTURE_KEY)
    keyed = proto.message_type.add(name="Keyed")
    keyed.oneof_decl.add(name="org")
    key(add(keyed, "org_id", 1, string, oneof_index=0), ORG_ID)
    key(add(keyed, "org_slug", 2, string, oneof_index=0), UNSPECIFIED)
    key(add(keyed, "label", 3, string), UNSPECIFIED)
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
    key(add(outer, "orgs", 6, string, label=repeated), ORG_ID)
    add(outer, "child", 7, message, "Outer")
    add(outer, "picked", 8, message, "Inner", oneof_index=0)
    add(outer, "word", 9, string, oneof_index=0)
    add(outer, "labels", 10, message, "Outer.LabelsEntry", label=repeated)
    add(outer, "org_count", 11, f.TYPE_INT64)
    add(outer, "keyed", 12, message, "Keyed")
    add(outer, "defaulted", 13, message, ".scopetest2.v1.Defaulted")
    key(add(outer, "slugs", 14, string, label=repeated), ORG_SLUG)
    plain = proto.message_type.add(name="Plain")
    add(plain, "name", 1, string)
    add(plain, "next", 2, message, "Plain")
    return proto


_pool = descriptor_pool.Default()
for _name, _make in (
    ("tests/scopetest2.proto", _defaulted_file),
    ("tests/scopetest.proto", _probe_file),
):
    try:
        _pool.FindFileByName(_name)
    except KeyError:
        _pool.Add(_make())


def _message(name: str) -> Any:
    return message_factory.GetMessageClass(_pool.FindMessageTypeByName(name))


Inner, Marked, Keyed = (_message(f"scopetest.v1.{n}") for n in ("Inner", "Marked", "Keyed"))
Outer, Plain = _message("scopetest.v1.Outer"), _message("scopetest.v1.Plain")
Defaulted = _message("scopetest2.v1.Defaulted")
UNARY = "/scopetest.v1.Probe/Call"
STREAM = "/scopetest.v1.Probe/Stream"


def test_tenant_fields_found_by_name_and_by_option() -> None:
    assert sorted(tenant_fields(Outer.DESCRIPTOR)) == [
        "scopetest.v1.Inner.org_id",
        "scopetest.v1.Inner.org_slug",
        "scopetest.v1.Keyed.org_id",
        "scopetest.v1.Keyed.org_slug",
        "scopetest.v1.Marked.future",
        "scopetest.v1.Marked.handle",
        "scopetest.v1.Marked.tenant",
        "scopetest.v1.Outer.orgs",
        "scopetest.v1.Outer.slugs",
        "scopetest2.v1.Defaulted.org_id",
    ]
    assert tenant_fields(Plain.DESCRIPTOR) == []
    # authsvc's own: the org-scoped requests name the tenant in their `org`
    # oneof, by id or by slug; SetActiveOrgRequest's oneof (the org to switch
    # to) and Member.org_id are exempt (TENANT_KEY_NONE); CreateOrg names no
    # org yet, and its `slug` is the new org's.
    for request in (
        orgs_pb2.GetOrgRequest,
        orgs_pb2.UpdateOrgRequest,
        orgs_pb2.DeleteOrgRequest,
        orgs_pb2.AddMemberRequest,
        orgs_pb2.UpdateMemberRequest,
        orgs_pb2.RemoveMemberRequest,
        orgs_pb2.GetMemberRequest,
        orgs_pb2.ListMembersRequest,
    ):
        name = request.DESCRIPTOR.full_name
        assert tenant_fields(request.DESCRIPTOR) == [f"{name}.org_id", f"{name}.org_slug"]
    assert tenant_fields(auth_pb2.SetActiveOrgRequest.DESCRIPTOR) == []
    assert tenant_fields(orgs_pb2.ListMembersResponse.DESCRIPTOR) == []
    assert tenant_fields(orgs_pb2.ListOrgsResponse.DESCRIPTOR) == []
    assert tenant_fields(orgs_pb2.CreateOrgRequest.DESCRIPTOR) == []


# Each case: a request, and whether a session whose active org is A (slug
# "org-a") may send it.
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
    # Slugs: by name (org_slug) or by option (TENANT_KEY_ORG_SLUG), exactly.
    ("nested org_slug = active", Outer(inner=Inner(org_slug=SLUG_A)), True),
    ("nested org_slug = other", Outer(inner=Inner(org_slug=SLUG_B)), False),
    ("nested org_slug set but empty", Outer(inner=Inner(org_slug="")), True),
    ("a slug in upper case is another slug", Outer(inner=Inner(org_slug="ORG-A")), False),
    ("the active id in a slug field", Outer(inner=Inner(org_slug=ORG_A)), False),
    ("the active slug in an id field", Outer(inner=Inner(org_id=SLUG_A)), False),
    ("id and slug both of the active org", Outer(inner=Inner(org_id=ORG_A, org_slug=SLUG_A)), True),
    ("active id, other slug", Outer(inner=Inner(org_id=ORG_A, org_slug=SLUG_B)), False),
    ("option-marked slug = active", Outer(marked=Marked(handle=SLUG_A)), True),
    ("option-marked slug = other", Outer(marked=Marked(handle=SLUG_B)), False),
    ("org_slug exempted by the option", Outer(marked=Marked(org_slug=SLUG_B)), True),
    ("repeated slugs, one other", Outer(slugs=[SLUG_A, SLUG_B]), False),
    ("repeated slugs, active", Outer(slugs=[SLUG_A]), True),
    ("slug in a map value, other", Outer(by_key={"k": Inner(org_slug=SLUG_B)}), False),
    # An `org` oneof as authsvc's requests have it: only the chosen member counts.
    ("org oneof by id, active", Outer(keyed=Keyed(org_id=ORG_A)), True),
    ("org oneof by id, other", Outer(keyed=Keyed(org_id=ORG_B)), False),
    ("org oneof by slug (by name), active", Outer(keyed=Keyed(org_slug=SLUG_A)), True),
    ("org oneof by slug (by name), other", Outer(keyed=Keyed(org_slug=SLUG_B)), False),
    ("org oneof chosen but empty", Outer(keyed=Keyed(org_slug="")), True),
    ("explicitly unspecified, not an org name", Outer(keyed=Keyed(label=ORG_B)), True),
    # A key newer than this client: refused whenever set, never skipped.
    ("unknown tenant key, set", Outer(marked=Marked(future=ORG_A)), False),
    ("unknown tenant key, empty", Outer(marked=Marked(future="")), True),
    # proto2 presence: a default value is not a named org; a set one is.
    ("proto2 field unset (its default names B)", Outer(defaulted=Defaulted()), True),
    ("proto2 field set to the active org", Outer(defaulted=Defaulted(org_id=ORG_A)), True),
    ("proto2 field set to another org", Outer(defaulted=Defaulted(org_id=ORG_B)), False),
]


def _switched_oneof() -> Message:
    keyed = Keyed(org_id=ORG_B)
    keyed.org_slug = SLUG_A  # the oneof now holds the slug: org_id is no longer set
    outer: Message = Outer(keyed=keyed)
    return outer


CASES.append(("org oneof switched from another id to the active slug", _switched_oneof(), True))


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


def fake_token(
    org_id: str = "", org_role: str = "", role: str = "user", org_slug: str | None = None
) -> str:
    """A JWT-shaped token (unsigned: the probe does not verify, and the
    interceptor only reads claims). With ``org_id``, the ``org_slug`` claim is
    ``org_slug`` ("org-a" for ORG_A, "org-b" for ORG_B by default; ``""``
    leaves it out, as a server older than the claim did)."""

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
        if org_slug is None:
            org_slug = {ORG_A: SLUG_A, ORG_B: SLUG_B}.get(org_id, "")
        if org_slug:
            claims["org_slug"] = org_slug
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


@pytest.mark.parametrize(
    "request_",
    [
        Outer(inner=Inner(org_id=ORG_A)),
        Outer(orgs=[ORG_A]),
        Outer(inner=Inner(org_slug=SLUG_A)),
        Outer(keyed=Keyed(org_slug=SLUG_A)),
        Outer(marked=Marked(handle=SLUG_A)),
    ],
)
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
    assert (info.org_id, info.org_slug, info.org_role, info.role) == (
        ORG_A,
        SLUG_A,
        resources_pb2.ORG_ROLE_OWNER,
        resources_pb2.ROLE_ADMIN,
    )
    assert info.expire_time.seconds > time.time()
    bare = session_from_token(fake_token())
    assert (bare.org_id, bare.org_slug, bare.org_role) == (
        "",
        "",
        resources_pb2.ORG_ROLE_UNSPECIFIED,
    )
    older = session_from_token(fake_token(ORG_A, org_slug=""))  # no org_slug claim
    assert (older.org_id, older.org_slug) == (ORG_A, "")
    for bad in ("", "a.b", "not.a.jwt", "a.e30.c"):  # e30 = "{}": no sub/sid
        with pytest.raises(ValueError, match=r"JWT|claims"):
            token_credentials(bad)


async def test_a_refused_slug_names_its_field(probe: Probe) -> None:
    """Another org's slug is refused before sending, exactly like another
    org's id: ORG_MISMATCH from the client, naming the field."""
    async with grpc.aio.insecure_channel(
        probe.target, interceptors=aio_interceptors(token_credentials(fake_token(ORG_A)))
    ) as channel:
        call = channel.unary_unary(UNARY, **_serde())
        for request_, field_name in (
            (Outer(inner=Inner(org_slug=SLUG_B)), "scopetest.v1.Inner.org_slug"),
            (Outer(keyed=Keyed(org_slug=SLUG_B)), "scopetest.v1.Keyed.org_slug"),
            (Outer(marked=Marked(handle=SLUG_B)), "scopetest.v1.Marked.handle"),
            (Outer(inner=Inner(org_id=ORG_B)), "scopetest.v1.Inner.org_id"),
        ):
            typed = _check_refusal(await _refused_aio(call(request_)))
            assert typed.metadata["field"] == field_name
            assert "another organization" in typed.message
        # The active org's slug goes through.
        await call(Outer(keyed=Keyed(org_slug=SLUG_A)))
    assert len(probe.calls) == 1


async def test_a_token_without_the_slug_claim_refuses_every_slug(probe: Probe) -> None:
    """A token of a server older than the `org_slug` claim: its org's id still
    passes, and no slug does, not even the org's own (the client cannot tell)."""
    token = fake_token(ORG_A, org_slug="")
    async with grpc.aio.insecure_channel(
        probe.target, interceptors=aio_interceptors(token_credentials(token))
    ) as channel:
        call = channel.unary_unary(UNARY, **_serde())
        for slug in (SLUG_A, SLUG_B):
            typed = _check_refusal(await _refused_aio(call(Outer(keyed=Keyed(org_slug=slug)))))
            assert "carries no org slug" in typed.message
        await call(Outer(keyed=Keyed(org_id=ORG_A)))
    assert len(probe.calls) == 1


async def test_a_token_from_before_a_slug_change_keeps_its_old_slug(probe: Probe) -> None:
    """The client trusts the token's `org_slug` claim and looks nothing up: a
    token minted before the org's slug changed passes its old slug (the
    server decides; see the test against authsvc) and refuses the new one
    until it is refreshed."""
    old = fake_token(ORG_A, org_slug="acme-old")
    renewed = fake_token(ORG_A, org_slug="acme-new")
    current = {"token": old}
    source = token_credentials(lambda: current["token"])
    async with grpc.aio.insecure_channel(probe.target, interceptors=aio_interceptors(source)) as ch:
        call = ch.unary_unary(UNARY, **_serde())
        await call(Outer(keyed=Keyed(org_slug="acme-old")))
        _check_refusal(await _refused_aio(call(Outer(keyed=Keyed(org_slug="acme-new")))))
        current["token"] = renewed  # refreshed: the new claim
        await call(Outer(keyed=Keyed(org_slug="acme-new")))
        _check_refusal(await _refused_aio(call(Outer(keyed=Keyed(org_slug="acme-old")))))
    assert [r.keyed.org_slug for _, r, _ in probe.calls] == ["acme-old", "acme-new"]


def test_the_sync_interceptor_refuses_a_foreign_slug(sync_probe: Probe) -> None:
    interceptor = SyncTenantScopeInterceptor(token_credentials(fake_token(ORG_A)))
    with grpc.insecure_channel(sync_probe.target) as plain:
        channel = grpc.intercept_channel(plain, interceptor)
        unary = channel.unary_unary(UNARY, **_serde())
        with pytest.raises(LocalRpcError) as raised:
            unary(Outer(keyed=Keyed(org_slug=SLUG_B)))
        assert _check_refusal(raised.value).metadata["field"] == "scopetest.v1.Keyed.org_slug"
        assert unary(Outer(keyed=Keyed(org_slug=SLUG_A))) == Outer(keyed=Keyed(org_slug=SLUG_A))
    assert len(sync_probe.calls) == 1


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

        # Another org's slug: refused locally too, against the token's
        # `org_slug` claim.
        slug_refused_id = uuid.uuid4().hex
        slug_error = await _refused_aio(
            orgs.GetOrg(
                orgs_pb2.GetOrgRequest(org_slug=org_b.slug),
                metadata=(("x-request-id", slug_refused_id),),
            )
        )
        assert _check_refusal(slug_error).metadata["field"] == "authsvc.v1.GetOrgRequest.org_slug"
        assert await api.snapshot() == before

        # The matching org goes through, by id and by slug, with the
        # interceptor's token.
        got = await orgs.GetOrg(orgs_pb2.GetOrgRequest(org_slug=org_a.slug))
        assert got.org.id == org_a.id
        passed_id = uuid.uuid4().hex
        got = await orgs.GetOrg(
            orgs_pb2.GetOrgRequest(org_id=org_a.id), metadata=(("x-request-id", passed_id),)
        )
        assert got.org.id == org_a.id
        # The access-log line is written after the answer goes out: wait for
        # it. Once the later call's line is there, the refused calls would
        # have had their lines too, had they reached the server.
        deadline = time.monotonic() + 5.0
        while not _logged(log_file, passed_id):
            assert time.monotonic() < deadline, "the passing call was never logged"
            await asyncio.sleep(0.01)
        assert not _logged(log_file, refused_id)
        assert not _logged(log_file, slug_refused_id)
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
        # SetActiveOrgRequest's org_id and org_slug are marked
        # (authsvc.v1.tenant) = TENANT_KEY_NONE: they name the org to switch
        # to, so they go to the server, which refuses a non-member.
        for named in ({"org_id": org_b.id}, {"org_slug": org_b.slug}):
            error = await _refused_aio(
                auth.SetActiveOrg(
                    auth_pb2.SetActiveOrgRequest(
                        refresh_token=owner_a.tokens.refresh_token, **named
                    )
                )
            )
            typed = from_rpc_error(error)
            assert typed.reason == "MEMBER_NOT_FOUND"
            assert typed.metadata.get("origin") != "client"
    finally:
        await channel.close()


async def test_against_authsvc_a_slug_change_is_decided_by_the_server(api: Api) -> None:
    """After the org's slug changes, the owner's older token still carries the
    old slug. The client trusts it: a request naming the new slug is refused
    locally, one naming the old slug is sent and authsvc (which compares the
    slug the org has now) refuses it. The refreshed token carries the new
    slug, and the new slug passes."""
    old_slug = new_slug()
    org, owner = await org_with_owner(api, slug=old_slug)
    renamed = new_slug()
    await api.orgs.UpdateOrg(
        orgs_pb2.UpdateOrgRequest(
            org_id=org.id,
            values=resources_pb2.Org(slug=renamed),
            update_mask=FieldMask(paths=["slug"]),
        ),
        metadata=service(),
    )
    current = {"token": owner.token}
    channel = grpc.aio.insecure_channel(
        api.target, interceptors=aio_interceptors(token_credentials(lambda: current["token"]))
    )
    orgs = orgs_pb2_grpc.OrgServiceStub(channel)
    try:
        assert session_from_token(owner.token).org_slug == old_slug
        local = from_rpc_error(
            await _refused_aio(orgs.GetOrg(orgs_pb2.GetOrgRequest(org_slug=renamed)))
        )
        assert (local.reason, local.metadata.get("origin")) == ("ORG_MISMATCH", "client")
        remote = from_rpc_error(
            await _refused_aio(orgs.GetOrg(orgs_pb2.GetOrgRequest(org_slug=old_slug)))
        )
        assert remote.reason == "ORG_MISMATCH"
        assert remote.metadata.get("origin") != "client"
        # By id, the old token still acts in the org: ids never change.
        assert (await orgs.GetOrg(orgs_pb2.GetOrgRequest(org_id=org.id))).org.slug == renamed

        tokens = await refreshed(api, owner.tokens.refresh_token)
        current["token"] = tokens.access_token
        assert session_from_token(tokens.access_token).org_slug == renamed
        got = await orgs.GetOrg(orgs_pb2.GetOrgRequest(org_slug=renamed))
        assert got.org.id == org.id
        local = from_rpc_error(
            await _refused_aio(orgs.GetOrg(orgs_pb2.GetOrgRequest(org_slug=old_slug)))
        )
        assert local.metadata.get("origin") == "client"
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

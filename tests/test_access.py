"""Every RPC against every kind of credential, driven by the declared access.

The API contract (``protos/authsvc/v1/options.proto``) says every authsvc
method declares exactly one ``(authsvc.v1.access)`` and that the server checks
the caller's credential against it before the handler runs. These tests read
the declarations from the generated descriptors, call each method over a real
channel with an empty request and each kind of credential, and check the
outcome the declaration promises. A method added later is walked
automatically; one that is not served, or that declares no access, fails.
Server-streaming methods (WatchRevocations) are judged by their first
response or their error.
"""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message_factory import GetMessageClass

import authsvc_client.v1 as client_v1
from authsvc_client.errors import from_rpc_error
from authsvc_client.v1 import auth_pb2, options_pb2, sessions_pb2, users_pb2
from tests.app import API_KEY, Api, bearer, failure, remember, service

PUBLIC = options_pb2.ACCESS_PUBLIC
USER = options_pb2.ACCESS_USER
SELF_OR_ADMIN = options_pb2.ACCESS_SELF_OR_ADMIN
ADMIN = options_pb2.ACCESS_ADMIN
ORG = options_pb2.ACCESS_ORG
ACCESS_NAMES = {int(value): name for name, value in options_pb2.Access.items()}

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED

# Credential kinds, in the order each method is called with them. The ones
# that may change state (a user's or admin's own token: SignOut, and
# RevokeAllSessions of oneself) come last.
KINDS = (
    "none",
    "bad_api_key",
    "malformed_bearer:not-a-jwt",
    "malformed_bearer:basic",
    "malformed_bearer:three-dots",
    "malformed_bearer:no-token",
    "api_key",
    "admin_token",
    "user_token",
)
MALFORMED_BEARERS = {
    "malformed_bearer:not-a-jwt": "Bearer not-a-jwt",
    "malformed_bearer:basic": "Basic dXNlcjpjb3JyZWN0IGhvcnNl",
    "malformed_bearer:three-dots": "Bearer a.b.c",
    "malformed_bearer:no-token": "Bearer",
}
BAD_API_KEY = "ak_not_a_key_this_server_knows_0000"


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


async def call_raw(
    api: Api, svc: ServiceDescriptor, method: MethodDescriptor, metadata: Any
) -> Outcome:
    """Calls a method with an empty request of its input type.

    A server-streaming method is judged by its first response (or its error):
    the stream is then cancelled.
    """
    request_class = GetMessageClass(method.input_type)
    response_class = GetMessageClass(method.output_type)
    kwargs: Any = {
        "request_serializer": request_class.SerializeToString,
        "response_deserializer": response_class.FromString,
    }
    try:
        if method.server_streaming:
            stream = api.channel.unary_stream(_path(svc, method), **kwargs)
            call = stream(request_class(), metadata=metadata, timeout=30)
            try:
                await asyncio.wait_for(call.read(), timeout=10)
            finally:
                call.cancel()
        else:
            unary = api.channel.unary_unary(_path(svc, method), **kwargs)
            await unary(request_class(), metadata=metadata, timeout=30)
    except grpc.aio.AioRpcError as rpc_error:
        error = from_rpc_error(rpc_error)
        return Outcome(error.code, error.reason)
    return Outcome(grpc.StatusCode.OK, "")


def expectation_broken(access: int, kind: str, got: Outcome) -> str | None:
    """Why ``got`` breaks the contract for this access and credential, or None."""
    if got.code == grpc.StatusCode.INTERNAL:
        return "INTERNAL"
    if got.code == grpc.StatusCode.UNIMPLEMENTED:
        return "not served"
    denied = got.code == PERMISSION_DENIED or got.reason == "PERMISSION_DENIED"
    if kind == "bad_api_key":
        want = Outcome(UNAUTHENTICATED, "API_KEY_INVALID")
        return None if got == want else f"want {want}"
    if kind.startswith("malformed_bearer"):
        want = Outcome(UNAUTHENTICATED, "TOKEN_INVALID")
        return None if got == want else f"want {want}"
    not_authenticated = Outcome(UNAUTHENTICATED, "NOT_AUTHENTICATED")
    if access == PUBLIC:
        # No credential needed: whatever fails, it is not the credential check.
        if got.reason in ("NOT_AUTHENTICATED", "API_KEY_INVALID") or denied:
            return "a public method refused the caller"
        return None
    if kind == "none":
        return None if got == not_authenticated else f"want {not_authenticated}"
    if access == USER:
        if kind == "api_key":
            # A service key is not a user: USER methods need an access token.
            return None if got == not_authenticated else f"want {not_authenticated}"
        if got.code == UNAUTHENTICATED or denied:
            return "a user's own token was refused"
        return None
    if access == SELF_OR_ADMIN:
        # An empty request names no one else: the caller acts on itself.
        if got.code == UNAUTHENTICATED or denied:
            return "refused a credential the method accepts"
        return None
    if access == ADMIN:
        if kind == "user_token":
            want = Outcome(PERMISSION_DENIED, "PERMISSION_DENIED")
            return None if got == want else f"want {want}"
        if got.code == UNAUTHENTICATED or denied:
            return "refused an admin credential"
        return None
    if access == ORG:
        # Credential needed as for SELF_OR_ADMIN; an empty request names no
        # org (neither org_id nor org_slug), which is a bad request for
        # everyone, before any active-org or role check.
        want = Outcome(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        return None if got == want else f"want {want}"
    return f"unknown access {access}"


async def _credentials(api: Api) -> dict[str, tuple[tuple[str, str], ...] | None]:
    """A fresh user and admin per method: SignOut and RevokeAllSessions with an
    empty request end the caller's own session."""
    user = await api.sign_up()
    admin = await api.admin_token()
    creds: dict[str, tuple[tuple[str, str], ...] | None] = {
        "none": None,
        "bad_api_key": (("x-api-key", BAD_API_KEY),),
        "api_key": service(),
        "admin_token": bearer(admin),
        "user_token": bearer(user.tokens.access_token),
    }
    for kind, value in MALFORMED_BEARERS.items():
        creds[kind] = (("authorization", value),)
    return creds


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


def test_declared_access_matches_the_documented_contract() -> None:
    """The access of each method as its proto comment documents it; a change of
    declaration must be a deliberate change of this table too."""
    documented = {
        "/authsvc.v1.AuthService/SignUp": PUBLIC,
        "/authsvc.v1.AuthService/SignInWithPassword": PUBLIC,
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


async def test_every_method_with_every_credential(api: Api) -> None:
    remember(BAD_API_KEY)
    covered: set[str] = set()
    table: list[str] = []
    broken: list[str] = []
    for svc, method in _methods():
        path = _path(svc, method)
        access = declared_access(method)
        creds = await _credentials(api)
        for kind in KINDS:
            got = await call_raw(api, svc, method, creds[kind])
            why = expectation_broken(access, kind, got)
            line = f"{path} [{ACCESS_NAMES[access]}] {kind}: {got}"
            table.append(line)
            if why is not None:
                broken.append(f"{line} -> {why}")
        covered.add(path)
    print("\n".join(table))
    assert covered == descriptor_methods(), "some methods were not walked"
    assert not broken, "access contract broken:\n" + "\n".join(broken)


async def test_public_methods_check_credentials_sent_anyway(api: Api) -> None:
    """A bad credential on a public method fails the call, even when the
    request itself would succeed (GetJwks)."""
    jwks = await api.auth.GetJwks(auth_pb2.GetJwksRequest())
    assert jwks.keys
    error = await failure(
        api.auth.GetJwks(auth_pb2.GetJwksRequest(), metadata=(("x-api-key", BAD_API_KEY),))
    )
    assert (error.code, error.reason) == (UNAUTHENTICATED, "API_KEY_INVALID")
    error = await failure(
        api.auth.GetJwks(auth_pb2.GetJwksRequest(), metadata=(("authorization", "Bearer x"),))
    )
    assert (error.code, error.reason) == (UNAUTHENTICATED, "TOKEN_INVALID")
    # A signed-out token is a bad credential too.
    created = await api.sign_up()
    await api.auth.SignOut(auth_pb2.SignOutRequest(), metadata=bearer(created.tokens.access_token))
    error = await failure(
        api.auth.GetJwks(auth_pb2.GetJwksRequest(), metadata=bearer(created.tokens.access_token))
    )
    assert (error.code, error.reason) == (UNAUTHENTICATED, "SESSION_REVOKED")


async def test_api_key_with_a_bad_bearer_still_fails(api: Api) -> None:
    """Every credential sent is checked: a good API key does not excuse a bad token."""
    error = await failure(
        api.users.CountUsers(
            users_pb2.CountUsersRequest(),
            metadata=(("x-api-key", API_KEY), ("authorization", "Bearer not-a-jwt")),
        )
    )
    assert (error.code, error.reason) == (UNAUTHENTICATED, "TOKEN_INVALID")


async def test_admin_methods_succeed_for_admins_and_services(api: Api) -> None:
    admin = await api.admin_token()
    for metadata in (bearer(admin), service()):
        counted = await api.users.CountUsers(users_pb2.CountUsersRequest(), metadata=metadata)
        assert counted.count == 1
        listed = await api.users.ListUsers(users_pb2.ListUsersRequest(), metadata=metadata)
        assert len(listed.users) == 1


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
                    user=users_pb2.User(id=user_id, display_name="Mallory"),
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


async def test_user_token_with_api_key_is_a_service_for_admin_methods(api: Api) -> None:
    """An API key next to a user's token acts as the service (documented: an
    admin token or API key)."""
    created = await api.sign_up()
    counted = await api.users.CountUsers(
        users_pb2.CountUsersRequest(),
        metadata=(*bearer(created.tokens.access_token), *service()),
    )
    assert counted.count == 1

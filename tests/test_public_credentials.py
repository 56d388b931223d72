"""Credentials on public RPCs: a bearer in metadata is ignored, an API key is not.

What auth.proto and options.proto promise for ACCESS_PUBLIC methods (SignUp,
SignInWithPassword, CompleteSignIn, RefreshToken, Authenticate, SetActiveOrg,
GetJwks): their credential, if they need one, is in the request, and an
``authorization`` header is not read at all. It is not verified and not
looked up (the server resolves no token but the one a request carries), and
no bearer, malformed, expired, revoked or forged, makes one fail. So a client
whose channel attaches the user's access token to every call can still
refresh when that token has expired. An ``x-api-key`` is still checked there:
a bad one fails API_KEY_INVALID and changes nothing, a good one still lets a
gateway pass ClientInfo, which a bearer (even an admin's) never does. Methods
that are not public check a bearer as before (tests/test_access.py walks them).

Expired tokens come from a server with a short access-token TTL and are
waited for, not minted with a past ``exp``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from authsvc.security.secrets import sha256
from authsvc_client.errors import from_rpc_error
from authsvc_client.v1 import (
    auth_pb2,
    options_pb2,
    orgs_pb2,
    resources_pb2,
    sessions_pb2,
    users_pb2,
)
from tests.app import (
    API_KEY,
    PASSWORD,
    Api,
    bearer,
    claims,
    failure,
    new_slug,
    refused,
    remember,
    service,
    who,
)

Metadata = tuple[tuple[str, str], ...]
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
BAD_API_KEY = "ak_public_credentials_not_a_key_000000"
#: An access token lives this long on the server of the expiry tests: long
#: enough for a request built with a fresh one to reach the server in time
#: (``exp`` is whole seconds, so a token lives TTL - 1 to TTL seconds).
SHORT_TTL = 3


@dataclass
class Public:
    """A valid request to one public RPC, sent with the metadata under test."""

    send: Callable[[Metadata | None], Awaitable[Any]]
    #: Proves the answer is the one asked for, whatever the metadata said.
    check: Callable[[Any], Awaitable[None]]
    #: CompleteSignIn: no pending token is valid yet, so its valid request's
    #: answer is this reason, never the bearer's.
    fails_with: str = ""


async def _user(api: Api) -> Any:
    return await api.sign_up()


async def _sign_up(api: Api) -> Public:
    email = f"public-{uuid.uuid4().hex[:12]}@example.com"

    async def check(r: Any) -> None:
        assert r.result.user.email == email
        assert (await who(api, r.result.tokens.access_token)).user_id == r.result.user.id

    return Public(
        lambda md: api.auth.SignUp(
            auth_pb2.SignUpRequest(email=email, password=PASSWORD), metadata=md
        ),
        check,
    )


async def _sign_in(api: Api) -> Public:
    user = await _user(api)

    async def check(r: Any) -> None:
        assert r.result.user.id == user.user.id
        seen = await who(api, r.result.tokens.access_token)
        assert (seen.user_id, seen.session_id) == (user.user.id, r.result.tokens.session_id)

    request = auth_pb2.SignInWithPasswordRequest(email=user.user.email, password=PASSWORD)
    return Public(lambda md: api.auth.SignInWithPassword(request, metadata=md), check)


async def _complete_sign_in(api: Api) -> Public:
    request = auth_pb2.CompleteSignInRequest(pending_token="pt_" + uuid.uuid4().hex)
    remember(request.pending_token)

    async def check(r: Any) -> None:
        raise AssertionError("CompleteSignIn succeeded")

    return Public(
        lambda md: api.auth.CompleteSignIn(request, metadata=md), check, "PENDING_TOKEN_INVALID"
    )


async def _refresh(api: Api) -> Public:
    user = await _user(api)

    async def check(r: Any) -> None:
        assert r.tokens.session_id == user.tokens.session_id
        assert (await who(api, r.tokens.access_token)).user_id == user.user.id

    request = auth_pb2.RefreshTokenRequest(refresh_token=user.tokens.refresh_token)
    return Public(lambda md: api.auth.RefreshToken(request, metadata=md), check)


async def _authenticate(api: Api) -> Public:
    user = await _user(api)

    async def check(r: Any) -> None:
        # The request's token is the one resolved, not the bearer.
        assert (r.session.user_id, r.session.session_id) == (
            user.user.id,
            user.tokens.session_id,
        )

    request = auth_pb2.AuthenticateRequest(access_token=user.tokens.access_token)
    return Public(lambda md: api.auth.Authenticate(request, metadata=md), check)


async def _set_active_org(api: Api) -> Public:
    user = await _user(api)
    org = (
        await api.orgs.CreateOrg(
            orgs_pb2.CreateOrgRequest(slug=new_slug(), name="Public"),
            metadata=bearer(user.tokens.access_token),
        )
    ).org

    async def check(r: Any) -> None:
        assert r.tokens.session_id == user.tokens.session_id
        assert (claims(r.tokens.access_token)["org_id"], claims(r.tokens.access_token)["sub"]) == (
            org.id,
            user.user.id,
        )

    request = auth_pb2.SetActiveOrgRequest(refresh_token=user.tokens.refresh_token, org_id=org.id)
    return Public(lambda md: api.auth.SetActiveOrg(request, metadata=md), check)


async def _get_jwks(api: Api) -> Public:
    async def check(r: Any) -> None:
        assert api.server.core.keys.active.kid in {k.kid for k in r.keys}

    return Public(lambda md: api.auth.GetJwks(auth_pb2.GetJwksRequest(), metadata=md), check)


PUBLIC: dict[str, Callable[[Api], Awaitable[Public]]] = {
    "SignUp": _sign_up,
    "SignInWithPassword": _sign_in,
    "CompleteSignIn": _complete_sign_in,
    "RefreshToken": _refresh,
    "Authenticate": _authenticate,
    "SetActiveOrg": _set_active_org,
    "GetJwks": _get_jwks,
}


async def _answers(public: Public, md: Metadata | None) -> None:
    """The call gets the answer its request deserves."""
    if public.fails_with:
        error = await failure(public.send(md))
        assert (error.code, error.reason) == (UNAUTHENTICATED, public.fails_with), error.message
    else:
        await public.check(await public.send(md))


def test_the_walk_covers_every_public_rpc() -> None:
    declared = {
        m.name
        for m in auth_pb2.DESCRIPTOR.services_by_name["AuthService"].methods
        if m.GetOptions().Extensions[options_pb2.access] == options_pb2.ACCESS_PUBLIC
    }
    others = [
        m.full_name
        for module in (users_pb2, sessions_pb2, orgs_pb2)
        for s in module.DESCRIPTOR.services_by_name.values()
        for m in s.methods
        if m.GetOptions().Extensions[options_pb2.access] == options_pb2.ACCESS_PUBLIC
    ]
    assert declared == set(PUBLIC)
    assert not others


# -- bearers nobody should accept -----------------------------------------------------


def _other_issuer(user_id: str, session_id: str) -> str:
    """A well-formed EdDSA token of another issuer, its own key and kid."""
    now = datetime.now(UTC)
    token = jwt.encode(
        {
            "iss": "https://issuer.example",
            "aud": "authsvc",
            "sub": user_id,
            "sid": session_id,
            "iat": int(now.timestamp()),
            "exp": int((now + timedelta(minutes=5)).timestamp()),
            "jti": uuid.uuid4().hex,
            "role": "admin",
            "ver": 0,
        },
        Ed25519PrivateKey.generate(),
        algorithm="EdDSA",
        headers={"kid": "another-issuers-key"},
    )
    remember(token)
    return token


def _forged(api: Api, token: str) -> str:
    """A live token's claims with the role raised, under the server's kid,
    signed by another key."""
    forged = jwt.encode(
        {**claims(token), "role": "admin"},
        Ed25519PrivateKey.generate(),
        algorithm="EdDSA",
        headers={"kid": api.server.core.keys.active.kid},
    )
    remember(forged)
    return forged


async def _revoked(api: Api) -> str:
    user = await _user(api)
    await api.auth.SignOut(auth_pb2.SignOutRequest(), metadata=bearer(user.tokens.access_token))
    error = await failure(who(api, user.tokens.access_token))
    assert error.reason == "SESSION_REVOKED"
    return str(user.tokens.access_token)


async def _bad_bearer(api: Api, kind: str) -> Metadata:
    """The authorization header(s) of ``kind``; each fails a non-public RPC."""
    if kind == "revoked":
        return bearer(await _revoked(api))
    if kind == "garbage":
        return bearer("garbage-" + uuid.uuid4().hex)
    if kind == "not_bearer":
        return (("authorization", "Basic dXNlcjpjb3JyZWN0IGhvcnNl"),)
    if kind == "other_issuer":
        user = await _user(api)
        return bearer(_other_issuer(user.user.id, user.tokens.session_id))
    if kind == "forged":
        return bearer(_forged(api, (await _user(api)).tokens.access_token))
    if kind == "oversized":
        return bearer("x" * 32 * 1024)
    assert kind == "twice"
    live = (await _user(api)).tokens.access_token
    return (("authorization", f"Bearer {live}"), ("authorization", "Bearer junk"))


BAD_BEARERS = ("revoked", "garbage", "not_bearer", "other_issuer", "forged", "oversized", "twice")


@pytest.fixture
def resolved(api: Api, monkeypatch: pytest.MonkeyPatch) -> set[bytes]:
    """The SHA-256 of every access token the server set out to resolve from
    now on: at the cache, where every resolution starts, and at the signature
    check (a token resolved from the cache costs no database read, one that
    is not reaches the check first)."""
    seen: set[bytes] = set()
    core = api.server.core
    cache_get, verify = core.cache.get, core.auth._codec.verify

    def get(digest: bytes) -> Any:
        seen.add(digest)
        return cache_get(digest)

    def checked(token: str, keys: Any) -> Any:
        seen.add(sha256(token))
        return verify(token, keys)

    monkeypatch.setattr(core.cache, "get", get)
    monkeypatch.setattr(core.auth._codec, "verify", checked)
    return seen


def _tokens_of(md: Metadata) -> list[str]:
    return [value.partition(" ")[2].strip() for _, value in md]


@pytest.mark.parametrize("kind", BAD_BEARERS)
@pytest.mark.parametrize("rpc", sorted(PUBLIC))
async def test_a_bad_bearer_is_ignored(api: Api, resolved: set[bytes], rpc: str, kind: str) -> None:
    md = await _bad_bearer(api, kind)
    # The same header fails a method that reads it.
    error = await failure(api.users.GetCurrentUser(users_pb2.GetCurrentUserRequest(), metadata=md))
    assert error.code == UNAUTHENTICATED
    public = await PUBLIC[rpc](api)
    resolved.clear()

    await _answers(public, md)

    # Not looked up: the server set out to resolve none of the header's tokens.
    looked_up = {sha256(t) for t in _tokens_of(md) if t} & resolved
    assert not looked_up, "a public RPC resolved the bearer in its metadata"


@pytest.mark.parametrize("rpc", sorted(PUBLIC))
async def test_a_live_bearer_is_not_resolved_either(
    api: Api, resolved: set[bytes], rpc: str
) -> None:
    """Not even a valid one: no database or cache work for a header the call
    does not use (the checks only look at the request)."""
    md = bearer((await _user(api)).tokens.access_token)
    public = await PUBLIC[rpc](api)
    resolved.clear()
    await _answers(public, md)
    assert sha256(_tokens_of(md)[0]) not in resolved


# -- expired bearers: the reason for the rule ----------------------------------------


async def _until_expired(api: Api, token: str, within: float = SHORT_TTL + 10) -> None:
    """Waits until a method that reads the bearer refuses ``token``: as expired."""
    deadline = time.monotonic() + within
    while True:
        try:
            await api.users.GetCurrentUser(
                users_pb2.GetCurrentUserRequest(), metadata=bearer(token)
            )
        except grpc.aio.AioRpcError as error:
            typed = from_rpc_error(error)
            assert (typed.code, typed.reason) == (UNAUTHENTICATED, "TOKEN_EXPIRED"), typed.message
            return
        assert time.monotonic() < deadline, "the access token did not expire"
        await asyncio.sleep(0.1)


async def test_a_channel_with_an_expired_access_token_can_still_refresh(
    own_server: Callable[..., Awaitable[Api]],
) -> None:
    """The user's case: the channel attaches the access token to every call;
    once it has expired, RefreshToken (and SetActiveOrg) still work on that
    channel, and the new access token works where the old one no longer does."""
    api = await own_server(access_token_ttl=SHORT_TTL)
    created = await api.sign_up()
    channel_md = bearer(created.tokens.access_token)  # attached to every call below
    org = (
        await api.orgs.CreateOrg(
            orgs_pb2.CreateOrgRequest(slug=new_slug(), name="Expiry"), metadata=channel_md
        )
    ).org
    await _until_expired(api, created.tokens.access_token)

    refreshed = await api.auth.RefreshToken(
        auth_pb2.RefreshTokenRequest(refresh_token=created.tokens.refresh_token),
        metadata=channel_md,
    )
    assert refreshed.tokens.session_id == created.tokens.session_id
    assert claims(refreshed.tokens.access_token)["exp"] > claims(created.tokens.access_token)["exp"]
    me = await api.users.GetCurrentUser(
        users_pb2.GetCurrentUserRequest(), metadata=bearer(refreshed.tokens.access_token)
    )
    assert me.user.id == created.user.id

    switched = await api.auth.SetActiveOrg(
        auth_pb2.SetActiveOrgRequest(refresh_token=refreshed.tokens.refresh_token, org_id=org.id),
        metadata=channel_md,
    )
    assert claims(switched.tokens.access_token)["org_id"] == org.id

    # A method that is not public still refuses the expired token.
    error = await failure(
        api.users.GetCurrentUser(users_pb2.GetCurrentUserRequest(), metadata=channel_md)
    )
    assert (error.code, error.reason) == (UNAUTHENTICATED, "TOKEN_EXPIRED")


async def test_an_expired_bearer_is_ignored_on_every_public_rpc(
    own_server: Callable[..., Awaitable[Api]],
) -> None:
    api = await own_server(access_token_ttl=SHORT_TTL)
    expired = (await api.sign_up()).tokens.access_token
    await _until_expired(api, expired)
    for rpc, build in PUBLIC.items():
        public = await build(api)  # fresh tokens: built right before the call
        try:
            await _answers(public, bearer(expired))
        except AssertionError as failed:
            raise AssertionError(f"{rpc}: {failed}") from failed
        except grpc.aio.AioRpcError as failed:
            raise AssertionError(f"{rpc}: {failed.code()} {failed.details()}") from failed


# -- API keys: still checked -------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    ["bad", "bad_with_live_bearer", "twice"],
)
@pytest.mark.parametrize("rpc", sorted(PUBLIC))
async def test_a_bad_api_key_fails_a_public_rpc(api: Api, rpc: str, headers: str) -> None:
    remember(BAD_API_KEY)
    public = await PUBLIC[rpc](api)
    md: Metadata = (("x-api-key", BAD_API_KEY),)
    if headers == "bad_with_live_bearer":
        md = (*md, *bearer((await _user(api)).tokens.access_token))
    elif headers == "twice":
        md = (("x-api-key", API_KEY), ("x-api-key", API_KEY))
    await refused(api, lambda: public.send(md), UNAUTHENTICATED, "API_KEY_INVALID")


@pytest.mark.parametrize("rpc", sorted(PUBLIC))
async def test_a_good_api_key_next_to_a_bad_bearer_is_the_service(api: Api, rpc: str) -> None:
    public = await PUBLIC[rpc](api)
    await _answers(public, (*service(), *bearer("garbage")))


# -- ClientInfo: the API key's, never a bearer's -----------------------------------------

GATEWAY_IP = "198.51.100.23"


async def _client_info_call(api: Api, rpc: str, md: Metadata | None) -> tuple[str, str]:
    """Makes ``rpc`` (one that starts or rotates a session) with a ClientInfo;
    returns (user id, session id) of the session it touched."""
    info = resources_pb2.ClientInfo(ip_address=GATEWAY_IP, user_agent="gateway-forwarded/1.0")
    user = await _user(api)
    if rpc == "SignUp":
        email = f"ci-{uuid.uuid4().hex[:12]}@example.com"
        signed_up = await api.auth.SignUp(
            auth_pb2.SignUpRequest(email=email, password=PASSWORD, client_info=info), metadata=md
        )
        return signed_up.result.user.id, signed_up.result.tokens.session_id
    if rpc == "SignInWithPassword":
        signed = await api.auth.SignInWithPassword(
            auth_pb2.SignInWithPasswordRequest(
                email=user.user.email, password=PASSWORD, client_info=info
            ),
            metadata=md,
        )
        return signed.result.user.id, signed.result.tokens.session_id
    if rpc == "RefreshToken":
        refreshed = await api.auth.RefreshToken(
            auth_pb2.RefreshTokenRequest(refresh_token=user.tokens.refresh_token, client_info=info),
            metadata=md,
        )
        return user.user.id, refreshed.tokens.session_id
    assert rpc == "SetActiveOrg"
    switched = await api.auth.SetActiveOrg(
        auth_pb2.SetActiveOrgRequest(refresh_token=user.tokens.refresh_token, client_info=info),
        metadata=md,
    )
    return user.user.id, switched.tokens.session_id


async def _session_ip(api: Api, user_id: str, session_id: str) -> str:
    listed = await api.sessions.ListSessions(
        sessions_pb2.ListSessionsRequest(user_id=user_id), metadata=service()
    )
    return next(s.ip_address for s in listed.sessions if s.id == session_id)


@pytest.mark.parametrize("rpc", ["SignUp", "SignInWithPassword", "RefreshToken", "SetActiveOrg"])
async def test_client_info_counts_with_an_api_key_not_with_an_admin_bearer(
    api: Api, rpc: str
) -> None:
    admin = await api.admin_token()
    assert (await who(api, admin)).role == resources_pb2.ROLE_ADMIN

    user_id, session_id = await _client_info_call(api, rpc, bearer(admin))
    assert await _session_ip(api, user_id, session_id) == "127.0.0.1"

    user_id, session_id = await _client_info_call(api, rpc, service())
    assert await _session_ip(api, user_id, session_id) == GATEWAY_IP

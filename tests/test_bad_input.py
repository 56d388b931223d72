"""Bad requests: each fails with its documented status and reason, changes
nothing, and never surfaces as INTERNAL.

Every case of the table runs on both backends. For each it checks the status
code, the ``ErrorInfo`` reason (and, for INVALID_ARGUMENT, the field the
``BadRequest`` detail names), that every row of every table is unchanged
(``Api.snapshot``), and that the server's own log line for the call (found by
its ``x-request-id``) records the same code and no ``rpc.failed``.

Forged access tokens are built here: ``alg: none``, HS256 keyed with the
server's public key, a foreign Ed25519 key claiming the server's ``kid``, and,
signed with the server's own active key (so only the claim is wrong), expired
tokens and tokens of another issuer or audience.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from google.protobuf.field_mask_pb2 import FieldMask
from google.rpc import error_details_pb2

from authsvc.domain.models import Cursor
from authsvc.security.page_tokens import PageTokens, fingerprint
from authsvc_client.v1 import auth_pb2, orgs_pb2, resources_pb2, sessions_pb2, users_pb2
from tests.app import (
    PASSWORD,
    Api,
    bearer,
    failure,
    new_slug,
    remember,
    service,
    set_active_org,
)

MB = 1 << 20
# A Role value the enum does not define (proto3 enums are open).
BAD_ROLE: Any = 7
IA = grpc.StatusCode.INVALID_ARGUMENT
UNAUTH = grpc.StatusCode.UNAUTHENTICATED

Metadata = tuple[tuple[str, str], ...]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def flip(text: str, at: int) -> str:
    """Changes one character (not the last, so base64url stays canonical)."""
    at = at % (len(text) - 1)
    replacement = "A" if text[at] != "A" else "B"
    return text[:at] + replacement + text[at + 1 :]


def flip_part(token: str, part: int) -> str:
    parts = token.split(".")
    parts[part] = flip(parts[part], len(parts[part]) // 2)
    return ".".join(parts)


@dataclass
class Ctx:
    """What the cases build their requests from (made fresh for each case)."""

    api: Api
    user: Any  # SignUpResponse of the main user (two live sessions)
    other: Any  # SignUpResponse of another user
    user_token: str  # the main user's latest access token
    kid: str
    server_key: Ed25519PrivateKey
    public_raw: bytes
    jwk_x: str
    users_token_prefix_a: str  # ListUsers(email_prefix="a", page_size=1) next_page_token
    sessions_token_of_user: str  # the user's own ListSessions(page_size=1) next_page_token
    sessions_token_by_service: str  # service's ListSessions(user_id=user, page_size=1)
    # Set by ``add_orgs`` for the cases of OrgService, SetActiveOrg and
    # WatchRevocations (``Bad.orgs``):
    org: Any = None  # owned by the main user, with ``other`` as a member
    outsider: Any = None  # SignUpResponse of a user in no org
    other_org: Any = None  # also owned by the main user
    org_token: str = ""  # the main user's access token with ``org`` active
    org_refresh: str = ""  # its refresh token
    orgs_token_of_user: str = ""  # the user's own ListOrgs(page_size=1) next_page_token
    orgs_token_by_service: str = ""  # service's ListOrgs(user_id=user, page_size=1)
    members_token: str = ""  # service's ListMembers(org, page_size=1) next_page_token

    @classmethod
    async def make(cls, api: Api) -> Ctx:
        user = await api.sign_up(f"a-main-{uuid.uuid4().hex[:8]}@example.com")
        other = await api.sign_up(f"a-other-{uuid.uuid4().hex[:8]}@example.com")
        signed = await api.auth.SignInWithPassword(
            auth_pb2.SignInWithPasswordRequest(email=user.user.email, password=PASSWORD)
        )
        remember(signed.result.tokens.access_token, signed.result.tokens.refresh_token)
        jwks = await api.auth.GetJwks(auth_pb2.GetJwksRequest())
        active = api.server.core.keys.active
        assert active.private is not None
        jwk = next(k for k in jwks.keys if k.kid == active.kid)
        public_raw = base64.urlsafe_b64decode(jwk.x + "=" * (-len(jwk.x) % 4))
        users_page = await api.users.ListUsers(
            users_pb2.ListUsersRequest(email_prefix="a", page_size=1), metadata=service()
        )
        own_page = await api.sessions.ListSessions(
            sessions_pb2.ListSessionsRequest(page_size=1),
            metadata=bearer(signed.result.tokens.access_token),
        )
        service_page = await api.sessions.ListSessions(
            sessions_pb2.ListSessionsRequest(user_id=user.user.id, page_size=1),
            metadata=service(),
        )
        ctx = cls(
            api=api,
            user=user,
            other=other,
            user_token=signed.result.tokens.access_token,
            kid=active.kid,
            server_key=active.private,
            public_raw=public_raw,
            jwk_x=jwk.x,
            users_token_prefix_a=users_page.next_page_token,
            sessions_token_of_user=own_page.next_page_token,
            sessions_token_by_service=service_page.next_page_token,
        )
        assert ctx.users_token_prefix_a
        assert ctx.sessions_token_of_user
        assert ctx.sessions_token_by_service
        return ctx

    # -- access tokens -------------------------------------------------------

    def claims(self, **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        settings = self.api.settings
        claims: dict[str, Any] = {
            "iss": settings.issuer,
            "aud": settings.audience,
            "sub": self.user.user.id,
            "sid": self.user.tokens.session_id,
            "iat": now,
            "exp": now + 600,
            "jti": uuid.uuid4().hex,
            "role": "user",
        }
        for name, value in changes.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def signed(
        self, key: Ed25519PrivateKey | None = None, kid: str | None = "", **changes: Any
    ) -> str:
        """A token signed with EdDSA: the server's active key unless ``key``."""
        headers = {} if kid is None else {"kid": kid or self.kid}
        token = jwt.encode(
            self.claims(**changes),
            key or self.server_key,
            algorithm="EdDSA",
            headers=headers,
        )
        remember(token)
        return token

    def unsigned(self, header: dict[str, Any], signature: bytes = b"", **changes: Any) -> str:
        token = f"{b64json(header)}.{b64json(self.claims(**changes))}.{b64url(signature)}"
        remember(token)
        return token

    def hs256(self, secret: bytes, **changes: Any) -> str:
        """HS256 keyed with ``secret``: the algorithm-confusion forgery."""
        header = {"alg": "HS256", "typ": "JWT", "kid": self.kid}
        signing_input = f"{b64json(header)}.{b64json(self.claims(**changes))}"
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        token = f"{signing_input}.{b64url(mac)}"
        remember(token)
        return token

    def public_pem(self) -> bytes:
        public = Ed25519PublicKey.from_public_bytes(self.public_raw)
        return public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)

    async def add_orgs(self) -> None:
        api = self.api
        orgs = []
        for _ in range(2):
            created = await api.orgs.CreateOrg(
                orgs_pb2.CreateOrgRequest(slug=new_slug(), name="Acme"),
                metadata=bearer(self.user_token),
            )
            orgs.append(created.org)
        self.org, self.other_org = orgs
        self.outsider = await api.sign_up()
        await api.orgs.AddMember(
            orgs_pb2.AddMemberRequest(org_id=self.org.id, user_id=self.other.user.id),
            metadata=service(),
        )
        pair = await set_active_org(api, self.user.tokens.refresh_token, self.org.id)
        self.org_token, self.org_refresh = pair.access_token, pair.refresh_token
        own = await api.orgs.ListOrgs(
            orgs_pb2.ListOrgsRequest(page_size=1), metadata=bearer(self.org_token)
        )
        by_service = await api.orgs.ListOrgs(
            orgs_pb2.ListOrgsRequest(user_id=self.user.user.id, page_size=1), metadata=service()
        )
        members = await api.orgs.ListMembers(
            orgs_pb2.ListMembersRequest(org_id=self.org.id, page_size=1), metadata=service()
        )
        self.orgs_token_of_user = own.next_page_token
        self.orgs_token_by_service = by_service.next_page_token
        self.members_token = members.next_page_token
        assert self.orgs_token_of_user
        assert self.orgs_token_by_service
        assert self.members_token

    def expired_page_token(self) -> str:
        pages = PageTokens(self.api.server.core.secrets.subkey("page-token"))
        long_ago = datetime.now(UTC) - timedelta(days=2)
        return pages.encode(
            "users", fingerprint(None, ""), Cursor(long_ago, uuid.uuid4()), long_ago
        )


Build = Callable[[Ctx], Any]
Creds = Callable[[Ctx], Metadata]


def _none(_: Ctx) -> Metadata:
    return ()


def _service(_: Ctx) -> Metadata:
    return service()


def _user(ctx: Ctx) -> Metadata:
    return bearer(ctx.user_token)


@dataclass(frozen=True)
class Bad:
    rpc: str  # "auth.SignUp", "users.GetUser", ...
    build: Build
    code: grpc.StatusCode
    reason: str
    field: str | None = None
    creds: Creds = _none
    orgs: bool = False  # the case needs Ctx.add_orgs
    # Other answers the contract allows (code, reason), field unchecked.
    also: tuple[tuple[grpc.StatusCode, str], ...] = ()


def bad(
    id: str,
    rpc: str,
    build: Build,
    code: grpc.StatusCode,
    reason: str,
    **kw: Any,
) -> Any:
    return pytest.param(Bad(rpc, build, code, reason, **kw), id=id)


def invalid(id: str, rpc: str, build: Build, field: str | None, **kw: Any) -> Any:
    return bad(id, rpc, build, IA, "INVALID_ARGUMENT", field=field, **kw)


def token_invalid(id: str, rpc: str, build: Build, **kw: Any) -> Any:
    return bad(id, rpc, build, UNAUTH, "TOKEN_INVALID", **kw)


def page_token_invalid(id: str, rpc: str, build: Build, **kw: Any) -> Any:
    return bad(id, rpc, build, IA, "INVALID_PAGE_TOKEN", **kw)


# -- request builders ----------------------------------------------------------

GOOD_PASSWORD = "a perfectly fine password"


def sign_up(email: str = "", password: str = GOOD_PASSWORD, **fields: Any) -> Build:
    def build(ctx: Ctx) -> Any:
        return auth_pb2.SignUpRequest(
            email=email or f"new-{uuid.uuid4().hex[:8]}@example.com", password=password, **fields
        )

    return build


def sign_up_email(email: str) -> Build:
    return lambda ctx: auth_pb2.SignUpRequest(email=email, password=GOOD_PASSWORD)


def sign_up_from(**client: str) -> Build:
    return sign_up(client_info=resources_pb2.ClientInfo(**client))


def sign_in(email: str | None = None, password: str | None = None, **fields: Any) -> Build:
    def build(ctx: Ctx) -> Any:
        return auth_pb2.SignInWithPasswordRequest(
            email=ctx.user.user.email if email is None else email,
            password=PASSWORD if password is None else password,
            **fields,
        )

    return build


def refresh(token: Callable[[Ctx], str], **fields: Any) -> Build:
    return lambda ctx: auth_pb2.RefreshTokenRequest(refresh_token=token(ctx), **fields)


def authenticate(token: Callable[[Ctx], str]) -> Build:
    return lambda ctx: auth_pb2.AuthenticateRequest(access_token=token(ctx))


def as_bearer(token: Callable[[Ctx], str]) -> Creds:
    return lambda ctx: (("authorization", f"Bearer {token(ctx)}"),)


def get_current(_: Ctx) -> Any:
    return users_pb2.GetCurrentUserRequest()


def count_users(_: Ctx) -> Any:
    return users_pb2.CountUsersRequest()


def update_user(
    paths: list[str], user_id: Callable[[Ctx], str] | None = None, **values: Any
) -> Build:
    def build(ctx: Ctx) -> Any:
        uid = ctx.user.user.id if user_id is None else user_id(ctx)
        return users_pb2.UpdateUserRequest(
            user=resources_pb2.User(id=uid, **values), update_mask=FieldMask(paths=paths)
        )

    return build


def list_users(**fields: Any) -> Build:
    return lambda ctx: users_pb2.ListUsersRequest(**fields)


def list_users_with_token(token: Callable[[Ctx], str], **fields: Any) -> Build:
    return lambda ctx: users_pb2.ListUsersRequest(page_token=token(ctx), **fields)


def list_sessions_with_token(token: Callable[[Ctx], str], **fields: Any) -> Build:
    def build(ctx: Ctx) -> Any:
        values = {k: (v(ctx) if callable(v) else v) for k, v in fields.items()}
        return sessions_pb2.ListSessionsRequest(page_token=token(ctx), **values)

    return build


def with_field(message: Any, field: str, value: str) -> Build:
    return lambda ctx: message(**{field: value})


def const(value: str) -> Callable[[Ctx], str]:
    return lambda ctx: value


def user_access(ctx: Ctx) -> str:
    return str(ctx.user_token)


def user_refresh(ctx: Ctx) -> str:
    return str(ctx.user.tokens.refresh_token)


def alg_none(ctx: Ctx) -> str:
    return ctx.unsigned({"alg": "none", "typ": "JWT", "kid": ctx.kid})


def alg_none_admin(ctx: Ctx) -> str:
    return ctx.unsigned({"alg": "none", "kid": ctx.kid}, role="admin")


def hs256_raw(ctx: Ctx) -> str:
    return ctx.hs256(ctx.public_raw)


def hs256_raw_admin(ctx: Ctx) -> str:
    return ctx.hs256(ctx.public_raw, role="admin")


def expired(ctx: Ctx) -> str:
    now = int(time.time())
    return ctx.signed(iat=now - 3600, exp=now - 1800)


def foreign_key(ctx: Ctx) -> str:
    return ctx.signed(key=Ed25519PrivateKey.generate())


def other_audience(ctx: Ctx) -> str:
    return ctx.signed(aud="someone-else")


def email_of(length: int) -> str:
    domain = "@example.com"
    return "a" * (length - len(domain)) + domain


NOT_UUIDS = [("not-uuid", "not-a-uuid"), ("sql", "' OR 1=1 --"), ("1mb", "x" * MB)]

# SetUserRole and SetUserEmail still go through UpdateUser's code, which names
# its own fields (user.id, user.role, user.email).


def set_user_role(role: Any, user_id: Callable[[Ctx], str] | None = None) -> Build:
    def build(ctx: Ctx) -> Any:
        uid = ctx.user.user.id if user_id is None else user_id(ctx)
        return users_pb2.SetUserRoleRequest(user_id=uid, role=role)

    return build


def set_user_email(email: str) -> Build:
    return lambda ctx: users_pb2.SetUserEmailRequest(user_id=ctx.user.user.id, email=email)


USER_FIELD_RPCS: dict[str, Callable[[str], Any]] = {
    "users.SetUserRole": lambda uid: users_pb2.SetUserRoleRequest(
        user_id=uid, role=resources_pb2.ROLE_ADMIN
    ),
    "users.SetUserEmail": lambda uid: users_pb2.SetUserEmailRequest(
        user_id=uid, email="moved@example.com"
    ),
}


def user_field_request(rpc: str, user_id: str) -> Build:
    return lambda ctx: USER_FIELD_RPCS[rpc](user_id)


def complete_sign_in(token: str | Callable[[Ctx], str], **fields: Any) -> Build:
    def build(ctx: Ctx) -> Any:
        value = token(ctx) if callable(token) else token
        return auth_pb2.CompleteSignInRequest(pending_token=value, **fields)

    return build


BIG_ETAG = "e" * MB


def _etag_cases() -> list[tuple[str, str, Build, str, dict[str, Any]]]:
    """(id, rpc, build, the etag field, extra Bad fields) of each request with an etag."""

    def user_id(ctx: Ctx) -> str:
        return str(ctx.user.user.id)

    def org_id(ctx: Ctx) -> str:
        return str(ctx.org.id)

    def other(ctx: Ctx) -> str:
        return str(ctx.other.user.id)

    orgs = {"orgs": True}
    return [
        (
            "updateuser",
            "users.UpdateUser",
            update_user(["display_name"], display_name="Ada", etag=BIG_ETAG),
            "user.etag",
            {},
        ),
        (
            "setuserrole",
            "users.SetUserRole",
            lambda c: users_pb2.SetUserRoleRequest(
                user_id=user_id(c), role=resources_pb2.ROLE_ADMIN, etag=BIG_ETAG
            ),
            "etag",
            {},
        ),
        (
            "setuseremail",
            "users.SetUserEmail",
            lambda c: users_pb2.SetUserEmailRequest(
                user_id=user_id(c), email="moved@example.com", etag=BIG_ETAG
            ),
            "etag",
            {},
        ),
        (
            "deleteuser",
            "users.DeleteUser",
            lambda c: users_pb2.DeleteUserRequest(user_id=user_id(c), etag=BIG_ETAG),
            "etag",
            {},
        ),
        (
            "updateorg",
            "orgs.UpdateOrg",
            lambda c: orgs_pb2.UpdateOrgRequest(
                org_id=org_id(c),
                values=resources_pb2.Org(name="Renamed", etag=BIG_ETAG),
                update_mask=FieldMask(paths=["name"]),
            ),
            "values.etag",
            orgs,
        ),
        (
            "deleteorg",
            "orgs.DeleteOrg",
            lambda c: orgs_pb2.DeleteOrgRequest(org_id=org_id(c), etag=BIG_ETAG, force=True),
            "etag",
            orgs,
        ),
        (
            "updatemember",
            "orgs.UpdateMember",
            lambda c: orgs_pb2.UpdateMemberRequest(
                org_id=org_id(c), user_id=other(c), role=resources_pb2.ORG_ROLE_ADMIN, etag=BIG_ETAG
            ),
            "etag",
            orgs,
        ),
        (
            "removemember",
            "orgs.RemoveMember",
            lambda c: orgs_pb2.RemoveMemberRequest(
                org_id=org_id(c), user_id=other(c), etag=BIG_ETAG
            ),
            "etag",
            orgs,
        ),
    ]


ETAG_CASES = _etag_cases()
# Paths UpdateUser no longer takes, with a value for each.
PROFILE_ONLY: list[tuple[str, dict[str, Any]]] = [
    ("role", {"role": resources_pb2.ROLE_ADMIN}),
    ("email", {"email": "moved@example.com"}),
]
BAD_PENDING_TOKENS: list[tuple[str, str | Callable[[Ctx], str]]] = [
    ("1mb", "p" * MB),
    ("garbage", "not-a-pending-token"),
    ("refresh-token", user_refresh),
    ("access-token", user_access),
]


CASES = [
    # -- SignUp: email ---------------------------------------------------------
    invalid("signup-email-empty", "auth.SignUp", sign_up_email(""), "email"),
    invalid("signup-email-1mb", "auth.SignUp", sign_up_email(email_of(MB)), "email"),
    invalid("signup-email-255-chars", "auth.SignUp", sign_up_email(email_of(255)), "email"),
    *[
        invalid(f"signup-email-{name}", "auth.SignUp", sign_up_email(value), "email")
        for name, value in [
            ("no-at", "plain.example.com"),
            ("nothing-after-at", "ada@"),
            ("nothing-before-at", "@example.com"),
            ("two-ats", "ada@@example.com"),
            ("space", "ada lovelace@example.com"),
            ("no-dot-in-domain", "ada@localhost"),
            ("double-dot", "ada..lovelace@example.com"),
            ("leading-dot", ".ada@example.com"),
            ("hyphen-domain", "ada@-example.com"),
            ("trailing-newline", "ada@example.com\n"),
            ("nul", "ada\x00@example.com"),
            ("quoted-local-part", '"ada lovelace"@example.com'),
            ("ip-literal", "ada@[127.0.0.1]"),
            ("html", "<script>@example.com"),
        ]
    ],
    # -- SignUp: password and display name -------------------------------------
    invalid("signup-password-empty", "auth.SignUp", sign_up(password=""), "password"),
    bad("signup-password-7-chars", "auth.SignUp", sign_up(password="x" * 7), IA, "WEAK_PASSWORD"),
    bad(
        "signup-password-257-chars", "auth.SignUp", sign_up(password="x" * 257), IA, "WEAK_PASSWORD"
    ),
    bad("signup-password-1mb", "auth.SignUp", sign_up(password="x" * MB), IA, "WEAK_PASSWORD"),
    invalid(
        "signup-display-name-201", "auth.SignUp", sign_up(display_name="x" * 201), "display_name"
    ),
    invalid(
        "signup-display-name-1mb", "auth.SignUp", sign_up(display_name="x" * MB), "display_name"
    ),
    invalid(
        "signup-display-name-newline", "auth.SignUp", sign_up(display_name="Ada\nL"), "display_name"
    ),
    invalid(
        "signup-display-name-nul", "auth.SignUp", sign_up(display_name="Ada\x00"), "display_name"
    ),
    # -- SignUp: client_info (checked only with the API key) ---------------------
    *[
        invalid(
            f"signup-client-{name}",
            "auth.SignUp",
            sign_up_from(**client),
            f"client_info.{next(iter(client))}",
            creds=_service,
        )
        for name, client in [
            ("ip-not-an-ip", {"ip_address": "not-an-ip"}),
            ("ip-1mb", {"ip_address": "1" * MB}),
            ("ip-with-port", {"ip_address": "203.0.113.7:443"}),
            ("ip-scoped-ipv6-1mb", {"ip_address": "fe80::1%" + "a" * MB}),
            ("ip-scoped-ipv6-65-chars", {"ip_address": "fe80::1%" + "a" * 57}),
            ("ip-scoped-ipv6-nul", {"ip_address": "fe80::1%eth\x000"}),
            ("user-agent-513", {"user_agent": "u" * 513}),
            ("user-agent-1mb", {"user_agent": "u" * MB}),
        ]
    ],
    # -- SignInWithPassword ----------------------------------------------------
    invalid("signin-email-empty", "auth.SignInWithPassword", sign_in(email=""), "email"),
    invalid("signin-password-empty", "auth.SignInWithPassword", sign_in(password=""), "password"),
    invalid("signin-email-1mb", "auth.SignInWithPassword", sign_in(email=email_of(MB)), "email"),
    invalid(
        "signin-password-1mb", "auth.SignInWithPassword", sign_in(password="x" * MB), "password"
    ),
    invalid(
        "signin-email-malformed", "auth.SignInWithPassword", sign_in(email="ada@@x.com"), "email"
    ),
    invalid(
        "signin-client-ip-not-an-ip",
        "auth.SignInWithPassword",
        sign_in(client_info=resources_pb2.ClientInfo(ip_address="999.1.1.1")),
        "client_info.ip_address",
        creds=_service,
    ),
    invalid(
        "signin-client-user-agent-1mb",
        "auth.SignInWithPassword",
        sign_in(client_info=resources_pb2.ClientInfo(user_agent="u" * MB)),
        "client_info.user_agent",
        creds=_service,
    ),
    invalid(
        "signin-client-ip-scoped-ipv6-1mb",
        "auth.SignInWithPassword",
        sign_in(client_info=resources_pb2.ClientInfo(ip_address="fe80::1%" + "a" * MB)),
        "client_info.ip_address",
        creds=_service,
    ),
    # -- RefreshToken ----------------------------------------------------------
    token_invalid("refresh-empty", "auth.RefreshToken", refresh(const(""))),
    token_invalid("refresh-1mb", "auth.RefreshToken", refresh(const("rt_" + "x" * MB))),
    token_invalid("refresh-unknown", "auth.RefreshToken", refresh(const("rt_" + "A" * 43))),
    token_invalid("refresh-given-access-token", "auth.RefreshToken", refresh(user_access)),
    token_invalid(
        "refresh-truncated", "auth.RefreshToken", refresh(lambda c: user_refresh(c)[:-4])
    ),
    token_invalid(
        "refresh-flipped-char", "auth.RefreshToken", refresh(lambda c: flip(user_refresh(c), 10))
    ),
    invalid(
        "refresh-client-ip-not-an-ip",
        "auth.RefreshToken",
        refresh(user_refresh, client_info=resources_pb2.ClientInfo(ip_address="nope")),
        "client_info.ip_address",
        creds=_service,
    ),
    # -- Authenticate: the token in the request ----------------------------------
    *[
        token_invalid(f"authenticate-{name}", "auth.Authenticate", authenticate(token))
        for name, token in [
            ("empty", const("")),
            ("1mb", const("x" * MB)),
            ("1mb-three-parts", const("a." + "b" * MB + ".c")),
            ("garbage", const("not-a-jwt")),
            ("bearer-prefix", lambda c: "Bearer " + user_access(c)),
            ("truncated-signature", lambda c: user_access(c)[:-8]),
            ("no-signature", lambda c: user_access(c).rsplit(".", 1)[0] + "."),
            ("half", lambda c: user_access(c)[: len(user_access(c)) // 2]),
            ("flipped-header-char", lambda c: flip_part(user_access(c), 0)),
            ("flipped-payload-char", lambda c: flip_part(user_access(c), 1)),
            ("flipped-signature-char", lambda c: flip_part(user_access(c), 2)),
            (
                "payload-of-another-token",
                lambda c: ".".join(
                    [
                        user_access(c).split(".")[0],
                        c.other.tokens.access_token.split(".")[1],
                        user_access(c).split(".")[2],
                    ]
                ),
            ),
            ("alg-none", alg_none),
            ("alg-none-no-kid", lambda c: c.unsigned({"alg": "none"})),
            ("alg-none-uppercase", lambda c: c.unsigned({"alg": "NONE", "kid": c.kid})),
            ("hs256-public-key-raw", hs256_raw),
            ("hs256-public-key-pem", lambda c: c.hs256(c.public_pem())),
            ("hs256-public-key-jwk-x", lambda c: c.hs256(c.jwk_x.encode())),
            ("other-issuer", lambda c: c.signed(iss="https://evil.example.com")),
            ("no-issuer", lambda c: c.signed(iss=None)),
            ("other-audience", other_audience),
            ("audience-list-without-ours", lambda c: c.signed(aud=["a", "b"])),
            ("foreign-key-server-kid", foreign_key),
            (
                "foreign-key-unknown-kid",
                lambda c: c.signed(key=Ed25519PrivateKey.generate(), kid="k1"),
            ),
            ("server-key-no-kid", lambda c: c.signed(kid=None)),
            ("server-key-no-jti", lambda c: c.signed(jti=None)),
            ("server-key-no-sid", lambda c: c.signed(sid=None)),
            ("server-key-no-exp", lambda c: c.signed(exp=None)),
            ("server-key-sid-not-uuid", lambda c: c.signed(sid="nope")),
            ("server-key-role-root", lambda c: c.signed(role="root")),
            ("server-key-sub-of-other-user", lambda c: c.signed(sub=c.other.user.id)),
            ("refresh-token", user_refresh),
        ]
    ],
    bad(
        "authenticate-expired", "auth.Authenticate", authenticate(expired), UNAUTH, "TOKEN_EXPIRED"
    ),
    # -- the token as the call's bearer credential -----------------------------
    *[
        token_invalid(f"bearer-{name}", "users.GetCurrentUser", get_current, creds=as_bearer(tok))
        for name, tok in [
            ("refresh-token", user_refresh),
            ("alg-none", alg_none),
            ("hs256-public-key", hs256_raw),
            ("foreign-key-server-kid", foreign_key),
            ("other-audience", other_audience),
            ("truncated", lambda c: user_access(c)[:-8]),
            ("oversized-5000", const("a." + "b" * 5000 + ".c")),
        ]
    ],
    token_invalid(
        "bearer-scheme-token",
        "users.GetCurrentUser",
        get_current,
        creds=lambda c: (("authorization", f"Token {c.user_token}"),),
    ),
    bad(
        "bearer-expired",
        "users.GetCurrentUser",
        get_current,
        UNAUTH,
        "TOKEN_EXPIRED",
        creds=as_bearer(expired),
    ),
    token_invalid(
        "bearer-alg-none-admin-role",
        "users.CountUsers",
        count_users,
        creds=as_bearer(alg_none_admin),
    ),
    token_invalid(
        "bearer-hs256-admin-role", "users.CountUsers", count_users, creds=as_bearer(hs256_raw_admin)
    ),
    token_invalid(
        "bearer-server-key-other-audience-admin-role",
        "users.CountUsers",
        count_users,
        creds=as_bearer(lambda c: c.signed(aud="x", role="admin")),
    ),
    # -- UserService -----------------------------------------------------------
    invalid(
        "getuser-id-empty",
        "users.GetUser",
        lambda c: users_pb2.GetUserRequest(),
        "user_id",
        creds=_service,
    ),
    *[
        invalid(
            f"getuser-id-{name}",
            "users.GetUser",
            with_field(users_pb2.GetUserRequest, "user_id", value),
            "user_id",
            creds=_service,
        )
        for name, value in NOT_UUIDS
    ],
    invalid(
        "updateuser-empty-mask",
        "users.UpdateUser",
        update_user([], display_name="x"),
        "update_mask",
        creds=_service,
    ),
    invalid(
        "updateuser-self-empty-mask",
        "users.UpdateUser",
        update_user([], display_name="x"),
        "update_mask",
        creds=_user,
    ),
    invalid(
        "updateuser-unknown-path",
        "users.UpdateUser",
        update_user(["password"]),
        "update_mask",
        creds=_service,
    ),
    invalid(
        "updateuser-path-id", "users.UpdateUser", update_user(["id"]), "update_mask", creds=_service
    ),
    invalid(
        "updateuser-path-create-time",
        "users.UpdateUser",
        update_user(["create_time"]),
        "update_mask",
        creds=_service,
    ),
    # The role and the email have their own RPCs: UpdateUser knows neither path.
    *[
        invalid(
            f"updateuser-path-{path}",
            "users.UpdateUser",
            update_user([path], **values),
            "update_mask",
            creds=_service,
        )
        for path, values in PROFILE_ONLY
    ],
    invalid(
        "updateuser-display-name-1mb",
        "users.UpdateUser",
        update_user(["display_name"], display_name="x" * MB),
        "user.display_name",
        creds=_service,
    ),
    invalid(
        "updateuser-self-display-name-1mb",
        "users.UpdateUser",
        update_user(["display_name"], display_name="x" * MB),
        "user.display_name",
        creds=_user,
    ),
    invalid(
        "updateuser-id-empty",
        "users.UpdateUser",
        update_user(["display_name"], user_id=const("")),
        "user.id",
        creds=_service,
    ),
    invalid(
        "updateuser-id-1mb",
        "users.UpdateUser",
        update_user(["display_name"], user_id=const("x" * MB)),
        "user.id",
        creds=_service,
    ),
    # -- SetUserRole, SetUserEmail ----------------------------------------------
    *[
        invalid(
            f"{rpc.split('.')[1].lower()}-id-{name}",
            rpc,
            user_field_request(rpc, value),
            "user_id",
            creds=_service,
        )
        for rpc in USER_FIELD_RPCS
        for name, value in [("empty", ""), *NOT_UUIDS]
    ],
    *[
        invalid(
            f"setuserrole-role-{name}",
            "users.SetUserRole",
            set_user_role(role),
            "role",
            creds=_service,
        )
        for name, role in [("unspecified", resources_pb2.ROLE_UNSPECIFIED), ("7", BAD_ROLE)]
    ],
    *[
        invalid(
            f"setuseremail-email-{name}",
            "users.SetUserEmail",
            set_user_email(email),
            "email",
            creds=_service,
        )
        for name, email in [
            ("empty", ""),
            ("malformed", "ada@@example.com"),
            ("no-at", "plain.example.com"),
            ("nul", "ada\x00@example.com"),
            ("255-chars", email_of(255)),
            ("1mb", email_of(MB)),
        ]
    ],
    # -- etags: oversized (a wrong etag is never INTERNAL nor a change) ----------
    *[
        invalid(
            f"{name}-etag-1mb",
            rpc,
            build,
            field,
            creds=_service,
            also=((grpc.StatusCode.ABORTED, "ETAG_MISMATCH"),),
            **kw,
        )
        for name, rpc, build, field, kw in ETAG_CASES
    ],
    invalid(
        "deleteuser-id-empty",
        "users.DeleteUser",
        lambda c: users_pb2.DeleteUserRequest(),
        "user_id",
        creds=_service,
    ),
    *[
        invalid(
            f"deleteuser-id-{name}",
            "users.DeleteUser",
            with_field(users_pb2.DeleteUserRequest, "user_id", value),
            "user_id",
            creds=_service,
        )
        for name, value in NOT_UUIDS
    ],
    invalid(
        "countusers-role-7",
        "users.CountUsers",
        lambda c: users_pb2.CountUsersRequest(role=BAD_ROLE),
        "role",
        creds=_service,
    ),
    invalid(
        "listusers-page-size-negative",
        "users.ListUsers",
        list_users(page_size=-1),
        "page_size",
        creds=_service,
    ),
    invalid(
        "listusers-role-7", "users.ListUsers", list_users(role=BAD_ROLE), "role", creds=_service
    ),
    invalid(
        "listusers-email-prefix-1mb",
        "users.ListUsers",
        list_users(email_prefix="a" * MB),
        "email_prefix",
        creds=_service,
    ),
    # -- page tokens -----------------------------------------------------------
    *[
        page_token_invalid(f"listusers-page-token-{name}", "users.ListUsers", build, creds=_service)
        for name, build in [
            ("garbage", list_users_with_token(const("abc"))),
            ("garbage-with-dot", list_users_with_token(const("abc.def"))),
            ("1mb", list_users_with_token(const("x" * MB))),
            (
                "flipped-body-char",
                list_users_with_token(
                    lambda c: flip_part(c.users_token_prefix_a, 0), email_prefix="a"
                ),
            ),
            (
                "flipped-tag-char",
                list_users_with_token(
                    lambda c: flip_part(c.users_token_prefix_a, 1), email_prefix="a"
                ),
            ),
            (
                "truncated",
                list_users_with_token(lambda c: c.users_token_prefix_a[:-3], email_prefix="a"),
            ),
            ("from-list-sessions", list_users_with_token(lambda c: c.sessions_token_by_service)),
            (
                "stale-email-prefix",
                list_users_with_token(lambda c: c.users_token_prefix_a, email_prefix="b"),
            ),
            ("dropped-email-prefix", list_users_with_token(lambda c: c.users_token_prefix_a)),
            (
                "stale-role",
                list_users_with_token(lambda c: c.users_token_prefix_a, email_prefix="a", role=2),
            ),
            ("expired", list_users_with_token(lambda c: c.expired_page_token())),
        ]
    ],
    page_token_invalid(
        "listsessions-page-token-from-list-users",
        "sessions.ListSessions",
        list_sessions_with_token(lambda c: c.users_token_prefix_a),
        creds=_user,
    ),
    page_token_invalid(
        "listsessions-page-token-1mb",
        "sessions.ListSessions",
        list_sessions_with_token(const("x" * MB)),
        creds=_user,
    ),
    page_token_invalid(
        "listsessions-page-token-flipped",
        "sessions.ListSessions",
        list_sessions_with_token(lambda c: flip_part(c.sessions_token_of_user, 0)),
        creds=_user,
    ),
    page_token_invalid(
        "listsessions-page-token-for-another-user",
        "sessions.ListSessions",
        list_sessions_with_token(
            lambda c: c.sessions_token_by_service, user_id=lambda c: c.other.user.id
        ),
        creds=_service,
    ),
    page_token_invalid(
        "listsessions-page-token-for-everyone",
        "sessions.ListSessions",
        list_sessions_with_token(lambda c: c.sessions_token_by_service),
        creds=_service,
    ),
    page_token_invalid(
        "listsessions-page-token-of-another-caller",
        "sessions.ListSessions",
        list_sessions_with_token(lambda c: c.sessions_token_of_user),
        creds=lambda c: bearer(c.other.tokens.access_token),
    ),
    # -- SessionService --------------------------------------------------------
    invalid(
        "listsessions-page-size-negative",
        "sessions.ListSessions",
        lambda c: sessions_pb2.ListSessionsRequest(page_size=-1),
        "page_size",
        creds=_user,
    ),
    *[
        invalid(
            f"listsessions-user-id-{name}",
            "sessions.ListSessions",
            with_field(sessions_pb2.ListSessionsRequest, "user_id", value),
            "user_id",
            creds=_service,
        )
        for name, value in NOT_UUIDS
    ],
    invalid(
        "revokesession-id-empty",
        "sessions.RevokeSession",
        lambda c: sessions_pb2.RevokeSessionRequest(),
        "session_id",
        creds=_user,
    ),
    *[
        invalid(
            f"revokesession-id-{name}",
            "sessions.RevokeSession",
            with_field(sessions_pb2.RevokeSessionRequest, "session_id", value),
            "session_id",
            creds=_service,
        )
        for name, value in NOT_UUIDS
    ],
    *[
        invalid(
            f"revokeallsessions-user-id-{name}",
            "sessions.RevokeAllSessions",
            with_field(sessions_pb2.RevokeAllSessionsRequest, "user_id", value),
            "user_id",
            creds=_service,
        )
        for name, value in NOT_UUIDS
    ],
    invalid(
        "revokeallsessions-service-without-user-id",
        "sessions.RevokeAllSessions",
        lambda c: sessions_pb2.RevokeAllSessionsRequest(),
        "user_id",
        creds=_service,
    ),
    # -- CompleteSignIn --------------------------------------------------------
    invalid("completesignin-empty", "auth.CompleteSignIn", complete_sign_in(""), "pending_token"),
    *[
        bad(
            f"completesignin-{name}",
            "auth.CompleteSignIn",
            complete_sign_in(token),
            UNAUTH,
            "PENDING_TOKEN_INVALID",
        )
        for name, token in BAD_PENDING_TOKENS
    ],
    bad(
        "completesignin-1mb-with-password",
        "auth.CompleteSignIn",
        complete_sign_in("p" * MB, new_password="x"),
        UNAUTH,
        "PENDING_TOKEN_INVALID",
    ),
]


# -- organizations, the active org, revocations ----------------------------------


def org_invalid(id: str, rpc: str, build: Build, field: str | None, **kw: Any) -> Any:
    return invalid(id, rpc, build, field, orgs=True, **{"creds": _service, **kw})


def org_page_token_invalid(id: str, rpc: str, build: Build, **kw: Any) -> Any:
    return page_token_invalid(id, rpc, build, orgs=True, **{"creds": _service, **kw})


def _org_user(ctx: Ctx) -> Metadata:
    return bearer(ctx.org_token)


def _other_user(ctx: Ctx) -> Metadata:
    return bearer(ctx.other.tokens.access_token)


Value = Callable[[Ctx], Any]


def naming(how: str) -> Callable[[Ctx], dict[str, str]]:
    """How a request names the org: by "id", "slug" or "neither" (unset)."""

    def fields(ctx: Ctx) -> dict[str, str]:
        return {
            "id": {"org_id": ctx.org.id},
            "slug": {"org_slug": ctx.org.slug},
            "neither": {},
        }[how]

    return fields


def org_request(
    message: Any, ident: Callable[[Ctx], dict[str, str]] | None = None, **fields: Any
) -> Build:
    """``message`` naming the org by ``ident`` (default: by id); callable field
    values take the Ctx."""
    by = naming("id") if ident is None else ident

    def build(ctx: Ctx) -> Any:
        values = {k: (v(ctx) if callable(v) else v) for k, v in fields.items()}
        return message(**by(ctx), **values)

    return build


def org_id_is(value: str) -> Callable[[Ctx], dict[str, str]]:
    return lambda ctx: {"org_id": value}


def org_slug_is(value: str) -> Callable[[Ctx], dict[str, str]]:
    return lambda ctx: {"org_slug": value}


def create_org(**fields: Any) -> Build:
    """CreateOrg as the API key makes it (naming the main user as owner)."""

    def build(ctx: Ctx) -> Any:
        values: dict[str, Any] = {
            "slug": new_slug(),
            "name": "Acme",
            "owner_user_id": ctx.user.user.id,
        }
        values.update(fields)
        return orgs_pb2.CreateOrgRequest(**values)

    return build


def update_org(paths: list[str], ident: str = "id", **values: Any) -> Build:
    def build(ctx: Ctx) -> Any:
        return orgs_pb2.UpdateOrgRequest(
            **naming(ident)(ctx),
            values=resources_pb2.Org(**values),
            update_mask=FieldMask(paths=paths),
        )

    return build


def of_member(ctx: Ctx) -> str:
    return str(ctx.other.user.id)


def of_outsider(ctx: Ctx) -> str:
    """A user in no org: AddMember of them would otherwise succeed."""
    return str(ctx.outsider.user.id)


BAD_SLUGS = [
    ("empty", ""),
    ("2-chars", "ab"),
    ("64-chars", "a" * 64),
    ("uppercase", "Acme"),
    ("underscore", "a_b"),
    ("space", "a b"),
    ("unicode", "äbc"),
    ("trailing-newline", "abc\n"),
    ("nul", "ab\x00c"),
    ("1mb", "a" * MB),
]
BAD_NAMES = [
    ("empty", ""),
    ("201-chars", "x" * 201),
    ("1mb", "x" * MB),
    ("newline", "Acme\nCorp"),
    ("nul", "Acme\x00"),
]
BAD_POSITIONS = [
    ("garbage", "garbage"),
    ("no-sequence", "1-"),
    ("no-time", "-1"),
    ("three-parts", "1-2-3"),
    ("fraction", "1.5-0"),
    ("negative", "-1-0"),
    ("fullwidth-digits", "\uff11-0"),
    ("space", " 1-0"),
    ("trailing-newline", "1-0\n"),
    ("1mb", "1" * MB + "-0"),
]
ORG_METHODS = {
    "orgs.GetOrg": orgs_pb2.GetOrgRequest,
    "orgs.DeleteOrg": orgs_pb2.DeleteOrgRequest,
    "orgs.ListMembers": orgs_pb2.ListMembersRequest,
}
MEMBER_METHODS = {
    "orgs.AddMember": orgs_pb2.AddMemberRequest,
    "orgs.UpdateMember": orgs_pb2.UpdateMemberRequest,
    "orgs.RemoveMember": orgs_pb2.RemoveMemberRequest,
    "orgs.GetMember": orgs_pb2.GetMemberRequest,
}
# Whom a member method names when its user is not the point of the case.
MEMBER_USER = {
    "orgs.AddMember": of_outsider,
    "orgs.UpdateMember": of_member,
    "orgs.RemoveMember": of_member,
    "orgs.GetMember": of_member,
}
# What a member method needs besides the org and the user to be well formed.
MEMBER_EXTRA: dict[str, dict[str, Any]] = {
    "orgs.AddMember": {},
    "orgs.UpdateMember": {"role": resources_pb2.ORG_ROLE_ADMIN},
    "orgs.RemoveMember": {},
    "orgs.GetMember": {},
}


def _short(rpc: str) -> str:
    return rpc.split(".")[1].lower()


def list_orgs_with_token(token: Value, **fields: Any) -> Build:
    def build(ctx: Ctx) -> Any:
        values = {k: (v(ctx) if callable(v) else v) for k, v in fields.items()}
        return orgs_pb2.ListOrgsRequest(page_token=token(ctx), **values)

    return build


def list_members_with_token(token: Value, org: str = "org") -> Build:
    def build(ctx: Ctx) -> Any:
        return orgs_pb2.ListMembersRequest(org_id=getattr(ctx, org).id, page_token=token(ctx))

    return build


def set_active(org_id: str, refresh_token: Value | None = None, org_slug: str = "") -> Build:
    def build(ctx: Ctx) -> Any:
        token = ctx.org_refresh if refresh_token is None else refresh_token(ctx)
        if org_slug:
            return auth_pb2.SetActiveOrgRequest(refresh_token=token, org_slug=org_slug)
        return auth_pb2.SetActiveOrgRequest(refresh_token=token, org_id=org_id)

    return build


ORG_CASES = [
    # -- CreateOrg ---------------------------------------------------------------
    *[
        org_invalid(f"createorg-slug-{name}", "orgs.CreateOrg", create_org(slug=v), "slug")
        for name, v in BAD_SLUGS
    ],
    *[
        org_invalid(f"createorg-name-{name}", "orgs.CreateOrg", create_org(name=v), "name")
        for name, v in BAD_NAMES
    ],
    *[
        org_invalid(
            f"createorg-owner-{name}",
            "orgs.CreateOrg",
            create_org(owner_user_id=v),
            "owner_user_id",
        )
        for name, v in NOT_UUIDS
    ],
    org_invalid(
        "createorg-service-without-owner",
        "orgs.CreateOrg",
        create_org(owner_user_id=""),
        "owner_user_id",
    ),
    org_invalid(
        "createorg-user-uppercase-slug",
        "orgs.CreateOrg",
        create_org(slug="Acme", owner_user_id=""),
        "slug",
        creds=_user,
    ),
    # -- naming the org: the oneof unset, a malformed id or slug -------------------
    # (Both cannot be sent: a oneof holds one, the last one on the wire.)
    *[
        org_invalid(f"{_short(rpc)}-org-unset", rpc, org_request(msg, naming("neither")), "org_id")
        for rpc, msg in ORG_METHODS.items()
    ],
    *[
        org_invalid(
            f"{_short(rpc)}-org-unset",
            rpc,
            org_request(msg, naming("neither"), user_id=MEMBER_USER[rpc], **MEMBER_EXTRA[rpc]),
            "org_id",
        )
        for rpc, msg in MEMBER_METHODS.items()
    ],
    org_invalid(
        "getorg-org-unset-by-user",
        "orgs.GetOrg",
        org_request(orgs_pb2.GetOrgRequest, naming("neither")),
        "org_id",
        creds=_org_user,
    ),
    org_invalid(
        "updateorg-org-unset",
        "orgs.UpdateOrg",
        update_org(["name"], "neither", name="x"),
        "org_id",
    ),
    *[
        org_invalid(f"{_short(rpc)}-org-id-{name}", rpc, org_request(msg, org_id_is(v)), "org_id")
        for rpc, msg in ORG_METHODS.items()
        for name, v in NOT_UUIDS
    ],
    *[
        org_invalid(
            f"{_short(rpc)}-org-id-not-uuid",
            rpc,
            org_request(
                msg, org_id_is("not-a-uuid"), user_id=MEMBER_USER[rpc], **MEMBER_EXTRA[rpc]
            ),
            "org_id",
        )
        for rpc, msg in MEMBER_METHODS.items()
    ],
    *[
        org_invalid(
            f"getorg-org-slug-{name}",
            "orgs.GetOrg",
            org_request(orgs_pb2.GetOrgRequest, org_slug_is(v)),
            "org_slug",
        )
        for name, v in [("1mb", "a" * MB), ("space", "a b"), ("uppercase", "Acme")]
    ],
    # -- UpdateOrg ---------------------------------------------------------------
    *[
        org_invalid(
            f"updateorg-mask-{name}", "orgs.UpdateOrg", update_org(paths, name="x"), "update_mask"
        )
        for name, paths in [
            ("empty", []),
            ("id", ["id"]),
            ("create-time", ["create_time"]),
            ("unknown", ["owner"]),
        ]
    ],
    *[
        org_invalid(
            f"updateorg-slug-{name}", "orgs.UpdateOrg", update_org(["slug"], slug=v), "values.slug"
        )
        for name, v in BAD_SLUGS
    ],
    *[
        org_invalid(
            f"updateorg-name-{name}", "orgs.UpdateOrg", update_org(["name"], name=v), "values.name"
        )
        for name, v in BAD_NAMES
    ],
    org_invalid(
        "updateorg-by-user-slug-uppercase",
        "orgs.UpdateOrg",
        update_org(["slug"], slug="Acme"),
        "values.slug",
        creds=_org_user,
    ),
    # -- members -----------------------------------------------------------------
    *[
        org_invalid(
            f"{_short(rpc)}-user-id-{name}",
            rpc,
            org_request(msg, user_id=v, **MEMBER_EXTRA[rpc]),
            "user_id",
        )
        for rpc, msg in MEMBER_METHODS.items()
        for name, v in [("empty", ""), *NOT_UUIDS]
    ],
    org_invalid(
        "addmember-role-7",
        "orgs.AddMember",
        org_request(orgs_pb2.AddMemberRequest, user_id=of_outsider, role=BAD_ROLE),
        "role",
    ),
    org_invalid(
        "updatemember-role-unspecified",
        "orgs.UpdateMember",
        org_request(orgs_pb2.UpdateMemberRequest, user_id=of_member, role=0),
        "role",
    ),
    org_invalid(
        "updatemember-role-7",
        "orgs.UpdateMember",
        org_request(orgs_pb2.UpdateMemberRequest, user_id=of_member, role=BAD_ROLE),
        "role",
    ),
    org_invalid(
        "updatemember-by-user-role-unspecified",
        "orgs.UpdateMember",
        org_request(orgs_pb2.UpdateMemberRequest, user_id=of_member, role=0),
        "role",
        creds=_org_user,
    ),
    # -- ListOrgs ----------------------------------------------------------------
    *[
        org_invalid(
            f"listorgs-user-id-{name}",
            "orgs.ListOrgs",
            with_field(orgs_pb2.ListOrgsRequest, "user_id", v),
            "user_id",
        )
        for name, v in NOT_UUIDS
    ],
    org_invalid(
        "listorgs-page-size-negative",
        "orgs.ListOrgs",
        lambda c: orgs_pb2.ListOrgsRequest(page_size=-1),
        "page_size",
        creds=_user,
    ),
    *[
        org_page_token_invalid(f"listorgs-page-token-{name}", "orgs.ListOrgs", build, **kw)
        for name, build, kw in [
            ("garbage", list_orgs_with_token(const("abc")), {}),
            ("1mb", list_orgs_with_token(const("x" * MB)), {}),
            (
                "flipped",
                list_orgs_with_token(
                    lambda c: flip(c.orgs_token_by_service, 10), user_id=lambda c: c.user.user.id
                ),
                {},
            ),
            (
                "truncated",
                list_orgs_with_token(
                    lambda c: c.orgs_token_by_service[:-3], user_id=lambda c: c.user.user.id
                ),
                {},
            ),
            ("from-list-users", list_orgs_with_token(lambda c: c.users_token_prefix_a), {}),
            (
                "from-list-members",
                list_orgs_with_token(lambda c: c.members_token, user_id=lambda c: c.user.user.id),
                {},
            ),
            (
                "from-list-sessions",
                list_orgs_with_token(
                    lambda c: c.sessions_token_by_service, user_id=lambda c: c.user.user.id
                ),
                {},
            ),
            (
                "for-another-user",
                list_orgs_with_token(
                    lambda c: c.orgs_token_by_service, user_id=lambda c: c.other.user.id
                ),
                {},
            ),
            ("for-everyone", list_orgs_with_token(lambda c: c.orgs_token_by_service), {}),
            (
                "of-another-caller",
                list_orgs_with_token(lambda c: c.orgs_token_of_user),
                {"creds": _other_user},
            ),
        ]
    ],
    # -- ListMembers -------------------------------------------------------------
    org_invalid(
        "listmembers-page-size-negative",
        "orgs.ListMembers",
        org_request(orgs_pb2.ListMembersRequest, page_size=-1),
        "page_size",
    ),
    *[
        org_page_token_invalid(f"listmembers-page-token-{name}", "orgs.ListMembers", build)
        for name, build in [
            ("garbage", list_members_with_token(const("abc"))),
            ("1mb", list_members_with_token(const("x" * MB))),
            ("flipped", list_members_with_token(lambda c: flip(c.members_token, 10))),
            ("truncated", list_members_with_token(lambda c: c.members_token[:-3])),
            ("of-another-org", list_members_with_token(lambda c: c.members_token, "other_org")),
            ("from-list-orgs", list_members_with_token(lambda c: c.orgs_token_by_service)),
            ("from-list-users", list_members_with_token(lambda c: c.users_token_prefix_a)),
        ]
    ],
    # -- SetActiveOrg ------------------------------------------------------------
    *[
        org_invalid(f"setactiveorg-org-id-{name}", "auth.SetActiveOrg", set_active(v), "org_id")
        for name, v in NOT_UUIDS
    ],
    *[
        org_invalid(
            f"setactiveorg-org-slug-{name}",
            "auth.SetActiveOrg",
            set_active("", org_slug=v),
            "org_slug",
        )
        for name, v in [
            ("1mb", "a" * MB),
            ("space", "a b"),
            ("uppercase", "Acme"),
            ("nul", "a\x00b"),
        ]
    ],
    *[
        bad(
            f"setactiveorg-refresh-{name}",
            "auth.SetActiveOrg",
            set_active("", token),
            UNAUTH,
            "TOKEN_INVALID",
            orgs=True,
        )
        for name, token in [
            ("empty", const("")),
            ("unknown", const("rt_" + "A" * 43)),
            ("1mb", const("rt_" + "x" * MB)),
            ("access-token", lambda c: c.org_token),
            ("flipped", lambda c: flip(c.org_refresh, 10)),
        ]
    ],
    # -- WatchRevocations --------------------------------------------------------
    *[
        org_invalid(
            f"watchrevocations-after-{name}",
            "auth.WatchRevocations",
            with_field(auth_pb2.WatchRevocationsRequest, "after", v),
            "after",
        )
        for name, v in BAD_POSITIONS
    ],
]


def _stub_method(api: Api, rpc: str) -> Any:
    stub_name, method = rpc.split(".")
    return getattr(getattr(api, stub_name), method)


def _log_size(log_file: Path) -> int:
    return log_file.stat().st_size


def _read_from(log_file: Path, start: int) -> str:
    with log_file.open("rb") as stream:
        stream.seek(start)
        return stream.read().decode(errors="replace")


async def _logged(log_file: Path, start: int, request_id: str) -> list[dict[str, Any]]:
    """The server's log lines of one call, written from byte ``start`` on.

    The access-log line is written after the status has gone out, so the
    client may see the status first: wait (briefly) for it.
    """
    lines: list[dict[str, Any]] = []
    for _ in range(100):
        text = _read_from(log_file, start)
        lines = [json.loads(line) for line in text.splitlines() if request_id in line]
        if any(line.get("event") == "rpc" for line in lines):
            return lines
        await asyncio.sleep(0.02)
    return lines


ALL_CASES = [*CASES, *ORG_CASES]


async def _invoke(api: Api, rpc: str, request: Any, metadata: Metadata) -> Any:
    """Makes the call; of a server-streaming one, awaits the first response."""
    call = _stub_method(api, rpc)(request, metadata=metadata)
    if isinstance(call, grpc.aio.UnaryStreamCall):
        try:
            return await call.read()
        finally:
            call.cancel()
    return await call


@pytest.mark.parametrize("case", ALL_CASES)
async def test_bad_request(api: Api, log_file: Path, case: Bad) -> None:
    ctx = await Ctx.make(api)
    if case.orgs:
        await ctx.add_orgs()
    request = case.build(ctx)
    request_id = f"bad-input-{uuid.uuid4().hex}"
    metadata = (*case.creds(ctx), ("x-request-id", request_id))
    before = await api.snapshot()
    log_start = _log_size(log_file)

    error = await failure(_invoke(api, case.rpc, request, metadata))

    assert error.code != grpc.StatusCode.INTERNAL, f"INTERNAL: {error.message}"
    answer = (error.code, error.reason)
    assert answer in {(case.code, case.reason), *case.also}, error.message
    assert error.request_id == request_id
    fields: list[str] | None = None
    if case.field is not None and answer == (case.code, case.reason):
        bad_request = error.detail(error_details_pb2.BadRequest)
        assert bad_request is not None, "INVALID_ARGUMENT without a BadRequest detail"
        fields = [v.field for v in bad_request.field_violations]
    assert await api.snapshot() == before, "a failed call changed stored data"

    logged = await _logged(log_file, log_start, request_id)
    assert not [line for line in logged if line.get("event") == "rpc.failed"]
    access = [line for line in logged if line.get("event") == "rpc"]
    assert [(line["code"], line["reason"]) for line in access] == [(answer[0].name, answer[1])]
    if fields is not None:
        assert fields == [case.field]


def test_case_ids_are_unique() -> None:
    ids = [p.id for p in ALL_CASES]
    assert len(ids) == len(set(ids))


async def test_undecodable_request_is_invalid_argument(api: Api) -> None:
    """A body that is not a valid message (a string field that is not UTF-8)
    is a malformed request: INVALID_ARGUMENT with an ErrorInfo like every
    other failure, not a bare UNKNOWN/INTERNAL from the gRPC runtime."""
    raw = api.channel.unary_unary(
        "/authsvc.v1.AuthService/SignUp",
        request_serializer=lambda body: body,
        response_deserializer=lambda body: body,
    )
    before = await api.snapshot()
    # field 1 (email): 2 bytes that are not UTF-8; field 2 (password): "ab".
    error = await failure(raw(b"\x0a\x02\xff\xfe\x12\x02ab"))
    assert (error.code, error.reason) == (IA, "INVALID_ARGUMENT"), (error.code, error.message)
    assert "DecodeError" not in error.message
    assert await api.snapshot() == before


@pytest.mark.parametrize(
    ("rpc", "build", "creds"),
    [
        pytest.param(
            "auth.SignUp",
            sign_up_from(ip_address="203.0.113.9", user_agent="Gateway\x00/1.0"),
            _service,
            id="signup-user-agent-nul",
        ),
        pytest.param(
            "auth.SignInWithPassword",
            sign_in(client_info=resources_pb2.ClientInfo(user_agent="Gateway\x00/1.0")),
            _service,
            id="signin-user-agent-nul",
        ),
        pytest.param(
            "auth.RefreshToken",
            refresh(user_refresh, client_info=resources_pb2.ClientInfo(user_agent="\x00")),
            _service,
            id="refresh-user-agent-nul",
        ),
        pytest.param(
            "users.ListUsers", list_users(email_prefix="a\x00"), _service, id="listusers-prefix-nul"
        ),
    ],
)
async def test_nul_characters_never_reach_the_database(
    api: Api, rpc: str, build: Build, creds: Creds
) -> None:
    """A NUL character (PostgreSQL text cannot hold one) is refused as
    INVALID_ARGUMENT or handled (stripped, matching nothing), never INTERNAL."""
    ctx = await Ctx.make(api)
    before = await api.snapshot()
    try:
        response = await _stub_method(api, rpc)(build(ctx), metadata=creds(ctx))
    except grpc.aio.AioRpcError as rpc_error:
        from authsvc_client.errors import from_rpc_error

        error = from_rpc_error(rpc_error)
        assert (error.code, error.reason) == (IA, "INVALID_ARGUMENT"), error.message
        assert await api.snapshot() == before
        return
    if rpc == "users.ListUsers":
        assert list(response.users) == []
    else:
        remember(response.tokens.access_token, response.tokens.refresh_token)
        listed = await api.sessions.ListSessions(
            sessions_pb2.ListSessionsRequest(), metadata=service()
        )
        assert listed.sessions
        assert all("\x00" not in s.user_agent for s in listed.sessions), "NUL stored"


async def test_long_unicode_email_within_the_limit_is_accepted(api: Api) -> None:
    """An email of 132 characters (the limit is 254) whose case-folded form is
    longer than the email itself: a valid address, so sign-up succeeds and the
    address signs in, on every backend (never INTERNAL)."""
    email = "\u0390" * 120 + "@example.com"  # ΐ case-folds to three characters
    assert len(email) <= 254
    assert len(email.casefold()) > 320
    created = await api.sign_up(email)
    signed = await api.auth.SignInWithPassword(
        auth_pb2.SignInWithPasswordRequest(email=email.replace(".com", ".COM"), password=PASSWORD)
    )
    remember(signed.result.tokens.access_token, signed.result.tokens.refresh_token)
    assert signed.result.user.id == created.user.id

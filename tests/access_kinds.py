"""The credential kinds of the access walk (``tests/test_access.py``).

A :class:`World` builds, lazily and once per test, the real objects a cell
needs: users with live sessions, two orgs (``A`` and ``B``) with members of
each role, a platform admin. A :class:`Kind` says what the server must see in
a credential (its live state, as the server reads it); :func:`credential` makes
one, as metadata, out of the world's objects.

Broken credentials are real: the expired token is signed by the running
server's own codec and key with an ``exp`` in the past (the access-token TTL
cannot go below 10 s, so it is minted rather than waited for), the foreign
one carries the same claims and the server's ``kid`` but is signed by another
Ed25519 key, the revoked one is a token whose session signed out. Stale tokens
are tokens minted before their session's claims version went up (a platform
role change, an org role change); they still verify, and the server acts on
the live state, which the kind records.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from authsvc.domain.models import Role
from authsvc.security.jwt_tokens import AccessClaims, SigningKey
from authsvc_client.v1 import auth_pb2, orgs_pb2, resources_pb2, users_pb2
from tests.app import (
    API_KEY,
    Api,
    OrgRole,
    OrgUser,
    bearer,
    claims,
    org_with_owner,
    refreshed,
    remember,
    service,
    set_active_org,
    who,
)

OWNER = resources_pb2.ORG_ROLE_OWNER
ADMIN = resources_pb2.ORG_ROLE_ADMIN
MEMBER = resources_pb2.ORG_ROLE_MEMBER

Metadata = tuple[tuple[str, str], ...]

BAD_API_KEY = "ak_not_a_key_this_server_knows_0000"
MALFORMED = "Bearer not-a-jwt"


@dataclass(frozen=True)
class Kind:
    """A kind of credential, as the server must see it.

    ``fails_with``: the UNAUTHENTICATED reason every method answers (the
    credential is checked before the request is read), except that a public
    method ignores a bearer (``options.proto``, ACCESS_PUBLIC) and checks only
    an API key (``api_key_checked``). Otherwise the flags say who the server
    sees: a user's
    live access token (``token``), the API key (``service``), the user's live
    platform role (``platform_admin``) and live role in their session's
    active org ``A`` (``org_role``), and whether the request names the
    caller's own user and org (``own``) or someone else's (another user, the
    org ``B`` for a caller active in ``A``, the org ``A`` for a caller in none).
    """

    name: str
    doc: str
    fails_with: str = ""
    api_key_checked: bool = False  # ``fails_with`` comes from the API key
    token: bool = False
    service: bool = False
    platform_admin: bool = False
    org_role: OrgRole | None = None
    own: bool = False


KINDS: tuple[Kind, ...] = (
    Kind("none", "no credential"),
    Kind("malformed", "authorization: Bearer not-a-jwt", fails_with="TOKEN_INVALID"),
    Kind(
        "foreign_key",
        "a platform admin's claims and the server's kid, signed by another key",
        fails_with="TOKEN_INVALID",
    ),
    Kind(
        "expired",
        "a platform admin's token from the server's codec and key, exp an hour ago",
        fails_with="TOKEN_EXPIRED",
    ),
    Kind("revoked", "a platform admin's token after SignOut", fails_with="SESSION_REVOKED"),
    Kind(
        "bad_api_key",
        "an x-api-key the server does not know",
        fails_with="API_KEY_INVALID",
        api_key_checked=True,
    ),
    Kind(
        "api_key_malformed",
        "the valid API key next to a malformed bearer",
        fails_with="TOKEN_INVALID",
    ),
    Kind("api_key", "the valid API key", service=True),
    Kind(
        "api_key_user", "the valid API key next to a plain user's token", token=True, service=True
    ),
    Kind(
        "platform_admin",
        "a platform admin's token (no active org)",
        token=True,
        platform_admin=True,
    ),
    Kind(
        "stale_admin",
        "a token minted while its user was platform admin, since demoted (naming another)",
        token=True,
    ),
    Kind("user", "a plain user (no active org), on their own things", token=True, own=True),
    Kind("user_other", "a plain user (no active org), naming another's", token=True),
    Kind(
        "org_member",
        "active org A as member, naming A / themself",
        token=True,
        org_role=MEMBER,
        own=True,
    ),
    Kind(
        "org_member_other",
        "active org A as member, naming B / another",
        token=True,
        org_role=MEMBER,
    ),
    Kind(
        "org_admin",
        "active org A as admin, naming A / themself",
        token=True,
        org_role=ADMIN,
        own=True,
    ),
    Kind(
        "org_admin_other", "active org A as admin, naming B / another", token=True, org_role=ADMIN
    ),
    Kind(
        "org_owner",
        "active org A as owner, naming A / themself",
        token=True,
        org_role=OWNER,
        own=True,
    ),
    Kind(
        "org_owner_other", "active org A as owner, naming B / another", token=True, org_role=OWNER
    ),
    Kind(
        "stale_org_admin",
        "a token minted while its user was admin of A, since made member: acts as member",
        token=True,
        org_role=MEMBER,
        own=True,
    ),
)
KIND = {kind.name: kind for kind in KINDS}


@dataclass(frozen=True)
class Caller:
    """A credential as sent, and what the request should name for it."""

    kind: Kind
    md: Metadata | None
    user: OrgUser | None  # the user whose access token it carries, if any
    own: bool  # the request names the caller's own user, sessions, org
    letter: str  # the org an org-scoped request names ("A" or "B")


class World:
    """The objects of one test, each made on first use."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self._made: dict[str, Any] = {}
        # org id -> user id -> role, as this world made them
        self.members: dict[str, dict[str, OrgRole]] = {}
        # user id -> ids of the orgs they are in
        self.orgs_of: dict[str, set[str]] = {}

    async def mark(self) -> None:
        """Stores a user of this world's own, for ``intact`` to look for."""
        await self._once("sentinel", self._signed_up)

    async def intact(self) -> bool:
        """Whether nothing has emptied the tables since ``mark``: the objects
        made so far are all still stored."""
        sentinel: OrgUser = self._made["sentinel"]
        async with self.api.server.core.db.reader() as tx:
            return await tx.users.get(uuid.UUID(sentinel.id)) is not None

    async def _once(self, key: str, make: Callable[[], Awaitable[Any]]) -> Any:
        if key not in self._made:
            self._made[key] = await make()
        return self._made[key]

    def _joined(self, org_id: str, user_id: str, role: OrgRole) -> None:
        self.members.setdefault(org_id, {})[user_id] = role
        self.orgs_of.setdefault(user_id, set()).add(org_id)

    async def _signed_up(self) -> OrgUser:
        created = await self.api.sign_up()
        return OrgUser(created.user, created.tokens)

    async def plain(self) -> OrgUser:
        """A user with one session and no org."""
        result: OrgUser = await self._once("plain", self._signed_up)
        return result

    async def victim(self) -> OrgUser:
        """Another plain user: whom requests name when they name someone else."""
        result: OrgUser = await self._once("victim", self._signed_up)
        return result

    async def outsider(self) -> OrgUser:
        """A user in no org, for AddMember."""
        result: OrgUser = await self._once("outsider", self._signed_up)
        return result

    async def _new_admin(self) -> OrgUser:
        """A user made platform admin (by the API key), with a token that says so."""
        created = await self.api.sign_up()
        await self.api.users.SetUserRole(
            users_pb2.SetUserRoleRequest(user_id=created.user.id, role=resources_pb2.ROLE_ADMIN),
            metadata=service(),
        )
        tokens = await refreshed(self.api, created.tokens.refresh_token)
        assert claims(tokens.access_token)["role"] == Role.ADMIN.value
        return OrgUser(created.user, tokens)

    async def admin(self) -> OrgUser:
        result: OrgUser = await self._once("admin", self._new_admin)
        return result

    async def org(self, letter: str) -> Any:
        """Org ``letter``, made by its owner, whose session has it active."""

        async def make() -> Any:
            org, owner = await org_with_owner(self.api, name=f"Org {letter}")
            self._made[f"in:{letter}:{OWNER}"] = owner
            self._joined(org.id, owner.id, OWNER)
            return org

        return await self._once(f"org:{letter}", make)

    async def _add(self, org_id: str, role: OrgRole) -> OrgUser:
        """A new user, added to the org with ``role`` by the API key."""
        user = await self._signed_up()
        await self.api.orgs.AddMember(
            orgs_pb2.AddMemberRequest(org_id=org_id, user_id=user.id, role=role),
            metadata=service(),
        )
        self._joined(org_id, user.id, role)
        return user

    async def in_org(self, letter: str, role: OrgRole) -> OrgUser:
        """A user holding ``role`` in org ``letter``, whose session has it active."""
        org = await self.org(letter)

        async def make() -> OrgUser:
            user = await self._add(org.id, role)
            tokens = await set_active_org(self.api, user.tokens.refresh_token, org.id)
            return OrgUser(user.user, tokens)

        result: OrgUser = await self._once(f"in:{letter}:{role}", make)
        return result

    async def spare(self, letter: str) -> OrgUser:
        """A plain member of org ``letter``: whom member calls name."""
        org = await self.org(letter)
        result: OrgUser = await self._once(f"spare:{letter}", lambda: self._add(org.id, MEMBER))
        return result

    async def victim_org(self) -> Any:
        """An org the victim owns (not active in any session), for SetActiveOrg."""

        async def make() -> Any:
            victim = await self.victim()
            response = await self.api.orgs.CreateOrg(
                orgs_pb2.CreateOrgRequest(slug=f"v-{uuid.uuid4().hex[:12]}", name="Victim's"),
                metadata=victim.md,
            )
            self._joined(response.org.id, victim.id, OWNER)
            return response.org

        return await self._once("victim_org", make)

    # -- broken and stale tokens ---------------------------------------------------

    def _admin_claims(self, admin: OrgUser, issued_at: datetime) -> AccessClaims:
        return AccessClaims(
            user_id=uuid.UUID(admin.id),
            session_id=uuid.UUID(admin.tokens.session_id),
            role=Role.ADMIN,
            issued_at=issued_at,
            expires_at=issued_at + timedelta(minutes=15),
            version=int(claims(admin.token)["ver"]),
        )

    async def expired_token(self) -> str:
        """A platform admin's token, genuine but past its ``exp``."""
        core = self.api.server.core
        admin = await self.admin()
        token = core.auth._codec.issue(
            core.keys.active, self._admin_claims(admin, datetime.now(UTC) - timedelta(hours=1))
        )
        remember(token)
        return token

    async def foreign_token(self) -> str:
        """A platform admin's live claims under the server's kid, signed by another key."""
        core = self.api.server.core
        admin = await self.admin()
        private = Ed25519PrivateKey.generate()
        public = private.public_key()
        forger = SigningKey(
            kid=core.keys.active.kid,
            private=private,
            public=public,
            public_raw=public.public_bytes(Encoding.Raw, PublicFormat.Raw),
        )
        token = core.auth._codec.issue(forger, self._admin_claims(admin, datetime.now(UTC)))
        remember(token)
        return token

    async def revoked_token(self) -> str:
        """A platform admin's token (an admin of its own), after SignOut."""

        async def make() -> str:
            admin = await self._new_admin()
            await self.api.auth.SignOut(auth_pb2.SignOutRequest(), metadata=admin.md)
            return admin.token

        result: str = await self._once("revoked", make)
        return result

    async def stale_admin(self) -> OrgUser:
        result: OrgUser = await self._once("stale_admin", self._stale_admin)
        return result

    async def _stale_admin(self) -> OrgUser:
        """A platform admin's session; the user is then demoted to user."""
        admin = await self._new_admin()
        await self.api.users.SetUserRole(
            users_pb2.SetUserRoleRequest(user_id=admin.id, role=resources_pb2.ROLE_USER),
            metadata=service(),
        )
        # The token still says admin; the server reads the live role.
        assert claims(admin.token)["role"] == Role.ADMIN.value
        assert (await who(self.api, admin.token)).role == resources_pb2.ROLE_USER
        return admin

    async def stale_org_admin(self) -> OrgUser:
        result: OrgUser = await self._once("stale_org_admin", self._stale_org_admin)
        return result

    async def _stale_org_admin(self) -> OrgUser:
        """An admin of org A, active there; then made member (by the API key)."""
        org = await self.org("A")
        added = await self._add(org.id, ADMIN)
        user = OrgUser(
            added.user, await set_active_org(self.api, added.tokens.refresh_token, org.id)
        )
        await self.api.orgs.UpdateMember(
            orgs_pb2.UpdateMemberRequest(org_id=org.id, user_id=user.id, role=MEMBER),
            metadata=service(),
        )
        self._joined(org.id, user.id, MEMBER)
        assert claims(user.token)["org_role"] == "admin"
        seen = await who(self.api, user.token)
        assert (seen.org_id, seen.org_role) == (org.id, MEMBER)
        return user


async def credential(world: World, kind: Kind) -> Caller:
    """The credential of ``kind``, made from the world's objects."""
    remember(BAD_API_KEY)
    name = kind.name

    def anonymous(md: Metadata | None) -> Caller:
        return Caller(kind, md, None, own=False, letter="A")

    if name == "none":
        return anonymous(None)
    if name == "malformed":
        return anonymous((("authorization", MALFORMED),))
    if name == "foreign_key":
        return anonymous(bearer(await world.foreign_token()))
    if name == "expired":
        return anonymous(bearer(await world.expired_token()))
    if name == "revoked":
        return anonymous(bearer(await world.revoked_token()))
    if name == "bad_api_key":
        return anonymous((("x-api-key", BAD_API_KEY),))
    if name == "api_key_malformed":
        return anonymous((("x-api-key", API_KEY), ("authorization", MALFORMED)))
    if name == "api_key":
        return anonymous(service())
    user: OrgUser
    if name == "api_key_user":
        user = await world.plain()
        return Caller(kind, (*service(), *user.md), user, own=False, letter="A")
    if name == "platform_admin":
        user = await world.admin()
    elif name == "stale_admin":
        user = await world.stale_admin()
    elif name in ("user", "user_other"):
        user = await world.plain()
    elif name == "stale_org_admin":
        user = await world.stale_org_admin()
    else:
        assert kind.org_role is not None, name
        user = await world.in_org("A", kind.org_role)
    letter = "A" if kind.own or kind.org_role is None else "B"
    return Caller(kind, user.md, user, own=kind.own, letter=letter)

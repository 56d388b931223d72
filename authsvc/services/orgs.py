"""Organizations and memberships: the role table and the tenancy rules.

A user acts in an org only through a session whose active org it is, with the
role their membership holds now (read inside the transaction that acts). A
platform admin's token and a service API key act on any org. Every change to
one org's memberships first locks the org row, so the last-owner rule (read
the owners, then write) holds under concurrency.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from authsvc.domain import etags
from authsvc.domain.events import claims_changed
from authsvc.domain.models import Cursor, Member, Org, OrgRole
from authsvc.domain.ports import Clock, Database, Transaction
from authsvc.domain.principal import Principal
from authsvc.errors import (
    InvalidArgument,
    LastOwner,
    MemberNotFound,
    OrgHasMembers,
    OrgMismatch,
    OrgNotFound,
    PermissionDenied,
    UserNotFound,
)
from authsvc.security.page_tokens import PageTokens, fingerprint
from authsvc.services import validation
from authsvc.services.auth import AuthService


class OrgAction(enum.Enum):
    """What a call does inside an org; the value is how the README says it."""

    READ = "read the org, its members, one member"
    LEAVE = "leave the org (remove oneself)"
    UPDATE_ORG = "update the org's name or slug"
    ADD_MEMBER = "add a member or admin"
    CHANGE_ROLE = "change a role between member and admin"
    REMOVE_MEMBER = "remove a member or admin"
    MANAGE_OWNERS = "add an owner, make or unmake an owner"
    REMOVE_OWNER = "remove an owner"
    DELETE_ORG = "delete the org"


# The role table: the lowest org role that may take each action. The README
# and the OrgService comment print it; tests check both copies and every cell.
REQUIRED_ROLE: Mapping[OrgAction, OrgRole] = MappingProxyType(
    {
        OrgAction.READ: OrgRole.MEMBER,
        OrgAction.LEAVE: OrgRole.MEMBER,
        OrgAction.UPDATE_ORG: OrgRole.ADMIN,
        OrgAction.ADD_MEMBER: OrgRole.ADMIN,
        OrgAction.CHANGE_ROLE: OrgRole.ADMIN,
        OrgAction.REMOVE_MEMBER: OrgRole.ADMIN,
        OrgAction.MANAGE_OWNERS: OrgRole.OWNER,
        OrgAction.REMOVE_OWNER: OrgRole.OWNER,
        OrgAction.DELETE_ORG: OrgRole.OWNER,
    }
)

_ORG_FIELDS = frozenset({"name", "slug"})


def _org_cursor(row: tuple[Org, Member]) -> Cursor:
    return Cursor(row[0].created_at, row[0].id)


def allowed(role: OrgRole, action: OrgAction) -> bool:
    return role.rank >= REQUIRED_ROLE[action].rank


@dataclass(frozen=True, slots=True)
class _Scope:
    """The org a call acts in, and as whom: ``role`` is None for a platform
    admin or a service, who may do everything."""

    org: Org
    role: OrgRole | None

    def require(self, action: OrgAction) -> None:
        if self.role is not None and not allowed(self.role, action):
            raise PermissionDenied(f"needs org role {REQUIRED_ROLE[action].value}")


class OrgService:
    def __init__(self, *, db: Database, auth: AuthService, pages: PageTokens, clock: Clock) -> None:
        self._db = db
        self._auth = auth
        self._pages = pages
        self._clock = clock

    # -- tenancy ------------------------------------------------------------------

    @staticmethod
    def _check_tenant(principal: Principal, ref: uuid.UUID | str) -> uuid.UUID | None:
        """The active org a user's call must name, checked before any lookup
        (so a user learns nothing of other orgs); None for admins and services.

        Raises: OrgMismatch.
        """
        if principal.is_admin:
            return None
        session = principal.session
        assert session is not None  # ACCESS_ORG: a token or an API key
        if session.org_id is None:
            raise OrgMismatch("the session has no active org; call SetActiveOrg")
        if isinstance(ref, uuid.UUID) and ref != session.org_id:
            raise OrgMismatch()
        return session.org_id

    async def _scope(
        self, tx: Transaction, principal: Principal, ref: uuid.UUID | str, *, lock: bool
    ) -> _Scope:
        """Resolves the org a call names and the caller's live role in it.

        Raises: OrgMismatch, OrgNotFound.
        """
        active = self._check_tenant(principal, ref)
        if active is None:
            org = await (
                tx.orgs.get(ref, for_update=lock)
                if isinstance(ref, uuid.UUID)
                else tx.orgs.get_by_slug(ref, for_update=lock)
            )
            if org is None:
                raise OrgNotFound()
            return _Scope(org, None)
        assert principal.session is not None
        org = await tx.orgs.get(active, for_update=lock)
        if org is None or (isinstance(ref, str) and org.slug != ref):
            raise OrgMismatch()
        me = await tx.memberships.get(org.id, principal.session.user_id)
        if me is None:
            # Removed since the token was checked: no longer in this org.
            raise OrgMismatch()
        return _Scope(org, me.role)

    async def _gone(
        self, tx: Transaction, principal: Principal, ref: uuid.UUID | str, action: OrgAction
    ) -> bool:
        """Whether a delete with ``allow_missing`` whose org did not resolve
        may succeed: what it deletes is gone, and the caller may be told so.

        An admin or a service sees every org: it did not resolve, so it is
        gone, and every membership in it. A user's call named an org other
        than their session's active one (or their session has none), and the
        answer must not tell whether an org they cannot see exists: the call
        succeeds only for the org their access token itself names (by its
        id, or by the slug the token carries), with a role there that may
        take ``action`` (the token is our signed word that they were in that
        org, in that role, when it was minted). That is the retry whose first
        attempt took the org off the caller's session (the owner's DeleteOrg;
        a member's leave; any delete in an org deleted since), with the same
        token. It then succeeds if the token's org (by id) is gone; for a
        leave (``action`` LEAVE), if the caller's own membership in it is.
        So a user learns at most that an org they were in, as their token
        says, is gone, or that they left it; never anything of an org that
        has the slug now (a slug is reusable, the token's org id is not).
        """
        if principal.is_admin:
            return True  # _scope raised OrgNotFound: there is no such org
        session = principal.session
        assert session is not None
        org_id, role = session.token_org_id, session.token_org_role
        named = ref == org_id or (bool(session.token_org_slug) and ref == session.token_org_slug)
        if org_id is None or role is None or not named or not allowed(role, action):
            return False
        if action is OrgAction.LEAVE:
            return await tx.memberships.get(org_id, session.user_id) is None
        return await tx.orgs.get(org_id) is None

    # -- orgs -----------------------------------------------------------------------

    async def create(
        self, principal: Principal, *, slug: str, name: str, owner_user_id: str
    ) -> Org:
        """Raises: InvalidArgument, PermissionDenied, OrgSlugConflict, UserNotFound."""
        slug = validation.slug(slug)
        name = validation.org_name(name)
        owner = self._owner(principal, owner_user_id)
        now = self._clock.now()
        org = Org(id=uuid.uuid4(), slug=slug, name=name, created_at=now, updated_at=now)
        async for attempt in self._db.attempts():
            async with attempt as tx:
                if await tx.users.get(owner) is None:
                    raise UserNotFound()
                await tx.orgs.add(org)
                await tx.memberships.add(org.id, owner, OrgRole.OWNER, now)
        return org

    @staticmethod
    def _owner(principal: Principal, owner_user_id: str) -> uuid.UUID:
        if owner_user_id:
            owner = validation.user_id(owner_user_id, "owner_user_id")
            if not principal.may_act_on(owner):
                raise PermissionDenied()
            return owner
        if principal.session is None or principal.service_name is not None:
            raise InvalidArgument.field("owner_user_id", "required with an API key")
        return principal.session.user_id

    async def get(self, principal: Principal, *, org_id: str, org_slug: str) -> Org:
        """Raises: InvalidArgument, OrgMismatch, OrgNotFound."""
        ref = validation.org_ref(org_id, org_slug)
        async with self._db.reader() as tx:
            scope = await self._scope(tx, principal, ref, lock=False)
        scope.require(OrgAction.READ)
        return scope.org

    async def update(
        self,
        principal: Principal,
        *,
        org_id: str,
        org_slug: str,
        paths: Sequence[str],
        name: str,
        slug: str,
        etag: str = "",
    ) -> Org:
        """Changes the fields in ``paths``; with ``etag``, only if it is the
        org's current one (checked under the org row's lock). A change that
        leaves every field as it is writes nothing and keeps the etag.

        Raises: InvalidArgument, OrgMismatch, PermissionDenied, OrgNotFound,
        OrgSlugConflict, EtagMismatch."""
        ref = validation.org_ref(org_id, org_slug)
        expected = validation.etag(etag, "values.etag")
        if not paths:
            raise InvalidArgument.field("update_mask", "required")
        unknown = set(paths) - _ORG_FIELDS
        if unknown:
            raise InvalidArgument.field("update_mask", f"unknown path {sorted(unknown)[0]!r}")
        changes: dict[str, object] = {}
        if "name" in paths:
            changes["name"] = validation.org_name(name, "values.name")
        if "slug" in paths:
            changes["slug"] = validation.slug(slug, "values.slug")
        async for attempt in self._db.attempts():
            async with attempt as tx:
                scope = await self._scope(tx, principal, ref, lock=True)
                scope.require(OrgAction.UPDATE_ORG)
                etags.require(expected, etags.org(scope.org))
                org: Org | None = scope.org
                if any(getattr(scope.org, field) != value for field, value in changes.items()):
                    now = self._clock.now()
                    org = await tx.orgs.update(scope.org.id, changes, now)
                    if org is not None and org.slug != scope.org.slug:
                        # The slug is a claim (`org_slug`): tokens of the
                        # sessions acting in this org are stale now, and
                        # Authenticate's cached view of them must go.
                        bumped = await tx.sessions.bump_org_claims(org.id, now)
                        await tx.events.add(*claims_changed([], bumped))
        if org is None:
            raise OrgNotFound()
        return org

    async def delete(
        self,
        principal: Principal,
        *,
        org_id: str,
        org_slug: str,
        etag: str = "",
        force: bool = False,
        allow_missing: bool = False,
    ) -> None:
        """Deletes the org and its memberships; sessions in it lose their org
        (AIP-135).

        An org with members other than the caller (for an admin or a service:
        any member) needs ``force``. With ``allow_missing``, an org that does
        not exist is no error, for whoever may be told so (``_gone``).

        Raises: InvalidArgument, OrgMismatch, PermissionDenied, OrgNotFound,
        OrgHasMembers, EtagMismatch.
        """
        ref = validation.org_ref(org_id, org_slug)
        expected = validation.etag(etag)
        now = self._clock.now()
        async for attempt in self._db.attempts():
            async with attempt as tx:
                try:
                    scope = await self._scope(tx, principal, ref, lock=True)
                except (OrgNotFound, OrgMismatch):
                    if allow_missing and await self._gone(tx, principal, ref, OrgAction.DELETE_ORG):
                        return
                    raise
                scope.require(OrgAction.DELETE_ORG)
                etags.require(expected, etags.org(scope.org))
                members = await tx.memberships.user_ids(scope.org.id)
                # A user acting in the org counts others; for an admin or a
                # service (no role in the scope), every member is another.
                me = None
                if scope.role is not None and principal.session is not None:
                    me = principal.session.user_id
                if not force and any(m != me for m in members):
                    raise OrgHasMembers()
                await tx.sessions.clear_org(scope.org.id, None)
                await tx.orgs.delete(scope.org.id)  # memberships go with it (ON DELETE CASCADE)
                bumped = await tx.sessions.bump_claims(members, now)
                await tx.events.add(*claims_changed(members, bumped))

    async def list_orgs(
        self, principal: Principal, *, user_id: str, page_size: int, page_token: str
    ) -> tuple[list[Org], list[Member], str]:
        """Orgs oldest first: a user's own, or (admin, service) anyone's or
        all; with one user's orgs, that user's membership in each (in the
        same order; empty when listing all), read in the same query.

        Raises: InvalidArgument, InvalidPageToken, PermissionDenied.
        """
        target: uuid.UUID | None
        if user_id:
            target = validation.user_id(user_id)
            if not principal.may_act_on(target):
                raise PermissionDenied()
        elif principal.is_admin or principal.session is None:
            target = None
        else:
            target = principal.session.user_id
        size = validation.page_size(page_size)
        filters = fingerprint(target)
        now = self._clock.now()
        after = self._pages.decode(page_token, "orgs", filters, now) if page_token else None
        if target is None:
            async with self._db.reader() as tx:
                every = await tx.orgs.list(after, size + 1)
            page, token = self._pages.page(
                "orgs", filters, every, size, now, lambda o: Cursor(o.created_at, o.id)
            )
            return page, [], token
        async with self._db.reader() as tx:
            rows = await tx.orgs.list_of_user(target, after, size + 1)
        pairs, token = self._pages.page("orgs", filters, rows, size, now, _org_cursor)
        return [org for org, _ in pairs], [member for _, member in pairs], token

    # -- memberships --------------------------------------------------------------

    async def add_member(
        self, principal: Principal, *, org_id: str, org_slug: str, user_id: str, role: OrgRole
    ) -> Member:
        """Raises: InvalidArgument, OrgMismatch, PermissionDenied, OrgNotFound,
        UserNotFound, MemberAlreadyExists."""
        ref = validation.org_ref(org_id, org_slug)
        uid = validation.user_id(user_id)
        async for attempt in self._db.attempts():
            async with attempt as tx:
                scope = await self._scope(tx, principal, ref, lock=True)
                scope.require(
                    OrgAction.MANAGE_OWNERS if role is OrgRole.OWNER else OrgAction.ADD_MEMBER
                )
                if await tx.users.get(uid) is None:
                    raise UserNotFound()
                await tx.memberships.add(scope.org.id, uid, role, self._clock.now())
                member = await tx.memberships.get(scope.org.id, uid)
        assert member is not None
        return member

    async def update_member(
        self,
        principal: Principal,
        *,
        org_id: str,
        org_slug: str,
        user_id: str,
        role: OrgRole,
        etag: str = "",
    ) -> Member:
        """Raises: InvalidArgument, OrgMismatch, PermissionDenied, OrgNotFound,
        MemberNotFound, LastOwner, EtagMismatch."""
        ref = validation.org_ref(org_id, org_slug)
        uid = validation.user_id(user_id)
        expected = validation.etag(etag)
        now = self._clock.now()
        async for attempt in self._db.attempts():
            async with attempt as tx:
                scope = await self._scope(tx, principal, ref, lock=True)
                scope.require(OrgAction.CHANGE_ROLE)
                current = await tx.memberships.get(scope.org.id, uid)
                if current is None:
                    raise MemberNotFound()
                # Under the org row's lock, which every membership change takes.
                etags.require(expected, etags.member(current))
                if OrgRole.OWNER in (current.role, role):
                    scope.require(OrgAction.MANAGE_OWNERS)
                if current.role is role:
                    return current
                if current.role is OrgRole.OWNER:
                    await self._keep_an_owner(tx, scope.org.id)
                await tx.memberships.set_role(scope.org.id, uid, role, now)
                bumped = await tx.sessions.bump_claims([uid], now)
                await tx.events.add(*claims_changed([uid], bumped))
                member = await tx.memberships.get(scope.org.id, uid)
        assert member is not None
        return member

    async def remove_member(
        self,
        principal: Principal,
        *,
        org_id: str,
        org_slug: str,
        user_id: str,
        etag: str = "",
        allow_missing: bool = False,
    ) -> None:
        """Removes a membership (AIP-135). With ``allow_missing``, one that
        does not exist is no error; the org must still resolve, except for a
        member retrying their own leave (``_gone``).

        Raises: InvalidArgument, OrgMismatch, PermissionDenied, OrgNotFound,
        MemberNotFound, LastOwner, EtagMismatch."""
        ref = validation.org_ref(org_id, org_slug)
        uid = validation.user_id(user_id)
        expected = validation.etag(etag)
        leaving = principal.session is not None and principal.session.user_id == uid
        action = OrgAction.LEAVE if leaving else OrgAction.REMOVE_MEMBER
        now = self._clock.now()
        async for attempt in self._db.attempts():
            async with attempt as tx:
                try:
                    scope = await self._scope(tx, principal, ref, lock=True)
                except (OrgNotFound, OrgMismatch):
                    # A leave takes the org off the leaver's sessions, and a
                    # deleted org off everyone's: their retry comes from a
                    # session without it.
                    if allow_missing and await self._gone(tx, principal, ref, action):
                        return
                    raise
                scope.require(action)
                current = await tx.memberships.get(scope.org.id, uid)
                if current is None:
                    if allow_missing:
                        return
                    raise MemberNotFound()
                etags.require(expected, etags.member(current))
                if current.role is OrgRole.OWNER:
                    if not leaving:
                        scope.require(OrgAction.REMOVE_OWNER)
                    await self._keep_an_owner(tx, scope.org.id)
                await tx.memberships.remove(scope.org.id, uid)
                await tx.sessions.clear_org(scope.org.id, uid)
                bumped = await tx.sessions.bump_claims([uid], now)
                await tx.events.add(*claims_changed([uid], bumped))

    @staticmethod
    async def _keep_an_owner(tx: Transaction, org_id: uuid.UUID) -> None:
        # Safe under concurrency: the caller holds the org row's lock.
        if await tx.memberships.count_owners(org_id) <= 1:
            raise LastOwner()

    async def get_member(
        self, principal: Principal, *, org_id: str, org_slug: str, user_id: str
    ) -> Member:
        """Raises: InvalidArgument, OrgMismatch, PermissionDenied, OrgNotFound,
        MemberNotFound."""
        ref = validation.org_ref(org_id, org_slug)
        uid = validation.user_id(user_id)
        async with self._db.reader() as tx:
            scope = await self._scope(tx, principal, ref, lock=False)
            scope.require(OrgAction.READ)
            member = await tx.memberships.get(scope.org.id, uid)
        if member is None:
            raise MemberNotFound()
        return member

    async def list_members(
        self, principal: Principal, *, org_id: str, org_slug: str, page_size: int, page_token: str
    ) -> tuple[list[Member], str]:
        """Raises: InvalidArgument, InvalidPageToken, OrgMismatch,
        PermissionDenied, OrgNotFound."""
        ref = validation.org_ref(org_id, org_slug)
        size = validation.page_size(page_size)
        now = self._clock.now()
        async with self._db.reader() as tx:
            scope = await self._scope(tx, principal, ref, lock=False)
            scope.require(OrgAction.READ)
            filters = fingerprint(scope.org.id)
            after = self._pages.decode(page_token, "members", filters, now) if page_token else None
            rows = await tx.memberships.list(scope.org.id, after, size + 1)
        return self._pages.page(
            "members", filters, rows, size, now, lambda m: Cursor(m.created_at, m.user_id)
        )

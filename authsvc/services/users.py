"""Reading and managing users."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from authsvc.domain.events import claims_changed, session_revoked, user_changed
from authsvc.domain.models import Cursor, Role, User
from authsvc.domain.ports import Clock, Database
from authsvc.domain.principal import Principal
from authsvc.errors import InvalidArgument, PermissionDenied, UserNotFound
from authsvc.security.page_tokens import PageTokens, fingerprint
from authsvc.services import validation
from authsvc.services.auth import AuthService

_SELF_FIELDS = frozenset({"display_name"})
_ADMIN_FIELDS = frozenset({"display_name", "email", "role"})


class UserService:
    def __init__(self, *, db: Database, auth: AuthService, pages: PageTokens, clock: Clock) -> None:
        self._db = db
        self._auth = auth
        self._pages = pages
        self._clock = clock

    async def get(self, principal: Principal, user_id: str) -> User:
        """Raises: InvalidArgument, PermissionDenied, UserNotFound."""
        uid = validation.user_id(user_id)
        _require_self_or_admin(principal, uid)
        async with self._db.reader() as tx:
            user = await tx.users.get(uid)
        if user is None:
            raise UserNotFound()
        return user

    async def get_current(self, principal: Principal) -> User:
        assert principal.session is not None
        async with self._db.reader() as tx:
            user = await tx.users.get(principal.session.user_id)
        if user is None:
            raise UserNotFound()
        return user

    async def list(
        self, *, page_size: int, page_token: str, role: Role | None, email_prefix: str
    ) -> tuple[list[User], str]:
        """Users oldest first, and the next page token ("" on the last page).

        Raises: InvalidArgument, InvalidPageToken.
        """
        size = validation.page_size(page_size)
        if len(email_prefix) > validation.MAX_EMAIL:
            raise InvalidArgument.field("email_prefix", "too long")
        if not email_prefix.isprintable():
            raise InvalidArgument.field("email_prefix", "control characters")
        prefix = validation.fold(email_prefix)
        filters = fingerprint(role, prefix)
        now = self._clock.now()
        after = self._pages.decode(page_token, "users", filters, now) if page_token else None
        async with self._db.reader() as tx:
            rows = await tx.users.list(after, size + 1, role, prefix)
        return self._pages.page(
            "users", filters, rows, size, now, lambda u: Cursor(u.created_at, u.id)
        )

    async def update(
        self,
        principal: Principal,
        user_id: str,
        paths: Sequence[str],
        *,
        display_name: str = "",
        email: str = "",
        role: Role | None = None,
    ) -> User:
        """Changes the named fields.

        Raises:
            InvalidArgument, PermissionDenied, UserNotFound, EmailAlreadyExists.
        """
        uid = validation.user_id(user_id, "user.id")
        _require_self_or_admin(principal, uid)
        if not paths:
            raise InvalidArgument.field("update_mask", "required")
        unknown = set(paths) - _ADMIN_FIELDS
        if unknown:
            raise InvalidArgument.field("update_mask", f"unknown path {sorted(unknown)[0]!r}")
        if not principal.is_admin and not set(paths) <= _SELF_FIELDS:
            raise PermissionDenied("only an admin may change email or role")
        changes: dict[str, object] = {}
        if "display_name" in paths:
            changes["display_name"] = validation.display_name(display_name, "user.display_name")
        if "email" in paths:
            changes["email"], changes["email_key"] = validation.email(email, "user.email")
        if "role" in paths:
            if role is None:
                raise InvalidArgument.field("user.role", "not a role")
            changes["role"] = role.value
        now = self._clock.now()
        async for attempt in self._db.attempts():
            async with attempt as tx:
                before = await tx.users.get(uid)
                user = await tx.users.update(uid, changes, now)
                if before is None or user is None:
                    raise UserNotFound()
                bumped: list[tuple[uuid.UUID, int]] = []
                if user.role is not before.role:
                    # The role is a claim: tokens minted before are now stale.
                    bumped = await tx.sessions.bump_claims([uid], now)
                # Authenticate serves the current role and email: drop what
                # is cached.
                await tx.events.add(*claims_changed([uid], bumped))
        assert user is not None
        return user

    async def delete(self, user_id: str) -> None:
        """Deletes the user and revokes all their sessions.

        Raises: InvalidArgument, UserNotFound.
        """
        uid = validation.user_id(user_id)
        async for attempt in self._db.attempts():
            async with attempt as tx:
                session_ids = await tx.sessions.live_ids(uid, self._clock.now())
                if not await tx.users.delete(uid):
                    raise UserNotFound()
                await tx.events.add(*session_revoked(*session_ids), *user_changed(uid))

    async def count(self, role: Role | None) -> int:
        async with self._db.reader() as tx:
            return await tx.users.count(role)


def _require_self_or_admin(principal: Principal, user_id: uuid.UUID) -> None:
    # Before any lookup, so the answer cannot tell which ids exist.
    if not principal.may_act_on(user_id):
        raise PermissionDenied()

"""Reading and managing users."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from authsvc.domain import etags
from authsvc.domain.events import claims_changed, session_revoked, user_changed
from authsvc.domain.models import Cursor, Role, User
from authsvc.domain.ports import Clock, Database, Transaction
from authsvc.domain.principal import Principal
from authsvc.errors import InvalidArgument, PermissionDenied, UserNotFound
from authsvc.security.page_tokens import PageTokens, fingerprint
from authsvc.services import validation
from authsvc.services.auth import AuthService

_PROFILE_FIELDS = frozenset({"display_name", "given_name", "family_name"})
# Fields of User that UpdateUser does not change, and the RPC that does.
_MOVED_FIELDS = {"email": "SetUserEmail", "role": "SetUserRole"}


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
        given_name: str = "",
        family_name: str = "",
        etag: str = "",
    ) -> User:
        """Changes the profile fields named in ``paths``: ``display_name``,
        ``given_name``, ``family_name``. The email and the role have their own
        methods (``set_email``, ``set_role``), each with one access rule.

        A change that leaves every field as it is writes nothing and keeps
        the etag. No event: Authenticate serves none of these fields.

        Raises:
            InvalidArgument, PermissionDenied, UserNotFound, EtagMismatch.
        """
        uid = validation.user_id(user_id, "user.id")
        _require_self_or_admin(principal, uid)
        expected = validation.etag(etag, "user.etag")
        if not paths:
            raise InvalidArgument.field("update_mask", "required")
        for path in paths:
            if path in _MOVED_FIELDS:
                raise InvalidArgument.field(
                    "update_mask", f"{path!r} is not a profile field: use {_MOVED_FIELDS[path]}"
                )
        unknown = set(paths) - _PROFILE_FIELDS
        if unknown:
            raise InvalidArgument.field("update_mask", f"unknown path {sorted(unknown)[0]!r}")
        values = {
            "display_name": display_name,
            "given_name": given_name,
            "family_name": family_name,
        }
        changes = {p: validation.profile_name(values[p], f"user.{p}") for p in paths}
        async for attempt in self._db.attempts():
            async with attempt as tx:
                user = await self._locked(tx, uid, expected)
                if any(getattr(user, field) != value for field, value in changes.items()):
                    changed = await tx.users.update(uid, changes, self._clock.now())
                    assert changed is not None  # the row is locked: it is still there
                    user = changed
        return user

    async def set_role(self, user_id: str, role: Role | None, *, etag: str = "") -> User:
        """Sets a user's platform role (an admin's or service's call).

        The role is a claim: the user's live sessions get a claims change, so
        their tokens are stale and Authenticate serves the new role at once.
        Setting the role the user has changes nothing (no write, no event).

        Raises: InvalidArgument, UserNotFound, EtagMismatch.
        """
        uid = validation.user_id(user_id)
        if role is None:
            raise InvalidArgument.field("role", "not a role")
        expected = validation.etag(etag)
        async for attempt in self._db.attempts():
            async with attempt as tx:
                user = await self._locked(tx, uid, expected)
                if user.role is not role:
                    now = self._clock.now()
                    changed = await tx.users.update(uid, {"role": role.value}, now)
                    assert changed is not None
                    user = changed
                    bumped = await tx.sessions.bump_claims([uid], now)
                    await tx.events.add(*claims_changed([uid], bumped))
        return user

    async def set_email(self, user_id: str, email: str, *, etag: str = "") -> User:
        """Sets a user's email directly (an admin's or service's call).

        The new address counts as unconfirmed. An address with the same
        uniqueness key (the same address in another case) is the same
        address: it keeps the confirmation; the very same text changes
        nothing.

        Raises: InvalidArgument, UserNotFound, EmailAlreadyExists, EtagMismatch.
        """
        uid = validation.user_id(user_id)
        normalized, email_key = validation.email(email)
        expected = validation.etag(etag)
        async for attempt in self._db.attempts():
            async with attempt as tx:
                user = await self._locked(tx, uid, expected)
                if user.email != normalized:
                    changes: dict[str, object] = {"email": normalized, "email_key": email_key}
                    if validation.fold(user.email) != email_key:
                        changes["email_verified"] = False
                    changed = await tx.users.update(uid, changes, self._clock.now())
                    assert changed is not None
                    user = changed
                    # Authenticate serves the email: drop cached views.
                    await tx.events.add(*user_changed(uid))
        return user

    async def delete(self, user_id: str, *, etag: str = "", allow_missing: bool = False) -> None:
        """Deletes the user and revokes all their sessions (AIP-135).

        With ``allow_missing``, a user that does not exist is no error (a
        retried delete succeeds), whatever ``etag`` says.

        Raises: InvalidArgument, UserNotFound, EtagMismatch.
        """
        uid = validation.user_id(user_id)
        expected = validation.etag(etag)
        async for attempt in self._db.attempts():
            async with attempt as tx:
                try:
                    await self._locked(tx, uid, expected)
                except UserNotFound:
                    if allow_missing:
                        return
                    raise
                session_ids = await tx.sessions.live_ids(uid, self._clock.now())
                await tx.users.delete(uid)
                await tx.events.add(*session_revoked(*session_ids), *user_changed(uid))

    @staticmethod
    async def _locked(tx: Transaction, user_id: uuid.UUID, expected_etag: str) -> User:
        """The user, read under its row lock (held to the end of ``tx``), so
        that of two writes holding one etag only the first passes the check.

        Raises: UserNotFound, EtagMismatch.
        """
        user = await tx.users.get(user_id, for_update=True)
        if user is None:
            raise UserNotFound()
        etags.require(expected_etag, etags.user(user))
        return user

    async def count(self, role: Role | None) -> int:
        async with self._db.reader() as tx:
            return await tx.users.count(role)


def _require_self_or_admin(principal: Principal, user_id: uuid.UUID) -> None:
    # Before any lookup, so the answer cannot tell which ids exist.
    if not principal.may_act_on(user_id):
        raise PermissionDenied()

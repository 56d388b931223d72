"""Listing and revoking sessions."""

from __future__ import annotations

import uuid

from authsvc.domain.events import session_revoked
from authsvc.domain.models import Cursor, Session
from authsvc.domain.ports import Clock, Database
from authsvc.domain.principal import Principal
from authsvc.errors import InvalidArgument, PermissionDenied, SessionNotFound, UserNotFound
from authsvc.security.page_tokens import PageTokens, fingerprint
from authsvc.services import validation
from authsvc.services.auth import AuthService


class SessionService:
    def __init__(self, *, db: Database, auth: AuthService, pages: PageTokens, clock: Clock) -> None:
        self._db = db
        self._auth = auth
        self._pages = pages
        self._clock = clock

    def _target(self, principal: Principal, user_id: str) -> uuid.UUID | None:
        """Whose sessions: the named user; if none is named, the caller's own
        for a plain user, everyone's (None) for an admin or service."""
        if not user_id:
            if principal.is_admin or principal.session is None:
                return None
            return principal.session.user_id
        uid = validation.user_id(user_id)
        if not principal.may_act_on(uid):
            raise PermissionDenied()
        return uid

    async def list(
        self, principal: Principal, *, user_id: str, page_size: int, page_token: str
    ) -> tuple[list[Session], str]:
        """Live sessions, newest first, with the next page token.

        Raises: InvalidArgument, InvalidPageToken, PermissionDenied.
        """
        target = self._target(principal, user_id)
        size = validation.page_size(page_size)
        filters = fingerprint(target)
        now = self._clock.now()
        after = self._pages.decode(page_token, "sessions", filters, now) if page_token else None
        async with self._db.reader() as tx:
            rows = await tx.sessions.list_live(target, now, after, size + 1)
        return self._pages.page(
            "sessions", filters, rows, size, now, lambda s: Cursor(s.created_at, s.id)
        )

    async def revoke(self, principal: Principal, session_id: str) -> None:
        """Raises: InvalidArgument, PermissionDenied, SessionNotFound."""
        sid = validation.uuid_field(session_id, "session_id")
        async for attempt in self._db.attempts():
            async with attempt as tx:
                session = await tx.sessions.get(sid)
                # Someone else's session answers exactly like a missing one.
                if session is None or not principal.may_act_on(session.user_id):
                    raise SessionNotFound() if principal.is_admin else PermissionDenied()
                # An event only for a session that was live: announcing an
                # old revocation again would change nothing for anyone.
                if await tx.sessions.revoke(sid, self._clock.now(), "revoked"):
                    await tx.events.add(*session_revoked(sid))

    async def revoke_all(self, principal: Principal, user_id: str) -> int:
        """Raises: InvalidArgument, PermissionDenied, UserNotFound."""
        target = self._target(principal, user_id)
        if target is None:
            if principal.session is None:
                raise InvalidArgument.field("user_id", "required with an API key")
            target = principal.session.user_id
        async for attempt in self._db.attempts():
            async with attempt as tx:
                if await tx.users.get(target) is None:
                    raise UserNotFound()
                revoked = await tx.sessions.revoke_all(target, self._clock.now(), "revoked_all")
                await tx.events.add(*session_revoked(*revoked))
        return len(revoked)

"""The storage and infrastructure interfaces services depend on.

Implementations: ``authsvc.storage.sql`` (SQLite and Postgres),
``authsvc.storage.redis_store`` and ``authsvc.storage.memory``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from types import TracebackType
from typing import Protocol

from authsvc.domain.events import Event, LogHead, Replay
from authsvc.domain.models import (
    Cursor,
    Member,
    Org,
    OrgRole,
    RefreshTokenRecord,
    Role,
    Session,
    SigningKeyRecord,
    User,
)


class UserRepository(Protocol):
    async def add(self, user: User, email_key: str, password_hash: str) -> None:
        """Raises: EmailAlreadyExists."""

    async def get(self, user_id: uuid.UUID, *, for_update: bool = False) -> User | None:
        """With ``for_update``, the user's row stays locked until the
        transaction ends (no other change of the user lands in between)."""

    async def get_credentials(self, email_key: str) -> tuple[User, str] | None: ...

    async def set_password_hash(self, user_id: uuid.UUID, password_hash: str) -> None: ...

    async def update(
        self, user_id: uuid.UUID, changes: Mapping[str, object], now: datetime
    ) -> User | None:
        """Raises: EmailAlreadyExists."""

    async def fill_names(
        self, user_id: uuid.UUID, names: Mapping[str, str], now: datetime
    ) -> User | None:
        """Sets each of ``names`` (``given_name``, ``family_name``, non-empty)
        that the user still has empty, never one set meanwhile; the user when
        a name was set, None when none was."""

    async def delete(self, user_id: uuid.UUID) -> bool: ...

    async def list(
        self, after: Cursor | None, limit: int, role: Role | None, email_prefix: str
    ) -> list[User]: ...

    async def count(self, role: Role | None) -> int: ...


class SessionRepository(Protocol):
    async def add(self, session: Session) -> None: ...

    async def get(self, session_id: uuid.UUID, *, for_update: bool = False) -> Session | None: ...

    async def get_with_user(
        self, session_id: uuid.UUID
    ) -> tuple[Session, User, tuple[OrgRole, str] | None] | None:
        """The session, its user, and the user's role in the session's active
        org with that org's slug (None without an active org or membership)."""

    async def set_org(self, session_id: uuid.UUID, org_id: uuid.UUID | None) -> None: ...

    async def clear_org(self, org_id: uuid.UUID, user_id: uuid.UUID | None) -> None:
        """Clears the active org ``org_id`` from the sessions (of one user, or all)."""

    async def bump_session_claims(self, session_id: uuid.UUID) -> int:
        """Increments one session's claims version; returns the new one."""

    async def bump_org_claims(
        self, org_id: uuid.UUID, now: datetime
    ) -> list[tuple[uuid.UUID, int]]:
        """Raises the claims version of every live session whose active org
        this is; returns ``(session_id, new_version)`` of each."""

    async def bump_claims(
        self, user_ids: Sequence[uuid.UUID], now: datetime
    ) -> list[tuple[uuid.UUID, int]]:
        """Increments the claims version of the users' live sessions; returns
        each session id with its new version."""

    async def touch(
        self, session_id: uuid.UUID, at: datetime, ip_address: str, user_agent: str
    ) -> None: ...

    async def revoke(self, session_id: uuid.UUID, at: datetime, reason: str) -> bool:
        """Returns whether the session was live before."""

    async def revoke_all(self, user_id: uuid.UUID, at: datetime, reason: str) -> list[uuid.UUID]:
        """Revokes every live session of the user; returns their ids."""

    async def live_ids(self, user_id: uuid.UUID, now: datetime) -> list[uuid.UUID]: ...

    async def list_live(
        self, user_id: uuid.UUID | None, now: datetime, after: Cursor | None, limit: int
    ) -> list[Session]:
        """Newest first."""


class OrgRepository(Protocol):
    async def add(self, org: Org) -> None:
        """Raises: OrgSlugConflict."""

    async def get(self, org_id: uuid.UUID, *, for_update: bool = False) -> Org | None: ...

    async def get_by_slug(self, slug: str, *, for_update: bool = False) -> Org | None: ...

    async def lock_shared(self, org_id: uuid.UUID) -> None:
        """Holds off membership changes of the org until the transaction ends."""

    async def update(
        self, org_id: uuid.UUID, changes: Mapping[str, object], now: datetime
    ) -> Org | None:
        """Raises: OrgSlugConflict."""

    async def delete(self, org_id: uuid.UUID) -> bool: ...

    async def list_of_user(
        self, user_id: uuid.UUID, after: Cursor | None, limit: int
    ) -> list[tuple[Org, Member]]:
        """The orgs ``user_id`` belongs to, oldest first, each with that
        user's membership (one query)."""

    async def list(self, after: Cursor | None, limit: int) -> list[Org]:
        """Every org, oldest first."""


class MembershipRepository(Protocol):
    async def add(
        self, org_id: uuid.UUID, user_id: uuid.UUID, role: OrgRole, now: datetime
    ) -> None:
        """Raises: MemberAlreadyExists."""

    async def get(self, org_id: uuid.UUID, user_id: uuid.UUID) -> Member | None: ...

    async def claim(self, org_id: uuid.UUID, user_id: uuid.UUID) -> tuple[OrgRole, str] | None:
        """The user's role in the org and the org's slug: what a token claims."""

    async def set_role(
        self, org_id: uuid.UUID, user_id: uuid.UUID, role: OrgRole, now: datetime
    ) -> None: ...

    async def remove(self, org_id: uuid.UUID, user_id: uuid.UUID) -> bool: ...

    async def count_owners(self, org_id: uuid.UUID) -> int: ...

    async def user_ids(self, org_id: uuid.UUID) -> list[uuid.UUID]: ...

    async def list(self, org_id: uuid.UUID, after: Cursor | None, limit: int) -> list[Member]:
        """Oldest membership first; the cursor's id is the user id."""


class RefreshTokenRepository(Protocol):
    async def add(
        self, session_id: uuid.UUID, token_hash: bytes, generation: int, at: datetime
    ) -> None: ...

    async def get_by_hash(self, token_hash: bytes) -> RefreshTokenRecord | None: ...

    async def get_current(self, session_id: uuid.UUID) -> RefreshTokenRecord | None:
        """The session's one unrotated token."""

    async def mark_rotated(self, token_id: int, at: datetime) -> None: ...

    async def count_grace_use(self, token_id: int) -> None: ...


class SigningKeyRepository(Protocol):
    async def all(self) -> list[SigningKeyRecord]: ...

    async def add(self, key: SigningKeyRecord) -> None: ...

    async def retire_others(self, kid: str, at: datetime) -> None: ...

    async def delete_retired_before(self, before: datetime) -> None: ...


class EventRepository(Protocol):
    """The event log (``authsvc.storage.event_log``)."""

    async def add(self, *events: Event) -> None:
        """Writes events in this transaction: they exist iff it commits."""

    async def head(self) -> tuple[LogHead, bool]: ...

    async def assign_positions(self, now_ms: int, limit: int) -> list[Event]: ...

    async def after(self, position: tuple[int, int], limit: int) -> list[Event]: ...

    async def has(self, position: tuple[int, int]) -> bool: ...

    async def prune(self, before_ms: int) -> int: ...


class Transaction(Protocol):
    """Repositories bound to one database transaction (or autocommit reader)."""

    @property
    def events(self) -> EventRepository: ...

    @property
    def users(self) -> UserRepository: ...

    @property
    def sessions(self) -> SessionRepository: ...

    @property
    def refresh_tokens(self) -> RefreshTokenRepository: ...

    @property
    def keys(self) -> SigningKeyRepository: ...

    @property
    def orgs(self) -> OrgRepository: ...

    @property
    def memberships(self) -> MembershipRepository: ...


class Attempt(Protocol):
    async def __aenter__(self) -> Transaction: ...

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...


class Database(Protocol):
    def transaction(self) -> AbstractAsyncContextManager[Transaction]:
        """Commits on normal exit, rolls back on an exception."""

    def attempts(self, tries: int = ...) -> AsyncIterator[Attempt]:
        """Transactions run again (a few times) when they lose a deadlock or
        a serialization race: ``async for attempt in db.attempts(): async
        with attempt as tx: ...``."""

    def reader(self) -> AbstractAsyncContextManager[Transaction]:
        """Autocommit reads: no BEGIN/ROLLBACK round trips."""


class PasswordHasher(Protocol):
    async def hash(self, password: str) -> str: ...

    async def verify(self, password_hash: str, password: str) -> bool: ...

    def needs_rehash(self, password_hash: str) -> bool: ...

    async def burn(self, password: str) -> None:
        """Does the work of one verify against a dummy hash (unknown email)."""


class Clock(Protocol):
    def now(self) -> datetime: ...


EventHandler = Callable[[Event], None]


class EventBus(Protocol):
    """Fans invalidation events (session revoked, claims changed, user changed)
    out to every replica, from the log they were committed to.

    Services write events in their transaction (``tx.events.add``); once it
    commits, ``committed`` delivers them to this process's handlers at once,
    so a change is in force locally, and the bus's relay carries them to the
    other replicas. ``healthy`` is false while events may be missed (the
    transport is down or lagging), and callers must not trust caches then.
    Listeners (``listen``) receive events as the log orders them, with their
    positions; ``replay`` returns what the log holds after a position.
    """

    retention: float

    def subscribe(self, handler: EventHandler, on_reset: Callable[[], None]) -> None: ...

    def committed(self, events: Sequence[Event]) -> None: ...

    def listen(self, listener: EventHandler) -> Callable[[], None]:
        """Adds a listener for logged events; returns its removal."""

    async def replay(self, after: str) -> Replay:
        """Raises: InvalidArgument (a malformed position)."""

    def healthy(self) -> bool: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class RateLimiter(Protocol):
    async def hit(self, key: str, limit: int, window: int) -> float | None:
        """Counts one attempt; returns seconds to wait when over the limit."""

    async def close(self) -> None: ...


Ping = Callable[[], Awaitable[None]]

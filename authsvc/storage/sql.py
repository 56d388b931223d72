"""SQL repositories: the only module that writes SQL.

Each repository is bound to one connection (a transaction or an autocommit
reader). Unique violations are translated here, where it is known which
constraint was hit.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from authsvc.domain.events import Event, LogHead
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
from authsvc.errors import (
    EmailAlreadyExists,
    MemberAlreadyExists,
    OrgNotFound,
    OrgSlugConflict,
    UserNotFound,
)
from authsvc.storage.tables import (
    event_log_head,
    events,
    memberships,
    orgs,
    refresh_tokens,
    sessions,
    signing_keys,
    users,
)

_USER_COLUMNS = (
    users.c.id,
    users.c.email,
    users.c.display_name,
    users.c.role,
    users.c.email_verified,
    users.c.created_at,
    users.c.updated_at,
    users.c.given_name,
    users.c.family_name,
)
_SESSION_COLUMNS = (
    sessions.c.id,
    sessions.c.user_id,
    sessions.c.created_at,
    sessions.c.last_used_at,
    sessions.c.expires_at,
    sessions.c.revoked_at,
    sessions.c.ip_address,
    sessions.c.user_agent,
    sessions.c.org_id,
    sessions.c.claims_version,
)
_ORG_COLUMNS = (orgs.c.id, orgs.c.slug, orgs.c.name, orgs.c.created_at, orgs.c.updated_at)
_MEMBER_COLUMNS = (
    memberships.c.org_id,
    memberships.c.user_id,
    memberships.c.role,
    users.c.email,
    users.c.display_name,
    memberships.c.created_at,
    memberships.c.updated_at,
)


def _user(row: Sequence[Any], offset: int = 0) -> User:
    r = row[offset : offset + len(_USER_COLUMNS)]
    return User(
        id=r[0],
        email=r[1],
        display_name=r[2],
        role=Role(r[3]),
        email_verified=r[4],
        created_at=r[5],
        updated_at=r[6],
        given_name=r[7],
        family_name=r[8],
    )


def _session(row: Sequence[Any]) -> Session:
    return Session(*row[: len(_SESSION_COLUMNS)])


def _org(row: Sequence[Any]) -> Org:
    return Org(*row[: len(_ORG_COLUMNS)])


def _member(row: Sequence[Any]) -> Member:
    return Member(row[0], row[1], OrgRole(row[2]), *row[3:7])


def _is_email_conflict(error: IntegrityError) -> bool:
    # Postgres: unique_violation on uq_users_email_key; SQLite:
    # "UNIQUE constraint failed: users.email_key".
    return "email_key" in str(error.orig)


def _is_foreign_key(error: IntegrityError) -> bool:
    # Postgres: foreign_key_violation (23503); SQLite: "FOREIGN KEY
    # constraint failed".
    state = getattr(error.orig, "sqlstate", None)
    return state == "23503" or "FOREIGN KEY constraint failed" in str(error.orig)


def _like_prefix(prefix: str) -> str:
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


class SqlUserRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def add(self, user: User, email_key: str, password_hash: str) -> None:
        try:
            await self._conn.execute(
                insert(users).values(
                    id=user.id,
                    email=user.email,
                    email_key=email_key,
                    password_hash=password_hash,
                    display_name=user.display_name,
                    given_name=user.given_name,
                    family_name=user.family_name,
                    role=user.role.value,
                    email_verified=user.email_verified,
                    created_at=user.created_at,
                    updated_at=user.updated_at,
                )
            )
        except IntegrityError as error:
            if _is_email_conflict(error):
                raise EmailAlreadyExists() from None
            raise

    async def get(self, user_id: uuid.UUID, *, for_update: bool = False) -> User | None:
        stmt = select(*_USER_COLUMNS).where(users.c.id == user_id)
        if for_update:
            # Holds off every other change of the user until the transaction
            # ends, so a check of what was read (an etag) still holds when
            # the write lands; SQLite's write lock does it there.
            stmt = stmt.with_for_update()
        row = (await self._conn.execute(stmt)).first()
        return _user(row) if row else None

    async def get_credentials(self, email_key: str) -> tuple[User, str] | None:
        stmt = select(*_USER_COLUMNS, users.c.password_hash).where(users.c.email_key == email_key)
        row = (await self._conn.execute(stmt)).first()
        return (_user(row), row[-1]) if row else None

    async def set_password_hash(self, user_id: uuid.UUID, password_hash: str) -> None:
        await self._conn.execute(
            update(users).where(users.c.id == user_id).values(password_hash=password_hash)
        )

    async def update(
        self, user_id: uuid.UUID, changes: Mapping[str, object], now: datetime
    ) -> User | None:
        values = dict(changes)
        values["updated_at"] = now
        try:
            result = await self._conn.execute(
                update(users).where(users.c.id == user_id).values(**values)
            )
        except IntegrityError as error:
            if _is_email_conflict(error):
                raise EmailAlreadyExists() from None
            raise
        return await self.get(user_id) if result.rowcount else None

    async def fill_names(
        self, user_id: uuid.UUID, names: Mapping[str, str], now: datetime
    ) -> User | None:
        """Sets each of ``names`` (given_name, family_name) that is still
        empty, in one statement: a name written meanwhile is never overwritten.
        Returns the user when a name was set, None when none was."""
        columns = {name: users.c[name] for name in names}
        values: dict[str, Any] = {
            name: case((column == "", names[name]), else_=column)
            for name, column in columns.items()
        }
        stmt = (
            update(users)
            .where(users.c.id == user_id, or_(*(column == "" for column in columns.values())))
            .values(**values, updated_at=now)
            .returning(*_USER_COLUMNS)
        )
        row = (await self._conn.execute(stmt)).first()
        return _user(row) if row else None

    async def delete(self, user_id: uuid.UUID) -> bool:
        result = await self._conn.execute(delete(users).where(users.c.id == user_id))
        return bool(result.rowcount)

    async def list(
        self, after: Cursor | None, limit: int, role: Role | None, email_prefix: str
    ) -> list[User]:
        stmt = select(*_USER_COLUMNS).order_by(users.c.created_at, users.c.id).limit(limit)
        if after is not None:
            stmt = stmt.where(
                tuple_(users.c.created_at, users.c.id) > tuple_(after.created_at, after.id)
            )
        if role is not None:
            stmt = stmt.where(users.c.role == role.value)
        if email_prefix:
            stmt = stmt.where(users.c.email_key.like(_like_prefix(email_prefix), escape="\\"))
        return [_user(row) for row in await self._conn.execute(stmt)]

    async def count(self, role: Role | None) -> int:
        stmt = select(func.count()).select_from(users)
        if role is not None:
            stmt = stmt.where(users.c.role == role.value)
        return int((await self._conn.execute(stmt)).scalar_one())


class SqlSessionRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def add(self, session: Session) -> None:
        """Raises: UserNotFound (the user was deleted meanwhile)."""
        try:
            await self._insert_session(session)
        except IntegrityError as error:
            if _is_foreign_key(error):
                raise UserNotFound() from None
            raise

    async def _insert_session(self, session: Session) -> None:
        await self._conn.execute(
            insert(sessions).values(
                id=session.id,
                user_id=session.user_id,
                created_at=session.created_at,
                last_used_at=session.last_used_at,
                expires_at=session.expires_at,
                revoked_at=session.revoked_at,
                ip_address=session.ip_address,
                user_agent=session.user_agent,
                org_id=session.org_id,
            )
        )

    async def get(self, session_id: uuid.UUID, *, for_update: bool = False) -> Session | None:
        stmt = select(*_SESSION_COLUMNS).where(sessions.c.id == session_id)
        if for_update:
            # Serializes every refresh of one session (ignored on SQLite, where
            # the database-wide write lock serializes them instead).
            stmt = stmt.with_for_update()
        row = (await self._conn.execute(stmt)).first()
        return _session(row) if row else None

    async def get_with_user(
        self, session_id: uuid.UUID
    ) -> tuple[Session, User, tuple[OrgRole, str] | None] | None:
        stmt = (
            select(*_SESSION_COLUMNS, *_USER_COLUMNS, memberships.c.role, orgs.c.slug)
            .join(users, users.c.id == sessions.c.user_id)
            .outerjoin(
                memberships,
                (memberships.c.org_id == sessions.c.org_id)
                & (memberships.c.user_id == sessions.c.user_id),
            )
            .outerjoin(orgs, orgs.c.id == memberships.c.org_id)
            .where(sessions.c.id == session_id)
        )
        row = (await self._conn.execute(stmt)).first()
        if row is None:
            return None
        org = (OrgRole(row[-2]), str(row[-1])) if row[-2] is not None else None
        return _session(row), _user(row, len(_SESSION_COLUMNS)), org

    async def set_org(self, session_id: uuid.UUID, org_id: uuid.UUID | None) -> None:
        await self._conn.execute(
            update(sessions).where(sessions.c.id == session_id).values(org_id=org_id)
        )

    async def clear_org(self, org_id: uuid.UUID, user_id: uuid.UUID | None) -> None:
        stmt = update(sessions).where(sessions.c.org_id == org_id).values(org_id=None)
        if user_id is not None:
            stmt = stmt.where(sessions.c.user_id == user_id)
        await self._conn.execute(stmt)

    async def bump_session_claims(self, session_id: uuid.UUID) -> int:
        stmt = (
            update(sessions)
            .where(sessions.c.id == session_id)
            .values(claims_version=sessions.c.claims_version + 1)
            .returning(sessions.c.claims_version)
        )
        return int((await self._conn.execute(stmt)).scalar_one())

    async def bump_org_claims(
        self, org_id: uuid.UUID, now: datetime
    ) -> list[tuple[uuid.UUID, int]]:
        stmt = (
            update(sessions)
            .where(
                sessions.c.org_id == org_id,
                sessions.c.revoked_at.is_(None),
                sessions.c.expires_at > now,
            )
            .values(claims_version=sessions.c.claims_version + 1)
            .returning(sessions.c.id, sessions.c.claims_version)
        )
        return [(row[0], row[1]) for row in await self._conn.execute(stmt)]

    async def bump_claims(
        self, user_ids: Sequence[uuid.UUID], now: datetime
    ) -> list[tuple[uuid.UUID, int]]:
        if not user_ids:
            return []
        stmt = (
            update(sessions)
            .where(
                sessions.c.user_id.in_(user_ids),
                sessions.c.revoked_at.is_(None),
                sessions.c.expires_at > now,
            )
            .values(claims_version=sessions.c.claims_version + 1)
            .returning(sessions.c.id, sessions.c.claims_version)
        )
        return [(row[0], row[1]) for row in await self._conn.execute(stmt)]

    async def touch(
        self, session_id: uuid.UUID, at: datetime, ip_address: str, user_agent: str
    ) -> None:
        await self._conn.execute(
            update(sessions)
            .where(sessions.c.id == session_id)
            .values(last_used_at=at, ip_address=ip_address, user_agent=user_agent)
        )

    async def revoke(self, session_id: uuid.UUID, at: datetime, reason: str) -> bool:
        result = await self._conn.execute(
            update(sessions)
            .where(sessions.c.id == session_id, sessions.c.revoked_at.is_(None))
            .values(revoked_at=at, revoke_reason=reason)
        )
        return bool(result.rowcount)

    async def revoke_all(self, user_id: uuid.UUID, at: datetime, reason: str) -> list[uuid.UUID]:
        ids = await self.live_ids(user_id, at)
        if ids:
            await self._conn.execute(
                update(sessions)
                .where(sessions.c.id.in_(ids), sessions.c.revoked_at.is_(None))
                .values(revoked_at=at, revoke_reason=reason)
            )
        return ids

    async def live_ids(self, user_id: uuid.UUID, now: datetime) -> list[uuid.UUID]:
        stmt = select(sessions.c.id).where(
            sessions.c.user_id == user_id,
            sessions.c.revoked_at.is_(None),
            sessions.c.expires_at > now,
        )
        return list((await self._conn.execute(stmt)).scalars())

    async def list_live(
        self, user_id: uuid.UUID | None, now: datetime, after: Cursor | None, limit: int
    ) -> list[Session]:
        stmt = (
            select(*_SESSION_COLUMNS)
            .where(sessions.c.revoked_at.is_(None), sessions.c.expires_at > now)
            .order_by(sessions.c.created_at.desc(), sessions.c.id.desc())
            .limit(limit)
        )
        if user_id is not None:
            stmt = stmt.where(sessions.c.user_id == user_id)
        if after is not None:
            stmt = stmt.where(
                tuple_(sessions.c.created_at, sessions.c.id) < tuple_(after.created_at, after.id)
            )
        return [_session(row) for row in await self._conn.execute(stmt)]


def _is_slug_conflict(error: IntegrityError) -> bool:
    return "slug" in str(error.orig)


class SqlOrgRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def add(self, org: Org) -> None:
        try:
            await self._conn.execute(
                insert(orgs).values(
                    id=org.id,
                    slug=org.slug,
                    name=org.name,
                    created_at=org.created_at,
                    updated_at=org.updated_at,
                )
            )
        except IntegrityError as error:
            if _is_slug_conflict(error):
                raise OrgSlugConflict() from None
            raise

    async def _one(self, where: Any, for_update: bool) -> Org | None:
        stmt = select(*_ORG_COLUMNS).where(where)
        if for_update:
            # Serializes every membership change of one org (the last-owner
            # rule reads, then writes); SQLite's write lock does it there.
            stmt = stmt.with_for_update()
        row = (await self._conn.execute(stmt)).first()
        return _org(row) if row else None

    async def get(self, org_id: uuid.UUID, *, for_update: bool = False) -> Org | None:
        return await self._one(orgs.c.id == org_id, for_update)

    async def get_by_slug(self, slug: str, *, for_update: bool = False) -> Org | None:
        return await self._one(orgs.c.slug == slug, for_update)

    async def lock_shared(self, org_id: uuid.UUID) -> None:
        # FOR SHARE: switches into one org do not wait for each other, but a
        # membership change (FOR UPDATE) waits for them, and they for it.
        await self._conn.execute(
            select(orgs.c.id).where(orgs.c.id == org_id).with_for_update(read=True)
        )

    async def update(
        self, org_id: uuid.UUID, changes: Mapping[str, object], now: datetime
    ) -> Org | None:
        try:
            result = await self._conn.execute(
                update(orgs).where(orgs.c.id == org_id).values(**changes, updated_at=now)
            )
        except IntegrityError as error:
            if _is_slug_conflict(error):
                raise OrgSlugConflict() from None
            raise
        return await self.get(org_id) if result.rowcount else None

    async def delete(self, org_id: uuid.UUID) -> bool:
        result = await self._conn.execute(delete(orgs).where(orgs.c.id == org_id))
        return bool(result.rowcount)

    @staticmethod
    def _page(stmt: Any, after: Cursor | None, limit: int) -> Any:
        stmt = stmt.order_by(orgs.c.created_at, orgs.c.id).limit(limit)
        if after is not None:
            stmt = stmt.where(
                tuple_(orgs.c.created_at, orgs.c.id) > tuple_(after.created_at, after.id)
            )
        return stmt

    async def list_of_user(
        self, user_id: uuid.UUID, after: Cursor | None, limit: int
    ) -> list[tuple[Org, Member]]:
        stmt = self._page(
            select(*_ORG_COLUMNS, *_MEMBER_COLUMNS)
            .join(memberships, memberships.c.org_id == orgs.c.id)
            .join(users, users.c.id == memberships.c.user_id)
            .where(memberships.c.user_id == user_id),
            after,
            limit,
        )
        width = len(_ORG_COLUMNS)
        return [(_org(row), _member(row[width:])) for row in await self._conn.execute(stmt)]

    async def list(self, after: Cursor | None, limit: int) -> list[Org]:
        stmt = self._page(select(*_ORG_COLUMNS), after, limit)
        return [_org(row) for row in await self._conn.execute(stmt)]


class SqlMembershipRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    @staticmethod
    def _key(org_id: uuid.UUID, user_id: uuid.UUID) -> Any:
        return (memberships.c.org_id == org_id) & (memberships.c.user_id == user_id)

    async def add(
        self, org_id: uuid.UUID, user_id: uuid.UUID, role: OrgRole, now: datetime
    ) -> None:
        try:
            await self._conn.execute(
                insert(memberships).values(
                    org_id=org_id, user_id=user_id, role=role.value, created_at=now, updated_at=now
                )
            )
        except IntegrityError as error:
            # Postgres names the constraint; SQLite lists the columns of a
            # unique one and names no foreign key.
            text_ = str(error.orig)
            if "pk_memberships" in text_ or "UNIQUE constraint failed: memberships" in text_:
                raise MemberAlreadyExists() from None
            if "fk_memberships_org_id" in text_:
                raise OrgNotFound() from None
            if _is_foreign_key(error):
                # The user was deleted after the caller's check (a race with
                # DeleteUser); the org is locked, so it is the user.
                raise UserNotFound() from None
            raise

    async def get(self, org_id: uuid.UUID, user_id: uuid.UUID) -> Member | None:
        stmt = (
            select(*_MEMBER_COLUMNS)
            .join(users, users.c.id == memberships.c.user_id)
            .where(self._key(org_id, user_id))
        )
        row = (await self._conn.execute(stmt)).first()
        return _member(row) if row else None

    async def claim(self, org_id: uuid.UUID, user_id: uuid.UUID) -> tuple[OrgRole, str] | None:
        stmt = (
            select(memberships.c.role, orgs.c.slug)
            .join(orgs, orgs.c.id == memberships.c.org_id)
            .where(self._key(org_id, user_id))
        )
        row = (await self._conn.execute(stmt)).first()
        return (OrgRole(row[0]), str(row[1])) if row else None

    async def set_role(
        self, org_id: uuid.UUID, user_id: uuid.UUID, role: OrgRole, now: datetime
    ) -> None:
        await self._conn.execute(
            update(memberships)
            .where(self._key(org_id, user_id))
            .values(role=role.value, updated_at=now)
        )

    async def remove(self, org_id: uuid.UUID, user_id: uuid.UUID) -> bool:
        result = await self._conn.execute(delete(memberships).where(self._key(org_id, user_id)))
        return bool(result.rowcount)

    async def count_owners(self, org_id: uuid.UUID) -> int:
        stmt = (
            select(func.count())
            .select_from(memberships)
            .where(memberships.c.org_id == org_id, memberships.c.role == OrgRole.OWNER.value)
        )
        return int((await self._conn.execute(stmt)).scalar_one())

    async def user_ids(self, org_id: uuid.UUID) -> list[uuid.UUID]:
        stmt = select(memberships.c.user_id).where(memberships.c.org_id == org_id)
        return list((await self._conn.execute(stmt)).scalars())

    async def list(self, org_id: uuid.UUID, after: Cursor | None, limit: int) -> list[Member]:
        stmt = (
            select(*_MEMBER_COLUMNS)
            .join(users, users.c.id == memberships.c.user_id)
            .where(memberships.c.org_id == org_id)
            .order_by(memberships.c.created_at, memberships.c.user_id)
            .limit(limit)
        )
        if after is not None:
            stmt = stmt.where(
                tuple_(memberships.c.created_at, memberships.c.user_id)
                > tuple_(after.created_at, after.id)
            )
        return [_member(row) for row in await self._conn.execute(stmt)]


class SqlRefreshTokenRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    _COLUMNS = (
        refresh_tokens.c.id,
        refresh_tokens.c.session_id,
        refresh_tokens.c.token_hash,
        refresh_tokens.c.generation,
        refresh_tokens.c.created_at,
        refresh_tokens.c.rotated_at,
        refresh_tokens.c.grace_uses,
    )

    async def add(
        self, session_id: uuid.UUID, token_hash: bytes, generation: int, at: datetime
    ) -> None:
        await self._conn.execute(
            insert(refresh_tokens).values(
                session_id=session_id,
                token_hash=token_hash,
                generation=generation,
                created_at=at,
                rotated_at=None,
                grace_uses=0,
            )
        )

    async def get_by_hash(self, token_hash: bytes) -> RefreshTokenRecord | None:
        stmt = select(*self._COLUMNS).where(refresh_tokens.c.token_hash == token_hash)
        row = (await self._conn.execute(stmt)).first()
        return RefreshTokenRecord(*row) if row else None

    async def get_current(self, session_id: uuid.UUID) -> RefreshTokenRecord | None:
        stmt = select(*self._COLUMNS).where(
            refresh_tokens.c.session_id == session_id, refresh_tokens.c.rotated_at.is_(None)
        )
        row = (await self._conn.execute(stmt)).first()
        return RefreshTokenRecord(*row) if row else None

    async def mark_rotated(self, token_id: int, at: datetime) -> None:
        await self._conn.execute(
            update(refresh_tokens).where(refresh_tokens.c.id == token_id).values(rotated_at=at)
        )

    async def count_grace_use(self, token_id: int) -> None:
        await self._conn.execute(
            update(refresh_tokens)
            .where(refresh_tokens.c.id == token_id)
            .values(grace_uses=refresh_tokens.c.grace_uses + 1)
        )


class SqlSigningKeyRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def all(self) -> list[SigningKeyRecord]:
        stmt = select(
            signing_keys.c.kid,
            signing_keys.c.created_at,
            signing_keys.c.retired_at,
            signing_keys.c.private_key_sealed,
            signing_keys.c.public_key,
        ).order_by(signing_keys.c.created_at.desc(), signing_keys.c.kid)
        return [SigningKeyRecord(*row) for row in await self._conn.execute(stmt)]

    async def add(self, key: SigningKeyRecord) -> None:
        await self._conn.execute(
            insert(signing_keys).values(
                kid=key.kid,
                created_at=key.created_at,
                retired_at=key.retired_at,
                private_key_sealed=key.private_key_sealed,
                public_key=key.public_key,
            )
        )

    async def retire_others(self, kid: str, at: datetime) -> None:
        await self._conn.execute(
            update(signing_keys)
            .where(signing_keys.c.kid != kid, signing_keys.c.retired_at.is_(None))
            .values(retired_at=at)
        )

    async def delete_retired_before(self, before: datetime) -> None:
        await self._conn.execute(delete(signing_keys).where(signing_keys.c.retired_at < before))


_EVENT_COLUMNS = (
    events.c.kind,
    events.c.key,
    events.c.version,
    events.c.at,
    events.c.log_ms,
    events.c.log_seq,
)


def _logged(row: Sequence[Any]) -> Event:
    return Event(
        kind=row[0], key=row[1], version=row[2], at=row[3] / 1000, position=f"{row[4]}-{row[5]}"
    )


class SqlEventRepository:
    """The event log: an outbox written in the business transaction, given
    positions by the relay (``assign_positions``), read back in log order."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn
        #: Events this transaction wrote; announced locally once it commits.
        self.written: list[Event] = []

    async def add(self, *new: Event) -> None:
        if not new:
            return
        await self._conn.execute(
            insert(events),
            [
                {"kind": e.kind, "key": e.key, "version": e.version, "at": int(e.at * 1000)}
                for e in new
            ],
        )
        self.written.extend(new)

    async def backlog(self, copied: tuple[int, int] | None) -> tuple[int, int | None]:
        """How many committed events wait for a position or, past ``copied``
        (the newest position known to be in Redis; None: positioned events
        are delivered at once), to be copied; and the oldest's ``at`` (ms)."""
        waiting: ColumnElement[bool] = events.c.log_ms.is_(None)
        if copied is not None:
            ms, seq = copied
            waiting = or_(
                waiting,
                events.c.log_ms > ms,
                and_(events.c.log_ms == ms, events.c.log_seq > seq),
            )
        row = (
            await self._conn.execute(select(func.count(), func.min(events.c.at)).where(waiting))
        ).one()
        return int(row[0]), None if row[1] is None else int(row[1])

    async def head(self) -> tuple[LogHead, bool]:
        """The log's head, and whether committed events wait for a position."""
        pending = exists().where(events.c.log_ms.is_(None))
        stmt = select(
            event_log_head.c.log_ms,
            event_log_head.c.log_seq,
            event_log_head.c.started_ms,
            event_log_head.c.log_id,
            pending,
        ).where(event_log_head.c.id == 1)
        row = (await self._conn.execute(stmt)).one()
        return LogHead(row[0], row[1], row[2], row[3]), bool(row[4])

    async def assign_positions(self, now_ms: int, limit: int) -> list[Event]:
        """Gives the oldest committed unpositioned events the next positions.

        Serialized by the head row's lock (SQLite: the write lock), so
        positions only grow, and become visible in their order: a reader that
        sees a position sees every smaller one. Events whose transaction
        commits later get later positions, whatever their insertion order.
        """
        head = (
            await self._conn.execute(
                select(event_log_head.c.log_ms, event_log_head.c.log_seq)
                .where(event_log_head.c.id == 1)
                .with_for_update()
            )
        ).one()
        rows = (
            await self._conn.execute(
                select(events.c.id, events.c.kind, events.c.key, events.c.version, events.c.at)
                .where(events.c.log_ms.is_(None))
                .order_by(events.c.id)
                .limit(limit)
            )
        ).all()
        if not rows:
            return []
        ms, seq = int(head[0]), int(head[1])
        if now_ms > ms:
            ms, seq = now_ms, -1
        out: list[Event] = []
        params: list[dict[str, int]] = []
        for row in rows:
            seq += 1
            params.append({"b_id": row[0], "b_ms": ms, "b_seq": seq})
            out.append(
                Event(
                    kind=row[1],
                    key=row[2],
                    version=row[3],
                    at=row[4] / 1000,
                    position=f"{ms}-{seq}",
                )
            )
        await self._conn.execute(
            update(events)
            .where(events.c.id == bindparam("b_id"))
            .values(log_ms=bindparam("b_ms"), log_seq=bindparam("b_seq")),
            params,
        )
        await self._conn.execute(
            update(event_log_head).where(event_log_head.c.id == 1).values(log_ms=ms, log_seq=seq)
        )
        return out

    async def after(self, position: tuple[int, int], limit: int) -> list[Event]:
        """Positioned events after ``position``, in log order."""
        stmt = (
            select(*_EVENT_COLUMNS)
            .where(
                events.c.log_ms.is_not(None),
                tuple_(events.c.log_ms, events.c.log_seq) > tuple_(*position),
            )
            .order_by(events.c.log_ms, events.c.log_seq)
            .limit(limit)
        )
        return [_logged(row) for row in await self._conn.execute(stmt)]

    async def has(self, position: tuple[int, int]) -> bool:
        stmt = select(events.c.id).where(
            events.c.log_ms == position[0], events.c.log_seq == position[1]
        )
        return (await self._conn.execute(stmt)).first() is not None

    async def prune(self, before_ms: int) -> int:
        """Forgets positioned events older than ``before_ms`` (their tokens
        have expired); the head keeps the newest position."""
        result = await self._conn.execute(
            delete(events).where(events.c.log_ms.is_not(None), events.c.log_ms < before_ms)
        )
        return int(result.rowcount or 0)


class SqlTransaction:
    """The repositories of one connection."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self.events = SqlEventRepository(conn)
        self.users = SqlUserRepository(conn)
        self.sessions = SqlSessionRepository(conn)
        self.refresh_tokens = SqlRefreshTokenRepository(conn)
        self.keys = SqlSigningKeyRepository(conn)
        self.orgs = SqlOrgRepository(conn)
        self.memberships = SqlMembershipRepository(conn)

    async def ping(self) -> None:
        await self.conn.execute(text("SELECT 1"))

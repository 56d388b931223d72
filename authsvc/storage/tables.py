"""SQLAlchemy Core tables: the one schema, shared by SQLite and Postgres.

Alembic's migrations in ``migrations/`` create exactly these tables; a test
compares the migrated schema with this metadata on both databases.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    TypeDecorator,
    Uuid,
)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on every dialect.

    Postgres stores ``timestamptz``; SQLite has no time zones, so it stores
    naive UTC (as fixed-width text, which keeps ``(created_at, id)`` keyset
    comparisons correct).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# An integer primary key that autoincrements on both dialects.
_BigId = BigInteger().with_variant(Integer, "sqlite")

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

users = Table(
    "users",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("email", String(320), nullable=False),
    # Case-folded email: the uniqueness key, compared on sign-in. Folding can
    # make a string up to three times longer, hence the width.
    Column("email_key", String(1024), nullable=False, unique=True),
    Column("password_hash", String(255), nullable=False),
    Column("display_name", String(200), nullable=False),
    Column("given_name", String(200), nullable=False, server_default=""),
    Column("family_name", String(200), nullable=False, server_default=""),
    Column("role", String(16), nullable=False),
    Column("email_verified", Boolean, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Index(None, "created_at", "id"),
)

sessions = Table(
    "sessions",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("user_id", Uuid, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("last_used_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, nullable=True),
    Column("revoke_reason", String(32), nullable=True),
    Column("ip_address", String(64), nullable=False),
    Column("user_agent", String(512), nullable=False),
    # The active org. No foreign key: removing a membership or an org clears
    # it in the same transaction (authsvc.storage.sql), which also bumps
    # claims_version.
    Column("org_id", Uuid, nullable=True),
    # Bumped whenever the claims of the session's tokens (platform role, org,
    # org role) change; tokens carry it as `ver`, so local verifiers can tell
    # a stale token (WatchRevocations).
    Column("claims_version", Integer, nullable=False, server_default="0"),
    Index(None, "user_id", "created_at", "id"),
    Index(None, "created_at", "id"),
    Index(None, "org_id"),
)

refresh_tokens = Table(
    "refresh_tokens",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("session_id", Uuid, ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
    # SHA-256 of the token; the token itself is never stored.
    Column("token_hash", LargeBinary(32), nullable=False, unique=True),
    Column("generation", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("rotated_at", UTCDateTime, nullable=True),
    Column("grace_uses", Integer, nullable=False),
    Index(None, "session_id", "generation"),
)

signing_keys = Table(
    "signing_keys",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("retired_at", UTCDateTime, nullable=True),
    # Ed25519 private key, sealed with AES-GCM under a key derived from
    # AUTHSVC_SECRET_KEY.
    Column("private_key_sealed", LargeBinary, nullable=False),
    Column("public_key", LargeBinary(32), nullable=False),
)

orgs = Table(
    "orgs",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("slug", String(63), nullable=False, unique=True),
    Column("name", String(200), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Index(None, "created_at", "id"),
)

memberships = Table(
    "memberships",
    metadata,
    Column("org_id", Uuid, ForeignKey("orgs.id", ondelete="CASCADE"), primary_key=True),
    Column("user_id", Uuid, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("role", String(16), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Index(None, "org_id", "created_at", "user_id"),
    Index(None, "user_id", "created_at", "org_id"),
)

# The event log (a transactional outbox): every revocation and claims change
# is written here in the transaction of the change it announces. A relay
# gives committed rows their log position (log_ms, log_seq) in commit order,
# under the lock of the one event_log_head row, and copies them to the Redis
# stream under that same position; Redis is a fan-out and may lose its data,
# this table is the log.
events = Table(
    "events",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),
    Column("key", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("at", BigInteger, nullable=False),  # unix ms, when written
    Column("log_ms", BigInteger, nullable=True),  # null until the relay positions it
    Column("log_seq", BigInteger, nullable=True),
    Index(None, "log_ms", "log_seq", unique=True),
)

# One row (id = 1): the newest position given out, since when the log
# vouches for every event (0 when it was created before any session existed),
# and the log's own id, which names its Redis stream (two deployments that
# share a Redis never mix their streams).
event_log_head = Table(
    "event_log_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("log_id", String(32), nullable=False),
    Column("log_ms", BigInteger, nullable=False),
    Column("log_seq", BigInteger, nullable=False),
    Column("started_ms", BigInteger, nullable=False),
)

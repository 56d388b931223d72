"""the event log: a transactional outbox of revocations and claims changes

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

"""

import time
import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "events",
        sa.Column("id", big_id, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("at", sa.BigInteger(), nullable=False),
        sa.Column("log_ms", sa.BigInteger(), nullable=True),
        sa.Column("log_seq", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index(op.f("ix_events_log_ms_log_seq"), "events", ["log_ms", "log_seq"], unique=True)
    head = op.create_table(
        "event_log_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("log_id", sa.String(length=32), nullable=False),
        sa.Column("log_ms", sa.BigInteger(), nullable=False),
        sa.Column("log_seq", sa.BigInteger(), nullable=False),
        sa.Column("started_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_log_head")),
    )
    # A database that already has sessions had revocations before this log
    # existed: the log vouches only from now on. A new one vouches for all.
    had_sessions = op.get_bind().execute(sa.text("SELECT 1 FROM sessions LIMIT 1")).first()
    started_ms = int(time.time() * 1000) if had_sessions else 0
    op.bulk_insert(
        head,
        [
            {
                "id": 1,
                "log_id": uuid.uuid4().hex,
                "log_ms": 0,
                "log_seq": 0,
                "started_ms": started_ms,
            }
        ],
    )


def downgrade() -> None:
    op.drop_table("event_log_head")
    op.drop_index(op.f("ix_events_log_ms_log_seq"), table_name="events")
    op.drop_table("events")

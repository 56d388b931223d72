"""users.given_name and users.family_name

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NOT NULL with a server default: existing rows get '' (no name yet), and
    # both PostgreSQL and SQLite add such a column without rewriting the table.
    op.add_column(
        "users",
        sa.Column("given_name", sa.String(length=200), nullable=False, server_default=""),
    )
    op.add_column(
        "users",
        sa.Column("family_name", sa.String(length=200), nullable=False, server_default=""),
    )


def downgrade() -> None:
    with op.batch_alter_table("users") as batch_op:
        batch_op.drop_column("family_name")
        batch_op.drop_column("given_name")

"""organizations, memberships, and the session claims version

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "orgs",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("slug", sa.String(length=63), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_orgs")),
        sa.UniqueConstraint("slug", name=op.f("uq_orgs_slug")),
    )
    op.create_index(op.f("ix_orgs_created_at_id"), "orgs", ["created_at", "id"])
    op.create_table(
        "memberships",
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"], ["orgs.id"], name=op.f("fk_memberships_org_id_orgs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_memberships_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", "user_id", name=op.f("pk_memberships")),
    )
    op.create_index(
        op.f("ix_memberships_org_id_created_at_user_id"),
        "memberships",
        ["org_id", "created_at", "user_id"],
    )
    op.create_index(
        op.f("ix_memberships_user_id_created_at_org_id"),
        "memberships",
        ["user_id", "created_at", "org_id"],
    )
    op.add_column(
        "sessions",
        sa.Column("claims_version", sa.Integer(), nullable=False, server_default="0"),
    )
    op.create_index(op.f("ix_sessions_org_id"), "sessions", ["org_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_sessions_org_id"), table_name="sessions")
    with op.batch_alter_table("sessions") as batch_op:
        batch_op.drop_column("claims_version")
    op.drop_index(op.f("ix_memberships_user_id_created_at_org_id"), table_name="memberships")
    op.drop_index(op.f("ix_memberships_org_id_created_at_user_id"), table_name="memberships")
    op.drop_table("memberships")
    op.drop_index(op.f("ix_orgs_created_at_id"), table_name="orgs")
    op.drop_table("orgs")

"""Cycle locks (``lock_lease``) and at most one champion (a partial unique index).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

STR = sqlmodel.sql.sqltypes.AutoString


def upgrade() -> None:
    op.create_table(
        "lock_lease",
        sa.Column("name", STR(), nullable=False),
        sa.Column("token", STR(), nullable=False),
        sa.Column("host", STR(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    bind = op.get_bind()
    champions = [r[0] for r in bind.execute(sa.text("SELECT id FROM generation WHERE is_champion"))]
    if len(champions) > 1:  # left by concurrent cycles before cycles took a lock
        raise RuntimeError(
            f"the lineage names generations {champions} as champions; set is_champion to "
            "false on all but one of them, then run graceful again"
        )
    op.create_index(
        "one_champion",
        "generation",
        ["is_champion"],
        unique=True,
        sqlite_where=sa.text("is_champion"),
        postgresql_where=sa.text("is_champion"),
    )


def downgrade() -> None:
    op.drop_index("one_champion", table_name="generation")
    op.drop_table("lock_lease")

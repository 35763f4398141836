"""The class vocabulary (``class_name``: a class keeps its head row for good), and with
each snapshot the head rows the lineage reserves (``capacity``) and the items of the
source that could not be read (``skipped``; ``[]`` for the snapshots recorded before).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

STR = sqlmodel.sql.sqltypes.AutoString


def upgrade() -> None:
    op.create_table(
        "class_name",
        sa.Column("idx", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("name", STR(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("idx"),
        sa.UniqueConstraint("name"),
    )
    # plain ALTER TABLE ... ADD COLUMN on both dialects: the NOT NULL column has a default
    op.add_column("snapshot", sa.Column("capacity", sa.Integer(), nullable=True))
    op.add_column("snapshot", sa.Column("skipped", sa.JSON(), nullable=False, server_default="[]"))


def downgrade() -> None:
    # SQLite drops columns by rebuilding the table (batch mode); PostgreSQL alters it
    with op.batch_alter_table("snapshot") as batch:
        batch.drop_column("skipped")
        batch.drop_column("capacity")
    op.drop_table("class_name")

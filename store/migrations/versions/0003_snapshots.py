"""Snapshots: what each generation trained on (source, keys, class counts, fingerprints).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

STR = sqlmodel.sql.sqltypes.AutoString


def upgrade() -> None:
    op.create_table(
        "snapshot",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("generation_id", sa.Integer(), nullable=False),
        sa.Column("source", STR(), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=True),
        sa.Column("stages", sa.Integer(), nullable=True),
        sa.Column("items", sa.Integer(), nullable=False),
        sa.Column("classes", sa.JSON(), nullable=False),
        sa.Column("fingerprint", STR(), nullable=False),
        sa.Column("eval_fingerprint", STR(), nullable=False),
        sa.Column("keys_path", STR(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["generation_id"], ["generation.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("generation_id"),
    )
    op.create_index("ix_snapshot_fingerprint", "snapshot", ["fingerprint"])


def downgrade() -> None:
    op.drop_index("ix_snapshot_fingerprint", table_name="snapshot")
    op.drop_table("snapshot")

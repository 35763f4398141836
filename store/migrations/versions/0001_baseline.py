"""The lineage as graceful created it before migrations (commit 749e6c6).

A lineage made then has these tables and no ``alembic_version``; store.migrate stamps it
with this revision and upgrades it from here.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STR = sqlmodel.sql.sqltypes.AutoString


def upgrade() -> None:
    op.create_table(
        "generation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("dataset", STR(), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("architecture", sa.JSON(), nullable=False),
        sa.Column("embed_dim", sa.Integer(), nullable=False),
        sa.Column("classes", sa.JSON(), nullable=False),
        sa.Column("train_samples", sa.Integer(), nullable=False),
        sa.Column("epochs", sa.Integer(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("method", STR(), nullable=False),
        sa.Column("status", STR(), nullable=False),
        sa.Column("is_champion", sa.Boolean(), nullable=False),
        sa.Column("pinned", sa.Boolean(), nullable=False),
        sa.Column("retired", sa.Boolean(), nullable=False),
        sa.Column("retired_reason", STR(), nullable=True),
        sa.Column("accuracy", sa.Float(), nullable=True),
        sa.Column("train_seconds", sa.Float(), nullable=True),
        sa.Column("checkpoint_path", STR(), nullable=True),
        sa.Column("checkpoint_sha256", STR(), nullable=True),
        sa.Column("gate_passed", sa.Boolean(), nullable=True),
        sa.Column("gate_reasons", sa.JSON(), nullable=False),
        sa.Column("error", STR(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "gallerypart",
        sa.Column("name", STR(), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("sha256", STR(), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "galleryinfo",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("dataset", STR(), nullable=False),
        sa.Column("embed_dim", sa.Integer(), nullable=False),
        sa.Column("items", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "constraint",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("generation_id", sa.Integer(), nullable=False),
        sa.Column("target_id", sa.Integer(), nullable=False),
        sa.Column("kind", STR(), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("status", STR(), nullable=False),
        sa.Column("retired_reason", STR(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["generation_id"], ["generation.id"]),
        sa.ForeignKeyConstraint(["target_id"], ["generation.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_constraint_target_id", "constraint", ["target_id"])
    op.create_index("ix_constraint_generation_id", "constraint", ["generation_id"])
    op.create_table(
        "evaluation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("generation_id", sa.Integer(), nullable=False),
        sa.Column("other_id", sa.Integer(), nullable=False),
        sa.Column("metric", STR(), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["generation_id"], ["generation.id"]),
        sa.ForeignKeyConstraint(["other_id"], ["generation.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("generation_id", "other_id", "metric"),
    )
    op.create_index("ix_evaluation_metric", "evaluation", ["metric"])
    op.create_index("ix_evaluation_generation_id", "evaluation", ["generation_id"])
    op.create_table(
        "backfilljob",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("generation_id", sa.Integer(), nullable=False),
        sa.Column("policy", STR(), nullable=False),
        sa.Column("budget", sa.Float(), nullable=False),
        sa.Column("total_items", sa.Integer(), nullable=False),
        sa.Column("items_done", sa.Integer(), nullable=False),
        sa.Column("status", STR(), nullable=False),
        sa.Column("m_mix_before", sa.Float(), nullable=True),
        sa.Column("m_mix_after", sa.Float(), nullable=True),
        sa.Column("curve", sa.JSON(), nullable=False),
        sa.Column("error", STR(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["generation_id"], ["generation.id"]),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    for table in ("backfilljob", "evaluation", "constraint", "galleryinfo", "gallerypart"):
        op.drop_table(table)
    op.drop_table("generation")

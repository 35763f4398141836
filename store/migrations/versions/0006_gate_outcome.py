"""The gate's outcome (promote, promote-with-backfill, reject) and the served state per
class it judged (``generation.gate_outcome``, ``generation.gate_served``: a list of
``{"class", "index", "delta", "ci", "queries"}``); NULL for generations gated before.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("generation", sa.Column("gate_outcome", sa.String(), nullable=True))
    op.add_column("generation", sa.Column("gate_served", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("generation") as batch:
        batch.drop_column("gate_served")
        batch.drop_column("gate_outcome")

"""The collection's id high-water mark (``galleryinfo.next_id``): item ids are assigned
by the collection and never reused, even after the items holding the largest ids are
pruned (NULL for galleries made before: the next id is then read off the parts); and
whether it indexes an evaluation split by position (``scenario``: every gallery made
before this revision did) or a collection's source by key.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("galleryinfo", sa.Column("next_id", sa.BigInteger(), nullable=True))
    # every gallery before this revision indexed an evaluation split; new ones say so
    op.add_column(
        "galleryinfo",
        sa.Column("scenario", sa.Boolean(), nullable=False, server_default=sa.true()),
    )


def downgrade() -> None:
    with op.batch_alter_table("galleryinfo") as batch:
        batch.drop_column("scenario")
        batch.drop_column("next_id")

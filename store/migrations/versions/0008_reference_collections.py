"""The scenario's collection is named by its spec, like every other collection.

Before this revision a flag (``galleryinfo.scenario``) said that the collection was the
reference half of the scenario's evaluation split, keyed by position, and ``dataset``
held the data set's spec. From this revision that collection's spec says so itself:
``reference:scenario:<data set spec>`` (workers.data.source.reference_spec), and the
flag is gone. The keys stay as they are: the scenario's evaluation items are still
keyed by their position. The downgrade restores the flag from the spec.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

PREFIX = "reference:scenario:"
INFO = sa.table(
    "galleryinfo",
    sa.column("id", sa.Integer()),
    sa.column("dataset", sa.String()),
    sa.column("scenario", sa.Boolean()),
)


def upgrade() -> None:
    bind = op.get_bind()
    rows = bind.execute(sa.select(INFO.c.id, INFO.c.dataset).where(INFO.c.scenario == sa.true()))
    for row_id, dataset in list(rows):
        if not str(dataset).startswith(PREFIX):
            bind.execute(INFO.update().where(INFO.c.id == row_id).values(dataset=PREFIX + dataset))
    with op.batch_alter_table("galleryinfo") as batch:
        batch.drop_column("scenario")


def downgrade() -> None:
    op.add_column(
        "galleryinfo",
        sa.Column("scenario", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    bind = op.get_bind()
    rows = bind.execute(sa.select(INFO.c.id, INFO.c.dataset))
    for row_id, dataset in list(rows):
        if str(dataset).startswith(PREFIX):
            bind.execute(
                INFO.update()
                .where(INFO.c.id == row_id)
                .values(dataset=str(dataset)[len(PREFIX) :], scenario=True)
            )

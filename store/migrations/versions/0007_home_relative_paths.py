"""Paths relative to GRACEFUL_HOME: a generation's checkpoint (``generation.checkpoint_path``)
and a snapshot's keys (``snapshot.keys_path``) were recorded as absolute paths, so a home
moved or copied elsewhere pointed back at the old place. From this revision they are
stored relative to the home (``store.lineage.HomePath``) and resolved against the home of
the process that reads them. This rewrites the rows recorded before: an absolute path
under the home becomes relative; one outside the home (a file the user keeps elsewhere,
or a home already moved before this upgrade) stays absolute, as it was.

The home is the GRACEFUL_HOME of the process that opens the lineage first after the
upgrade (for the default SQLite lineage: the directory that holds it). The columns stay
strings; only their values change. The downgrade makes relative paths absolute again,
under that home.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

COLUMNS = (("generation", "checkpoint_path"), ("snapshot", "keys_path"))


def _home() -> Path | None:
    from store.settings import StoreError, graceful_home

    try:
        return graceful_home(create=False)
    except StoreError:  # GRACEFUL_HOME is a file: nothing lies under it
        return None


def _rewrite(change) -> None:
    """Set each path column to ``change(value)`` where that differs (one UPDATE a row)."""
    bind = op.get_bind()
    for table, column in COLUMNS:
        t = sa.table(table, sa.column("id", sa.Integer()), sa.column(column, sa.String()))
        rows = bind.execute(sa.select(t.c.id, t.c[column]).where(t.c[column].isnot(None)))
        for row_id, value in list(rows):
            new = change(value)
            if new != value:
                bind.execute(t.update().where(t.c.id == row_id).values({column: new}))


def upgrade() -> None:
    home = _home()
    if home is None:
        return

    def relative(value: str) -> str:
        if not value or not Path(value).is_absolute():
            return value
        try:
            return Path(value).relative_to(home).as_posix()
        except ValueError:  # outside the home: kept absolute
            return value

    _rewrite(relative)


def downgrade() -> None:
    home = _home()
    if home is None:
        return
    _rewrite(lambda v: v if not v or Path(v).is_absolute() else str(home / v))

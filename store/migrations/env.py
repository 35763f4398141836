"""Alembic environment: runs on the connection graceful hands it (store.migrate)."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import store.lineage  # noqa: F401  (registers every table on SQLModel.metadata)

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    render_as_batch=True,  # SQLite alters tables by copying them
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()

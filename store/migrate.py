"""The lineage's schema, versioned with alembic (``store/migrations``).

Every engine is brought to the newest revision when graceful first opens it: a new
database gets every table, an older one is upgraded in place, in one transaction. A
lineage created before migrations existed (tables, no ``alembic_version``) is first
stamped with the baseline revision, which is exactly that schema. Two processes opening
one database at once migrate it one after the other (a PostgreSQL advisory lock inside
the transaction; on SQLite ``BEGIN IMMEDIATE``, which also makes its DDL transactional).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Connection, Engine

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
BASELINE = "0001"  # the schema of graceful before migrations (commit 749e6c6)
_MIGRATE_LOCK_KEY = 0x6772616365  # "grace": the advisory lock of migrations on PostgreSQL


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    """The newest revision."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()  # type: ignore[return-value]


def current(connection: Connection) -> str | None:
    """The revision a database is at (None: not versioned)."""
    return MigrationContext.configure(connection).get_current_revision()


def _sqlite_engine(engine: Engine) -> Engine:
    """An engine whose transactions are real SQLite transactions, DDL included.

    pysqlite runs DDL outside any transaction by default, so a migration that fails half
    way would leave half a schema; ``BEGIN IMMEDIATE`` also takes the write lock at once,
    so a second process waits for the first migration instead of racing it.
    """
    migrating = create_engine(engine.url, connect_args={"timeout": 120})

    @event.listens_for(migrating, "connect")
    def _no_implicit_transactions(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(migrating, "begin")
    def _begin_immediate(conn) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return migrating


def upgrade(engine: Engine) -> str:
    """Bring the database to the newest revision; returns the revision it was at before."""
    # an in-memory SQLite database exists in its own connection only: migrate it there
    sqlite = engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:")
    migrating = _sqlite_engine(engine) if sqlite else engine
    try:
        with migrating.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATE_LOCK_KEY})
            cfg = alembic_config(conn)
            before = current(conn)
            if before is None and "generation" in inspect(conn).get_table_names():
                command.stamp(cfg, BASELINE)  # made before migrations: it is the baseline
                before = BASELINE
            if before != head():
                command.upgrade(cfg, "head")
            return before or "empty"
    finally:
        if sqlite:
            migrating.dispose()

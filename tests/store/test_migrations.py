"""The lineage's schema under alembic: a new database matches the models, and a lineage
made by graceful before migrations (commit 749e6c6, fixtures in tests/fixtures) upgrades in
place on SQLite and on PostgreSQL with every row read back unchanged."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, make_url, text
from sqlmodel import SQLModel

from store import migrate
from store.lineage import Lineage

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
OLD_SQLITE = FIXTURES / "lineage-749e6c6.sqlite"
OLD_POSTGRES = FIXTURES / "lineage-749e6c6.postgres.sql"


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'lineage.db'}"
    return request.getfixturevalue("pg_url")


def test_a_new_database_is_at_head_and_matches_the_models(url: str) -> None:
    lin = Lineage(url)
    with lin.engine.connect() as conn:
        assert migrate.current(conn) == migrate.head()
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert diff == []  # the migrations build exactly what the models declare


def _rows(conn, table: str, columns: str) -> list[tuple]:
    return [tuple(r) for r in conn.execute(text(f'SELECT {columns} FROM "{table}" ORDER BY 1'))]


GEN_COLUMNS = "id, dataset, stage, status, is_champion, accuracy, checkpoint_sha256, method"
CON_COLUMNS = "id, generation_id, target_id, kind, weight, status"
EVAL_COLUMNS = "id, generation_id, other_id, metric, value"


def _old_state(conn) -> dict[str, list[tuple]]:
    return {
        "generation": _rows(conn, "generation", GEN_COLUMNS),
        "constraint": _rows(conn, "constraint", CON_COLUMNS),
        "evaluation": _rows(conn, "evaluation", EVAL_COLUMNS),
        "backfilljob": _rows(conn, "backfilljob", "id, policy, budget, items_done, status"),
    }


def _assert_upgraded(url: str, before: dict[str, list[tuple]]) -> None:
    lin = Lineage(url)  # opening it upgrades it
    with lin.engine.connect() as conn:
        assert migrate.current(conn) == migrate.head()
        assert _old_state(conn) == before
        assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []
    gens = lin.generations()
    assert [g.id for g in gens] == [1, 2] and lin.champion().id == 2
    assert {(c.generation_id, c.target_id, c.kind) for c in lin.constraints()} == {
        (2, 1, "influence"),
        (2, 1, "focal"),
        (2, 1, "embedding"),
    }
    assert len(lin.metric("nfr")) == 1 and lin.backfill_jobs()[0].status == "done"
    # and it works as a lineage of today: the lock table and the one-champion index exist
    with lin.lock():
        pass
    lin.promote(1, expected_champion=2)
    assert lin.champion().id == 1


def test_a_sqlite_lineage_of_749e6c6_upgrades_in_place(tmp_path: Path) -> None:
    db = tmp_path / "lineage.db"
    shutil.copy(OLD_SQLITE, db)
    with sqlite3.connect(db) as raw:
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "alembic_version" not in tables and "generation" in tables  # really the old one
    url = f"sqlite:///{db}"
    with create_engine(url).connect() as conn:
        before = _old_state(conn)
    assert len(before["evaluation"]) > 10
    _assert_upgraded(url, before)


def test_a_postgres_lineage_of_749e6c6_upgrades_in_place(pg_url: str) -> None:
    u = make_url(pg_url)
    psql = str(Path(migrate_bin("psql")))
    subprocess.run(
        [psql, "-q", "-v", "ON_ERROR_STOP=1", "-h", u.host, "-p", str(u.port), "-U", u.username]
        + ["-d", u.database, "-f", str(OLD_POSTGRES)],
        check=True,
        capture_output=True,
    )
    with create_engine(pg_url).connect() as conn:
        before = _old_state(conn)
        assert migrate.current(conn) is None
    assert len(before["evaluation"]) > 10
    _assert_upgraded(pg_url, before)


def test_two_champions_left_by_old_concurrent_cycles_are_named(tmp_path: Path) -> None:
    from store.settings import StoreError

    db = tmp_path / "lineage.db"
    shutil.copy(OLD_SQLITE, db)
    with sqlite3.connect(db) as raw:
        raw.execute("UPDATE generation SET is_champion = 1")
    with pytest.raises(StoreError, match=r"names generations \[1, 2\] as champions"):
        Lineage(f"sqlite:///{db}").generations()
    with sqlite3.connect(db) as raw:  # the failed upgrade changed nothing
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "lock_lease" not in tables and "alembic_version" not in tables


def migrate_bin(name: str) -> str:
    import glob

    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    return found[-1]

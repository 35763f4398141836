"""The lineage's schema under alembic: a new database matches the models, and a lineage
made by graceful before migrations (commit 749e6c6) or at revision 0003 (commit cddcc65:
snapshots, no class vocabulary), fixtures in tests/fixtures, upgrades in place on SQLite
and on PostgreSQL with every row read back unchanged."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, make_url, text
from sqlmodel import SQLModel

from store import migrate
from store.lineage import Lineage
from store.settings import StoreError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
OLD_SQLITE = FIXTURES / "lineage-749e6c6.sqlite"
OLD_POSTGRES = FIXTURES / "lineage-749e6c6.postgres.sql"
SNAP_SQLITE = FIXTURES / "lineage-cddcc65.sqlite"
SNAP_POSTGRES = FIXTURES / "lineage-cddcc65.postgres.sql"


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


def _load_dump(pg_url: str, dump: Path) -> None:
    """Load a plain pg_dump into the (empty) database of ``pg_url`` with psql."""
    u = make_url(pg_url)
    psql = str(Path(migrate_bin("psql")))
    subprocess.run(
        [psql, "-q", "-v", "ON_ERROR_STOP=1", "-h", u.host, "-p", str(u.port), "-U", u.username]
        + ["-d", u.database, "-f", str(dump)],
        check=True,
        capture_output=True,
    )


def test_a_postgres_lineage_of_749e6c6_upgrades_in_place(pg_url: str) -> None:
    _load_dump(pg_url, OLD_POSTGRES)
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


SNAP_COLUMNS = "id, generation_id, source, items, classes, fingerprint, eval_fingerprint"


def _snapshot_state(url: str) -> dict[str, list[tuple]]:
    """The rows of a lineage at revision 0003 that every later revision keeps as they are."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            assert migrate.current(conn) == "0003"  # really a lineage of cddcc65
            return {**_old_state(conn), "snapshot": _rows(conn, "snapshot", SNAP_COLUMNS)}
    finally:
        engine.dispose()


def _assert_snapshots_upgraded(url: str, before: dict[str, list[tuple]]) -> None:
    assert len(before["generation"]) == 2 and len(before["snapshot"]) == 2
    assert len(before["evaluation"]) > 10
    lin = Lineage(url)  # opening it upgrades it
    with lin.engine.connect() as conn:
        assert migrate.current(conn) == migrate.head()
        assert {**_old_state(conn), "snapshot": _rows(conn, "snapshot", SNAP_COLUMNS)} == before
        assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []
    snaps = lin.snapshots()
    assert sorted(snaps) == [1, 2]
    for snap in snaps.values():  # recorded before 0004: nothing skipped, no capacity
        assert snap.skipped == [] and snap.capacity is None
    # the vocabulary starts empty; a class keeps its head row for good
    assert lin.vocabulary() == {}
    assert Lineage(url).extend_vocabulary(["a", "b"]) == {"a": 0, "b": 1}
    assert Lineage(url).vocabulary() == {"a": 0, "b": 1}
    assert lin.extend_vocabulary(["b", "c"]) == {"a": 0, "b": 1, "c": 2}
    with pytest.raises(StoreError, match="3 head rows"):
        lin.extend_vocabulary(["d"], capacity=3)
    assert lin.vocabulary() == {"a": 0, "b": 1, "c": 2}  # the refusal added nothing


def test_a_sqlite_lineage_of_cddcc65_upgrades_in_place(tmp_path: Path) -> None:
    db = tmp_path / "lineage.db"
    shutil.copy(SNAP_SQLITE, db)
    url = f"sqlite:///{db}"
    _assert_snapshots_upgraded(url, _snapshot_state(url))


def test_a_postgres_lineage_of_cddcc65_upgrades_in_place(pg_url: str) -> None:
    _load_dump(pg_url, SNAP_POSTGRES)
    _assert_snapshots_upgraded(pg_url, _snapshot_state(pg_url))


def test_0004_downgrades_to_0003_and_upgrades_again(url: str) -> None:
    lin = Lineage(url)  # at head
    snapshot = dict(source="digits", items=3, classes={"0": 3}, fingerprint="f", capacity=4)
    gen = lin.start_generation(
        [],
        {**snapshot, "eval_fingerprint": "e"},
        dataset="digits",
        stage=0,
        architecture={},
        embed_dim=8,
    )
    lin.extend_vocabulary(["a"])
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            command.downgrade(migrate.alembic_config(conn), "0003")
        with engine.connect() as conn:
            assert migrate.current(conn) == "0003"
            tables = inspect(conn).get_table_names()
            columns = {c["name"] for c in inspect(conn).get_columns("snapshot")}
            assert _rows(conn, "snapshot", "generation_id, items") == [(gen.id, 3)]
        assert "class_name" not in tables and not {"capacity", "skipped"} & columns
        with engine.begin() as conn:
            command.upgrade(migrate.alembic_config(conn), "head")
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []
            assert _rows(conn, "snapshot", "capacity, skipped") in ([(None, "[]")], [(None, [])])
    finally:
        engine.dispose()


def migrate_bin(name: str) -> str:
    import glob

    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    return found[-1]

"""A GRACEFUL_HOME moved or copied elsewhere keeps working: the lineage stores the paths of
its checkpoints and snapshot keys relative to the home (store.lineage.HomePath) and
resolves them against the home that reads them; migration 0007 rewrote the absolute rows
of older lineages under the home (those outside it stay absolute). Checkpoints are still
loaded with weights_only=True after their sha256 is checked."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from alembic import command
from hostile_helpers import collection, error_line
from sources.data import champion
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from flows import cli as graceful
from store import migrate
from store.collection import Collection
from store.lineage import Lineage
from store.settings import subdir


def _lineage_with_a_snapshot(lin: Lineage) -> tuple[int, int]:
    """A champion (its checkpoint under the home) and a second generation whose snapshot's
    keys lie under the home, as a cycle on a source records them."""
    gen = champion(lin, 0)
    keys = subdir("snapshots") / "keys-moved.parquet"
    pq.write_table(pa.table({"key": ["a.png", "b.png"], "label": ["x", "y"]}), keys)
    snapshot = dict(
        source="imagefolder:/photos",
        items=2,
        classes={"x": 1, "y": 1},
        fingerprint="f",
        eval_fingerprint="e",
        keys_path=str(keys),
    )
    second = lin.start_generation(
        [], snapshot, dataset="imagefolder:/photos", stage=0, architecture={}, embed_dim=8
    )
    return int(gen.id), int(second.id)


def _stored(db: Path) -> dict[str, list]:
    """The path columns as the database holds them."""
    with sqlite3.connect(db) as conn:
        return {
            "checkpoint": [r[0] for r in conn.execute("SELECT checkpoint_path FROM generation")],
            "keys": [r[0] for r in conn.execute("SELECT keys_path FROM snapshot")],
        }


def test_a_moved_or_copied_home_keeps_working(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lin = Lineage()
    champion_id, second = _lineage_with_a_snapshot(lin)
    collection(Collection(lin), "images:/album", parts=1, per_part=5, generation=champion_id)
    stored = _stored(home / "lineage.db")
    assert stored["checkpoint"] == ["checkpoints/gen-0-d8.pt", None]  # relative to the home
    assert stored["keys"] == ["snapshots/keys-moved.parquet"]
    query = tmp_path / "query.npy"
    np.save(query, np.random.default_rng(0).random((1, 8, 8), dtype=np.float32))

    # moved, then copied, the original removed: only the copy is left
    moved = tmp_path / "elsewhere" / "moved-home"
    moved.parent.mkdir()
    shutil.move(home, moved)
    copy = tmp_path / "copied-home"
    shutil.copytree(moved, copy)
    for where in (moved, copy):
        monkeypatch.setenv("GRACEFUL_HOME", str(where))
        gen = Lineage().generation(champion_id)
        assert gen.checkpoint_path == str(where / "checkpoints" / "gen-0-d8.pt")
        keys = Lineage().snapshots()[second].keys_path
        assert keys == str(where / "snapshots" / "keys-moved.parquet")
        assert pq.read_table(keys).column("key").to_pylist() == ["a.png", "b.png"]
        if where == moved:
            shutil.rmtree(moved)  # the copy must not lean on the first move
            continue
        runner = CliRunner()
        report = runner.invoke(graceful.app, ["report", "--json"])
        assert report.exit_code == 0, report.output
        assert [g["id"] for g in json.loads(report.stdout)["generations"]] == [1, 2]
        # a search by file embeds with the champion: its checkpoint, verified and loaded
        found = runner.invoke(graceful.app, ["search", "--file", str(query), "--json"])
        assert found.exit_code == 0, found.output
        assert len(json.loads(found.stdout)) == 5
        by_key = runner.invoke(graceful.app, ["search", "--item", "item-00000.png", "--json"])
        assert by_key.exit_code == 0, by_key.output
        assert json.loads(by_key.stdout)[0]["key"] == "item-00000.png"
    assert _stored(copy / "lineage.db") == stored  # reading rewrote nothing


def test_a_swapped_checkpoint_in_a_moved_home_is_still_refused(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sha256 check holds at the new place: a checkpoint swapped there is refused."""
    lin = Lineage()
    gen = champion(lin, 0)
    collection(Collection(lin), "images:/album", parts=1, per_part=5, generation=int(gen.id))
    other = champion(lin, 1)  # another model's file, then the champion again
    lin.promote(gen.id)
    moved = tmp_path / "moved-home"
    shutil.move(home, moved)
    monkeypatch.setenv("GRACEFUL_HOME", str(moved))
    ckpt = moved / "checkpoints"
    (ckpt / "gen-0-d8.pt").write_bytes((ckpt / Path(other.checkpoint_path).name).read_bytes())
    query = tmp_path / "query.npy"
    np.save(query, np.zeros((1, 8, 8), np.float32))
    result = CliRunner().invoke(graceful.app, ["search", "--file", str(query)])
    assert result.exit_code == 2, result.output
    line = error_line(result.stderr)
    assert f"{ckpt / 'gen-0-d8.pt'} does not match the sha256" in line, line


def test_a_path_outside_the_home_stays_absolute(home: Path, tmp_path: Path) -> None:
    outside = tmp_path / "models" / "gen-9.pt"
    lin = Lineage()
    gen = lin.add_generation(
        dataset="digits", stage=0, architecture={}, embed_dim=8, checkpoint_path=str(outside)
    )
    assert _stored(home / "lineage.db")["checkpoint"] == [str(outside)]
    assert lin.generation(gen.id).checkpoint_path == str(outside)


@pytest.fixture(params=["sqlite", "postgresql"])
def lineage_url(request, home: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{home / 'lineage.db'}"
    return request.getfixturevalue("pg_url")


def test_0007_rewrites_absolute_paths_under_the_home(lineage_url: str, home: Path) -> None:
    lin = Lineage(lineage_url)
    champion_id, second = _lineage_with_a_snapshot(lin)
    outside = "/mnt/models/gen-kept.pt"
    lin.add_generation(
        dataset="digits", stage=0, architecture={}, embed_dim=8, checkpoint_path=outside
    )
    engine = create_engine(lineage_url)

    def raw() -> tuple[list, list]:
        with engine.connect() as conn:
            ckpt = conn.execute(text("SELECT checkpoint_path FROM generation ORDER BY id"))
            keys = conn.execute(text("SELECT keys_path FROM snapshot ORDER BY id"))
            return [r[0] for r in ckpt], [r[0] for r in keys]

    try:
        # back to 0006: the rows as graceful recorded them before, absolute
        with engine.begin() as conn:
            command.downgrade(migrate.alembic_config(conn), "0006")
        assert raw() == (
            [str(home / "checkpoints" / "gen-0-d8.pt"), None, outside],
            [str(home / "snapshots" / "keys-moved.parquet")],
        )
        with engine.begin() as conn:
            command.upgrade(migrate.alembic_config(conn), "0007")
            assert migrate.current(conn) == "0007"
        assert raw() == (
            ["checkpoints/gen-0-d8.pt", None, outside],  # outside the home: kept absolute
            ["snapshots/keys-moved.parquet"],
        )
    finally:
        engine.dispose()
    gen = Lineage(lineage_url).generation(champion_id)
    assert gen.checkpoint_path == str(home / "checkpoints" / "gen-0-d8.pt")
    keys = Lineage(lineage_url).snapshots()[second].keys_path
    assert keys == str(home / "snapshots" / "keys-moved.parquet")


@pytest.mark.slow
def test_a_lineage_made_by_graceful_run_works_from_a_moved_home(tmp_path: Path, cli) -> None:
    """End to end (Prefect, Ray, training): `graceful run` makes a lineage, the home is
    moved, and report, search, backfill and the next cycle (constrained against the first
    generation: its checkpoint loaded from the new place) work there."""

    def ok(c, *args: str) -> str:
        proc = c.start(*args)
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, (args, err[-3000:])
        return out

    home = tmp_path / "home"
    ok(cli(home), "run", "--dataset", "digits", "--generations", "1", "--epochs", "2", "--no-gate")
    moved = tmp_path / "moved" / "home"
    moved.parent.mkdir()
    shutil.move(home, moved)
    c = cli(moved)
    report = json.loads(ok(c, "report", "--json"))
    assert [(g["id"], g["status"]) for g in report["generations"]] == [(1, "promoted")]
    items = report["gallery"]["items"]
    query = tmp_path / "query.npy"
    np.save(query, np.random.default_rng(0).random((1, 8, 8), dtype=np.float32))
    assert len(json.loads(ok(c, "search", "--file", str(query), "--json"))) == 5
    hits = json.loads(ok(c, "search", "--item", "3", "--json"))  # a position of the split
    assert len(hits) == 5 and {h["generation"] for h in hits} == {1}
    ok(c, "backfill", "--budget", "1.0")
    ok(c, "cycle", "--force", "--epochs", "2", "--no-gate", "--backfill-budget", "1.0")
    report = json.loads(ok(c, "report", "--json"))
    assert [g["status"] for g in report["generations"]] == ["promoted", "promoted"]
    assert report["generations"][1]["constraints"]  # trained against generation 1
    assert report["gallery"] == {**report["gallery"], "items": items, "by_generation": {"2": items}}
    assert not home.exists()  # nothing was written at the old place

"""The SQL lineage on SQLite: transactions, champion alias, constraint chain, metrics."""

from __future__ import annotations

import pytest
from sqlmodel import select

from store.lineage import Constraint, Generation, Lineage, UnknownGeneration
from store.settings import StoreError, db_url, graceful_home


def _gen(lineage: Lineage, status: str = "trained", **kw) -> Generation:
    fields = dict(
        dataset="digits", stage=0, architecture={"kind": "mlp"}, embed_dim=8, status=status
    )
    return lineage.add_generation(**(fields | kw))


def test_default_url_is_sqlite_under_home(home) -> None:
    assert db_url() == f"sqlite:///{home.resolve() / 'lineage.db'}"
    Lineage().generations()
    assert (home / "lineage.db").exists()


def test_home_that_is_a_file_is_a_clear_error(tmp_path, monkeypatch) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    monkeypatch.setenv("GRACEFUL_HOME", str(f))
    with pytest.raises(StoreError, match="not a directory"):
        graceful_home()


def test_promote_moves_the_champion_alias(home) -> None:
    lin = Lineage()
    g1, g2 = _gen(lin), _gen(lin)
    lin.promote(g1.id)
    lin.promote(g2.id)
    champs = [g.id for g in lin.generations() if g.is_champion]
    assert champs == [g2.id]
    assert lin.generation(g1.id).status == "promoted"


def test_rejected_generation_is_never_promoted(home) -> None:
    lin = Lineage()
    g1, g2 = _gen(lin), _gen(lin, status="rejected")
    lin.promote(g1.id)
    with pytest.raises(StoreError, match="rejected"):
        lin.promote(g2.id)
    assert lin.champion().id == g1.id


def test_unknown_generation_names_the_id(home) -> None:
    lin = Lineage()
    _gen(lin)
    with pytest.raises(UnknownGeneration, match="unknown generation 42"):
        lin.generation(42)
    with pytest.raises(UnknownGeneration):
        lin.promote(42)


def test_failed_transaction_leaves_nothing(home) -> None:
    lin = Lineage()
    g1 = _gen(lin)
    with pytest.raises(RuntimeError), lin.session() as s:
        s.add(Constraint(generation_id=g1.id, target_id=g1.id, kind="influence", weight=1.0))
        s.flush()
        raise RuntimeError("crash inside the transaction")
    with lin.session() as s:
        assert list(s.exec(select(Constraint))) == []


def test_start_generation_records_constraints_together(home) -> None:
    lin = Lineage()
    g1 = _gen(lin)
    g2 = lin.start_generation(
        [(g1.id, "influence", 1.0), (g1.id, "focal", 0.5)],
        dataset="digits",
        stage=1,
        architecture={},
        embed_dim=8,
    )
    cons = lin.constraints(g2.id)
    assert [(c.target_id, c.kind, c.weight, c.status) for c in cons] == [
        (g1.id, "influence", 1.0, "active"),
        (g1.id, "focal", 0.5, "active"),
    ]


def test_retire_marks_every_constraint_on_the_target(home) -> None:
    lin = Lineage()
    g1, g2 = _gen(lin), _gen(lin)
    g3 = lin.start_generation(
        [(g1.id, "influence", 1.0), (g2.id, "influence", 1.0)],
        dataset="digits",
        stage=2,
        architecture={},
        embed_dim=8,
    )
    assert lin.retire(g1.id, "backfilled away") == 1
    status = {c.target_id: (c.status, c.retired_reason) for c in lin.constraints(g3.id)}
    assert status == {g1.id: ("retired", "backfilled away"), g2.id: ("active", None)}
    assert lin.generation(g1.id).retired


def test_metrics_upsert_keeps_one_row_per_pair(home) -> None:
    lin = Lineage()
    g1, g2 = _gen(lin), _gen(lin)
    lin.record_metrics([(g2.id, g1.id, "nfr", 0.25)])
    lin.record_metrics([(g2.id, g1.id, "nfr", 0.125), (g2.id, g2.id, "accuracy", 0.9)])
    assert lin.metric("nfr") == [(g2.id, g1.id, 0.125)]
    assert lin.metric("accuracy") == [(g2.id, g2.id, 0.9)]

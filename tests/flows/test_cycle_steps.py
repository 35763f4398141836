"""The cycle's plain steps (what the Prefect tasks wrap), in-process with local Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flows.config import BackfillConfig, CycleConfig, GateConfig, TrainConfig
from flows.cycle import run_cycle
from flows.cycle_steps import evaluate_step, gate_step, start_cycle, train_step
from store.lineage import Lineage
from workers.data.datasets import load_dataset

# a first generation trained an epoch or two for a test of later steps: not judged
# against chance (the chance rule has its own test)
SETUP_GATE = GateConfig(first_above_chance=False)


def _cycle(lineage: Lineage, cfg: CycleConfig) -> tuple[int, bool]:
    result = run_cycle(lineage, cfg)
    return result["generation"], result["promoted"]


@pytest.mark.slow
def test_gate_rejects_a_generation_that_flips_too_much(home) -> None:
    lin = Lineage()
    train = TrainConfig(method="none", epochs=2)
    g1, ok = _cycle(lin, CycleConfig(dataset="digits", stages=3, train=train, gate=SETUP_GATE))
    assert ok and lin.champion().id == g1

    strict = GateConfig(max_nfr=0.0, require_ecc=False, accuracy_tolerance=1.0)
    g2, ok = _cycle(lin, CycleConfig(stages=3, train=train, gate=strict))
    gen2 = lin.generation(g2)
    nfr = dict(((a, b), v) for a, b, v in lin.metric("nfr"))[(g2, g1)]
    assert nfr > 0.0  # the unconstrained update flips something ...
    assert not ok and gen2.status == "rejected" and not gen2.is_champion  # ... so it is rejected
    assert any(r.startswith(f"FAIL NFR against {g1}") for r in gen2.gate_reasons)
    assert lin.champion().id == g1
    assert lin.gallery_counts() == {g1: 270}  # nothing was backfilled with the rejected one

    # the report carries the evidence the gate decided on, consistent with the metrics
    from flows.report import build_report

    gate = next(g for g in build_report(lin)["generations"] if g["id"] == g2)["gate"]
    assert gate["passed"] is False and gate["max_nfr"] == 0.0
    (anc,) = gate["ancestors"]
    n_items = len(load_dataset("digits").y_test)  # every evaluation item is a flip case
    assert anc["k"] == g1 and anc["items"] == n_items
    assert anc["negative_flips"] == round(nfr * n_items) and anc["nfr"] == pytest.approx(nfr)
    assert anc["nfr_ci"][0] <= nfr <= anc["nfr_ci"][1]
    assert anc["ci"][0] <= anc["ecc_delta"] <= anc["ci"][1]
    assert anc["queries"] == n_items // 2  # the query half of the evaluation split
    # where the gap lies: g1 trained on 6 of the 10 classes (the scenario's first stage)
    groups = anc["ecc_gap_by_class"]
    y_queries = load_dataset("digits").y_test[1::2]
    seen = list(lin.generation(g1).classes)
    assert len(seen) == 6
    assert groups["unseen_queries"] == int((~np.isin(y_queries, seen)).sum()) > 0
    n_unseen = groups["unseen_queries"]
    n_seen = anc["queries"] - n_unseen
    overall = (n_seen * groups["seen"] + n_unseen * groups["unseen"]) / anc["queries"]
    assert overall == pytest.approx(anc["ecc_delta"])  # the two groups make up the whole gap


@pytest.mark.slow
def test_an_incompatible_update_promoted_with_backfill_empties_its_ancestor(home) -> None:
    """on_incompatible=backfill: ECC fails, g2 is promoted owing g1 a full backfill; the
    cycle is killed before its backfill, and recovery pays the debt beyond the budget."""
    from flows import chain
    from flows.recovery import recover

    lin = Lineage()
    train = TrainConfig(method="none", epochs=2)  # unconstrained: unrelated embeddings
    g1, _ = _cycle(lin, CycleConfig(dataset="digits", stages=3, train=train, gate=SETUP_GATE))
    gate = GateConfig(on_incompatible="backfill", max_nfr=1.0, accuracy_tolerance=1.0)
    budget = BackfillConfig(budget=0.1, curve=False)  # far less than g1's 270 items
    cfg = CycleConfig(stages=3, train=train, gate=gate, backfill=budget)
    state = start_cycle(lin, cfg)
    train_step(lin, state, cfg)
    passed = gate_step(lin, state, evaluate_step(lin, state), cfg)
    g2 = state.generation.id
    (why,) = [r for r in lin.generation(g2).gate_reasons if "compatible with" in r]
    assert passed and why.startswith(f"BACKFILL not compatible with {g1}: ")
    lin.promote(g2)  # ... and the process dies here, before backfill_step
    assert chain.owed_backfill(lin) == [g1] and lin.gallery_counts() == {g1: 270}

    _, done = recover(lin, cfg)  # the next cycle's recovery, before anything is trained
    assert done is not None and done["items_done"] == 270  # every item, beyond 10%
    assert lin.gallery_counts() == {g2: 270} and chain.owed_backfill(lin) == []
    assert [g for g, _ in done["retired"]] == [g1]  # so the next one is not held to g1
    assert chain.active_generations(lin) == [g2]


@pytest.mark.slow
def test_diverging_training_fails_the_generation_with_a_clear_error(home) -> None:
    lin = Lineage()
    cfg = CycleConfig(dataset="digits", stages=2, train=TrainConfig(epochs=2, lr=1e12))
    state = start_cycle(lin, cfg)
    with pytest.raises(RuntimeError, match=r"training generation 1 failed: .*loss"):
        train_step(lin, state, cfg)
    gen = lin.generation(state.generation.id)
    assert gen.status == "failed" and "loss" in gen.error
    assert lin.champion() is None


def test_cycle_without_dataset_on_empty_home_names_the_problem(home) -> None:
    from store.settings import StoreError

    with pytest.raises(StoreError, match="pass --dataset"):
        start_cycle(Lineage(), CycleConfig())
    assert Lineage().generations() == []


@pytest.mark.slow
def test_each_method_trains_every_kind_at_its_configured_weight(home) -> None:
    """From the config to the lineage to the loss: the default's embedding term once got 0."""
    from workers.learning.kinds import METHOD_KINDS, TrainMethod

    lin = Lineage()
    first = CycleConfig(
        dataset="digits", train=TrainConfig(method="none", epochs=1), gate=SETUP_GATE
    )
    g1, ok = _cycle(lin, first)
    assert ok
    custom = {"influence": 0.7, "focal": 0.2, "embedding": 1.5}
    for method in TrainMethod:
        for weights in (None, custom):
            train = TrainConfig(method=method, epochs=1, weights=weights)
            cfg = CycleConfig(train=train)
            state = start_cycle(lin, cfg)
            result = train_step(lin, state, cfg)
            expected = {kind.value: train.weights[kind] for kind in METHOD_KINDS[method]}
            stored = {c.kind: c.weight for c in lin.constraints(state.generation.id)}
            assert all(c.target_id == g1 for c in lin.constraints(state.generation.id))
            assert stored == expected, (method, weights)
            received = result["constraint_weights"]  # float32 in the loss
            assert received == {k: {str(g1): pytest.approx(w)} for k, w in expected.items()}
    assert expected and all(w > 0 for w in expected.values())


@pytest.mark.slow
def test_a_swapped_champion_checkpoint_stops_the_cycle_before_anything_starts(home) -> None:
    from store.files import CheckpointError

    lin = Lineage()
    first = CycleConfig(
        dataset="digits", train=TrainConfig(method="none", epochs=1), gate=SETUP_GATE
    )
    g1, _ = _cycle(lin, first)
    g2, _ = _cycle(lin, CycleConfig(train=TrainConfig(method="none", epochs=1), gate=SETUP_GATE))
    champion = lin.champion()
    other = lin.generation(g1 if champion.id == g2 else g2)
    Path(champion.checkpoint_path).write_bytes(Path(other.checkpoint_path).read_bytes())
    before = [(g.id, g.status) for g in lin.generations()]
    with pytest.raises(CheckpointError, match=f"generation {champion.id} .* does not match"):
        start_cycle(lin, CycleConfig(train=TrainConfig(epochs=1)))
    assert [(g.id, g.status) for g in lin.generations()] == before  # nothing recorded


def test_interrupted_generations_are_resumed_or_closed_with_a_reason(home) -> None:
    from flows.recovery import recover_generations
    from flows.steps import Step
    from store.snapshots import cycle_config_path

    lin = Lineage()
    cfg = CycleConfig(dataset="digits", train=TrainConfig(epochs=1))
    first = start_cycle(lin, cfg).generation  # "killed" before training: status training
    second = start_cycle(lin, cfg).generation
    state = recover_generations(lin)
    # the newest continues from its step, under the config it was started with
    assert state is not None and state.generation.id == second.id and state.step == Step.TRAIN
    assert state.config == cfg.model_copy(update={"stages": 3})  # the stage count it used
    assert state.resumed.startswith(f"resumed generation {second.id}")
    older = lin.generation(first.id)
    assert older.status == "failed"
    assert older.error == f"interrupted: superseded by generation {second.id}"

    cycle_config_path(second.id).unlink()  # what it needs to resume is gone
    assert recover_generations(lin) is None
    gone = lin.generation(second.id)
    assert gone.status == "failed" and gone.error.startswith("interrupted: cannot resume: ")
    assert "cycle config" in gone.error
    assert recover_generations(lin) is None  # nothing left mid-cycle
    # no gallery yet, but the lineage knows its source: no --dataset needed
    from flows.cycle_steps import plan_cycle

    assert lin.gallery_info() is None
    assert plan_cycle(lin, CycleConfig(train=TrainConfig(epochs=1))).dataset.spec == "digits"


@pytest.mark.slow
def test_a_cycle_with_nothing_new_is_skipped_unless_forced(home) -> None:
    import numpy as np
    import pyarrow.parquet as pq
    from sqlmodel import Session

    from flows.cycle_steps import plan_cycle, unchanged_since
    from flows.report import build_report
    from store.lineage import SnapshotRecord
    from store.settings import StoreError
    from workers.data.datasets import load_dataset
    from workers.data.source import train_rows

    lin = Lineage()
    train = TrainConfig(method="none", epochs=1)
    cfg = CycleConfig(dataset="digits", stages=2, train=train, gate=GateConfig(enabled=False))
    g1, _ = _cycle(lin, cfg)
    assert unchanged_since(lin, plan_cycle(lin, CycleConfig(train=train))) is None  # stage 1
    g2, _ = _cycle(lin, CycleConfig(train=train, gate=GateConfig(enabled=False)))
    # the scenario's last stage again: the champion's very snapshot (stages from the lineage)
    plan = plan_cycle(lin, CycleConfig(train=train))
    assert plan.snapshot.stages == 2 and plan.stage.index == 1
    assert unchanged_since(lin, plan) == g2
    forced, _ = _cycle(lin, CycleConfig(train=train, force=True, gate=GateConfig(enabled=False)))
    assert forced == 3 and lin.champion().id == 3

    rep = build_report(lin)
    snaps = {g["id"]: g["snapshot"] for g in rep["generations"]}
    assert snaps[g2]["fingerprint"] == snaps[forced]["fingerprint"] != snaps[g1]["fingerprint"]
    ds = load_dataset("digits")
    # the stage's rows, as its keys file (the snapshot's items) names them
    idx = train_rows(pq.read_table(lin.snapshots()[g1].keys_path).column("key"))
    labels = ds.y_train[idx]
    assert snaps[g1]["items"] == len(idx) == lin.generation(g1).train_samples
    assert snaps[g1]["classes"] == {  # hand-counted from the stage's own rows
        ds.class_names[c]: int((labels == c).sum()) for c in np.unique(labels)
    }
    assert sum(snaps[g1]["classes"].values()) == snaps[g1]["items"]
    assert len(snaps[g1]["classes"]) == len(lin.generation(g1).classes) < 10  # stage 0

    with Session(lin.engine) as s, s.begin():  # as if the evaluation set had been edited
        row = s.get(SnapshotRecord, 1)
        row.eval_fingerprint = "0" * 64
        s.add(row)
    with pytest.raises(StoreError, match="evaluation set of 'digits' changed since generation 1"):
        plan_cycle(lin, CycleConfig(train=train))


def test_a_lineage_keeps_its_backbone_kind(home) -> None:
    """A new scenario lineage on images gets the residual CNN; one whose generations are
    MLPs (made before the CNN was the default) goes on with the MLP, which it can warm
    start from."""
    from flows.cycle_steps import plan_cycle

    lin = Lineage()
    cfg = CycleConfig(dataset="digits", stages=3)
    assert plan_cycle(lin, cfg).stage.architecture["kind"] == "resnet"
    gen = lin.add_generation(
        dataset="digits",
        stage=0,
        architecture={"kind": "mlp", "width": 128, "depth": 2, "head": "fixed"},
        embed_dim=64,
        classes=list(range(5)),
        status="promoted",
    )
    arch = plan_cycle(lin, cfg).stage.architecture
    assert arch["kind"] == "mlp" and arch["width"] > 128  # it still grows, as an MLP
    assert gen.id == 1


def test_a_new_lineage_asked_for_a_kind_gets_that_kinds_sizes(home) -> None:
    """``train.architecture = {"kind": "mlp"}`` on images starts the MLP's own schedule
    (width 128 at the first of 3 stages, as on features), not an MLP of the residual CNN's
    12 channels; another image kind keeps the image schedule's sizes."""
    from flows.cycle_steps import plan_cycle

    def first_stage(kind: str) -> dict:
        train = TrainConfig(architecture={"kind": kind})
        return plan_cycle(Lineage(), CycleConfig(dataset="digits", stages=3, train=train))

    mlp = first_stage("mlp").stage.architecture
    assert (mlp["kind"], mlp["width"], mlp["depth"]) == ("mlp", 128, 2)
    cnn = first_stage("cnn").stage.architecture
    assert cnn["width"] == 12  # the image schedule's first stage


@pytest.mark.slow
def test_a_scenario_lineage_from_before_the_one_source_goes_on(home, monkeypatch) -> None:
    """A scenario lineage made before the Source: its keys file holds integer labels, it
    has no class vocabulary and no evaluation items file. Its next cycle trains on the
    next stage with the data set's own class rows: exactly what a lineage made now
    trains (the same accuracy, to the last digit)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sqlmodel import Session, delete

    from store.lineage import ClassName
    from workers.data.source import train_rows
    from workers.data.sources import label_indices

    train = TrainConfig(method="none", epochs=1)
    off = GateConfig(enabled=False)
    ds = load_dataset("digits")

    def two_stages(old_format: bool) -> Lineage:
        lin = Lineage()
        g1, _ = _cycle(lin, CycleConfig(dataset="digits", stages=2, train=train, gate=off))
        if old_format:  # as the old code left it: keys and head rows, no names
            keys = lin.snapshots()[g1].keys_path
            rows = train_rows(pq.read_table(keys).column("key"))
            labels = pa.array(ds.y_train[rows])
            pq.write_table(pa.table({"key": [f"train/{r}" for r in rows], "label": labels}), keys)
            with Session(lin.engine) as s, s.begin():
                s.exec(delete(ClassName))
            for old in (home / "snapshots").glob("eval-*.parquet"):
                old.unlink()
            assert lin.vocabulary() == {}
        g2, promoted = _cycle(lin, CycleConfig(train=train, gate=off))
        assert promoted and lin.generation(g2).stage == 1
        return lin

    lin = two_stages(old_format=True)
    assert lin.vocabulary() == {n: i for i, n in enumerate(ds.class_names)}
    snap = lin.snapshots()[2]
    table = pq.read_table(snap.keys_path)
    rows2 = train_rows(table.column("key"))
    np.testing.assert_array_equal(
        label_indices(table.column("label"), lin.vocabulary()), ds.y_train[rows2]
    )
    assert snap.stages == 2 and snap.items == len(rows2) > lin.snapshots()[1].items

    monkeypatch.setenv("GRACEFUL_HOME", str(home.parent / "made-now"))
    now = two_stages(old_format=False)
    assert [g.accuracy for g in lin.generations()] == [g.accuracy for g in now.generations()]

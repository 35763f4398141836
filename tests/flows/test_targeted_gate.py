"""The gate's three outcomes through the cycle's plain steps, on digits with local Ray.

A first generation at chance is rejected; a weak one above chance is promoted; a better,
incompatible one is promoted owing a targeted backfill, which every backfill pays first,
exactly, through a kill.
"""

from __future__ import annotations

import numpy as np
import pytest

from flows import chain
from flows.backfill import backfill_once
from flows.config import BackfillConfig, CycleConfig, GateConfig, TrainConfig
from flows.cycle_steps import backfill_step, evaluate_step, gate_step, start_cycle, train_step
from flows.gate import GateOutcome
from flows.recovery import recover
from flows.report import build_report
from store.collection import Collection
from store.debts import load_debt
from store.lineage import Lineage


def _gated(lin: Lineage, cfg: CycleConfig):
    state = start_cycle(lin, cfg)
    train_step(lin, state, cfg)
    passed = gate_step(lin, state, evaluate_step(lin, state), cfg)
    return state, passed


def _held(lin: Lineage) -> dict[int, int]:
    """item id -> the generation whose embedding the collection holds."""
    out = {}
    for _, batch in Collection(lin).iter_batches(["item_id", "generation"]):
        out.update(zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True))
    return out


@pytest.mark.slow
def test_weak_first_generation_then_a_better_one_promoted_with_a_targeted_backfill(home) -> None:
    lin = Lineage()
    parts = BackfillConfig(budget=0.0, batch_rows=40, curve=False)  # only the gate's plan
    # 1. a generation that learned nothing (a learning rate of 1e-7): not above chance
    frozen = TrainConfig(method="none", epochs=1, lr=1e-7)
    state, passed = _gated(lin, CycleConfig(dataset="digits", stages=3, train=frozen))
    gen = lin.generation(state.generation.id)
    assert not passed and gen.status == "rejected" and gen.gate_outcome == "reject"
    assert "not above chance" in gen.gate_reasons[0] and lin.champion() is None

    # 2. a weak generation above chance (the scenario's next stage, 3 epochs)
    weak = CycleConfig(stages=3, train=TrainConfig(method="none", epochs=3), backfill=parts)
    state, passed = _gated(lin, weak)
    g1 = state.generation.id
    assert passed and "above chance" in lin.generation(g1).gate_reasons[0]
    lin.promote(g1)
    backfill_step(lin, state, weak)  # indexes the collection (270 items, 7 parts)
    assert lin.gallery_counts() == {g1: 270} and len(Collection(lin).part_names()) == 7

    # 3. a better, unconstrained generation: incompatible with g1, so the served state
    # decides which of g1's items it must re-embed
    better = CycleConfig(
        train=TrainConfig(method="none", epochs=4),
        gate=GateConfig(max_backfill=1.0),
        backfill=parts,
    )
    state, passed = _gated(lin, better)
    g2 = state.generation.id
    gen = lin.generation(g2)
    assert passed and gen.gate_outcome == GateOutcome.PROMOTE_WITH_BACKFILL, gen.gate_reasons
    (why,) = [r for r in gen.gate_reasons if r.startswith("TARGETED BACKFILL")]
    debt = load_debt(g2)
    assert 0 < len(debt) < 270 and f": {len(debt)} of 270 collection items" in why
    assert set(debt) <= set(_held(lin))  # items of the collection, by id
    # the served state it judged: every class, none worse with evidence
    served = build_report(lin)["generations"][-1]["gate"]["served"]
    assert [row["index"] for row in served] == list(range(10))
    assert all(row["ci"][0] <= row["delta"] <= row["ci"][1] for row in served)
    assert all(row["ci"][1] >= 0 for row in served)

    # promoted, and killed after the first re-embedded part of its backfill ...
    lin.promote(g2)
    assert chain.owed_items(lin).tolist() == debt.tolist()
    with pytest.raises(KeyboardInterrupt):
        backfill_once(lin, parts, crash_after_parts=1)
    paid = {i for i, g in _held(lin).items() if g == g2}
    assert 0 < len(paid) < len(debt) and paid <= set(debt)
    # ... the next cycle's recovery finishes it: exactly the debt, nothing else (budget 0)
    _, done = recover(lin, better)
    assert done is not None and done["items_total"] == len(debt)
    held = _held(lin)
    assert sorted(i for i, g in held.items() if g == g2) == debt.tolist()
    assert lin.gallery_counts() == {g1: 270 - len(debt), g2: len(debt)}
    assert len(chain.owed_items(lin)) == 0  # paid: a later backfill starts from the policy
    report = build_report(lin)
    gate = next(g for g in report["generations"] if g["id"] == g2)["gate"]
    assert gate["outcome"] == "promote-with-backfill"
    assert gate["targeted_backfill"] == {
        "items": len(debt),
        "share": pytest.approx(len(debt) / 270),
    }
    assert gate["served_all"]["recovered"] <= gate["served_all"]["regressed"]
    assert report["m_mix"] is not None and np.isfinite(report["m_mix"])

"""The cycle's plain steps (what the Prefect tasks wrap), in-process with local Ray."""

from __future__ import annotations

import pytest

from flows.config import CycleConfig, GateConfig, TrainConfig
from flows.cycle import backfill_step, evaluate_step, gate_step, start_cycle, train_step
from store.lineage import Lineage


def _cycle(lineage: Lineage, cfg: CycleConfig) -> tuple[int, bool]:
    state = start_cycle(lineage, cfg)
    train_step(lineage, state, cfg)
    metrics = evaluate_step(lineage, state)
    passed = gate_step(lineage, state, metrics, cfg)
    if passed:
        lineage.promote(state.generation.id)
        backfill_step(lineage, state, cfg)
    return state.generation.id, passed


@pytest.mark.slow
def test_gate_rejects_a_generation_that_flips_too_much(home) -> None:
    lin = Lineage()
    train = TrainConfig(method="none", epochs=2)
    g1, ok = _cycle(lin, CycleConfig(dataset="digits", stages=3, train=train))
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

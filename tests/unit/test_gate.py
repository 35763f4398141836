"""The promotion gate on hand-made numbers."""

from flows.config import GateConfig
from flows.gate import decide


def test_first_generation_passes() -> None:
    ok, reasons = decide(0.5, None, {}, {}, GateConfig())
    assert ok and "first generation" in reasons[0]


def test_passes_when_every_threshold_holds() -> None:
    ok, reasons = decide(0.90, 0.91, {1: (0.80, 0.79)}, {1: 0.02}, GateConfig())
    assert ok, reasons
    assert not any(r.startswith("FAIL") for r in reasons)


def test_rejects_too_many_flips() -> None:
    ok, reasons = decide(0.95, 0.90, {1: (0.9, 0.8)}, {1: 0.11}, GateConfig(max_nfr=0.10))
    assert not ok
    assert any(r.startswith("FAIL NFR against 1") for r in reasons)


def test_rejects_accuracy_drop_beyond_tolerance() -> None:
    ok, _ = decide(0.87, 0.90, {}, {}, GateConfig(accuracy_tolerance=0.02))
    assert not ok
    ok, _ = decide(0.885, 0.90, {}, {}, GateConfig(accuracy_tolerance=0.02))
    assert ok


def test_ecc_is_strict_and_checked_per_ancestor() -> None:
    ok, reasons = decide(0.9, 0.9, {1: (0.8, 0.7), 2: (0.75, 0.75)}, {}, GateConfig())
    assert not ok
    assert [r for r in reasons if r.startswith("FAIL")] == [
        "FAIL not compatible with 2: C[g][2]=0.7500 <= C[2][2]=0.7500"
    ]
    ok, _ = decide(0.9, 0.9, {2: (0.75, 0.75)}, {}, GateConfig(require_ecc=False))
    assert ok


def test_disabled_gate_promotes() -> None:
    ok, reasons = decide(0.1, 0.9, {1: (0.0, 1.0)}, {1: 1.0}, GateConfig(enabled=False))
    assert ok and "disabled" in reasons[0]

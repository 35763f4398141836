"""The promotion gate on hand-made numbers: paired evidence, not point comparisons."""

import math

import pytest

from flows.config import GateConfig
from flows.gate import (
    ClassGroupGaps,
    FirstEvidence,
    decide,
    evidence_rows,
)
from workers.measuring.evaluate import PairEvidence
from workers.measuring.stats import PairedCounts, clopper_pearson, pair_evidence


def _fails(reasons: list[str]) -> list[str]:
    return [r for r in reasons if r.startswith("FAIL ")]


def test_first_generation_passes() -> None:
    ok, reasons, _ = decide(0.5, None, {}, {}, GateConfig())
    assert ok and "first generation" in reasons[0]


def test_first_generation_must_be_above_chance_with_evidence() -> None:
    # 10 balanced classes: chance 0.1. Clopper-Pearson at 95% (beta quantiles):
    # 12/100 -> [0.0636, 0.2002] includes 0.1: rejected; 16/100 -> [0.0943, 0.2468]
    # still includes it; 30/100 -> [0.2124, 0.3998] lies above it: promoted
    # off: a first generation is promoted as before
    off = GateConfig(first_above_chance=False)
    assert decide(0.12, None, {}, {}, off, first=FirstEvidence(12, 100, 0.1))[0]
    on = GateConfig()  # on by default
    assert on.first_above_chance
    for hits, promoted in ((12, False), (16, False), (30, True)):
        ok, reasons, _ = decide(hits / 100, None, {}, {}, on, first=FirstEvidence(hits, 100, 0.1))
        assert ok is promoted, reasons
    ok, reasons, _ = decide(0.12, None, {}, {}, on, first=FirstEvidence(12, 100, 0.1))
    assert reasons == [
        "FAIL first generation: accuracy 0.1200 not above chance ([0.0636, 0.2002] at 95% CI, "
        "chance 0.1000); train longer or on more data"
    ]
    ok, reasons, _ = decide(0.3, None, {}, {}, on, first=FirstEvidence(30, 100, 0.1))
    assert reasons == [
        "first generation: accuracy 0.3000 above chance ([0.2124, 0.3998] at 95% CI, chance 0.1000)"
    ]
    # an imbalanced evaluation set: chance is the largest class's share (0.35 here)
    assert not decide(0.4, None, {}, {}, on, first=FirstEvidence(40, 100, 0.35))[0]
    # the gate off promotes anything
    assert decide(
        0.1,
        None,
        {},
        {},
        GateConfig(enabled=False, first_above_chance=True),
        first=FirstEvidence(10, 100, 0.1),
    )[0]


def test_passes_when_every_threshold_holds() -> None:
    ok, reasons, _ = decide(0.90, 0.91, {1: (0.80, 0.79)}, {1: 0.02}, GateConfig())
    assert ok, reasons
    assert not _fails(reasons)


def test_rejects_too_many_flips_without_counts() -> None:
    # point values only: the interval is the point, NFR 0.11 > 0.10
    ok, reasons, _ = decide(0.95, 0.90, {1: (0.9, 0.8)}, {1: 0.11}, GateConfig(max_nfr=0.10))
    assert not ok
    assert any(r.startswith("FAIL NFR against 1") for r in reasons)
    assert "point value" in _fails(reasons)[0]


def test_rejects_accuracy_drop_beyond_tolerance() -> None:
    ok, _, _ = decide(0.87, 0.90, {}, {}, GateConfig(accuracy_tolerance=0.02))
    assert not ok
    ok, _, _ = decide(0.885, 0.90, {}, {}, GateConfig(accuracy_tolerance=0.02))
    assert ok


def test_point_ecc_fails_only_below_the_margin_and_per_ancestor() -> None:
    compat = {1: (0.8, 0.7), 2: (0.74, 0.75), 3: (0.75, 0.75)}
    ok, reasons, _ = decide(0.9, 0.9, compat, {}, GateConfig(on_incompatible="reject"))
    assert not ok  # a tie is no evidence of a loss; 2 is below by 0.01 > margin 0
    assert [r.split(":")[0] for r in _fails(reasons)] == ["FAIL not compatible with 2"]
    ok, _, _ = decide(
        0.9, 0.9, compat, {}, GateConfig(ecc_margin=0.01, on_incompatible="reject")
    )  # -0.01 not below -0.01
    assert ok
    ok, _, _ = decide(0.9, 0.9, {2: (0.5, 0.75)}, {}, GateConfig(require_ecc=False))
    assert ok


def test_a_two_query_difference_is_noise_and_promotes() -> None:
    # The run that the strict rule rejected: C[2][1] = 0.275 vs C[1][1] = 0.277 on 1000
    # queries, i.e. 275 vs 277 hits: 40 queries only generation 2's hit, 42 only 1's.
    counts = {1: PairedCounts(1000, 40, 42)}
    compat = {1: (0.275, 0.277)}
    ok, reasons, _ = decide(
        0.9, 0.9, compat, {}, GateConfig(on_incompatible="reject")
    )  # point rule: rejected
    assert not ok
    ok, reasons, _ = decide(
        0.9, 0.9, compat, {}, GateConfig(on_incompatible="reject"), ecc_counts=counts
    )
    assert ok, reasons
    # delta = -2/1000; sd of a difference = sqrt(82/1000 - 0.002^2) = 0.2864,
    # 95% half width 1.96 * 0.2864 / sqrt(1000) = 0.0178 -> about [-0.0198, +0.0158]
    reason = reasons[1]
    assert reason.startswith("compatible with 1: C[g][1]-C[1][1] = -0.0020, 95% CI [")
    lo, hi = (float(v) for v in reason.split("CI [")[1].split("]")[0].split(","))
    half = 1.96 * math.sqrt(82 / 1000 - 0.002**2) / math.sqrt(1000)
    assert lo == pytest.approx(-0.002 - half, abs=0.003)
    assert hi == pytest.approx(-0.002 + half, abs=0.003)
    assert "not below +0.0000" in reason and "1000 queries" in reason


def test_reasons_say_where_the_gap_lies_without_changing_the_verdict() -> None:
    # 400 queries, 10 only g hits, 50 only k hits: rejected, with or without the groups
    counts = {1: PairedCounts(400, 10, 50)}
    compat = {1: (0.6, 0.7)}
    groups = {1: ClassGroupGaps(seen=-0.02, unseen=-0.22, unseen_queries=160)}
    plain = decide(0.9, 0.9, compat, {}, GateConfig(on_incompatible="reject"), ecc_counts=counts)
    noted = decide(
        0.9,
        0.9,
        compat,
        {},
        GateConfig(on_incompatible="reject"),
        ecc_counts=counts,
        ecc_groups=groups,
    )
    assert plain[0] is noted[0] is False
    (fail,) = _fails(noted[1])
    assert fail.endswith(
        "400 queries; on classes 1 trained on -0.0200, "
        "on the 160 queries of classes it never saw -0.2200)"
    )
    assert "trained on" not in _fails(plain[1])[0]
    # an ancestor that trained on every class: no split to report
    whole = {1: ClassGroupGaps(seen=-0.1, unseen=None, unseen_queries=0)}
    _, reasons, _ = decide(
        0.9,
        0.9,
        compat,
        {},
        GateConfig(on_incompatible="reject"),
        ecc_counts=counts,
        ecc_groups=whole,
    )
    assert "never saw" not in _fails(reasons)[0]


def test_on_incompatible_backfill_promotes_and_says_what_it_owes() -> None:
    # against 1: 10 only g hits, 50 only k hits of 400 -> upper bound about -0.063 < 0;
    # against 2: 30 vs 31 -> the interval holds 0: compatible
    counts = {1: PairedCounts(400, 10, 50), 2: PairedCounts(400, 30, 31)}
    compat = {1: (0.6, 0.7), 2: (0.7, 0.7025)}
    cfg = GateConfig(on_incompatible="backfill")
    ok, reasons, owed = decide(0.9, 0.9, compat, {}, cfg, ecc_counts=counts)
    assert ok and not _fails(reasons)
    assert reasons[1].startswith("BACKFILL not compatible with 1: ")
    assert reasons[1].endswith(
        "every collection item of 1 is re-embedded by this cycle's backfill "
        "(on_incompatible=backfill)"
    )
    assert reasons[2].startswith("compatible with 2")
    assert owed == [1]  # the same evidence, the same answer
    # the default rejects the same evidence, and owes nothing
    ok, reasons, owed = decide(
        0.9, 0.9, compat, {}, GateConfig(on_incompatible="reject"), ecc_counts=counts
    )
    assert not ok and _fails(reasons)[0].startswith("FAIL not compatible with 1")
    assert owed == []
    # rejected for another reason: the ECC failure is a failure like any, nothing promised
    flips = {1: PairedCounts(540, 10, 100)}
    nfr = {1: 100 / 540}
    ok, reasons, _ = decide(0.9, 0.9, compat, nfr, cfg, ecc_counts=counts, flip_counts=flips)
    assert not ok and not any(r.startswith("BACKFILL") for r in reasons)
    fails = _fails(reasons)
    assert len(fails) == 2 and fails[0].startswith("FAIL not compatible with 1: ")
    assert fails[1].startswith("FAIL NFR against 1 = 0.1852")


def test_a_pinned_ancestor_is_never_backfilled_away() -> None:
    counts = {1: PairedCounts(400, 10, 50)}
    compat = {1: (0.6, 0.7)}
    cfg = GateConfig(on_incompatible="backfill")
    ok, reasons, owed = decide(0.9, 0.9, compat, {}, cfg, ecc_counts=counts, pinned={1})
    assert not ok
    assert _fails(reasons)[0].endswith("; it is pinned: unpin it to backfill it away")
    assert owed == []
    off = GateConfig(on_incompatible="backfill", require_ecc=False)
    ok, _, owed = decide(0.9, 0.9, compat, {}, off, ecc_counts=counts)
    assert ok
    assert owed == []


def test_the_typed_evidence_is_what_the_rows_store() -> None:
    """The gate reads PairEvidence; the lineage stores its rows: the same numbers."""
    q, f = PairedCounts(400, 10, 50), PairedCounts(540, 10, 100)
    pair = PairEvidence(0.3, 0.4, 100 / 540, q, f, ClassGroupGaps(0.01, -0.3, 120))
    rows = {(a, b, m): v for a, b, m, v in pair.rows(3, 1)}
    assert rows[(3, 1, "ecc_gap_seen")] == 0.01 and rows[(3, 1, "ecc_gap_unseen")] == -0.3
    assert rows[(3, 1, "ecc_unseen_queries")] == 120
    assert rows[(3, 1, "ecc_queries")] == 400 and rows[(3, 1, "ecc_gain")] == 10
    assert rows[(3, 1, "ecc_loss")] == 50 and rows[(3, 1, "ecc_delta")] == -0.1
    assert rows[(3, 1, "flip_items")] == 540 and rows[(3, 1, "flip_neg")] == 100
    assert rows[(3, 1, "flip_pos")] == 10
    # no class split known (an older lineage): no group rows
    bare = PairEvidence(0.3, 0.4, 0.0, q, f)
    assert not any(m.startswith("ecc_gap") for _, _, m, _ in bare.rows(3, 1))


def test_a_clear_ecc_regression_is_still_rejected() -> None:
    # 400 queries: 10 only g hits, 50 only k hits: delta = -0.1, sd of a difference
    # sqrt(60/400 - 0.01) = 0.374, upper bound about -0.1 + 1.96 * 0.374/20 = -0.063
    counts = {1: PairedCounts(400, 10, 50)}
    cfg = GateConfig(ecc_margin=0.01, on_incompatible="reject")
    ok, reasons, _ = decide(0.9, 0.9, {1: (0.30, 0.40)}, {}, cfg, ecc_counts=counts)
    assert not ok
    (fail,) = _fails(reasons)
    assert fail.startswith("FAIL not compatible with 1: C[g][1]-C[1][1] = -0.1000, 95% CI [")
    assert "below -0.0100" in fail


def test_confidence_decides_how_much_evidence_is_enough() -> None:
    # 1000 queries, 50 gains, 75 losses: delta -0.025, standard error
    # sqrt(0.125 - 0.025^2)/sqrt(1000) = 0.01115: the 80% upper bound
    # -0.025 + 1.2816 * 0.01115 = -0.0107 is below 0; the 99% one, +0.0037, is not
    counts = {1: PairedCounts(1000, 50, 75)}
    compat = {1: (0.5, 0.525)}
    ok, reasons, _ = decide(
        0.9,
        0.9,
        compat,
        {},
        GateConfig(confidence=0.8, on_incompatible="reject"),
        ecc_counts=counts,
    )
    assert not ok and "80% CI" in _fails(reasons)[0]
    ok, reasons, _ = decide(
        0.9,
        0.9,
        compat,
        {},
        GateConfig(confidence=0.99, on_incompatible="reject"),
        ecc_counts=counts,
    )
    assert ok and "99% CI" in reasons[1]


def test_nfr_just_above_the_bound_is_noise() -> None:
    # 60 negative flips of 540 items: NFR 0.111 > 0.10, but the lower bound is about
    # 0.111 - 1.96 * sqrt(0.111 * 0.889 / 540) = 0.085
    flips = {1: PairedCounts(540, 30, 60)}
    ok, reasons, _ = decide(0.9, 0.9, {}, {1: 60 / 540}, GateConfig(), flip_counts=flips)
    assert ok, reasons
    assert reasons[1].startswith("NFR against 1 = 0.1111, 95% CI [0.08")
    assert "not above 0.1" in reasons[1] and "60 negative vs 30 positive flips" in reasons[1]


def test_nfr_clearly_above_the_bound_is_rejected() -> None:
    # 100 of 540: NFR 0.185, lower bound about 0.185 - 1.96 * 0.0167 = 0.152 > 0.10
    flips = {1: PairedCounts(540, 10, 100)}
    ok, reasons, _ = decide(0.9, 0.9, {}, {1: 100 / 540}, GateConfig(), flip_counts=flips)
    assert not ok
    (fail,) = _fails(reasons)
    assert fail.startswith("FAIL NFR against 1 = 0.1852, 95% CI [0.15")
    assert "above 0.1" in fail


def test_any_negative_flip_fails_a_zero_bound() -> None:
    # one flip of 540: the lower bound 1 - 0.975^(1/540) = 4.7e-5 > 0
    flips = {1: PairedCounts(540, 0, 1)}
    assert clopper_pearson(1, 540)[0] == pytest.approx(1 - 0.975 ** (1 / 540))
    ok, reasons, _ = decide(0.9, 0.9, {}, {1: 1 / 540}, GateConfig(max_nfr=0.0), flip_counts=flips)
    assert not ok and _fails(reasons)[0].startswith("FAIL NFR against 1")
    flips = {1: PairedCounts(540, 3, 0)}  # no negative flip at all: lower bound 0
    ok, _, _ = decide(0.9, 0.9, {}, {1: 0.0}, GateConfig(max_nfr=0.0), flip_counts=flips)
    assert ok


def test_disabled_gate_promotes() -> None:
    ok, reasons, _ = decide(0.1, 0.9, {1: (0.0, 1.0)}, {1: 1.0}, GateConfig(enabled=False))
    assert ok and "disabled" in reasons[0]


def test_stored_evidence_matches_the_gate_reasons() -> None:
    g = 3
    queries = {1: PairedCounts(400, 10, 50), 2: PairedCounts(400, 30, 31)}
    items = {1: PairedCounts(540, 10, 100), 2: PairedCounts(540, 20, 25)}
    for k in (1, 2):  # what the evaluation stores for the pair, from the same counts
        stored = {
            m: v for _, _, m, v in PairEvidence(0.5, 0.5, 0.0, queries[k], items[k]).rows(g, k)
        }
        assert stored == pair_evidence(queries[k], items[k])

    cfg = GateConfig(confidence=0.9, ecc_margin=0.02, on_incompatible="reject")
    rows = {(a, b, m): v for a, b, m, v in evidence_rows(g, queries, items, cfg)}
    assert rows[(g, g, "evidence_confidence")] == 0.9
    assert rows[(g, g, "gate_ecc_margin")] == 0.02 and rows[(g, g, "gate_max_nfr")] == 0.1
    assert rows[(g, 1, "flip_neg")] == 100 and rows[(g, 2, "ecc_gain")] == 30
    _, reasons, _ = decide(
        0.9, 0.9, {2: (0.5, 0.5)}, {2: 25 / 540}, cfg, ecc_counts=queries, flip_counts=items
    )
    lo, hi = rows[(g, 2, "ecc_delta_lo")], rows[(g, 2, "ecc_delta_hi")]
    assert f"90% CI [{lo:+.4f}, {hi:+.4f}]" in reasons[1]
    assert f"[{rows[(g, 2, 'nfr_lo')]:.4f}, {rows[(g, 2, 'nfr_hi')]:.4f}]" in reasons[2]
    assert evidence_rows(g, {}, {}, GateConfig(require_ecc=False))[1] == (
        g,
        g,
        "gate_ecc_margin",
        None,
    )


def test_targeted_defers_an_ecc_failure_to_the_served_state() -> None:
    # the same evidence the backfill test uses: not compatible with 1 beyond doubt
    counts = {1: PairedCounts(400, 10, 50)}
    compat = {1: (0.6, 0.7)}
    ok, reasons, owed = decide(0.9, 0.9, compat, {}, GateConfig(), ecc_counts=counts)
    assert ok and reasons[1].startswith("TARGETED not compatible with 1: ")
    assert reasons[1].endswith("(on_incompatible=targeted)")
    assert owed == []  # no full backfill owed
    # a pinned ancestor too: whether its items must move is the served state's question
    assert decide(0.9, 0.9, compat, {}, GateConfig(), ecc_counts=counts, pinned={1})[0]
    # not better (accuracy below the champion's - tolerance): rejected, ECC a failure too
    ok, reasons, _ = decide(0.8, 0.9, compat, {}, GateConfig(), ecc_counts=counts)
    assert not ok and len(_fails(reasons)) == 2


def _plan(deltas, classes=(), feasible=True, regressed=0, recovered=0):
    import numpy as np

    from workers.measuring.served import ClassDelta, ServedPlan

    rows = [ClassDelta(c, d, lo, hi, 50, 0, 0) for c, d, lo, hi in deltas]
    whole = ClassDelta(-1, -0.01, -0.03, 0.01, 100, 0, 0)
    return ServedPlan(list(classes), np.zeros(4, bool), rows, whole, feasible, regressed, recovered)


def test_judge_served_three_outcomes() -> None:
    from flows.gate import GateOutcome, judge_served

    names = {0: "shirt", 1: "sneaker"}
    ok_rows = [(0, 0.0, -0.04, 0.04), (1, -0.02, -0.08, 0.04)]
    # 1. no re-embedding needed: promote
    outcome, reasons = judge_served(_plan(ok_rows), 0, 1000, GateConfig(), names)
    assert outcome == GateOutcome.PROMOTE
    assert reasons[0].startswith("served search no worse in any class without re-embedding")
    assert "sneaker -0.020 [-0.080, +0.040]" in reasons[0]
    # 2. re-embedding class 1's items (300 of 1,000: 30% <= 70%) mends it
    plan = _plan(ok_rows, classes=[1], regressed=40, recovered=38)
    outcome, reasons = judge_served(plan, 300, 1000, GateConfig(), names)
    assert outcome == GateOutcome.PROMOTE_WITH_BACKFILL
    assert reasons[0].startswith(
        "TARGETED BACKFILL re-embedding the items of classes sneaker: 300 of 1000 collection "
        "items (30.0%)"
    )
    assert reasons[0].endswith("it serves again 38 of the 40 queries that would regress")
    # 3a. the same plan above a cap of 50% (600 of 1,000): rejected with the cost
    half = GateConfig(max_backfill=0.5)
    assert GateConfig().max_backfill == 0.7  # the default: bench/results/lifelong.md
    outcome, reasons = judge_served(plan, 600, 1000, half, names)
    assert outcome == GateOutcome.REJECT
    assert reasons == [
        "FAIL the targeted backfill it needs costs more than the cap: re-embedding the items "
        "of classes sneaker: 600 of 1000 collection items (60.0%) > max_backfill 50%"
    ]
    assert judge_served(plan, 600, 1000, GateConfig(max_backfill=0.6), names)[0] == (
        GateOutcome.PROMOTE_WITH_BACKFILL
    )
    # 3b. a class worse with evidence even after re-embedding: rejected, the class named
    bad = _plan([(0, 0.0, -0.04, 0.04), (1, -0.3, -0.45, -0.15)], classes=[0, 1], feasible=False)
    outcome, reasons = judge_served(bad, 1000, 1000, GateConfig(), names)
    assert outcome == GateOutcome.REJECT
    assert reasons[0].startswith(
        "FAIL served search worse in sneaker even after re-embedding classes shirt, sneaker"
    )
    # other modes report the served state without judging it
    outcome, reasons = judge_served(bad, 0, 1000, GateConfig(on_incompatible="reject"), names)
    assert outcome == GateOutcome.PROMOTE and "not judged" in reasons[0]

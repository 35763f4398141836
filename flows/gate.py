"""The promotion gate: a pure decision on paired evidence, with its reasons.

Generation g and each active ancestor k are measured on the same queries and the same
evaluation items, so each check is a paired test (``workers/measuring/stats.py``) at the
two-sided level ``cfg.confidence``; a check fails only when its whole interval lies on
the bad side of its threshold:

- accuracy: ``accuracy >= champion accuracy - accuracy_tolerance`` (unchanged);
- ECC against k (``require_ecc``): FAIL when the upper bound of the paired bootstrap
  interval of C[g][k] - C[k][k] is below ``-ecc_margin``;
- NFR against k: FAIL when the lower Clopper-Pearson bound of NFR(g, k) is above
  ``max_nfr``.

Without per-case counts for k (a caller that has only the point values) the interval is
the point itself: ECC fails when C[g][k] - C[k][k] < -ecc_margin, NFR when NFR > max_nfr,
and the reason says so. Every reason carries its interval; failures start with ``FAIL ``.

Three outcomes (``GateOutcome``; ``on_incompatible = "targeted"``, the default): an
ECC failure against an ancestor does not reject by itself. What users will meet decides
(:func:`judge_served`): the served state after the cycle, simulated on the evaluation set
(``workers/measuring/served.py``), must be no worse in any class than now, with evidence (paired,
Bonferroni-corrected over the classes). If the candidate needs no re-embedding for that it
is promoted (``promote``); if it needs the items of some classes re-embedded, and those
are at most ``max_backfill`` of the collection, it is promoted owing exactly those items
(``promote-with-backfill``: the debt every backfill pays first); otherwise, or when the
accuracy, NFR or chance checks fail, it is rejected with the cost or the class in its
reason.

``on_incompatible = "backfill"`` turns an ECC failure against k from a rejection into a
full backfill: g is promoted (if nothing else fails and k is not pinned), it owes k a full
backfill (recorded as the metric row (g, k, ``backfill_owed``); every backfill under g
re-embeds k's items first), so g's queries stop meeting k's embeddings — the textbook
update without compatibility, paid for in re-embedding instead of a stalled lineage.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from enum import StrEnum
from typing import NamedTuple

from flows.config import GateConfig, OnIncompatible
from workers.measuring.metric_names import Metric
from workers.measuring.served import ServedPlan
from workers.measuring.stats import ClassGroupGaps, PairedCounts, clopper_pearson, pair_evidence


class GateOutcome(StrEnum):
    """The gate's three answers."""

    PROMOTE = "promote"
    PROMOTE_WITH_BACKFILL = "promote-with-backfill"
    REJECT = "reject"


EPS = 1e-12  # a bound equal to its threshold is not beyond it


def _level(cfg: GateConfig) -> str:
    return f"{100 * cfg.confidence:g}% CI"


def _evidence(
    queries: PairedCounts | None, items: PairedCounts | None, cfg: GateConfig
) -> dict[str, float]:
    return pair_evidence(
        queries, items, confidence=cfg.confidence, resamples=cfg.bootstrap_resamples
    )


def _group_note(k: int, groups: ClassGroupGaps | None) -> str:
    """Where the gap lies, when k never trained on some of the queries' classes."""
    if groups is None or groups.unseen is None or groups.seen is None:
        return ""
    return (
        f"; on classes {k} trained on {groups.seen:+.4f}, on the {groups.unseen_queries} "
        f"queries of classes it never saw {groups.unseen:+.4f}"
    )


def _ecc_check(
    k: int,
    c_gk: float,
    c_kk: float,
    counts: PairedCounts | None,
    cfg: GateConfig,
    groups: ClassGroupGaps | None = None,
) -> tuple[bool, str]:
    if counts is None:
        delta = lo = hi = c_gk - c_kk
        ci = "no per-query evidence: point values"
    else:
        ev = _evidence(counts, None, cfg)
        delta, lo, hi = ev["ecc_delta"], ev["ecc_delta_lo"], ev["ecc_delta_hi"]
        ci = f"{_level(cfg)} [{lo:+.4f}, {hi:+.4f}]"
    bound = 0.0 - cfg.ecc_margin  # +0.0, not -0.0, for a zero margin
    what = f"C[g][{k}]-C[{k}][{k}] = {delta:+.4f}, {ci}"
    where = f"(C[g][{k}]={c_gk:.4f}, C[{k}][{k}]={c_kk:.4f}"
    where += f", {counts.n} queries" if counts is not None else ""
    where += _group_note(k, groups) + ")"
    if hi < bound - EPS:  # the interval's upper bound beyond the threshold: a failure
        return False, f"not compatible with {k}: {what} below {bound:+.4f} {where}"
    return True, f"compatible with {k}: {what} not below {bound:+.4f} {where}"


def _nfr_check(
    k: int, value: float, counts: PairedCounts | None, cfg: GateConfig
) -> tuple[bool, str]:
    if counts is None:
        lo = hi = value
        ci, where = "no per-item evidence: point value", ""
    else:
        ev = _evidence(None, counts, cfg)
        lo, hi = ev["nfr_lo"], ev["nfr_hi"]
        ci = f"{_level(cfg)} [{lo:.4f}, {hi:.4f}]"
        where = (
            f" ({counts.loss} negative vs {counts.gain} positive flips of {counts.n} items, "
            f"McNemar p={ev['flip_p']:.3g})"
        )
    what = f"NFR against {k} = {value:.4f}, {ci}"
    if lo > cfg.max_nfr + EPS:
        return False, f"FAIL {what} above {cfg.max_nfr}{where}"
    return True, f"{what} not above {cfg.max_nfr}{where}"


class FirstEvidence(NamedTuple):
    """What a first generation's accuracy is judged on: its hits among the evaluation
    items, and the share of the evaluation set's largest class (what always answering
    that class scores: chance)."""

    hits: int
    items: int
    chance: float


def _above_chance(
    accuracy: float, first: FirstEvidence | None, cfg: GateConfig
) -> tuple[bool, str]:
    """Promote a first generation only if its accuracy's exact (Clopper-Pearson)
    interval lies entirely above chance: a generation that learned nothing would
    otherwise become the champion every later one must stay compatible with."""
    if first is None or not cfg.first_above_chance:
        return True, "first generation: nothing to compare against"
    lo, hi = clopper_pearson(first.hits, first.items, cfg.confidence)
    where = f"[{lo:.4f}, {hi:.4f}] at {_level(cfg)}, chance {first.chance:.4f}"
    if lo > first.chance:
        return True, f"first generation: accuracy {accuracy:.4f} above chance ({where})"
    return False, (
        f"FAIL first generation: accuracy {accuracy:.4f} not above chance ({where}); "
        "train longer or on more data"
    )


def decide(
    accuracy: float,
    champion_accuracy: float | None,
    compat: dict[int, tuple[float, float]],
    nfr: dict[int, float],
    cfg: GateConfig,
    *,
    ecc_counts: Mapping[int, PairedCounts] | None = None,
    flip_counts: Mapping[int, PairedCounts] | None = None,
    ecc_groups: Mapping[int, ClassGroupGaps] | None = None,
    pinned: Collection[int] = (),
    first: FirstEvidence | None = None,
) -> tuple[bool, list[str], list[int]]:
    """Promote only if no check fails on the evidence (the rule: module docstring); with
    the reasons, and the ancestors a promoted generation owes a full backfill.

    ``compat[k] = (C[g][k], C[k][k])`` and ``nfr[k] = NFR(g, k)`` for each active ancestor
    k; ``ecc_counts[k]`` the paired top-1 hits of generation-g vs generation-k queries on
    the k-gallery, ``flip_counts[k]`` the paired classification outcomes (loss = negative
    flips) — both from the evaluation (``workers.measuring.evaluate.PairEvidence``);
    ``ecc_groups[k]`` only adds to the reasons where the ECC
    gap lies, on the classes k trained on or on the others; it does not change a verdict.
    With ``cfg.on_incompatible == "backfill"`` an ECC failure against k does not reject
    g unless k is ``pinned`` (kept on purpose): if g is promoted its reason starts
    ``BACKFILL`` and g owes k a full backfill (returned, in ancestor order); if g is rejected
    for another reason, the ECC failure is reported as a ``FAIL`` like any other.
    With ``cfg.first_above_chance``, a first generation (no champion) is promoted only if
    its accuracy is above chance with evidence (:func:`_above_chance`, given ``first``).
    """
    if not cfg.enabled:
        return True, ["gate disabled: promoted without checks"], []
    ecc_counts, flip_counts, groups = ecc_counts or {}, flip_counts or {}, ecc_groups or {}
    if champion_accuracy is None:
        ok, reason = _above_chance(accuracy, first, cfg)
    else:
        tol = cfg.accuracy_tolerance
        ok = bool(accuracy + EPS >= champion_accuracy - tol)
        op = ">=" if ok else "<"
        what = f"accuracy {accuracy:.4f} {op} champion {champion_accuracy:.4f} - {tol}"
        reason = what if ok else f"FAIL {what}"
    reasons = [reason]
    owed: dict[int, int] = {}  # ancestor -> index of its reason, under on_incompatible
    for k, (c_gk, c_kk) in sorted(compat.items()) if cfg.require_ecc else ():
        passed, reason = _ecc_check(k, c_gk, c_kk, ecc_counts.get(k), cfg, groups.get(k))
        # no rejection by itself: under targeted the served state decides (judge_served),
        # pinned or not; under backfill k's items can all leave, unless it is pinned
        kept = cfg.on_incompatible == OnIncompatible.BACKFILL and k in pinned
        if not passed and cfg.on_incompatible != OnIncompatible.REJECT and not kept:
            owed[k] = len(reasons)
        elif not passed:
            ok = False
            reason = (
                "FAIL " + reason + ("; it is pinned: unpin it to backfill it away" if kept else "")
            )
        reasons.append(reason)
    for k, value in sorted(nfr.items()):
        passed, reason = _nfr_check(k, value, flip_counts.get(k), cfg)
        ok &= passed
        reasons.append(reason)
    for k, i in owed.items():  # promoted: k's items are owed; rejected: a failure like any
        if not ok:
            reasons[i] = f"FAIL {reasons[i]}"
        elif cfg.on_incompatible == OnIncompatible.TARGETED:
            reasons[i] = (
                f"TARGETED {reasons[i]}; the served state decides which of its items are "
                "re-embedded (on_incompatible=targeted)"
            )
        else:
            reasons[i] = (
                f"BACKFILL {reasons[i]}; every collection item of {k} is re-embedded by this "
                "cycle's backfill (on_incompatible=backfill)"
            )
    full = [k for k in owed if ok and cfg.on_incompatible == OnIncompatible.BACKFILL]
    return ok, reasons, full


def evidence_rows(
    g: int,
    ecc_counts: Mapping[int, PairedCounts],
    flip_counts: Mapping[int, PairedCounts],
    cfg: GateConfig,
) -> list[tuple[int, int, str, float | None]]:
    """Metric rows of the evidence at the gate's level (the numbers ``decide`` used).

    They replace the evaluation's default-level intervals, with (g, g) rows
    ``evidence_confidence``, ``gate_ecc_margin`` (None when ECC is not required) and
    ``gate_max_nfr`` for the report.
    """
    rows: list[tuple[int, int, str, float | None]] = []
    for k in sorted(set(ecc_counts) | set(flip_counts)):
        ev = _evidence(ecc_counts.get(k), flip_counts.get(k), cfg)
        rows += [(g, k, name, value) for name, value in ev.items()]
    rows += [
        (g, g, Metric.EVIDENCE_CONFIDENCE, cfg.confidence),
        (g, g, Metric.GATE_ECC_MARGIN, cfg.ecc_margin if cfg.require_ecc else None),
        (g, g, Metric.GATE_MAX_NFR, cfg.max_nfr),
    ]
    return rows


def _class_list(classes: list[int], names: Mapping[int, str]) -> str:
    return ", ".join(names.get(c, str(c)) for c in classes)


def judge_served(
    plan: ServedPlan,
    cost: int,
    collection: int,
    cfg: GateConfig,
    names: Mapping[int, str] | None = None,
) -> tuple[GateOutcome, list[str]]:
    """The outcome for a generation that passed :func:`decide`, from the served state it
    leaves (``plan``, ``workers.measuring.served.plan_targeted``) and what its targeted backfill
    re-embeds (``cost`` of the ``collection``'s items); reasons as :func:`decide`'s.

    With ``on_incompatible`` other than ``targeted`` there is no targeted backfill: the
    served state is reported, and a worse one fails only under ``targeted``.
    """
    names = names or {}
    level = f"{_level(cfg)}, per class Bonferroni over {len(plan.deltas)}"
    lows = sorted(plan.deltas, key=lambda d: d.delta)[:3]
    worst = ", ".join(
        f"{names.get(d.cls, str(d.cls))} {d.delta:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}]" for d in lows
    )
    whole = (
        f"all queries {plan.overall.delta:+.4f} [{plan.overall.lo:+.4f}, {plan.overall.hi:+.4f}]"
    )
    if not plan.feasible:
        bad = _class_list([d.cls for d in plan.worse], names) or "all queries"
        tried = (
            f" even after re-embedding classes {_class_list(plan.classes, names)}"
            if plan.classes
            else ""
        )
        reason = f"served search worse in {bad}{tried} ({whole}; lowest: {worst}; {level})"
        if cfg.on_incompatible == OnIncompatible.TARGETED:
            return GateOutcome.REJECT, [f"FAIL {reason}"]
        return GateOutcome.PROMOTE, [
            f"served state (not judged: on_incompatible={cfg.on_incompatible.value}): {reason}"
        ]
    if not plan.classes:
        return GateOutcome.PROMOTE, [
            f"served search no worse in any class without re-embedding ({whole}; lowest: "
            f"{worst}; {level})"
        ]
    share = cost / collection if collection else 0.0
    what = (
        f"re-embedding the items of classes {_class_list(plan.classes, names)}: {cost} of "
        f"{collection} collection items ({share:.1%})"
    )
    if share > cfg.max_backfill + EPS:
        return GateOutcome.REJECT, [
            f"FAIL the targeted backfill it needs costs more than the cap: {what} > "
            f"max_backfill {cfg.max_backfill:.0%}"
        ]
    recovered = (
        f"; it serves again {plan.recovered} of the {plan.regressed} queries that would regress"
        if plan.regressed
        else ""
    )
    return GateOutcome.PROMOTE_WITH_BACKFILL, [
        f"TARGETED BACKFILL {what}, paid first by this cycle's backfill; after it served "
        f"search is no worse in any class ({whole}; lowest: {worst}; {level}){recovered}"
    ]

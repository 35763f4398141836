"""The contract's JSON report, built from the lineage alone (no model is loaded)."""

from __future__ import annotations

from typing import Any

from flows.steps import interrupted_step
from store.collection import Collection
from store.lineage import (
    INTERRUPTED,
    Generation,
    JobStatus,
    Lineage,
    SnapshotRecord,
)
from store.locks import CYCLE_LOCK
from workers.collection.items import is_reference
from workers.measuring import metrics as M
from workers.measuring.metric_names import Metric

PAIR_METRICS = (
    Metric.NFR,
    Metric.PFR,
    Metric.NFI,
    Metric.BTC,
    Metric.BEC,
    Metric.COMPAT_MAP100,
    Metric.ECC,
    Metric.UPDATE_GAIN,
)


def _snapshot(record: SnapshotRecord | None) -> dict[str, Any] | None:
    if record is None:  # a generation made before snapshots were recorded
        return None
    return {
        "source": record.source,
        "items": record.items,
        "classes": record.classes,
        "fingerprint": record.fingerprint,
        "eval_fingerprint": record.eval_fingerprint,
        "stage": record.stage,
        "stages": record.stages,
        "skipped": len(record.skipped or []),  # unreadable items left out (keys in the lineage)
        "class_capacity": record.capacity,
    }


GATE_PAIR_METRICS = (
    Metric.ECC_DELTA,
    Metric.ECC_DELTA_LO,
    Metric.ECC_DELTA_HI,
    Metric.ECC_QUERIES,
    Metric.NFR,
    Metric.NFR_LO,
    Metric.NFR_HI,
    Metric.FLIP_P,
    Metric.FLIP_NEG,
    Metric.FLIP_POS,
    Metric.FLIP_ITEMS,
    Metric.ECC_GAP_SEEN,
    Metric.ECC_GAP_UNSEEN,
    Metric.ECC_UNSEEN_QUERIES,
)
GATE_OWN_METRICS = (
    Metric.EVIDENCE_CONFIDENCE,
    Metric.GATE_ECC_MARGIN,
    Metric.GATE_MAX_NFR,
    Metric.SERVED_DELTA,
    Metric.SERVED_DELTA_LO,
    Metric.SERVED_DELTA_HI,
    Metric.SERVED_REGRESSED,
    Metric.SERVED_RECOVERED,
    Metric.DEBT_ITEMS,
    Metric.DEBT_SHARE,
)


def _gate(lineage: Lineage, gens: list[Generation]) -> dict[int, dict[str, Any]]:
    """Per generation: the gate's verdict, reasons and paired evidence per ancestor.

    ``ancestors``: ``k``, ``ecc_delta`` = C[g][k] - C[k][k] with its bootstrap ``ci``
    over ``queries`` paired queries, ``nfr`` with its exact ``nfr_ci``, the flip counts and
    ``p`` (one-sided exact McNemar: more negative than positive flips), at ``confidence``;
    ``ecc_gap_by_class``: C[g][k] - C[k][k] on the classes k trained on (``seen``) and on
    the others (``unseen``, over ``unseen_queries``);
    ``ecc_margin`` / ``max_nfr``: the thresholds the gate compared them with (None before
    a gate used them);
    ``outcome``: promote, promote-with-backfill or reject (flows.gate.GateOutcome);
    ``served`` (contract): per class, ``{"class": name, "delta": d, "ci": [lo, hi]}`` (and
    ``index``, ``queries``), served search after the cycle's backfill minus before, as the
    gate simulated it; ``served_all``: the same over all queries, with the queries the
    candidate would lose without re-embedding (``regressed``) and those its targeted
    backfill serves again (``recovered``); ``targeted_backfill``: the items it owes
    (``items``, ``share`` of the collection).
    """
    # g -> k -> metric -> value: the pair metrics at each ancestor k < g, g's own at k = g
    rows: dict[int, dict[int, dict[str, float | None]]] = {}
    for metric in GATE_PAIR_METRICS + GATE_OWN_METRICS:
        for a, b, v in lineage.metric(metric):
            if a > b if metric in GATE_PAIR_METRICS else a == b:
                rows.setdefault(a, {}).setdefault(b, {})[metric] = v

    def count(v: float | None) -> int | None:
        return None if v is None else int(round(v))

    out: dict[int, dict[str, Any]] = {}
    for g in gens:
        gid = int(g.id)  # type: ignore[arg-type]
        pair = rows.get(gid, {})
        o = pair.pop(gid, {})
        ancestors = []
        for k, m in sorted(pair.items()):
            if "ecc_delta" not in m and "nfr_lo" not in m:
                continue  # no evidence recorded (evaluated before graceful recorded it)
            ancestors.append(
                {
                    "k": k,
                    "ecc_delta": m.get("ecc_delta"),
                    "ci": [m.get("ecc_delta_lo"), m.get("ecc_delta_hi")],
                    "queries": count(m.get("ecc_queries")),
                    "nfr": m.get("nfr"),
                    "nfr_ci": [m.get("nfr_lo"), m.get("nfr_hi")],
                    "negative_flips": count(m.get("flip_neg")),
                    "positive_flips": count(m.get("flip_pos")),
                    "items": count(m.get("flip_items")),
                    "p": m.get("flip_p"),
                    "ecc_gap_by_class": {
                        "seen": m.get("ecc_gap_seen"),
                        "unseen": m.get("ecc_gap_unseen"),
                        "unseen_queries": count(m.get("ecc_unseen_queries")),
                    },
                }
            )
        out[gid] = {
            "passed": g.gate_passed,
            "reasons": g.gate_reasons,
            "confidence": o.get("evidence_confidence"),
            "ecc_margin": o.get("gate_ecc_margin"),
            "max_nfr": o.get("gate_max_nfr"),
            "ancestors": ancestors,
            "outcome": g.gate_outcome,
            "served": g.gate_served,
            "served_all": None
            if o.get("served_delta") is None
            else {
                "delta": o.get("served_delta"),
                "ci": [o.get("served_delta_lo"), o.get("served_delta_hi")],
                "regressed": count(o.get("served_regressed")),
                "recovered": count(o.get("served_recovered")),
            },
            "targeted_backfill": {
                "items": count(o.get("debt_items")) or 0,
                "share": o.get("debt_share") or 0.0,
            },
        }
    return out


def build_report(lineage: Lineage) -> dict[str, Any]:
    """``generations``, pair metrics, ``ac``/``am``, ``m_mix``, ``gallery``, ``backfills``.

    A run is shown in progress only while its process holds its lock: a generation
    mid-cycle with no cycle holding the lineage's cycle lock, or a running backfill job
    with nobody holding the gallery's writer lock, was killed and shows ``interrupted``
    (the next cycle or backfill resumes or closes it).
    """
    gens = lineage.generations()
    snapshots = lineage.snapshots()
    cycle_running = lineage.lock(CYCLE_LOCK).holder() is not None
    writer_running = Collection(lineage).writer_active()
    constraints = lineage.constraints()
    champion = next((g.id for g in gens if g.is_champion), None)
    gate = _gate(lineage, gens)
    report: dict[str, Any] = {
        "champion": champion,
        "generations": [
            {
                "id": g.id,
                "status": INTERRUPTED
                if interrupted_step(g) is not None and not cycle_running
                else str(g.status),
                "champion": g.is_champion,
                "accuracy": g.accuracy,
                "architecture": g.architecture,
                "stage": g.stage,
                "classes": g.classes,
                "method": g.method,
                "epochs": g.epochs,
                "train_samples": g.train_samples,
                "train_seconds": g.train_seconds,
                "checkpoint_sha256": g.checkpoint_sha256,
                "pinned": g.pinned,
                "retired": g.retired,
                "retired_reason": g.retired_reason,
                "gate_passed": g.gate_passed,
                "gate_reasons": g.gate_reasons,
                "gate": gate[int(g.id)],  # type: ignore[arg-type]
                "error": g.error,
                "snapshot": _snapshot(snapshots.get(int(g.id))),  # type: ignore[arg-type]
                "constraints": [
                    {
                        "target": c.target_id,
                        "kind": c.kind,
                        "weight": c.weight,
                        "status": c.status,
                        "retired_reason": c.retired_reason,
                    }
                    for c in constraints
                    if c.generation_id == g.id
                ],
            }
            for g in gens
        ],
    }
    for metric in PAIR_METRICS:
        report[metric] = [
            [a, b, v]
            for a, b, v in lineage.metric(metric)
            if (a >= b if metric == Metric.COMPAT_MAP100 else a > b) and v is not None
        ]
    report["nfr_any"] = [[a, v] for a, b, v in lineage.metric(Metric.NFR_ANY) if a == b]
    top1 = {(a, b): v for a, b, v in lineage.metric(Metric.COMPAT_TOP1) if a >= b and v is not None}
    report["compat_top1"] = [[a, b, v] for (a, b), v in sorted(top1.items())]
    report["ac"] = M.ac(top1) if any(a > b for a, b in top1) else None
    report["am"] = M.am(top1) if top1 else None
    m_mix = [(a, v) for a, b, v in lineage.metric(Metric.M_MIX) if a == champion]
    report["m_mix"] = m_mix[-1][1] if m_mix else None
    counts = lineage.gallery_counts()
    info = lineage.gallery_info()
    report["gallery"] = {
        "items": sum(counts.values()),
        "by_generation": {str(g): n for g, n in counts.items()},
        # extensions: what the collection indexes (None before anything is indexed)
        "spec": info.dataset if info is not None else None,
        # the evaluation set's reference half: the scenario's, as the report has always named it
        "kind": None
        if info is None
        else ("scenario" if is_reference(info.dataset) else "collection"),
    }
    report["backfills"] = [
        {
            "job_id": j.id,
            "generation": j.generation_id,
            "policy": j.policy,
            "budget": j.budget,
            "status": INTERRUPTED
            if j.status == JobStatus.RUNNING and not writer_running
            else j.status,
            "error": j.error,
            "items_total": j.total_items,
            "items_done": j.items_done,
            "m_mix_before": j.m_mix_before,
            "m_mix_after": j.m_mix_after,
            "curve": j.curve,
            "area": M.curve_area(j.curve) if j.curve else None,
            "no_regret": M.no_regret(j.curve) if j.curve else None,
        }
        for j in lineage.backfill_jobs()
    ]
    return report

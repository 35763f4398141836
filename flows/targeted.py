"""The gate's served-state judgement and the targeted backfill it plans (issue 17).

What users meet after a cycle is the champion's queries against the collection as that
cycle's backfill leaves it. :func:`served_view` rebuilds it on the evaluation set: the
reference half stands for the collection, each item embedded by the generation that
holds it. On the scenario's collection (the reference half itself, keyed by position)
the holder is exact; on a user's collection the reference items are dealt to the
holding generations in the collection's proportions (a seeded deal). Where nothing is
indexed yet, the collection will be indexed by whichever generation is champion, so the
candidate is compared in full with the champion in full.

:func:`judge` runs ``workers.measuring.served.plan_targeted`` under the gate's mode, finds
the plan's classes in the real collection from its stored embeddings (``collection_selection``),
and lets ``flows.gate.judge_served`` decide; :func:`record` stores the served state per
class on the generation and the debt (``store.debts``) before the promotion.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flows.config import GateConfig, OnIncompatible
from flows.gate import GateOutcome, judge_served
from store.collection import Collection
from store.debts import save_debt
from store.lineage import Generation, Lineage
from workers.data.datasets import Dataset
from workers.data.scenario import eval_split
from workers.measuring.evaluate import generation_outputs
from workers.measuring.metric_names import Metric
from workers.measuring.served import (
    ServedPlan,
    ServedView,
    collection_selection,
    item_classes,
    plan_targeted,
)

DEAL_SEED = 0  # the deal of reference items to a user's collection's generations


@dataclass
class Judgement:
    """The served-state part of a gate decision."""

    outcome: GateOutcome
    reasons: list[str]
    plan: ServedPlan
    debt: np.ndarray
    collection: int


def _holders(
    lineage: Lineage, collection: Collection, ref_keys: list[str | None], fallback: int
) -> np.ndarray:
    """Per reference item (by key; None: no key), the generation whose embedding of it
    users meet now: the holder of the item with its key, else a seeded deal in the
    collection's proportions."""
    held = np.full(len(ref_keys), fallback, dtype=np.int64)
    if collection.info() is None:
        return held
    wanted = pa.array(ref_keys, pa.string())
    found = np.zeros(len(ref_keys), dtype=bool)
    for _, batch in collection.iter_batches(["key", "generation"]):
        at = pc.index_in(batch.column(0), value_set=wanted)  # null: not a reference item
        hit = np.flatnonzero(pc.is_valid(at).to_numpy(zero_copy_only=False))
        if len(hit):
            n = pc.drop_null(at).to_numpy().astype(np.int64)
            held[n] = batch.column(1).to_numpy()[hit]
            found[n] = True
    counts = lineage.gallery_counts()
    total = sum(counts.values())
    if found.all() or not total:
        return held
    rest = np.flatnonzero(~found)
    order = rest[np.random.default_rng(DEAL_SEED).permutation(len(rest))]
    bounds = np.round(np.cumsum([n / total for n in counts.values()]) * len(rest))
    start = 0
    for gen, end in zip(counts, bounds.astype(int), strict=True):
        held[order[start:end]] = gen
        start = end
    return held


def served_view(
    lineage: Lineage,
    ds: Dataset,
    candidate: Generation,
    champion: Generation,
    cache_dir: Path,
) -> tuple[ServedView, set[int]]:
    """The evaluation set as users would meet it (module docstring), and the generations
    that hold items now."""
    ref_idx, q_idx = eval_split(len(ds.y_test))
    collection = Collection(lineage)
    ref_keys = [ds.test_keys[i] if ds.test_keys else None for i in ref_idx]
    held = _holders(lineage, collection, ref_keys, int(champion.id))  # type: ignore[arg-type]
    by_id = {int(g.id): g for g in lineage.generations()}  # type: ignore[arg-type]
    new = generation_outputs(candidate, ds, cache_dir)
    now = generation_outputs(champion, ds, cache_dir)
    ref_by_gen = {}
    for gen in sorted(set(held.tolist())):
        src = by_id.get(gen)
        if src is not None and src.checkpoint_path:
            ref_by_gen[gen] = generation_outputs(src, ds, cache_dir).reference_emb
        else:  # a holder without a checkpoint cannot be simulated: the champion stands in
            held[held == gen] = int(champion.id)  # type: ignore[arg-type]
            ref_by_gen.setdefault(int(champion.id), now.reference_emb)  # type: ignore[arg-type]
    view = ServedView(
        query_y=ds.y_test[q_idx],
        ref_y=ds.y_test[ref_idx],
        champion_q=now.query_emb,
        candidate_q=new.query_emb,
        candidate_ref=new.reference_emb,
        held_by=held,
        ref_by_gen=ref_by_gen,
    )
    return view, set(ref_by_gen) if collection.info() is not None else set()


def judge(
    lineage: Lineage,
    ds: Dataset,
    candidate: Generation,
    champion: Generation,
    cfg: GateConfig,
    *,
    num_classes: int,
    cache_dir: Path,
    pinned: set[int],
    owed_full: list[int],
    names: dict[int, str],
) -> Judgement:
    """The served-state outcome of a candidate that passed the other checks."""
    view, holders = served_view(lineage, ds, candidate, champion, cache_dir)
    collection = Collection(lineage)
    kw = {"confidence": cfg.confidence, "resamples": cfg.bootstrap_resamples}
    if holders and cfg.on_incompatible == OnIncompatible.TARGETED:
        plan = plan_targeted(view, holders - pinned, num_classes, **kw)
    else:  # whole generations replaced: those owed a full backfill, or where nothing is
        # indexed yet all of them (the champion will index the collection whole)
        replace = owed_full if holders else view.ref_by_gen
        plan = plan_targeted(view, [], num_classes, greedy=False, replace_gens=replace, **kw)
    debt = np.zeros(0, dtype=np.int64)
    if plan.classes:  # the same classes, found in the collection by its stored embeddings
        _, protos = item_classes(view, holders - pinned, num_classes)
        batches = (
            (
                b.column(0).to_numpy(),
                b.column(1).to_numpy(),
                b.column(2).flatten().to_numpy(zero_copy_only=False).reshape(b.num_rows, -1),
            )
            for _, b in collection.iter_batches(["item_id", "generation", "embedding"])
        )
        debt = collection_selection(batches, protos, plan.classes)
    size = sum(lineage.gallery_counts().values())
    outcome, reasons = judge_served(plan, len(debt), size, cfg, names)
    return Judgement(outcome, reasons, plan, debt, size)


def record(g: int, j: Judgement) -> list[tuple]:
    """The debt file (before the promotion it belongs to) and the metric rows of the
    served state; returns the rows. The per-class list goes on the generation."""
    plan, owed = j.plan, j.outcome == GateOutcome.PROMOTE_WITH_BACKFILL
    if owed:
        save_debt(g, j.debt)
    share = len(j.debt) / j.collection if j.collection else 0.0
    return [
        (g, g, Metric.SERVED_DELTA, plan.overall.delta),
        (g, g, Metric.SERVED_DELTA_LO, plan.overall.lo),
        (g, g, Metric.SERVED_DELTA_HI, plan.overall.hi),
        (g, g, Metric.SERVED_WORSE_CLASSES, float(len(plan.worse))),
        (g, g, Metric.SERVED_REGRESSED, float(plan.regressed)),
        (g, g, Metric.SERVED_RECOVERED, float(plan.recovered)),
        (g, g, Metric.DEBT_ITEMS, float(len(j.debt)) if owed else 0.0),
        (g, g, Metric.DEBT_SHARE, share if owed else 0.0),
    ]


def served_rows(plan: ServedPlan, names: dict[int, str]) -> list[dict]:
    """The per-class served state as the report shows it (contract: ``gate.served``)."""
    return [
        {
            "class": names.get(d.cls, str(d.cls)),
            "index": d.cls,
            "delta": d.delta,
            "ci": [d.lo, d.hi],
            "queries": d.queries,
        }
        for d in plan.deltas
    ]

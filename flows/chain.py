"""The constraint chain: which earlier generations constrain the next, and retirement."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from store.collection import Collection
from store.debts import load_debt
from store.lineage import Generation, GenerationStatus, Lineage
from workers.learning.kinds import METHOD_KINDS, full_weights, parse_method
from workers.measuring.metric_names import Metric


def active_generations(lineage: Lineage) -> list[int]:
    """Earlier generations still in use: items in the collection, pinned, or serving as champion."""
    in_gallery = set(lineage.gallery_counts())
    active = []
    for gen in lineage.generations():
        if gen.status != GenerationStatus.PROMOTED or gen.retired:
            continue
        if gen.id in in_gallery or gen.pinned or gen.is_champion:
            active.append(int(gen.id))  # type: ignore[arg-type]
    return active


def plan_constraints(
    active: list[int],
    method: str,
    against: str,
    weights: Mapping[str, float] | None = None,
    ancestor_weights: str = "each",
) -> list[tuple[int, str, float]]:
    """(target, kind, weight) for each constraint of the next generation.

    ``weights`` maps kinds to weights (workers.learning.constraints); kinds left out keep their
    default, so every kind the method uses gets a weight. ``ancestor_weights``: "each"
    ancestor gets the kind's weight, or they "share" it equally (the constraints' sum
    then stays the same however many ancestors there are).
    """
    if ancestor_weights not in ("each", "share"):
        raise ValueError(f"unknown ancestor_weights {ancestor_weights!r}; choose each or share")
    kinds = METHOD_KINDS[parse_method(str(method))]
    full = full_weights(weights)
    targets = sorted(active)
    if against == "last":
        targets = targets[-1:]
    elif against != "all":
        raise ValueError(f"unknown --against {against!r}; choose all or last")
    scale = 1.0 / len(targets) if ancestor_weights == "share" and targets else 1.0
    return [(k, kind.value, full[kind] * scale) for k in targets for kind in kinds]


OWED = Metric.BACKFILL_OWED  # metric row (g, k, 1.0): g was promoted owing k a full backfill


def owed_backfill(lineage: Lineage) -> list[int]:
    """Generations whose items the champion must re-embed in full before anything else:
    it was promoted though incompatible with them (``on_incompatible=backfill``), and they
    still hold gallery items. Every backfill under that champion starts with them, so a
    cycle killed before its backfill, or a manual ``graceful backfill``, still pays it."""
    champion = lineage.champion()
    if champion is None:
        return []
    held = lineage.gallery_counts()
    return sorted(
        int(k) for a, k, v in lineage.metric(OWED) if a == champion.id and v and held.get(int(k))
    )


DEBT = Metric.DEBT_ITEMS  # metric row (g, g, n): g was promoted owing n items (store.debts)


def owed_items(lineage: Lineage) -> np.ndarray:
    """Collection items the champion still owes a re-embedding (its targeted backfill,
    flows/targeted.py): the debt's items not yet embedded by the champion. Every backfill
    under that champion re-embeds them first, so a cycle killed before or during its
    backfill, or a manual ``graceful backfill``, still pays them."""
    champion = lineage.champion()
    none = np.zeros(0, dtype=np.int64)
    if champion is None:
        return none
    n = next((v for a, b, v in lineage.metric(DEBT) if a == b == champion.id), None)
    if not n:
        return none
    debt = load_debt(int(champion.id), expected=int(round(n)))  # type: ignore[arg-type]
    collection = Collection(lineage)
    if collection.info() is None:
        return none
    stale = []
    for _, batch in collection.iter_batches(["item_id", "generation"]):
        ids = batch.column(0).to_numpy()
        keep = np.isin(ids, debt) & (batch.column(1).to_numpy() != champion.id)
        stale.append(ids[keep])
    return np.sort(np.concatenate(stale)).astype(np.int64) if stale else none


def retire_unused(lineage: Lineage) -> list[tuple[int, str]]:
    """Retire the promoted generations no longer active: no items left in the collection,
    neither pinned nor champion (:func:`active_generations`)."""
    active = active_generations(lineage)
    retired = []
    for gen in lineage.generations():
        if gen.status == GenerationStatus.PROMOTED and not gen.retired and gen.id not in active:
            reason = f"generation {gen.id} has no items left in the collection (backfilled away)"
            lineage.retire(int(gen.id), reason)  # type: ignore[arg-type]
            retired.append((int(gen.id), reason))  # type: ignore[arg-type]
    return retired


EVALUATED = (GenerationStatus.TRAINED, GenerationStatus.PROMOTED, GenerationStatus.REJECTED)


def ancestors_of(lineage: Lineage, gen_id: int) -> list[Generation]:
    """Earlier generations that trained successfully (evaluation compares against all)."""
    return [
        g
        for g in lineage.generations()
        if g.id < gen_id and g.status in EVALUATED and g.checkpoint_path
    ]

"""The constraint chain: which earlier generations constrain the next, and retirement."""

from __future__ import annotations

from store.lineage import Generation, Lineage

KINDS_BY_METHOD = {
    "none": (),
    "bct": ("influence",),
    "pct": ("focal",),
    "bct+pct": ("influence", "focal"),
    # + an embedding-level pull toward each ancestor's embeddings (best AC in bench/compat)
    "bct+pct+emb": ("influence", "focal", "embedding"),
}


def active_generations(lineage: Lineage) -> list[int]:
    """Earlier generations still in use: items in the gallery, pinned, or serving as champion."""
    in_gallery = set(lineage.gallery_counts())
    active = []
    for gen in lineage.generations():
        if gen.status != "promoted" or gen.retired:
            continue
        if gen.id in in_gallery or gen.pinned or gen.is_champion:
            active.append(int(gen.id))  # type: ignore[arg-type]
    return active


def plan_constraints(
    active: list[int],
    method: str,
    against: str,
    influence_weight: float,
    focal_weight: float,
    embedding_weight: float = 0.0,
) -> list[tuple[int, str, float]]:
    """(target, kind, weight) for each constraint of the next generation."""
    if method not in KINDS_BY_METHOD:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(KINDS_BY_METHOD)}")
    targets = sorted(active)
    if against == "last":
        targets = targets[-1:]
    elif against != "all":
        raise ValueError(f"unknown --against {against!r}; choose all or last")
    weights = {"influence": influence_weight, "focal": focal_weight, "embedding": embedding_weight}
    return [(k, kind, weights[kind]) for k in targets for kind in KINDS_BY_METHOD[method]]


def retire_unused(lineage: Lineage) -> list[tuple[int, str]]:
    """Retire promoted generations with no items left in the gallery (unless pinned/champion)."""
    counts = lineage.gallery_counts()
    retired = []
    for gen in lineage.generations():
        if gen.status != "promoted" or gen.retired or gen.pinned or gen.is_champion:
            continue
        if counts.get(int(gen.id), 0) == 0:  # type: ignore[arg-type]
            reason = f"generation {gen.id} has no items left in the gallery (backfilled away)"
            lineage.retire(int(gen.id), reason)  # type: ignore[arg-type]
            retired.append((int(gen.id), reason))  # type: ignore[arg-type]
    return retired


def ancestors_of(lineage: Lineage, gen_id: int) -> list[Generation]:
    """Earlier generations that trained successfully (evaluation compares against all)."""
    return [
        g
        for g in lineage.generations()
        if g.id < gen_id and g.status in ("trained", "promoted", "rejected") and g.checkpoint_path
    ]

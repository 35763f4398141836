"""Backfill policies: the order in which gallery items are re-embedded, and the budget.

Every policy orders the *stale* items (those not yet embedded by the target generation)
from per-item columns only, so the order can be computed from a streaming pass over the
gallery; none needs a forward pass of the new model.

- ``random``: a seeded pseudo-random order (a hash of item id and seed, so the order
  does not depend on how the gallery is read);
- ``oldest-first``: items of the oldest generation first, in seeded random order inside a
  generation (item ids may follow insertion time or content; the hash does not);
- ``uncertainty``: the smallest stored margin (top-1 minus top-2 class probability of
  the generation that embedded the item) first;
- ``representative`` (designed here): coverage first, then confidence. The stale old
  embeddings are cut into ``k`` strata by spherical k-means (k = twice the number of
  classes; centroids trained on a seeded sample, so two streaming passes suffice). Every
  stratum is backfilled at the same rate, and inside a stratum the items its generation
  was most certain about (largest stored margin) go first. Why: in a mixed gallery the
  newly embedded items are closer to new queries than any old item, so whatever is
  backfilled first captures the queries of its neighbourhood. Backfilling uncertain
  items first plants boundary items that capture queries of other classes (the curve
  dips below its start), and a confidence order without strata starves the modes the
  old generation was unsure of (e.g. classes it never saw). Strata give every mode its
  share; confidence makes that share the mode's core.

Whatever the policy, ``retire_below`` moves the items of generations that hold only a
few stale items to the front (:func:`tails_first`): those generations then leave the
gallery within the budget and retire, so the number of ancestors a new generation is
constrained against stays bounded as the chain grows (bench/results/lifelong.md: without
it, the representative policy leaves each generation's least certain items behind for
many cycles, and the constraints of a ten-generation chain grew to 24).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

POLICIES = ("random", "oldest-first", "uncertainty", "representative")
EMBEDDING_POLICIES = frozenset({"representative"})  # need the old embeddings (streamed)
SAMPLE_PER_STRATUM = 256  # k-means training points per stratum (faiss's default cap)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"unknown backfill policy {policy!r}; choose one of {', '.join(POLICIES)}")


def budget_items(budget: float, n_items: int) -> int:
    """A budget <= 1 is a fraction of the collection, above 1 a count of items."""
    if budget < 0:
        raise ValueError(f"the backfill budget must be >= 0, got {budget}")
    n = round(budget * n_items) if budget <= 1 else int(budget)
    return min(n, n_items)


def item_hash(item_id: np.ndarray, seed: int = 0) -> np.ndarray:
    """A seeded 64-bit hash of each item id (splitmix64): order-independent randomness."""
    z = np.array(item_id, dtype=np.uint64)  # a copy; the rest is in place
    with np.errstate(over="ignore"):
        z += (np.uint64(seed) + np.uint64(1)) * _GOLDEN
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def _tie(ids: np.ndarray, seed: int, chunk: int = 1 << 18) -> np.ndarray:
    """The hash's top 32 bits, computed in chunks: the sort key of the random order and
    the tie-breaker of the others, at 4 bytes an item."""
    out = np.empty(len(ids), dtype=np.uint32)
    for i in range(0, len(ids), chunk):
        out[i : i + chunk] = item_hash(ids[i : i + chunk], seed) >> np.uint64(32)
    return out


def n_strata(num_classes: int | None) -> int:
    """Strata of the ``representative`` policy: two per class the champion knows.

    Measured on Fashion-MNIST: fewer strata than classes starve modes (k = 6 regressed
    recovery to 0.6), 1.6x to 2.4x the classes were equally good.
    """
    return max(2, 2 * int(num_classes or 10))


def train_strata(sample: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Spherical k-means centroids (at most ``k``, at most one per sample point)."""
    import faiss

    x = np.ascontiguousarray(sample, dtype=np.float32).copy()
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"need a non-empty (n, d) sample, got shape {x.shape}")
    faiss.normalize_L2(x)
    k = max(1, min(int(k), len(x)))
    if k == 1:
        c = x.mean(axis=0, keepdims=True)
        return c / max(float(np.linalg.norm(c)), 1e-12)
    km = faiss.Kmeans(
        x.shape[1], k, niter=20, seed=int(seed) + 1, spherical=True, min_points_per_centroid=1
    )
    km.train(x)
    return np.asarray(km.centroids, dtype=np.float32)


def assign_strata(centroids: np.ndarray, emb: np.ndarray) -> np.ndarray:
    """The stratum (nearest centroid by cosine) of each embedding."""
    x = np.asarray(emb, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return np.argmax(x @ np.asarray(centroids, dtype=np.float32).T, axis=1).astype(np.int32)


def strata_of(
    embedding: np.ndarray, generation: np.ndarray, target: int, k: int, seed: int = 0
) -> np.ndarray:
    """In memory: strata for every row (trained on the stale rows); -1 for fresh rows."""
    stale = np.asarray(generation) != target
    out = np.full(len(stale), -1, dtype=np.int32)
    if stale.any():
        old = np.asarray(embedding)[stale]
        out[stale] = assign_strata(train_strata(old, k, seed), old)
    return out


def _representative(
    ids: np.ndarray, margins: np.ndarray, strata: np.ndarray, tie: np.ndarray
) -> np.ndarray:
    """Positions: strata advance at equal rates; most certain first inside a stratum."""
    if len(ids) == 0:
        return np.zeros(0, dtype=np.int64)
    by_stratum = np.lexsort((tie, -margins, strata))
    bounds = np.flatnonzero(np.diff(strata[by_stratum])) + 1
    frac = np.empty(len(ids), dtype=np.float32)  # 4 bytes an item: galleries are big
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(ids)], strict=True):
        frac[by_stratum[lo:hi]] = (np.arange(hi - lo, dtype=np.float64) + 0.5) / (hi - lo)
    del by_stratum
    return np.lexsort((tie, frac))


def backfill_order(
    item_id: np.ndarray,
    generation: np.ndarray,
    margin: np.ndarray,
    target: int,
    policy: str,
    seed: int = 0,
    strata: np.ndarray | None = None,
    retire_below: int = 0,
    complete: Sequence[int] = (),
    first_items: np.ndarray | None = None,
) -> np.ndarray:
    """Item ids not yet embedded by ``target``, first to backfill first.

    ``strata`` (aligned with the rows; see :func:`strata_of`) is needed by
    ``representative``. The items of the generations in ``complete`` (which must leave
    the gallery) come first, then those of generations with at most ``retire_below``
    stale items (:func:`tails_first`), each group in policy order; the items in
    ``first_items`` (a targeted backfill's debt) come before all of them.
    """
    check_policy(policy)
    item_id, generation, margin = (np.asarray(a) for a in (item_id, generation, margin))
    stale_mask = generation != target
    if stale_mask.all():  # views, not copies: a full backfill of a big gallery
        stale: np.ndarray | slice = slice(None)
        ids, gens, margins = item_id, generation, margin
    else:
        stale = np.flatnonzero(stale_mask)
        ids, gens, margins = item_id[stale], generation[stale], margin[stale]
    del stale_mask
    tie = _tie(ids, seed)
    if policy == "random":
        order = np.lexsort((ids, tie))
    elif policy == "oldest-first":
        order = np.lexsort((tie, gens))
    elif policy == "uncertainty":
        order = np.lexsort((ids, margins))
    else:  # representative
        if strata is None:
            raise ValueError("the representative policy needs the strata of the old embeddings")
        order = _representative(ids, margins, np.asarray(strata)[stale], tie)
    if retire_below > 0:
        order = order[tails_first(gens[order], retire_below)]
    if len(complete):
        order = order[generations_first(gens[order], complete)]
    if first_items is not None and len(first_items):
        front = np.isin(ids[order], np.asarray(first_items, dtype=np.int64))
        order = np.concatenate([order[front], order[~front]])
    return np.asarray(ids[order], dtype=np.int64)


def generations_first(gens: np.ndarray, first: Sequence[int]) -> np.ndarray:
    """A stable reordering of positions: rows of the generations ``first`` come first."""
    front = np.isin(np.asarray(gens), np.asarray(list(first), dtype=np.int64))
    return np.concatenate([np.flatnonzero(front), np.flatnonzero(~front)])


def tails_first(gens: np.ndarray, retire_below: int) -> np.ndarray:
    """A stable reordering of positions: rows of generations with at most
    ``retire_below`` rows come first (each part keeps its order)."""
    values, counts = np.unique(np.asarray(gens), return_counts=True)
    return generations_first(gens, values[counts <= retire_below].tolist())

"""Backfill policies: the order in which gallery items are re-embedded, and the budget."""

from __future__ import annotations

import numpy as np

POLICIES = ("random", "oldest-first", "uncertainty")


def budget_items(budget: float, n_items: int) -> int:
    """A budget <= 1 is a fraction of the gallery, above 1 a count of items."""
    if budget < 0:
        raise ValueError(f"the backfill budget must be >= 0, got {budget}")
    n = round(budget * n_items) if budget <= 1 else int(budget)
    return min(n, n_items)


def backfill_order(
    item_id: np.ndarray,
    generation: np.ndarray,
    margin: np.ndarray,
    target: int,
    policy: str,
    seed: int = 0,
) -> np.ndarray:
    """Item ids not yet embedded by ``target``, first to backfill first.

    - ``random``: a seeded permutation;
    - ``oldest-first``: items of the oldest generation first (then by item id);
    - ``uncertainty``: the smallest stored margin (top-1 minus top-2 probability) first.
    """
    stale = np.flatnonzero(np.asarray(generation) != target)
    ids, gens, margins = item_id[stale], generation[stale], margin[stale]
    if policy == "random":
        order = np.random.default_rng(seed).permutation(len(ids))
    elif policy == "oldest-first":
        order = np.lexsort((ids, gens))
    elif policy == "uncertainty":
        order = np.lexsort((ids, margins))
    else:
        raise ValueError(f"unknown backfill policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return np.asarray(ids[order], dtype=np.int64)

"""What users meet: a search's served state per class, and where a backfill must reach.

After a cycle, users' queries are embedded by the champion and searched against the
collection as its backfill left it: a mix of items embedded by several generations. On
the evaluation set this is simulated with its two halves: the *reference* half stands
for the collection (each item embedded by the generation that holds it, or by the
candidate where a backfill would re-embed it: :func:`mixed_reference`), the *query*
half for users' queries. A query is served well when its nearest reference item is of
its class (:func:`top1_hits`).

:func:`served_by_class` compares two served states on the same queries, class by class:
the paired difference of hit rates of each class's queries with a paired bootstrap
interval at a level corrected for the number of classes compared (Bonferroni: each
class at ``1 - (1 - confidence) / C``), so "no class is worse with evidence" (no
interval entirely below 0) holds for all classes at once with probability at least
``confidence`` when none is truly worse.

:func:`targeted_selection` finds the items of an old generation's collection that fall
in classes where compatibility is lost, without a forward pass and without labels: the
nearest class prototype in that generation's own space (its mean embedding of each
class's reference items, :func:`class_prototypes`) names the class of each stored
embedding.

These are the pieces of the three-outcome gate of issue 17 (promote, promote with a
targeted backfill, reject); each has a hand-computed test (tests/unit/test_served.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workers.stats import PairedCounts, paired_bootstrap_ci_counts


@dataclass(frozen=True)
class ClassDelta:
    """One class's served hit rate, new minus old, on the same queries."""

    cls: int
    delta: float
    lo: float
    hi: float
    queries: int
    gain: int  # queries the new state serves and the old did not
    loss: int  # and the other way round

    @property
    def worse(self) -> bool:
        """Worse with evidence: the whole interval below 0."""
        return self.hi < 0


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def top1_hits(
    query_emb: np.ndarray, query_y: np.ndarray, ref_emb: np.ndarray, ref_y: np.ndarray
) -> np.ndarray:
    """Per query: whether its nearest reference item (cosine) is of its class."""
    nearest = np.argmax(_unit(query_emb) @ _unit(ref_emb).T, axis=1)
    return np.asarray(ref_y)[nearest] == np.asarray(query_y)


def mixed_reference(current: np.ndarray, candidate: np.ndarray, replaced: np.ndarray) -> np.ndarray:
    """The reference embeddings once the items in ``replaced`` are re-embedded by the
    candidate (the others keep the embedding of the generation that holds them)."""
    return np.where(np.asarray(replaced, dtype=bool)[:, None], candidate, current)


def served_by_class(
    new_hits: np.ndarray,
    old_hits: np.ndarray,
    query_y: np.ndarray,
    *,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> list[ClassDelta]:
    """Per class of the queries: new hit rate minus old, with its paired bootstrap
    interval at the Bonferroni-corrected level (see the module docstring)."""
    new_hits, old_hits = np.asarray(new_hits, bool), np.asarray(old_hits, bool)
    query_y = np.asarray(query_y)
    classes = np.unique(query_y)
    level = 1 - (1 - confidence) / max(1, len(classes))
    out = []
    for c in classes.tolist():
        m = query_y == c
        gain = int((new_hits[m] & ~old_hits[m]).sum())
        loss = int((~new_hits[m] & old_hits[m]).sum())
        counts = PairedCounts(int(m.sum()), gain, loss)
        ci = paired_bootstrap_ci_counts(counts, confidence=level, resamples=resamples, seed=seed)
        out.append(ClassDelta(int(c), counts.delta, ci.lo, ci.hi, counts.n, gain, loss))
    return out


def class_prototypes(emb: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    """Per class, the normalised mean of its items' embeddings (zero rows: no items)."""
    emb, y = _unit(emb), np.asarray(y, dtype=np.int64)
    sums = np.zeros((num_classes, emb.shape[1]))
    np.add.at(sums, y, emb)
    return _unit(sums)


def targeted_selection(
    item_emb: np.ndarray, prototypes: np.ndarray, classes: list[int] | np.ndarray
) -> np.ndarray:
    """Items (rows of an old generation's stored embeddings) whose nearest prototype in
    that generation's space is one of ``classes``: a boolean mask."""
    if len(item_emb) == 0:
        return np.zeros(0, dtype=bool)
    present = np.linalg.norm(prototypes, axis=1) > 0  # classes without reference items
    scores = _unit(item_emb) @ prototypes.T
    scores[:, ~present] = -np.inf
    return np.isin(np.argmax(scores, axis=1), np.asarray(list(classes), dtype=np.int64))

"""What users meet: a search's served state per class, and where a backfill must reach.

After a cycle, users' queries are embedded by the champion and searched against the
collection as its backfill left it: a mix of items embedded by several generations. On
the evaluation set this is simulated with its two halves: the *reference* half stands
for the collection (each item embedded by the generation that holds it, or by the
candidate where a backfill would re-embed it: :func:`mixed_reference`), the *query*
half for users' queries. A query is served well when its nearest reference item is of
its class: the evaluation's own retrieval hit
(:func:`workers.measuring.metrics.retrieval_hits`), so served state and C[a][b] agree.

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

:func:`plan_targeted` puts them together for the gate (flows/gate.py): starting from no
re-embedding, it adds one class at a time, the one whose served search is worst with
evidence (or, when no single class is but the whole is, the lowest), and judges again,
until no class and not the whole is worse, or nothing is left to add.
:func:`collection_selection` then finds the same classes' items in the real collection,
from the stored embeddings alone.

Each piece has a hand-computed test (tests/unit/test_served.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from workers.measuring.metrics import retrieval_hits
from workers.measuring.stats import paired_bootstrap_ci_counts, paired_counts


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
        d = overall_delta(
            new_hits[m], old_hits[m], confidence=level, resamples=resamples, seed=seed
        )
        out.append(replace(d, cls=int(c)))
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
    return np.isin(_nearest(item_emb, prototypes), np.asarray(list(classes), dtype=np.int64))


def _nearest(emb: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """Per row of ``emb``, its nearest prototype's class (cosine)."""
    scores = _unit(emb) @ prototypes.T
    scores[:, ~(np.linalg.norm(prototypes, axis=1) > 0)] = -np.inf  # classes without items
    return np.argmax(scores, axis=1)


def overall_delta(
    new_hits: np.ndarray,
    old_hits: np.ndarray,
    *,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> ClassDelta:
    """All queries' served hit rate, new minus old, with its paired bootstrap interval
    at ``confidence`` (``cls`` is -1)."""
    if len(new_hits) == 0:
        return ClassDelta(-1, 0.0, 0.0, 0.0, 0, 0, 0)
    counts = paired_counts(new_hits, old_hits)
    ci = paired_bootstrap_ci_counts(counts, confidence=confidence, resamples=resamples, seed=seed)
    return ClassDelta(-1, counts.delta, ci.lo, ci.hi, counts.n, counts.gain, counts.loss)


@dataclass
class ServedView:
    """The evaluation set as the served state is simulated on it.

    ``query_y`` / ``ref_y``: the classes of the query and reference halves;
    ``champion_q``: the current champion's query embeddings (None: there is none);
    ``candidate_q`` / ``candidate_ref``: the candidate's; ``held_by``: per reference item,
    the generation whose embedding users meet now (as the collection holds it);
    ``ref_by_gen``: each such generation's embeddings of the reference half.
    """

    query_y: np.ndarray
    ref_y: np.ndarray
    champion_q: np.ndarray | None
    candidate_q: np.ndarray
    candidate_ref: np.ndarray
    held_by: np.ndarray
    ref_by_gen: dict[int, np.ndarray] = field(default_factory=dict)

    def current_ref(self) -> np.ndarray:
        """The reference half as users meet it now (each item by its holder)."""
        out = np.array(self.candidate_ref, dtype=np.float64, copy=True)
        for gen, emb in self.ref_by_gen.items():
            m = self.held_by == gen
            out[m] = emb[m]
        return out


@dataclass
class ServedPlan:
    """The served state a candidate would leave, and what it must re-embed for it.

    ``classes``: the classes whose old-embedded items are re-embedded (in each holder's
    own space); ``replaced``: those reference items; ``deltas`` per class and ``overall``:
    served after the plan minus now; ``feasible``: no class and not the whole is worse
    with evidence; ``regressed``: queries served now that the candidate without any
    re-embedding would lose, ``recovered``: how many of them the plan serves again.
    """

    classes: list[int]
    replaced: np.ndarray
    deltas: list[ClassDelta]
    overall: ClassDelta
    feasible: bool
    regressed: int
    recovered: int

    @property
    def worse(self) -> list[ClassDelta]:
        return [d for d in self.deltas if d.worse]


def item_classes(
    view: ServedView, movable: Iterable[int], num_classes: int
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Per reference item, the class its holder's space places it in (nearest prototype)
    where the holder is ``movable`` (its items may be re-embedded), else -1; and each
    movable holder's prototypes (for :func:`collection_selection`)."""
    placed = np.full(len(view.ref_y), -1, dtype=np.int64)
    protos: dict[int, np.ndarray] = {}
    for gen in sorted(set(movable) & set(view.ref_by_gen)):
        emb = view.ref_by_gen[gen]
        protos[gen] = class_prototypes(emb, view.ref_y, num_classes)
        m = view.held_by == gen
        if m.any():
            placed[m] = _nearest(emb[m], protos[gen])
    return placed, protos


def plan_targeted(
    view: ServedView,
    movable: Iterable[int],
    num_classes: int,
    *,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
    greedy: bool = True,
    replace_gens: Iterable[int] = (),
) -> ServedPlan:
    """The smallest class-by-class re-embedding (greedy, see the module docstring) after
    which the candidate's served state is not worse than now; ``greedy=False`` judges
    the state with nothing re-embedded but the items of ``replace_gens`` (generations
    owed a full backfill, or every item where no collection is indexed yet)."""
    current = view.current_ref()
    users_q = view.champion_q if view.champion_q is not None else view.candidate_q
    old = retrieval_hits(users_q, view.query_y, current, view.ref_y)
    placed, _ = item_classes(view, movable, num_classes)
    selectable = set(np.unique(placed[placed >= 0]).tolist())
    chosen: list[int] = []
    base: np.ndarray | None = None
    full = np.isin(view.held_by, np.asarray(list(replace_gens), dtype=np.int64))
    while True:
        replaced = full | (np.isin(placed, chosen) & (placed >= 0))
        ref = mixed_reference(current, view.candidate_ref, replaced)
        new = retrieval_hits(view.candidate_q, view.query_y, ref, view.ref_y)
        base = new if base is None else base
        deltas = served_by_class(
            new, old, view.query_y, confidence=confidence, resamples=resamples, seed=seed
        )
        whole = overall_delta(new, old, confidence=confidence, resamples=resamples, seed=seed)
        feasible = not any(d.worse for d in deltas) and not whole.worse
        left = selectable - set(chosen)
        if feasible or not greedy or not left:
            lost = old & ~base
            return ServedPlan(
                sorted(chosen),
                replaced,
                deltas,
                whole,
                feasible,
                int(lost.sum()),
                int((lost & new).sum()),
            )
        # one class at a time, the worst with evidence first (lowest upper bound): moving
        # one class's items also moves what its queries and its neighbours' meet, so the
        # next step is judged again (measured: fewer items than adding every worse class)
        worse = [d for d in deltas if d.worse and d.cls in left]
        if worse:
            chosen.append(min(worse, key=lambda d: (d.hi, d.cls)).cls)
        else:  # no worse class can move, or only the whole is worse: the lowest delta
            chosen.append(min((d for d in deltas if d.cls in left), key=lambda d: d.delta).cls)


def collection_selection(
    batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    prototypes: Mapping[int, np.ndarray],
    classes: Iterable[int],
) -> np.ndarray:
    """Item ids of the collection to re-embed: of each (item_id, generation, embedding)
    batch, the items of a generation in ``prototypes`` whose nearest prototype in that
    generation's space is one of ``classes`` (no forward pass, no labels)."""
    wanted = np.asarray(sorted(set(classes)), dtype=np.int64)
    out: list[np.ndarray] = []
    for ids, gens, emb in batches:
        for gen, protos in prototypes.items():
            m = np.asarray(gens) == gen
            if m.any():
                out.append(np.asarray(ids)[m][targeted_selection(emb[m], protos, wanted)])
    return np.sort(np.concatenate(out)).astype(np.int64) if out else np.zeros(0, np.int64)

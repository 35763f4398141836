"""Evaluation metrics for graceful model updates.

Classification (generation ``g`` = "new", ancestor ``k`` = "old"):
accuracy, negative/positive flip rates (NFR/PFR), negative flip impact (NFI),
backward trust/error compatibility (BTC/BEC) and the any-ancestor NFR.

Retrieval: cosine nearest neighbours (faiss ``IndexFlatIP`` on L2-normalised
float32 copies), top-1 accuracy, mAP@K, the cross-generation compatibility
matrix ``C[a][b]`` (queries by generation ``a``, gallery by generation
``b <= a``), empirical compatibility (ECC), AC/AM, update gain and backfill
curve summaries (area, no-regret).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import faiss
import numpy as np

from workers.measuring.metric_names import Metric

# --------------------------------------------------------------------------- validation


def _labels(y: np.ndarray, name: str = "y") -> np.ndarray:
    """Return ``y`` as a non-empty 1-D array or raise ``ValueError``."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    return arr


def _preds(pred: np.ndarray, y: np.ndarray, name: str = "pred") -> np.ndarray:
    """Return ``pred`` as a 1-D array of the same length as ``y``."""
    arr = np.asarray(pred)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.shape[0] != y.shape[0]:
        raise ValueError(f"length mismatch: {name} has {arr.shape[0]} entries, y has {y.shape[0]}")
    return arr


def _embeddings(emb: np.ndarray, name: str) -> np.ndarray:
    """Return a C-contiguous float32 copy of a non-empty, finite 2-D embedding matrix."""
    arr = np.asarray(emb)
    if arr.ndim != 2:
        raise ValueError(f"{name} embeddings must be 2-D (n, dim), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} embeddings are empty (0 rows)")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} embeddings have dimension 0")
    out = np.array(arr, dtype=np.float32, order="C", copy=True)
    if np.isnan(out).any():
        raise ValueError(f"{name} embeddings contain NaN")
    if not np.isfinite(out).all():
        raise ValueError(f"{name} embeddings contain inf")
    return out


def _query_gallery(query: np.ndarray, gallery: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated query and gallery embeddings of one dimension."""
    q = _embeddings(query, "query")
    g = _embeddings(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise ValueError(
            f"embedding dim mismatch: queries have {q.shape[1]}, gallery has {g.shape[1]}"
        )
    return q, g


def _retrieval_inputs(
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    gallery_emb: np.ndarray,
    gallery_labels: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate a retrieval problem; return (queries, query labels, gallery, gallery labels)."""
    q, g = _query_gallery(query_emb, gallery_emb)
    ql = _labels(query_labels, "query_labels")
    gl = _labels(gallery_labels, "gallery_labels")
    for name, emb, labels in (("query", q, ql), ("gallery", g, gl)):
        if labels.shape[0] != emb.shape[0]:
            raise ValueError(
                f"length mismatch: {emb.shape[0]} {name} embeddings but {labels.shape[0]} "
                f"{name} labels"
            )
    return q, ql, g, gl


# --------------------------------------------------------------------------- classification


def accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    """acc = mean 1[pred == y]."""
    yy = _labels(y)
    return float(np.mean(_preds(pred, yy) == yy))


def flip_metrics(new: np.ndarray, old: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """All pairwise flip metrics: {"nfr", "pfr", "nfi", "btc", "bec"} (see each one's own)."""
    yy = _labels(y)
    new_right, old_right = _preds(new, yy, "new") == yy, _preds(old, yy, "old") == yy
    neg_flips = float(np.mean(old_right & ~new_right))
    n_new_wrong, n_old_right = int((~new_right).sum()), int(old_right.sum())
    return {
        Metric.NFR: neg_flips,
        Metric.PFR: float(np.mean(~old_right & new_right)),
        Metric.NFI: neg_flips / float(np.mean(~new_right)) if n_new_wrong else 0.0,
        Metric.BTC: int((new_right & old_right).sum()) / n_old_right if n_old_right else 1.0,
        Metric.BEC: int((~new_right & ~old_right).sum()) / n_new_wrong if n_new_wrong else 1.0,
    }


def nfr(new: np.ndarray, old: np.ndarray, y: np.ndarray) -> float:
    """Negative flip rate: mean 1[old right and new wrong]."""
    return flip_metrics(new, old, y)[Metric.NFR]


def pfr(new: np.ndarray, old: np.ndarray, y: np.ndarray) -> float:
    """Positive flip rate: mean 1[old wrong and new right]."""
    return flip_metrics(new, old, y)[Metric.PFR]


def nfi(new: np.ndarray, old: np.ndarray, y: np.ndarray) -> float:
    """Negative flip impact: NFR / (1 - acc(new)); 0.0 when the new model makes no errors."""
    return flip_metrics(new, old, y)[Metric.NFI]


def btc(new: np.ndarray, old: np.ndarray, y: np.ndarray) -> float:
    """Backward trust compatibility: #(both right) / #(old right); 1.0 if old got none right."""
    return flip_metrics(new, old, y)[Metric.BTC]


def bec(new: np.ndarray, old: np.ndarray, y: np.ndarray) -> float:
    """Backward error compatibility: #(both wrong) / #(new wrong); 1.0 if new made no errors."""
    return flip_metrics(new, old, y)[Metric.BEC]


def nfr_any(new: np.ndarray, olds: Sequence[np.ndarray], y: np.ndarray) -> float:
    """mean 1[(some ancestor right) and new wrong]; 0.0 for no ancestors."""
    yy = _labels(y)
    new_right = _preds(new, yy, "new") == yy
    if len(olds) == 0:
        return 0.0
    any_right = np.zeros(yy.shape[0], dtype=bool)
    for i, old in enumerate(olds):
        any_right |= _preds(old, yy, f"olds[{i}]") == yy
    return float(np.mean(any_right & ~new_right))


# --------------------------------------------------------------------------- retrieval


def _search(q: np.ndarray, g: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine top-k on already validated float32 copies (normalised in place)."""
    faiss.normalize_L2(q)
    faiss.normalize_L2(g)
    index = faiss.IndexFlatIP(g.shape[1])
    index.add(g)
    return index.search(q, min(k, g.shape[0]))


def nearest_neighbors(
    query: np.ndarray, gallery: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine top-k neighbours: (scores, indices), each (n_query, min(k, n_gallery))."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return _search(*_query_gallery(query, gallery), k)


def retrieval_top1(
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    gallery_emb: np.ndarray,
    gallery_labels: np.ndarray,
) -> float:
    """Fraction of queries whose nearest gallery item carries the query's label."""
    return float(np.mean(retrieval_hits(query_emb, query_labels, gallery_emb, gallery_labels)))


def retrieval_hits(
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    gallery_emb: np.ndarray,
    gallery_labels: np.ndarray,
) -> np.ndarray:
    """Per query: whether its nearest gallery item carries its label (mean = top-1)."""
    q, ql, g, gl = _retrieval_inputs(query_emb, query_labels, gallery_emb, gallery_labels)
    _, idx = _search(q, g, 1)
    return gl[idx[:, 0]] == ql


def retrieval_map_at_k(
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    gallery_emb: np.ndarray,
    gallery_labels: np.ndarray,
    k: int = 100,
) -> float:
    """mAP@K with AP@K = (1/min(K, n_rel)) sum_{i<=K} P@i rel_i; n_rel = 0 gives AP 0.

    K is clipped to the gallery size.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q, ql, g, gl = _retrieval_inputs(query_emb, query_labels, gallery_emb, gallery_labels)
    kk = min(k, g.shape[0])
    _, idx = _search(q, g, kk)
    rel = gl[idx] == ql[:, None]  # (n_query, kk)
    hits = np.cumsum(rel, axis=1)
    prec = hits / np.arange(1, kk + 1)
    uniq, counts = np.unique(gl, return_counts=True)
    per_label = dict(zip(uniq.tolist(), counts.tolist(), strict=True))
    n_rel = np.array([per_label.get(lab, 0) for lab in ql.tolist()], dtype=np.float64)
    denom = np.minimum(kk, n_rel)
    summed = (prec * rel).sum(axis=1)
    ap = np.divide(summed, denom, out=np.zeros_like(summed), where=denom > 0)
    return float(ap.mean())


def compat_matrix(
    query_embs: Mapping[int, np.ndarray],
    gallery_embs: Mapping[int, np.ndarray],
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    k: int = 100,
) -> dict[tuple[int, int], dict[str, float]]:
    """C[(a, b)] = {"top1", "map100"} for queries by generation a vs gallery by b, b <= a.

    Pairs range over ``a`` in ``query_embs`` and ``b`` in ``gallery_embs``.
    """
    out: dict[tuple[int, int], dict[str, float]] = {}
    for a in sorted(query_embs):
        for b in sorted(gallery_embs):
            if b > a:
                continue
            qa, gb = query_embs[a], gallery_embs[b]
            out[(a, b)] = {
                "top1": retrieval_top1(qa, query_labels, gb, gallery_labels),
                "map100": retrieval_map_at_k(qa, query_labels, gb, gallery_labels, k=k),
            }
    return out


def ecc(c_ab: float, c_bb: float) -> bool:
    """Empirical compatibility criterion: C[a][b] > C[b][b] (strict)."""
    return bool(c_ab > c_bb)


def ecc_on_classes(
    cross_hits: np.ndarray,
    own_hits: np.ndarray,
    query_labels: np.ndarray,
    classes: Iterable[int],
) -> bool | None:
    """ECC(a, b) on the queries of ``classes`` only: the mean of ``cross_hits`` (a's
    queries against b's gallery, per query) above the mean of ``own_hits`` (b's own);
    None when no query is of those classes (AC on a partition of the classes)."""
    m = np.isin(np.asarray(query_labels), np.asarray(sorted(set(classes)), dtype=np.int64))
    if not m.any():
        return None
    return ecc(float(np.asarray(cross_hits)[m].mean()), float(np.asarray(own_hits)[m].mean()))


def ac(top1: Mapping[tuple[int, int], float]) -> float:
    """Share of off-diagonal pairs a > b satisfying ECC; nan when there are none."""
    pairs = [(a, b) for (a, b) in top1 if a > b]
    if not pairs:
        return float("nan")
    hits = 0
    for a, b in pairs:
        if (b, b) not in top1:
            raise ValueError(f"missing diagonal entry C[{b}][{b}] needed for pair ({a}, {b})")
        hits += ecc(top1[(a, b)], top1[(b, b)])
    return hits / len(pairs)


def ecc_gap_by_class_group(
    new_hits: np.ndarray,
    old_hits: np.ndarray,
    query_labels: np.ndarray,
    seen_classes: Sequence[int],
) -> dict[str, float | int | None]:
    """C[a][b] - C[b][b] on the queries of classes b trained on ("seen") and on the others.

    ``new_hits`` / ``old_hits``: per query, the top-1 hit of generation a's / b's query
    against b's gallery (``retrieval_hits``; their means are C[a][b] and C[b][b]). A
    group without queries has gap None. Where the two groups' gaps differ, the strict
    criterion's failures come from one kind of class: those an ancestor knew, or those
    it never trained on and embeds only by resemblance.
    """
    new = np.asarray(new_hits, dtype=bool)
    old = np.asarray(old_hits, dtype=bool)
    y = _labels(query_labels, "query_labels")
    if not (len(new) == len(old) == len(y)):
        raise ValueError(f"lengths differ: {len(new)} new, {len(old)} old hits, {len(y)} labels")
    seen = np.isin(y, np.asarray(list(seen_classes), dtype=y.dtype))
    out: dict[str, float | int | None] = {}
    for name, mask in (("seen", seen), ("unseen", ~seen)):
        n = int(mask.sum())
        out[f"{name}_queries"] = n
        out[name] = float(new[mask].mean() - old[mask].mean()) if n else None
    return out


def am(top1: Mapping[tuple[int, int], float]) -> float:
    """Mean of C[a][b] over all stored pairs with b <= a; nan when there are none."""
    vals = [float(v) for (a, b), v in top1.items() if b <= a]
    if not vals:
        return float("nan")
    return float(np.mean(vals))


def update_gain(c_ab: float, c_bb: float, c_aa: float) -> float:
    """(C[a][b] - C[b][b]) / (C[a][a] - C[b][b]); nan when the denominator is 0."""
    denom = c_aa - c_bb
    if denom == 0:
        return float("nan")
    return float((c_ab - c_bb) / denom)


# --------------------------------------------------------------------------- backfill curves


def _curve(curve: Sequence[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Validate a backfill curve; return (beta, metric) sorted by beta."""
    arr = np.asarray(curve, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("backfill curve is empty")
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"backfill curve must be a sequence of (beta, M) pairs, got {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError("backfill curve contains NaN")
    order = np.argsort(arr[:, 0], kind="stable")
    return arr[order, 0], arr[order, 1]


def curve_area(curve: Sequence[tuple[float, float]]) -> float:
    """Normalised area: trapezoid integral of M over beta divided by the beta range.

    A single-point curve (zero range) returns its value.
    """
    beta, m = _curve(curve)
    span = float(beta[-1] - beta[0])
    if span == 0.0:
        return float(np.mean(m))
    return float(np.trapezoid(m, beta) / span)


def no_regret(curve: Sequence[tuple[float, float]], tol: float = 0.0) -> bool:
    """True when M never drops below its value at the smallest beta (beta = 0) minus ``tol``."""
    _, m = _curve(curve)
    return bool(np.all(m >= m[0] - tol))

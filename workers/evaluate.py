"""Evaluation of a generation against every earlier one: flips and retrieval compatibility.

Each generation's outputs on the evaluation split are computed once and cached next to
its checkpoint (keyed by the checkpoint's sha256), so evaluating generation g costs one
forward pass of g plus cached reads of its ancestors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from store.lineage import Generation
from workers import metrics as M
from workers import stats as S
from workers.datasets import Dataset
from workers.embed import Outputs, forward
from workers.metric_names import Metric
from workers.models import load_model
from workers.scenario import eval_split


@dataclass
class EvalOutputs:
    """A generation's outputs on the evaluation split, with the gallery/query split."""

    outputs: Outputs
    gallery_idx: np.ndarray
    query_idx: np.ndarray

    @property
    def prediction(self) -> np.ndarray:
        return self.outputs.prediction

    @property
    def gallery_emb(self) -> np.ndarray:
        return self.outputs.embedding[self.gallery_idx]

    @property
    def query_emb(self) -> np.ndarray:
        return self.outputs.embedding[self.query_idx]


def generation_outputs(gen: Generation, ds: Dataset, cache_dir: Path) -> EvalOutputs:
    """Outputs of ``gen`` on ``ds``'s evaluation split (cached by checkpoint hash)."""
    if not gen.checkpoint_path:
        raise ValueError(f"generation {gen.id} has no checkpoint")
    cache = cache_dir / f"eval-{gen.id}-{(gen.checkpoint_sha256 or 'x')[:16]}.npz"
    if cache.exists():
        z = np.load(cache)
        out = Outputs(z["embedding"], z["prediction"], z["margin"])
    else:
        out = forward(load_model(gen.checkpoint_path, gen.checkpoint_sha256), ds.x_test)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.stem + ".tmp.npz")
        np.savez(tmp, embedding=out.embedding, prediction=out.prediction, margin=out.margin)
        tmp.replace(cache)
    g_idx, q_idx = eval_split(len(ds.y_test))
    return EvalOutputs(out, g_idx, q_idx)


def evaluate_against_ancestors(
    gen: Generation,
    ancestors: Sequence[Generation],
    active: Sequence[int],
    ds: Dataset,
    cache_dir: Path,
) -> list[tuple[int, int, str, float]]:
    """Every metric of ``gen`` against every earlier generation: rows (a, b, metric, value).

    Besides the contract's metrics, each pair (g, k) gets the gate's paired evidence
    (:func:`gate_evidence`: discordant counts, C[g][k] - C[k][k] with its bootstrap
    interval, NFR's exact interval, McNemar's p) and (g, g, ``evidence_confidence``) the
    level of those intervals.
    """
    y = ds.y_test
    new = generation_outputs(gen, ds, cache_dir)
    g = int(gen.id)  # type: ignore[arg-type]
    rows: list[tuple[int, int, str, float]] = [
        (g, g, Metric.ACCURACY, M.accuracy(new.prediction, y))
    ]
    g_idx, q_idx = new.gallery_idx, new.query_idx
    qy, gy = y[q_idx], y[g_idx]

    own = M.compat_matrix({g: new.query_emb}, {g: new.gallery_emb}, qy, gy)[(g, g)]
    rows += [(g, g, Metric.COMPAT_TOP1, own["top1"]), (g, g, Metric.COMPAT_MAP100, own["map100"])]

    olds_active = []
    for anc in ancestors:
        k = int(anc.id)  # type: ignore[arg-type]
        old = generation_outputs(anc, ds, cache_dir)
        for name, value in M.flip_metrics(new.prediction, old.prediction, y).items():
            rows.append((g, k, name, value))
        if k in active:
            olds_active.append(old.prediction)
        cross = M.compat_matrix({g: new.query_emb, k: old.query_emb}, {k: old.gallery_emb}, qy, gy)
        c_gk = cross[(g, k)]
        c_kk = cross[(k, k)]["top1"]
        rows += [
            (g, k, Metric.COMPAT_TOP1, c_gk["top1"]),
            (g, k, Metric.COMPAT_MAP100, c_gk["map100"]),
            (g, k, Metric.ECC, float(M.ecc(c_gk["top1"], c_kk))),
            (g, k, Metric.UPDATE_GAIN, M.update_gain(c_gk["top1"], c_kk, own["top1"])),
        ]
        # a generation recorded without its classes (an older lineage) has no split
        evidence = gate_evidence(new, old, y, anc.classes or None)
        rows += [(g, k, name, value) for name, value in evidence.items()]
    rows.append((g, g, Metric.NFR_ANY, M.nfr_any(new.prediction, olds_active, y)))
    rows.append((g, g, Metric.EVIDENCE_CONFIDENCE, S.DEFAULT_CONFIDENCE))
    return rows


def gate_evidence(
    new: EvalOutputs, old: EvalOutputs, y: np.ndarray, old_classes: Sequence[int] | None = None
) -> dict[str, float | None]:
    """The gate's paired evidence for (new, old) on the same cases (``stats.pair_evidence``).

    Retrieval: per query, the top-1 hit of the new generation's query and of the old one's,
    both against the old generation's gallery (their means are C[g][k] and C[k][k]).
    Classification: per evaluation item, whether each generation predicts its label.
    Intervals at the default confidence; the gate records its own level's over them.
    With ``old_classes`` (the classes the old generation trained on) also C[g][k] - C[k][k]
    on the queries of those classes (``ecc_gap_seen``) and of the others
    (``ecc_gap_unseen``, over ``ecc_unseen_queries``): where compatibility is lost.
    """
    qy, gy = y[new.query_idx], y[new.gallery_idx]
    new_hits = M.retrieval_hits(new.query_emb, qy, old.gallery_emb, gy)
    old_hits = M.retrieval_hits(old.query_emb, qy, old.gallery_emb, gy)
    queries = S.paired_counts(new_hits, old_hits)
    items = S.paired_counts(new.prediction == y, old.prediction == y)
    out: dict[str, float | None] = dict(S.pair_evidence(queries, items))
    if old_classes is not None:
        groups = M.ecc_gap_by_class_group(new_hits, old_hits, qy, old_classes)
        out["ecc_gap_seen"] = groups["seen"]
        out["ecc_gap_unseen"] = groups["unseen"]
        out["ecc_unseen_queries"] = groups["unseen_queries"]
    return out

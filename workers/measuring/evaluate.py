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
from workers.data.datasets import Dataset
from workers.data.scenario import eval_split
from workers.learning.embed import Outputs, forward
from workers.learning.models import load_model
from workers.measuring import metrics as M
from workers.measuring import stats as S
from workers.measuring.metric_names import Metric


@dataclass
class EvalOutputs:
    """A generation's outputs on the evaluation split: its query half and its reference half."""

    outputs: Outputs
    reference_idx: np.ndarray  # the evaluation reference half (what queries search)
    query_idx: np.ndarray

    @property
    def prediction(self) -> np.ndarray:
        return self.outputs.prediction

    @property
    def reference_emb(self) -> np.ndarray:
        return self.outputs.embedding[self.reference_idx]

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


@dataclass(frozen=True)
class PairEvidence:
    """What the gate weighs for the pair (g, k), measured on the same evaluation cases."""

    compat: float  # C[g][k]: g's queries against k's gallery, top-1
    own: float  # C[k][k]
    nfr: float
    queries: S.PairedCounts  # per query: g's top-1 hit vs k's, both against k's gallery
    items: S.PairedCounts  # per evaluation item: g right vs k right
    groups: S.ClassGroupGaps | None = None  # where the gap lies (k's classes known)

    def rows(self, g: int, k: int) -> list[tuple[int, int, str, float | None]]:
        """The evidence as stored metric rows, at the default confidence."""
        rows = [
            (g, k, name, value) for name, value in S.pair_evidence(self.queries, self.items).items()
        ]
        if self.groups is not None:
            rows += [
                (g, k, Metric.ECC_GAP_SEEN, self.groups.seen),
                (g, k, Metric.ECC_GAP_UNSEEN, self.groups.unseen),
                (g, k, Metric.ECC_UNSEEN_QUERIES, self.groups.unseen_queries),
            ]
        return rows


@dataclass(frozen=True)
class Evaluation:
    """Generation g against every earlier generation: the typed evidence the gate decides
    on, and the metric rows the lineage stores (the same numbers)."""

    generation: int
    accuracy: float
    hits: int  # evaluation items g classifies right
    items: int
    chance: float  # the largest class's share: what always answering it scores
    pairs: dict[int, PairEvidence]  # per earlier generation k
    rows: list[tuple[int, int, str, float | None]]


def evaluate_against_ancestors(
    gen: Generation,
    ancestors: Sequence[Generation],
    active: Sequence[int],
    ds: Dataset,
    cache_dir: Path,
) -> Evaluation:
    """Every metric of ``gen`` against every earlier generation, typed and as rows.

    Besides the contract's metrics, each pair (g, k) gets the gate's paired evidence
    (:func:`gate_evidence`: discordant counts, C[g][k] - C[k][k] with its bootstrap
    interval, NFR's exact interval, McNemar's p) and (g, g, ``evidence_confidence``) the
    level of those intervals.
    """
    y = ds.y_test
    new = generation_outputs(gen, ds, cache_dir)
    g = int(gen.id)  # type: ignore[arg-type]
    accuracy = M.accuracy(new.prediction, y)
    rows: list[tuple[int, int, str, float | None]] = [(g, g, Metric.ACCURACY, accuracy)]
    qy, gy = y[new.query_idx], y[new.reference_idx]

    own = M.compat_matrix({g: new.query_emb}, {g: new.reference_emb}, qy, gy)[(g, g)]
    rows += [(g, g, Metric.COMPAT_TOP1, own["top1"]), (g, g, Metric.COMPAT_MAP100, own["map100"])]

    olds_active = []
    pairs: dict[int, PairEvidence] = {}
    for anc in ancestors:
        k = int(anc.id)  # type: ignore[arg-type]
        old = generation_outputs(anc, ds, cache_dir)
        rows += [(g, k, n, v) for n, v in M.flip_metrics(new.prediction, old.prediction, y).items()]
        if k in active:
            olds_active.append(old.prediction)
        # a generation recorded without its classes (an older lineage) has no split
        p = pairs[k] = gate_evidence(new, old, y, anc.classes or None)
        map_gk = M.retrieval_map_at_k(new.query_emb, qy, old.reference_emb, gy)
        rows += [
            (g, k, Metric.COMPAT_TOP1, p.compat),
            (g, k, Metric.COMPAT_MAP100, map_gk),
            (g, k, Metric.ECC, float(M.ecc(p.compat, p.own))),
            (g, k, Metric.UPDATE_GAIN, M.update_gain(p.compat, p.own, own["top1"])),
            *p.rows(g, k),
        ]
    rows.append((g, g, Metric.NFR_ANY, M.nfr_any(new.prediction, olds_active, y)))
    rows.append((g, g, Metric.EVIDENCE_CONFIDENCE, S.DEFAULT_CONFIDENCE))
    hits = int((new.prediction == y).sum())
    chance = float(np.bincount(y).max() / len(y)) if len(y) else 1.0
    return Evaluation(g, accuracy, hits, len(y), chance, pairs, rows)


def gate_evidence(
    new: EvalOutputs, old: EvalOutputs, y: np.ndarray, old_classes: Sequence[int] | None = None
) -> PairEvidence:
    """The gate's paired evidence for (new, old) on the same cases.

    Retrieval: per query, the top-1 hit of the new generation's query and of the old one's,
    both against the old generation's gallery (their means are C[g][k] and C[k][k]).
    Classification: per evaluation item, whether each generation predicts its label.
    With ``old_classes`` (the classes the old generation trained on) also C[g][k] - C[k][k]
    on the queries of those classes (``seen``) and of the others (``unseen``, over
    ``unseen_queries``): where compatibility is lost.
    """
    qy, gy = y[new.query_idx], y[new.reference_idx]
    new_hits = M.retrieval_hits(new.query_emb, qy, old.reference_emb, gy)
    old_hits = M.retrieval_hits(old.query_emb, qy, old.reference_emb, gy)
    items = S.paired_counts(new.prediction == y, old.prediction == y)
    groups = None
    if old_classes is not None:
        gaps = M.ecc_gap_by_class_group(new_hits, old_hits, qy, old_classes)
        groups = S.ClassGroupGaps(gaps["seen"], gaps["unseen"], int(gaps["unseen_queries"]))
    c_gk, c_kk = float(np.mean(new_hits)), float(np.mean(old_hits))  # as M.retrieval_top1
    queries = S.paired_counts(new_hits, old_hits)
    return PairEvidence(c_gk, c_kk, items.loss_rate, queries, items, groups)

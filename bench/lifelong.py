"""Lifelong benchmark: ten generations of the product's update cycle, per method and data set.

    python -m bench.lifelong [--datasets fashion-mnist,digits] [--generations 10]
                             [--epochs 8] [--methods none,textbook,default]
                             [--train-per-class 600] [--out DIR] [--render]

Each (data set, method) chain runs in its own ``GRACEFUL_HOME`` through
``flows.cycle.run_cycle``, which the Prefect flow ``update_cycle`` wraps
(``bench.compat.run_chain``: ``start_cycle -> train_step (Ray) -> evaluate_step ->
gate_step -> promote_step -> backfill_step -> retire_unused``), with the product's own
gate and backfill at their defaults and **no pinning**: a generation stays a constraint
target while the gallery holds items it embedded or it is champion, and retires once
backfilled away. That is the deployment the issue asks about: constraints stay bounded
as the chain grows.

Generation i is stage i - 1 of the growing scenario (workers/data/scenario.py): classes grow
from 60% to all, data from half to all, the model widens and deepens. Every figure is
read from ``flows.report.build_report`` and the lineage; AC and AM "so far" are the
product's ``workers.measuring.metrics.ac``/``am`` on the pairs among the first g generations.

Fashion-MNIST is used as images (the default residual CNN), on a stratified subset of
its training split (``--train-per-class``, default 600 a class: 2 CPU cores train it in
minutes) and its whole test split (10,000 evaluation items); digits whole.

Writes ``bench/results/lifelong.md`` (tables, ``lifelong_*.png``) and ``lifelong.json``:
``results[<data set>][<method>]`` with ``final_acc``, ``ac``, ``am``, ``worst_nfr_ratio``,
``mean_nfr_ratio`` (to ``none``'s, over all pairs), ``acc_cost_pt``, ``promoted``,
``generations`` (per generation: accuracy, AC and AM so far, worst and mean NFR ratio so
far, NFR_any, active constraints, training seconds), and beyond the issue's keys
``champion``/``champion_acc``, ``m_mix``, ``items_backfilled`` and ``ecc_gap_by_class_group``
(per pair: C[a][b] - C[b][b] on the classes b trained on and on the others, as the
product's evaluation stores it for the gate) with its summary ``ecc_gap_groups``. A chain
named ``*/backfill-incompatible`` runs under ``GateConfig(on_incompatible="backfill")``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.compat import METHODS as COMPAT_METHODS
from bench.compat import _stop_ray, run_chain
from flows.config import BackfillConfig, GateConfig, TrainConfig
from flows.data import eval_dataset
from flows.gate import GateOutcome
from flows.report import build_report
from store.collection import Collection
from store.lineage import Lineage
from store.settings import subdir
from workers.data.datasets import DEFAULT_FASHION_MNIST_DIR, load_dataset
from workers.measuring.evaluate import generation_outputs
from workers.measuring.metrics import ac as ac_metric
from workers.measuring.metrics import am as am_metric
from workers.measuring.metrics import ecc_on_classes, retrieval_hits
from workers.measuring.served import overall_delta, served_by_class

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "lifelong"
DEFAULT_EPOCHS = 8
TRAIN_PER_CLASS = 600
HELDOUT = 2  # classes no generation trains on: AC there is the anchors' protocol

# The three methods the issue names; RECIPES adds the candidates of the recipe study.
METHODS: dict[str, TrainConfig] = {
    "none": TrainConfig(method="none"),
    "textbook": COMPAT_METHODS["bct+pct-textbook"],  # BCT+PCT as the papers state it
    "default": TrainConfig(),  # whatever the product trains with by default
}
RECIPES: dict[str, TrainConfig] = {
    "bct+pct+emb/each": TrainConfig(method="bct+pct+emb", ancestor_weights="each"),
    "bct+pct+emb/share": TrainConfig(method="bct+pct+emb", ancestor_weights="share"),
    "bct+pct+hoc/each": TrainConfig(method="bct+pct+hoc", ancestor_weights="each"),
    "bct+pct+hoc/share": TrainConfig(method="bct+pct+hoc", ancestor_weights="share"),
    "bct+hoc/share": TrainConfig(method="bct+hoc", ancestor_weights="share"),
    "hoc/share": TrainConfig(method="hoc", ancestor_weights="share"),
    "bct+pct+emb+hoc/share": TrainConfig(method="bct+pct+emb+hoc", ancestor_weights="share"),
    # the embedding term four times as heavy: the pull that keeps classes an ancestor
    # never saw where its gallery holds them
    "bct+pct+emb/emb8": TrainConfig(method="bct+pct+emb", weights={"embedding": 8.0}),
    # issue 17's study: BCT alone (its synthesised centroid rows for classes an ancestor
    # never saw, every active ancestor, the collection's holders included), BCT with the
    # embedding pull and no focal term, and the focal term only on what the ancestor got
    # right (alpha 0) with half the embedding pull
    "bct/share": TrainConfig(method="bct"),
    "bct+emb/share": TrainConfig(method="bct+pct+emb", weights={"focal": 0.0}),
    "bct+pct+emb/alpha0-emb1": TrainConfig(
        method="bct+pct+emb", focal_alpha=0.0, weights={"embedding": 1.0}
    ),
    # the default recipe with no cap on the targeted backfill (GATES): what each update
    # would need, the figure gate.max_backfill's default is chosen from
    "default/uncapped": TrainConfig(),
    # the default recipe under a gate that backfills instead of rejecting on ECC (GATES)
    "default/backfill-incompatible": TrainConfig(),
    # unconstrained training, every update a full backfill: what compatibility saves
    "none/backfill-incompatible": TrainConfig(method="none"),
    # the strict textbook gate (reject on an ECC failure): the old default, for contrast
    "default/reject-incompatible": TrainConfig(),
}
# the gate a chain runs under, where it is not the product's default
GATES: dict[str, GateConfig] = {
    "default/uncapped": GateConfig(max_backfill=1.0),
    "default/backfill-incompatible": GateConfig(on_incompatible="backfill"),
    "none/backfill-incompatible": GateConfig(on_incompatible="backfill"),
    "default/reject-incompatible": GateConfig(on_incompatible="reject"),
}
# where a chain's C[a][b] - C[b][b] by class group is kept, and the chains its plot shows
GROUP_KEY = "ecc_gap_by_class_group"
# the cycle's budgeted backfill off: only the gate's plans (and full debts) re-embed
BACKFILL = BackfillConfig(budget=0, curve=False)
GROUP_PLOT_METHODS = ("none", "textbook", "default", "bct+pct+emb/emb8")


# -- data -----------------------------------------------------------------------------------
def _write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (uint8), gzipped, as Fashion-MNIST ships them."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def heldout_classes(num_classes: int) -> tuple[int, ...]:
    """The classes no generation trains on (the last ``HELDOUT``): their training items
    are left out of the benchmark's data, their evaluation items kept (``ac_heldout``)."""
    return tuple(range(num_classes - HELDOUT, num_classes))


def fashion_subset(workdir: Path, per_class: int, seed: int = 0) -> str:
    """A ``fashion-mnist:DIR`` spec of ``per_class`` training items a class (stratified,
    seeded; none of the held-out classes) and the whole test split, in the IDX files the
    product reads."""
    src = Path(DEFAULT_FASHION_MNIST_DIR)
    out = workdir / f"fashion-mnist-{per_class}"
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset("fashion-mnist")
    rng = np.random.default_rng(seed)
    trained = [c for c in range(10) if c not in heldout_classes(10)]
    idx = np.sort(
        np.concatenate(
            [rng.permutation(np.flatnonzero(ds.y_train == c))[:per_class] for c in trained]
        )
    )
    # the loader scales pixels to [0, 1]; the files hold the original bytes
    x = np.rint(ds.x_train[idx].reshape(len(idx), 28, 28) * 255).astype(np.uint8)
    _write_idx(out / "train-images-idx3-ubyte.gz", x)
    _write_idx(out / "train-labels-idx1-ubyte.gz", ds.y_train[idx].astype(np.uint8))
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (out / name).write_bytes((src / name).read_bytes())
    return f"fashion-mnist:{out}"


def image_folder(name: str, src: str, workdir: Path) -> str:
    """An ``imagefolder:DIR`` spec of the data set ``src`` (a spec the product loads)
    without the held-out classes' training images: PNGs of the decoded images for
    ``digits``, the files themselves for an image folder."""
    out = workdir / name
    if src.startswith("imagefolder:"):
        root = Path(src.split(":", 1)[1])
        classes = sorted(d.name for d in (root / "test").iterdir() if d.is_dir())
        held = {classes[c] for c in heldout_classes(len(classes))}
        for split in ("train", "test"):
            for d in sorted((root / split).iterdir()):
                if d.is_dir() and not (split == "train" and d.name in held):
                    shutil.copytree(d, out / split / d.name, dirs_exist_ok=True)
        return f"imagefolder:{out}"
    from PIL import Image

    ds = load_dataset(src)
    held = heldout_classes(ds.num_classes)
    for split in ("train", "test"):
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        for i, (img, label) in enumerate(zip(x, y, strict=True)):
            if split == "train" and int(label) in held:
                continue
            d = out / split / f"{int(label):02d}"
            d.mkdir(parents=True, exist_ok=True)
            pixels = np.rint(np.clip(img[0] if img.ndim == 3 else img, 0, 1) * 255)
            Image.fromarray(pixels.astype(np.uint8)).save(d / f"{i:05d}.png")
    return f"imagefolder:{out}"


# -- figures --------------------------------------------------------------------------------
def _pairs(rows: list[list[Any]]) -> dict[tuple[int, int], float]:
    return {(int(a), int(b)): float(v) for a, b, v in rows}


def nfr_ratio(value: float, reference: float) -> float:
    """NFR over ``none``'s on one pair: 0 when neither flips, inf when only this one does."""
    if reference > 0:
        return value / reference
    return 0.0 if value == 0 else math.inf


def class_group_gaps(rep: dict[str, Any]) -> list[list[Any]]:
    """Per pair a > b: C[a][b] - C[b][b] on classes b trained on and on the others.

    Rows ``[a, b, seen gap, unseen gap, unseen queries]``, as the product's evaluation
    stored them with the gate's evidence (``workers.measuring.evaluate.gate_evidence``).
    """
    rows = []
    for g in rep["generations"]:
        for anc in (g.get("gate") or {}).get("ancestors", []):
            groups = anc.get("ecc_gap_by_class") or {}
            if groups.get("seen") is not None or groups.get("unseen") is not None:
                rows.append(
                    [g["id"], anc["k"], groups["seen"], groups["unseen"], groups["unseen_queries"]]
                )
    return sorted(rows)


def _group_summary(rows: list[list[Any]]) -> dict[str, Any]:
    """Mean gap and share of pairs with a positive gap, per class group."""
    out: dict[str, Any] = {}
    for i, name in ((2, "seen"), (3, "unseen")):
        vals = [r[i] for r in rows if r[i] is not None]
        out[name] = {
            "pairs": len(vals),
            "mean_gap": float(np.mean(vals)) if vals else None,
            "share_positive": float(np.mean([v > 0 for v in vals])) if vals else None,
        }
    return out


class ServedWatch:
    """What users meet before and after each cycle, measured on the real collection: the
    champion's queries (the evaluation set's query half) against the collection's stored
    embeddings, per class (``workers.measuring.served``); a cycle regresses a class when its
    served hit rate after is below before with evidence (Bonferroni over the classes)."""

    def __init__(self) -> None:
        self.before: np.ndarray | None = None
        self.cycles: list[dict[str, Any]] = []
        self.ds: Any = None  # the lineage's evaluation set, loaded once

    def hits(self, lin: Lineage) -> np.ndarray | None:
        champion, gallery = lin.champion(), Collection(lin)
        if self.ds is None and champion is not None:
            self.ds = eval_dataset(lin)
        ds = self.ds
        if champion is None or gallery.info() is None or ds is None:
            return None
        out = generation_outputs(champion, ds, subdir("cache"))
        rows = gallery.read_all()
        return retrieval_hits(out.query_emb, ds.y_test[out.query_idx], rows.embedding, rows.label)

    def __call__(self, lin: Lineage, when: str) -> None:
        if when == "before":
            self.before = self.hits(lin)
            return
        after = self.hits(lin)
        if self.before is None or after is None:
            return
        qy = self.ds.y_test[1::2]  # the query half (workers.data.scenario.eval_split)
        deltas = served_by_class(after, self.before, qy)
        whole = overall_delta(after, self.before)
        self.cycles.append(
            {
                "worse_classes": [d.cls for d in deltas if d.worse],
                "min_class_delta": min(d.delta for d in deltas),
                "delta": whole.delta,
                "ci": [whole.lo, whole.hi],
            }
        )


def ac_partitions(lin: Lineage, heldout: tuple[int, ...]) -> dict[str, float | None]:
    """AC on three partitions of the queries, per pair a > b of trained generations:
    classes both trained on (``ac_seen``), classes only a trained on (``ac_novel``), the
    held-out classes no generation trains on (``ac_heldout``); ECC(a, b) on a partition
    is C[a][b] > C[b][b] on that partition's queries against b's whole gallery."""
    ds = eval_dataset(lin)
    gens = [g for g in lin.generations() if g.checkpoint_path and g.accuracy is not None]
    if ds is None or len(gens) < 2:
        return {"ac_seen": None, "ac_novel": None, "ac_heldout": None}
    out = {int(g.id): generation_outputs(g, ds, subdir("cache")) for g in gens}  # type: ignore[arg-type]
    classes = {int(g.id): set(g.classes) - set(heldout) for g in gens}  # type: ignore[arg-type]
    qy, gy = ds.y_test[1::2], ds.y_test[0::2]
    held: dict[str, list[bool]] = {"ac_seen": [], "ac_novel": [], "ac_heldout": []}
    for a in out:
        for b in out:
            if a <= b:
                continue
            own = retrieval_hits(out[b].query_emb, qy, out[b].reference_emb, gy)
            cross = retrieval_hits(out[a].query_emb, qy, out[b].reference_emb, gy)
            parts = {
                "ac_seen": classes[a] & classes[b],
                "ac_novel": classes[a] - classes[b],
                "ac_heldout": set(heldout),
            }
            for key, cls in parts.items():
                holds = ecc_on_classes(cross, own, qy, cls)
                if holds is not None:
                    held[key].append(holds)
    return {k: (float(np.mean(v)) if v else None) for k, v in held.items()}


def chain_figures(
    lin: Lineage,
    runs: dict[int, dict[str, Any]],
    none_nfr: dict[tuple[int, int], float] | None,
    watch: ServedWatch | None = None,
    heldout: tuple[int, ...] = (),
) -> dict[str, Any]:
    """The chain's figures, read from the product's report, per generation and in all.

    ``none_nfr``: the reference NFR per pair; None: the chain is the reference itself.
    """
    rep = build_report(lin)
    ids = [int(g["id"]) for g in rep["generations"]]
    acc = {int(g["id"]): g["accuracy"] for g in rep["generations"]}
    top1 = _pairs(rep["compat_top1"])
    nfr = _pairs(rep["nfr"])
    none_nfr = nfr if none_nfr is None else none_nfr
    nfr_any = {int(a): float(v) for a, v in rep["nfr_any"]}
    rows = []
    for n, g in enumerate(ids, start=1):
        so_far = set(ids[:n])
        sub = {p: v for p, v in top1.items() if p[0] in so_far and p[1] in so_far}
        ratios = [
            nfr_ratio(v, none_nfr[p]) for p, v in nfr.items() if p[0] in so_far and p in none_nfr
        ]
        run = runs.get(g, {})
        rows.append(
            {
                "generation": g,
                "accuracy": acc[g],
                "ac": ac_metric(sub) if n > 1 else None,
                "am": am_metric(sub),
                "worst_nfr_ratio": max(ratios) if ratios else None,
                "mean_nfr_ratio": float(np.mean(ratios)) if ratios else None,
                "nfr_any": nfr_any.get(g),
                "active_constraints": len(lin.constraints(g)),
                "active_ancestors": run.get("active_ancestors", []),
                "train_seconds": run.get("train_seconds_task"),
                "epoch_seconds": run.get("epoch_seconds"),
                "teacher_seconds": run.get("teacher_seconds"),
                "promoted": run.get("promoted"),
                "retired_after_cycle": [r[0] for r in run.get("retired_after_cycle", [])],
            }
        )
    ratios_all = [nfr_ratio(v, none_nfr[p]) for p, v in nfr.items() if p in none_nfr]
    gaps = class_group_gaps(rep)
    gates = {int(g["id"]): g.get("gate") or {} for g in rep["generations"]}
    for r in rows:
        gate = gates.get(r["generation"], {})
        r["gate_outcome"] = gate.get("outcome")
        r["targeted_items"] = (gate.get("targeted_backfill") or {}).get("items", 0)
    planned = [
        g["served_all"]
        for g in gates.values()
        if g.get("outcome") == "promote-with-backfill" and g.get("served_all")
    ]
    regressed = sum(p["regressed"] or 0 for p in planned)
    recovered = sum(p["recovered"] or 0 for p in planned)
    collection = int(rep["gallery"].get("items") or 0) or 1
    reembedded = sum(int(j["items_done"] or 0) for j in rep["backfills"])
    updates = max(1, len(ids) - 1)  # a full backfill at every update after the first
    worst_pair = min(((top1[(a, b)] - top1[(b, b)], a, b) for a, b in top1 if a > b))
    return {
        "final_acc": acc[ids[-1]],
        "champion": rep["champion"],
        "champion_acc": acc.get(rep["champion"]),
        "m_mix": rep["m_mix"],
        "items_backfilled": sum(int(j["items_done"] or 0) for j in rep["backfills"]),
        "ac": rep["ac"],
        "am": rep["am"],
        "worst_nfr_ratio": max(ratios_all) if ratios_all else None,
        "mean_nfr_ratio": float(np.mean(ratios_all)) if ratios_all else None,
        "pairs_nfr_at_most_half": sum(r <= 0.5 for r in ratios_all) if ratios_all else None,
        "pairs": len(nfr),
        "promoted": sum(bool(r["promoted"]) for r in rows),
        "rejected": [r["generation"] for r in rows if not r["promoted"]],
        "gate_reasons": {
            int(g["id"]): g.get("reasons") for g in rep["generations"] if g.get("reasons")
        },
        "worst_ecc_gap": {"gap": worst_pair[0], "pair": [worst_pair[1], worst_pair[2]]},
        "ecc_failures": [
            [a, b, round(top1[(a, b)] - top1[(b, b)], 4)]
            for a, b in top1
            if a > b and not top1[(a, b)] > top1[(b, b)]
        ],
        "max_active_constraints": max(r["active_constraints"] for r in rows),
        "nfr": rep["nfr"],
        "compat_top1": rep["compat_top1"],
        "generations": rows,
        GROUP_KEY: gaps,
        "ecc_gap_groups": _group_summary(gaps),
        "served": watch.cycles if watch is not None else [],
        "served_regressions": (
            sum(len(c["worse_classes"]) for c in watch.cycles) if watch is not None else None
        ),
        "reembedded_items": reembedded,
        # of the evaluation queries a promotion would lose without re-embedding, the share
        # its targeted selection serves again (over the chain's targeted promotions)
        "selection_coverage": recovered / regressed if regressed else None,
        "reembedded_share": reembedded / (updates * collection),
        "outcomes": {o: sum(r["gate_outcome"] == o for r in rows) for o in GateOutcome},
        **ac_partitions(lin, heldout),
    }


def run_dataset(
    spec: str,
    methods: list[str],
    generations: int,
    epochs: int,
    home: Path,
    log=print,
    known: dict[str, dict[str, Any]] | None = None,
    heldout: tuple[int, ...] = (),
) -> dict[str, dict[str, Any]]:
    """Every method's chain on one data set; ``none`` first (the others' reference).

    ``known``: chains measured by an earlier run (``--merge``) that are kept, not rerun;
    its ``none`` is the reference unless ``none`` is among ``methods``.
    """
    out: dict[str, dict[str, Any]] = dict(known or {})
    none_nfr = _pairs(out["none"]["nfr"]) if "none" in out and "none" not in methods else None
    order = [m for m in methods if m == "none"] + [m for m in methods if m != "none"]
    if none_nfr is None and "none" not in order:
        order.insert(0, "none")
    for name in order:
        cfg = {**METHODS, **RECIPES}[name]
        train = TrainConfig.model_validate(cfg.model_dump() | {"epochs": epochs, "seed": 0})
        t0 = time.perf_counter()
        log(f"[{spec}] {name}: {train.method.value}", flush=True)
        watch = ServedWatch()
        lin, runs = run_chain(
            spec,
            name,
            train,
            generations,
            home / name,
            log=log,
            pin=False,
            gate=GATES.get(name, GateConfig()),
            backfill=BACKFILL,
            observe=watch,
        )
        fig = chain_figures(lin, runs, none_nfr, watch, heldout)
        if name == "none":
            none_nfr = _pairs(fig["nfr"])
        fig["train_config"] = train.model_dump(mode="json")
        fig["gate_config"] = GATES.get(name, GateConfig()).model_dump(mode="json")
        fig["wall_seconds"] = time.perf_counter() - t0
        out[name] = fig
        log(
            f"[{spec}] {name}: acc {fig['final_acc']:.4f} AC {fig['ac']:.3f} AM {fig['am']:.4f} "
            f"NFR/none worst {fig['worst_nfr_ratio']} mean {fig['mean_nfr_ratio']} "
            f"promoted {fig['promoted']}/{generations} max constraints "
            f"{fig['max_active_constraints']} served regressions {fig['served_regressions']} "
            f"re-embedded {fig['reembedded_share']:.3f} AC seen/novel/held-out "
            f"{fig['ac_seen']}/{fig['ac_novel']}/{fig['ac_heldout']} "
            f"({fig['wall_seconds']:.0f}s)",
            flush=True,
        )
    for fig in out.values():
        fig["acc_cost_pt"] = 100 * (out["none"]["final_acc"] - fig["final_acc"])
    return dict(sorted(out.items(), key=lambda kv: _method_order(kv[0])))


def _method_order(name: str) -> tuple[int, str]:
    """none, textbook, default first; then the recipes of the study."""
    fixed = list(METHODS)
    return (fixed.index(name), "") if name in fixed else (len(fixed), name)


# -- targets and report ---------------------------------------------------------------------
def targets(fig: dict[str, Any], generations: int) -> dict[str, Any]:
    """The issue's targets for one chain, each with whether it holds and by how much."""
    secs = [r["train_seconds"] for r in fig["generations"] if r["train_seconds"]]
    half = max(1, len(secs) // 2)

    def at_least(key: str, bound: float) -> dict[str, Any]:
        v = fig.get(key)
        return {"holds": v is not None and v >= bound, "value": v}

    return {
        "ac_at_least_0.95": {"holds": fig["ac"] >= 0.95, "value": fig["ac"]},
        "ac_seen_at_least_0.95": at_least("ac_seen", 0.95),
        "ac_heldout_at_least_0.95": at_least("ac_heldout", 0.95),
        "no_served_regressions": {
            "holds": fig.get("served_regressions") == 0,
            "value": fig.get("served_regressions"),
        },
        "reembedded_at_most_0.25": {
            "holds": fig.get("reembedded_share", 1.0) <= 0.25,
            "value": fig.get("reembedded_share"),
        },
        "nfr_at_most_half_every_pair": {
            "holds": fig["worst_nfr_ratio"] is not None and fig["worst_nfr_ratio"] <= 0.5,
            "value": fig["worst_nfr_ratio"],
            "pairs_holding": fig["pairs_nfr_at_most_half"],
            "pairs": fig["pairs"],
        },
        "acc_within_1pt": {"holds": fig["acc_cost_pt"] <= 1.0, "value": fig["acc_cost_pt"]},
        "all_promoted": {"holds": fig["promoted"] == generations, "value": fig["promoted"]},
        "constraints_bounded": {
            "holds": fig["max_active_constraints"] <= 3 * 4,
            "value": fig["max_active_constraints"],
        },
        "train_seconds_first_vs_second_half": {
            "value": [
                statistics.mean(secs[:half]) if secs else None,
                statistics.mean(secs[half:]) if secs[half:] else None,
            ],
            "generations": len(secs),
        },
    }


def plot(results: dict[str, dict[str, dict[str, Any]]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for key, label in (
        ("ac", "AC so far"),
        ("worst_nfr_ratio", "worst NFR / none's so far"),
        ("mean_nfr_ratio", "mean NFR / none's so far"),
        ("acc_cost", "accuracy cost vs none (points)"),
        ("active_constraints", "active constraints"),
        ("train_seconds", "training seconds"),
    ):
        fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
        for ax, (ds, per) in zip(axes[0], results.items(), strict=True):
            none = {r["generation"]: r["accuracy"] for r in per["none"]["generations"]}
            for method, f in per.items():
                if key in ("worst_nfr_ratio", "mean_nfr_ratio") and method == "none":
                    continue
                xs, ys = [], []
                for i, r in enumerate(f["generations"], start=1):
                    v = (
                        100 * (none[r["generation"]] - r["accuracy"])
                        if key == "acc_cost"
                        else r[key]
                    )
                    if v is not None and math.isfinite(v):
                        xs.append(i)
                        ys.append(v)
                ax.plot(xs, ys, marker="o", label=method)
            ax.set_title(f"{ds.split(':')[0]}: {label}")
            ax.set_xlabel("generations in the chain")
            if key == "worst_nfr_ratio" or key == "mean_nfr_ratio":
                ax.axhline(0.5, color="grey", ls="--", lw=1)
            if key == "ac":
                ax.axhline(0.95, color="grey", ls="--", lw=1)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        names.append(_save(fig, out / f"{NAME}_{key}.png", plt))
    names.append(plot_class_groups(results, out, plt))
    return names


def _save(fig, path: Path, plt) -> str:
    """Write a figure as PNG; its file name."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_class_groups(results: dict[str, dict[str, dict[str, Any]]], out: Path, plt) -> str:
    """Mean C[a][b] - C[b][b] over b < a against a, on classes b saw (solid) and the rest."""
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (ds, per) in zip(axes[0], results.items(), strict=True):
        shown = [(m, per[m]) for m in GROUP_PLOT_METHODS if per.get(m, {}).get(GROUP_KEY)]
        for n, (method, f) in enumerate(shown):
            rows = f[GROUP_KEY]
            for i, style, group in ((2, "-", "seen"), (3, "--", "unseen")):
                by_a: dict[int, list[float]] = {}
                for r in rows:
                    if r[i] is not None:
                        by_a.setdefault(int(r[0]), []).append(float(r[i]))
                xs = sorted(by_a)
                ax.plot(
                    xs,
                    [np.mean(by_a[a]) for a in xs],
                    style,
                    marker="o",
                    color=f"C{n}",
                    label=f"{method}: {group}",
                )
        ax.axhline(0.0, color="grey", lw=1)
        ax.set_title(f"{ds}: mean C[a][b] - C[b][b], b < a")
        ax.set_xlabel("generation a")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out / f"{NAME}_ecc_class_groups.png", plt)


def _f(v: Any, fmt: str = ".3f") -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, fmt)


def _champion(f: dict[str, Any]) -> str:
    if f.get("champion") is None:
        return "—"
    return f"{f['champion']} ({_f(f.get('champion_acc'), '.4f')})"


def render(report: dict[str, Any], out: Path) -> None:
    """``lifelong.md`` from ``lifelong.json`` (and the plots)."""
    s = report["settings"]
    plots = plot(report["results"], out)
    lines = [
        "# Lifelong benchmark",
        "",
        f"Produced by `python -m bench.lifelong` in {report['wall_seconds'] / 60:.1f} min: "
        f"{s['generations']}-generation chains of the growing scenario, epochs per generation "
        f"{s['epochs_per_dataset']}, seed 0; methods {', '.join(s['methods'])}. Code path: "
        "the product's update cycle (`flows.cycle.run_cycle` through `bench.compat.run_chain`: "
        "`start_cycle → train_step (Ray) → evaluate_step → gate_step → promote_step → "
        "backfill_step → retire_unused`), "
        "with the product's default gate (three outcomes, judged on the served state per "
        "class at 95%, targeted backfills up to `gate.max_backfill` of the collection) and "
        "the cycle's budgeted backfill set to 0, so that only the gate's plans re-embed; "
        "nothing pinned: a generation is a constraint target while the collection holds "
        "its items or it is champion. Served regressions are measured on the real "
        "collection before and after each cycle (`ServedWatch`); AC on three partitions "
        "of the queries (`ac_partitions`): classes both generations trained on, classes "
        "only the newer one trained on, and the held-out classes no generation trains on. "
        "Every other figure is read from `flows.report.build_report`.",
        "",
        f"Data: {'; '.join(s['datasets_note'])}.",
        "",
    ]
    for ds, per in report["results"].items():
        lines += [
            f"## {ds}",
            "",
            "| method | final acc | acc cost (pt) | promoted (plain / targeted) | champion (acc) "
            "| served regressions | re-embedded share | AC | AC seen / novel / held-out | AM "
            "| worst NFR / none | mean NFR / none | max active constraints "
            "| train s (1st / 2nd half) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for m, f in per.items():
            t = report["targets"][ds][m]
            half = t["train_seconds_first_vs_second_half"]["value"]
            outcomes = f.get("outcomes") or {}
            promoted = (
                f"{f['promoted']}/{s['generations']} ({outcomes.get('promote', '—')} / "
                f"{outcomes.get('promote-with-backfill', '—')})"
            )
            parts = " / ".join(_f(f.get(k), ".2f") for k in ("ac_seen", "ac_novel", "ac_heldout"))
            lines.append(
                f"| {m} | {f['final_acc']:.4f} | {f['acc_cost_pt']:+.2f} | {promoted} | "
                f"{_champion(f)} | {_f(f.get('served_regressions'), 'd')} | "
                f"{_f(f.get('reembedded_share'), '.3f')} | {f['ac']:.3f} | {parts} | "
                f"{f['am']:.4f} | "
                f"{_f(f['worst_nfr_ratio'], '.2f') if m != 'none' else '—'} | "
                f"{_f(f['mean_nfr_ratio'], '.2f') if m != 'none' else '—'} | "
                f"{f['max_active_constraints']} | {_f(half[0], '.0f')} / {_f(half[1], '.0f')} |"
            )
        lines += [
            "",
            "Per generation (accuracy · AC so far · worst NFR ratio so far · "
            "active constraints · training s · the gate's outcome: P promote, T promote with "
            "a targeted backfill of n items, ✗ reject):",
            "",
        ]
        lines += ["| g | " + " | ".join(per) + " |", "|---|" + "---|" * len(per)]
        n = len(per["none"]["generations"])
        for i in range(n):
            cells = []
            for f in per.values():
                r = f["generations"][i]
                outcome = r.get("gate_outcome")
                mark = {"promote": " P", "promote-with-backfill": f" T{r.get('targeted_items', 0)}"}
                mark = mark.get(outcome, "" if r["promoted"] else " ✗")
                cells.append(
                    f"{r['accuracy']:.4f} · {_f(r['ac'], '.2f')} · "
                    f"{_f(r['worst_nfr_ratio'], '.2f')} · {r['active_constraints']} · "
                    f"{_f(r['train_seconds'], '.0f')}{mark}"
                )
            lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
        grouped = {m: f["ecc_gap_groups"] for m, f in per.items() if f.get("ecc_gap_groups")}
        if grouped:
            lines += [
                "",
                "C[a][b] − C[b][b] by class group, over the pairs a > b: on the classes "
                "generation b trained on (seen) and on those it never saw (unseen); mean gap "
                "and the share of pairs where it is positive:",
                "",
                "| method | seen: mean gap | seen: share > 0 | unseen: mean gap "
                "| unseen: share > 0 (pairs) |",
                "|---|---|---|---|---|",
            ]
            for m, g in grouped.items():
                lines.append(
                    f"| {m} | {_f(g['seen']['mean_gap'], '+.3f')} | "
                    f"{_f(g['seen']['share_positive'], '.2f')} | "
                    f"{_f(g['unseen']['mean_gap'], '+.3f')} | "
                    f"{_f(g['unseen']['share_positive'], '.2f')} ({g['unseen']['pairs']}) |"
                )
        lines += ["", "ECC failures (a, b, C[a][b] − C[b][b]):", ""]
        for m, f in per.items():
            if m != "none":
                lines.append(f"- {m}: {f['ecc_failures'] or 'none'}")
        lines.append("")
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    if report.get("findings"):
        lines += ["## Findings", ""] + list(report["findings"]) + [""]
    (out / f"{NAME}.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="fashion-mnist,digits")
    ap.add_argument("--generations", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    ap.add_argument("--methods", default="none,textbook,default")
    ap.add_argument("--train-per-class", type=int, default=TRAIN_PER_CLASS)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    ap.add_argument(
        "--merge", action="store_true", help="keep the chains of the .json that are not rerun"
    )
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render:
        report = json.loads((args.out / f"{NAME}.json").read_text())
        render(report, args.out)
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in {**METHODS, **RECIPES}]
    if unknown:
        print(f"error: unknown method(s) {unknown}; choose from {[*METHODS, *RECIPES]}")
        return 2
    t0 = time.perf_counter()
    previous = json.loads((args.out / f"{NAME}.json").read_text()) if args.merge else None
    results: dict[str, dict[str, Any]] = dict(previous["results"]) if previous else {}
    notes = list(previous["settings"]["datasets_note"]) if previous else []
    epochs = dict(previous["settings"].get("epochs_per_dataset", {})) if previous else {}
    with tempfile.TemporaryDirectory(prefix="graceful-lifelong-") as tmp:
        work = Path(tmp)
        for ds in [d.strip() for d in args.datasets.split(",") if d.strip()]:
            key = ds.split(":", 1)[0]
            epochs[key] = args.epochs
            notes = [n for n in notes if not n.startswith(key)]
            if key == "fashion-mnist":
                spec = fashion_subset(work, args.train_per_class)
                notes.append(
                    f"fashion-mnist: {args.train_per_class} training images a class "
                    "(stratified, seed 0), the whole 10,000-image test split; 28x28 images, "
                    "the default residual CNN"
                )
            elif key == "photos":  # photos:DIR, an image folder of colour photographs
                spec = image_folder(key, "imagefolder:" + ds.split(":", 1)[1], work)
                notes.append(f"photos: the image folder {ds.split(':', 1)[1]}")
            else:
                spec = image_folder(key, ds, work)
                notes.append(f"{key}: the whole data set, as PNGs")
            n_classes = len(load_dataset(spec).class_names)
            held = heldout_classes(n_classes)
            notes[-1] += f"; classes {list(held)} held out of training"
            results[key] = run_dataset(
                spec,
                methods,
                args.generations,
                args.epochs,
                work / key,
                known=results.get(key),
                heldout=held,
            )
        _stop_ray()
    report = {
        "settings": {
            "generations": args.generations,
            "epochs_per_dataset": epochs,
            "methods": sorted({m for per in results.values() for m in per}, key=_method_order),
            "train_per_class": args.train_per_class,
            "datasets_note": notes,
            "gate": GateConfig().model_dump(mode="json"),
            "backfill": BACKFILL.model_dump(mode="json"),
            "heldout_classes": HELDOUT,
        },
        "results": results,
        "targets": {
            ds: {m: targets(f, args.generations) for m, f in per.items()}
            for ds, per in results.items()
        },
        "wall_seconds": time.perf_counter() - t0 + (previous["wall_seconds"] if previous else 0),
    }
    (args.out / f"{NAME}.json").write_text(json.dumps(report, indent=1, default=str))
    render(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Compatibility benchmark: a 5-generation chain per method, every pair evaluated.

    python -m bench.compat [--dataset fashion-mnist] [--generations 5] [--epochs E]
                           [--methods none,bct-last,...] [--quick]

Each method trains the same growing scenario (workers/scenario.py: the first generation
sees 60% of the classes and half the data, the last all of both; the MLP grows wider and
deeper) with the same seeds and epochs, calling the plain functions the flows call
(``workers.train.train_generation``, ``workers.embed.forward``, ``workers.metrics``).
Then, over every pair of generations: accuracy, NFR(g, k), NFR_any, the retrieval
matrix C[a][b] (top-1, b <= a), AC and AM. It also measures what a constraint against
ten ancestors costs per epoch next to one against a single ancestor.

Writes ``bench/results/compat.md`` (tables, heat maps ``compat_*.png``) and
``bench/results/compat.json`` (every figure under stable keys).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers import metrics as M
from workers.datasets import Dataset, load_dataset
from workers.embed import Outputs, forward
from workers.models import load_model
from workers.scenario import eval_split, stage_indices, stage_plan
from workers.train import ConstraintSpec, TrainSpec, train_generation

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "compat"
DEFAULT_EPOCHS = 8


@dataclass(frozen=True)
class Method:
    """One training recipe of the chain: which constraint kinds, against whom."""

    name: str
    kinds: tuple[str, ...]
    against: str = "all"  # "all" active ancestors or the "last" one
    weights: dict[str, float] = field(
        default_factory=lambda: {"influence": 1.0, "focal": 1.0, "embedding": 1.0}
    )
    train: dict[str, Any] = field(default_factory=dict)  # TrainSpec overrides
    architecture: dict[str, Any] = field(default_factory=dict)  # e.g. {"head": "learned"}
    note: str = ""


# the per-constraint weights the flows should default to (TrainConfig), as measured here
WEIGHTS = {"influence": 1.0, "focal": 0.3, "embedding": 2.0}
# the textbook recipes of the papers: the ancestor's own learned head, fresh initialisation
TEXTBOOK = {"bct_prototypes": True, "influence_head": "head", "warm_start": False}

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("none", (), note="no constraint"),
        Method("bct-last", ("influence",), "last", WEIGHTS),
        Method("bct-all", ("influence",), "all", WEIGHTS),
        Method("pct", ("focal",), "all", WEIGHTS),
        Method("bct+pct", ("influence", "focal"), "all", WEIGHTS),
        Method("bct+pct+emb", ("influence", "focal", "embedding"), "all", WEIGHTS),
        Method(
            "bct+pct-textbook",
            ("influence", "focal"),
            "all",
            {"influence": 1.0, "focal": 1.0, "embedding": 1.0},
            dict(TEXTBOOK),
            {"head": "learned"},
            note="the papers' recipe: learned heads, fresh start, weights 1",
        ),
    )
}


# How the recipe was found: full 5-generation Fashion-MNIST chains, the same settings as
# this benchmark (8 epochs, seed 0, one thread per chain), each run once during development
# with ``run_chain`` + ``evaluate_chain``. Columns: final accuracy, AC, AM, max and mean
# over pairs of NFR(g, k) / none's NFR(g, k) (none = the first row).
# Notation: fixed/learned head; ws = warm start; C = influence on a head of old class
# centroids; weights as influence/focal/embedding; mix = mixup distillation inputs.
SCREENING: list[tuple[str, float, float, float, float, float]] = [
    ("none, learned head", 0.9001, 0.0, 0.3618, 1.00, 1.00),
    ("none, fixed head", 0.9000, 0.0, 0.6643, 1.09, 0.98),
    ("BCT, learned head (textbook)", 0.8975, 0.1, 0.7380, 1.09, 0.96),
    ("BCT+PCT 1/1, learned head (textbook)", 0.8689, 0.0, 0.7094, 0.47, 0.37),
    ("BCT, fixed head", 0.8992, 0.0, 0.6941, 1.08, 0.98),
    ("BCT, fixed, ws", 0.9018, 0.1, 0.7428, 1.12, 0.99),
    ("BCT+PCT 1/1, learned, ws", 0.8799, 0.0, 0.7289, 0.39, 0.31),
    ("BCT+PCT 1/1, fixed, ws", 0.8878, 0.2, 0.7650, 0.37, 0.32),
    ("C+emb 1/-/1, fixed, ws", 0.9018, 0.7, 0.8253, 1.04, 0.89),
    ("C+emb 1/-/3, fixed, ws", 0.8958, 0.8, 0.8323, 0.86, 0.75),
    ("C+emb 1/-/3 + mix 1.0, fixed, ws", 0.8654, 0.8, 0.8303, 0.79, 0.67),
    ("C+PCT+emb 1/1/1, fixed, ws", 0.8762, 0.6, 0.8125, 0.27, 0.24),
    ("C+PCT+emb 1/1/1, alpha 0, fixed, ws", 0.8813, 0.6, 0.8138, 0.39, 0.31),
    ("C+PCT+emb 1/0.3/1, alpha 0, fixed, ws", 0.8945, 0.6, 0.8183, 0.65, 0.51),
    ("C+PCT+emb 1/0.3/1, fixed, ws", 0.8953, 0.6, 0.8166, 0.51, 0.44),
    ("C+PCT+emb 1/0.3/3 + mix, alpha 0, fixed, ws", 0.8552, 0.7, 0.8249, 0.52, 0.44),
    ("PCT+emb -/0.3/3 + mix, alpha 0, fixed, ws", 0.8536, 0.3, 0.8054, 0.47, 0.34),
    ("C+PCT+emb 1/0.5/3, fixed, ws", 0.8841, 0.8, 0.8229, 0.41, 0.34),
    ("C+PCT+emb 1/0.4/3, fixed, ws", 0.8841, 0.7, 0.8209, 0.44, 0.37),
    ("C+PCT+emb 1/0.5/5, fixed, ws", 0.8306, 0.7, 0.8206, 0.36, 0.31),
    ("C+PCT+emb 1/0.5/3, T 1, fixed, ws", 0.8911, 0.8, 0.8255, 0.54, 0.46),
    ("C+PCT+emb 1/0.4/1, fixed, ws", 0.8915, 0.6, 0.8163, 0.46, 0.40),
    ("C+PCT+emb 1/0.4/2, fixed, ws", 0.8885, 0.6, 0.8226, 0.48, 0.38),
    ("C+PCT+emb 1/0.5/1, fixed, ws", 0.8893, 0.6, 0.8150, 0.44, 0.35),
    ("C+PCT+emb 1/0.3/2, fixed, ws (chosen)", 0.8936, 0.7, 0.8221, 0.46, 0.40),
    # with the fixed warm start (the code of the tables above):
    ("C+PCT+emb 1/0.35/2, fixed, ws [fixed ws]", 0.8914, 0.7, 0.8228, 0.51, 0.44),
    ("C+PCT+emb 1/0.4/2, fixed, ws [fixed ws]", 0.8881, 0.6, 0.8196, 0.49, 0.39),
]


def targets_of(method: Method, ancestors: list[int]) -> list[int]:
    if not method.kinds or not ancestors:
        return []
    return ancestors[-1:] if method.against == "last" else list(ancestors)


def run_chain(
    ds: Dataset,
    method: Method,
    generations: int,
    epochs: int,
    seed: int,
    workdir: Path,
    threads: int | None = None,
    log=print,
) -> dict[str, Any]:
    """Train the chain of ``generations`` under ``method``; outputs on the test split."""
    done: list[dict[str, Any]] = []
    outputs: list[Outputs] = []
    for stage_no in range(generations):
        gen_id = stage_no + 1
        stage = stage_plan(ds.num_classes, generations, stage_no)
        idx = stage_indices(ds.y_train, stage, seed=0)
        arch = dict(stage.architecture) | method.architecture
        targets = targets_of(method, [d["id"] for d in done])
        by_id = {d["id"]: d for d in done}
        constraints = [
            ConstraintSpec(
                k,
                kind,
                method.weights[kind],
                by_id[k]["checkpoint"],
                by_id[k]["sha256"],
                by_id[k]["classes"],
            )
            for k in targets
            for kind in method.kinds
        ]
        spec = TrainSpec(
            generation=gen_id,
            x=ds.x_train[idx],
            y=ds.y_train[idx],
            num_classes=ds.num_classes,
            classes=list(stage.classes),
            architecture=arch,
            epochs=epochs,
            seed=seed,
            constraints=constraints,
            checkpoint_dir=str(workdir / method.name),
            threads=threads,
            **method.train,
        )
        result = train_generation(spec)
        model = load_model(result["checkpoint"], result["sha256"])
        out = forward(model, ds.x_test)
        outputs.append(out)
        acc = M.accuracy(out.prediction, ds.y_test)
        done.append(
            {
                "id": gen_id,
                "classes": list(stage.classes),
                "train_samples": len(idx),
                "architecture": model.config["architecture"],
                "constraints": [[c.target, c.kind, c.weight] for c in constraints],
                "train_seconds": result["train_seconds"],
                "teacher_seconds": result["teacher_seconds"],
                "epoch_seconds": result["epoch_seconds"],
                "last_losses": result["history"][-1],
                "checkpoint": result["checkpoint"],
                "sha256": result["sha256"],
                "accuracy": acc,
            }
        )
        log(
            f"  [{method.name}] generation {gen_id}: acc {acc:.4f}, "
            f"{result['train_seconds']:.1f}s, {len(constraints)} constraints"
        )
    return {"generations": done, "outputs": outputs}


def evaluate_chain(outputs: list[Outputs], y: np.ndarray) -> dict[str, Any]:
    """Every figure over every pair of the chain (generation ids 1..n)."""
    ids = list(range(1, len(outputs) + 1))
    g_idx, q_idx = eval_split(len(y))
    qy, gy = y[q_idx], y[g_idx]
    preds = {g: o.prediction for g, o in zip(ids, outputs, strict=True)}
    acc = [M.accuracy(preds[g], y) for g in ids]
    nfr, pfr, nfi, btc, bec = [], [], [], [], []
    for g in ids:
        for k in ids:
            if k < g:
                f = M.flip_metrics(preds[g], preds[k], y)
                nfr.append([g, k, f["nfr"]])
                pfr.append([g, k, f["pfr"]])
                nfi.append([g, k, f["nfi"]])
                btc.append([g, k, f["btc"]])
                bec.append([g, k, f["bec"]])
    nfr_any = [[g, M.nfr_any(preds[g], [preds[k] for k in ids if k < g], y)] for g in ids[1:]]
    cm = M.compat_matrix(
        {g: o.embedding[q_idx] for g, o in zip(ids, outputs, strict=True)},
        {g: o.embedding[g_idx] for g, o in zip(ids, outputs, strict=True)},
        qy,
        gy,
    )
    top1 = {ab: v["top1"] for ab, v in cm.items()}
    ecc = [[a, b, bool(M.ecc(top1[(a, b)], top1[(b, b)]))] for (a, b) in sorted(top1) if a > b]
    gain = [
        [a, b, M.update_gain(top1[(a, b)], top1[(b, b)], top1[(a, a)])]
        for (a, b) in sorted(top1)
        if a > b
    ]
    return {
        "accuracy": acc,
        "nfr": nfr,
        "pfr": pfr,
        "nfi": nfi,
        "btc": btc,
        "bec": bec,
        "nfr_any": nfr_any,
        "compat_top1": [[a, b, v] for (a, b), v in sorted(top1.items())],
        "compat_map100": [[a, b, cm[(a, b)]["map100"]] for (a, b) in sorted(cm)],
        "ecc": ecc,
        "update_gain": gain,
        "ac": M.ac(top1),
        "am": M.am(top1),
    }


def summary_line(name: str, ev: dict[str, Any], base: dict[str, Any] | None = None) -> str:
    nfr = [v for _, _, v in ev["nfr"]]
    ratio = ""
    if base is not None:
        b = {(g, k): v for g, k, v in base["nfr"]}
        r = [v / b[(g, k)] if b[(g, k)] > 0 else float("inf") for g, k, v in ev["nfr"]]
        ratio = f" nfr/none max {max(r):.2f} mean {np.mean(r):.2f}"
    top1 = {(a, b): v for a, b, v in ev["compat_top1"]}
    worst = min((top1[(a, b)] - top1[(b, b)], a, b) for (a, b) in top1 if a > b)
    return (
        f"{name:>14}: acc {' '.join(f'{a:.4f}' for a in ev['accuracy'])} | AC {ev['ac']:.2f} "
        f"AM {ev['am']:.4f} worst C[a][b]-C[b][b] {worst[0]:+.4f} ({worst[1]},{worst[2]}) | "
        f"NFR mean {np.mean(nfr):.4f} max {max(nfr):.4f}{ratio}"
    )


# -- teacher cost ---------------------------------------------------------------------------
def teacher_cost(
    ds: Dataset,
    workdir: Path,
    epochs: int,
    threads: int | None,
    n_many: int = 10,
    kinds_list: tuple[tuple[str, ...], ...] = (("influence", "focal"),),
    log=print,
) -> dict[str, Any]:
    """Per-epoch time of one generation with 0, 1 and ``n_many`` constrained ancestors
    (e.g. bct+pct: influence and focal against each), on the same data and seed."""
    n = ds.num_classes
    first = stage_plan(n, 2, 0)
    idx0 = stage_indices(ds.y_train, first, seed=0)
    ancestors = []
    for i in range(n_many):  # small, distinct ancestors: one epoch each, own seed
        r = train_generation(
            TrainSpec(
                generation=100 + i,
                x=ds.x_train[idx0],
                y=ds.y_train[idx0],
                num_classes=n,
                classes=list(first.classes),
                architecture=dict(first.architecture),
                epochs=1,
                seed=1000 + i,
                checkpoint_dir=str(workdir / "teacher-cost"),
                threads=threads,
            )
        )
        ancestors.append((100 + i, r["checkpoint"], r["sha256"], list(first.classes)))
    last = stage_plan(n, 2, 1)
    idx = stage_indices(ds.y_train, last, seed=0)
    out: dict[str, Any] = {
        "train_samples": len(idx),
        "architecture": last.architecture,
        "epochs": epochs,
        "n_many": n_many,
        "runs": {},
    }
    for kinds in kinds_list:
        out["runs"]["+".join(kinds)] = _cost_runs(
            ds, idx, last, ancestors, kinds, n_many, epochs, threads, workdir, log
        )
    out["loss_ms_per_step"] = loss_step_cost(ds.num_classes, n_many, threads)
    return out


def loss_step_cost(
    num_classes: int, n_many: int, threads: int | None, steps: int = 300
) -> dict[str, dict[str, float]]:
    """Milliseconds per step of one constraint kind's loss and its backward pass, against
    1 and ``n_many`` stacked ancestors (60,000 precomputed items, batch 128, d 64)."""
    from workers.train import _Stack, constraint_losses

    if threads:
        torch.set_num_threads(threads)
    n, c, d, b = 60_000, num_classes, 64, 128
    g = torch.Generator().manual_seed(0)
    spec = TrainSpec(0, np.zeros((2, 1)), np.zeros(2, np.int64), c, [], {})
    out: dict[str, dict[str, float]] = {}
    for k in (1, n_many):
        stacks = {
            "influence": _Stack(torch.ones(k), head=torch.randn(k, c, d, generator=g)),
            "focal": _Stack(
                torch.ones(k),
                logits=torch.randn(k, n, c, generator=g),
                correct=torch.rand(k, n, generator=g) > 0.5,
                mask=torch.rand(k, n, generator=g) > 0.2,
            ),
            "embedding": _Stack(torch.ones(k), embedding=torch.randn(k, n, d, generator=g)),
        }
        emb = torch.randn(b, d, generator=g, requires_grad=True)
        logits = torch.randn(b, c, generator=g, requires_grad=True)
        y = torch.randint(0, c, (b,), generator=g)
        for kind, stack in stacks.items():
            t = time.perf_counter()
            for _ in range(steps):
                batch = torch.randint(0, n, (b,), generator=g)
                terms = constraint_losses({kind: stack}, emb, logits, y, batch, spec)
                sum(terms.values()).backward()
            out.setdefault(kind, {})[str(k)] = (time.perf_counter() - t) / steps * 1e3
    return out


def _cost_runs(ds, idx, last, ancestors, kinds, n_many, epochs, threads, workdir, log):
    out: dict[str, Any] = {"kinds": list(kinds)}
    n = ds.num_classes
    for count in (0, 1, n_many):
        constraints = [
            ConstraintSpec(k, kind, WEIGHTS[kind], ckpt, sha, cls)
            for k, ckpt, sha, cls in ancestors[:count]
            for kind in kinds
        ]
        r = train_generation(
            TrainSpec(
                generation=200 + 20 * len(kinds) + count,
                x=ds.x_train[idx],
                y=ds.y_train[idx],
                num_classes=n,
                classes=list(last.classes),
                architecture=dict(last.architecture),
                epochs=epochs,
                seed=0,
                constraints=constraints,
                checkpoint_dir=str(workdir / "teacher-cost"),
                threads=threads,
            )
        )
        # the first epoch carries one-off warm-up costs; the median of the rest is the cost
        per_epoch = statistics.median(r["epoch_seconds"][1:] or r["epoch_seconds"])
        out[f"ancestors_{count}"] = {
            "epoch_seconds": r["epoch_seconds"],
            "median_epoch_seconds": per_epoch,
            "min_epoch_seconds": min(r["epoch_seconds"][1:] or r["epoch_seconds"]),
            "teacher_seconds": r["teacher_seconds"],
        }
        log(
            f"  teacher cost ({'+'.join(kinds)}): {count} ancestors -> {per_epoch:.3f}s/epoch, "
            f"precompute {r['teacher_seconds']:.2f}s"
        )
    one, many = out["ancestors_1"], out[f"ancestors_{n_many}"]
    base = out["ancestors_0"]["median_epoch_seconds"]
    out["ratio_many_to_one"] = many["median_epoch_seconds"] / one["median_epoch_seconds"]
    out["ratio_many_to_one_min"] = many["min_epoch_seconds"] / one["min_epoch_seconds"]
    out["overhead_one"] = one["median_epoch_seconds"] / base - 1.0
    out["overhead_many"] = many["median_epoch_seconds"] / base - 1.0
    return out


# -- report ---------------------------------------------------------------------------------
def check_targets(results: dict[str, dict[str, Any]], reference: str = "none") -> dict[str, Any]:
    """Per method: AC = 1, NFR(g,k) <= half of none's for every pair, final accuracy
    within one point of none's."""
    base = results[reference]
    base_nfr = {(g, k): v for g, k, v in base["nfr"]}
    out = {}
    for name, ev in results.items():
        if name == reference:
            continue
        ratios = [
            [g, k, v / base_nfr[(g, k)] if base_nfr[(g, k)] > 0 else None] for g, k, v in ev["nfr"]
        ]
        half = all(v <= 0.5 * base_nfr[(g, k)] for g, k, v in ev["nfr"])
        acc_gap = ev["accuracy"][-1] - base["accuracy"][-1]
        out[name] = {
            "ac_is_1": ev["ac"] == 1.0,
            "ac": ev["ac"],
            "nfr_half_of_none_every_pair": half,
            "nfr_pairs_at_most_half": sum(v <= 0.5 * base_nfr[(g, k)] for g, k, v in ev["nfr"]),
            "nfr_pairs": len(ev["nfr"]),
            "nfr_ratio_to_none": ratios,
            "max_nfr_ratio": max((r for _, _, r in ratios if r is not None), default=None),
            "final_accuracy_gap": acc_gap,
            "final_accuracy_within_1pt": acc_gap >= -0.01,
        }
    return out


FINDINGS = [
    "What the measurements say:",
    "",
    "- **Stationary (fixed) head**: same accuracy as a learned head, much better alignment "
    "(AM 0.66 vs 0.36 unconstrained; with warm start + BCT+PCT AM 0.77 vs 0.73). Default "
    "in the scenario.",
    "- **Warm start** (function-preserving expansion of the newest ancestor into the wider "
    "and deeper model, Net2Net-style) is the biggest single step for AC: classes that "
    "*neither* generation has seen yet (in stage 0 four of ten classes) get no training "
    "signal at all, so only a shared starting function keeps their embeddings where the "
    "ancestor put them. On digits, C[2][1] on those classes went from 0.23/0.15/0.31 "
    "(fresh start) to 0.85/0.40/0.69 (warm start), against 0.92/0.70/0.83 for C[1][1].",
    "- **Influence on class centroids** (the ancestor's mean embedding per class rather "
    "than its head row) and the new **embedding** constraint (1 - cos to the ancestor's "
    "embedding of the same item) raise AC from 0.1-0.2 to 0.6-0.8, at no accuracy cost "
    "with embedding weight 1 (0.6 points at weight 3).",
    "- **PCT focal distillation** is what halves NFR, and what costs accuracy: at weight "
    "1 per ancestor (4 ancestors at generation 5) it costs 2-3 points; at 0.3 about 0.6-0.9.",
    "- **Mixup distillation inputs** help AC a little but cost 3-4 points: off by default.",
    "- **NFR and accuracy trade off right at the targets** with the current code on this "
    "seed: focal 0.3 keeps accuracy within one point (-0.89) but leaves two pairs just "
    "above half of none's NFR; focal 0.4 brings every pair to at most half (max ratio "
    "0.50 against this table's none) and costs 1.19 points. Both margins are within "
    "what one seed can tell apart.",
    "- **AC = 1.0 is not reached**: with the chosen recipe the pairs that fail are the early "
    "ones (2,1), (3,1), (3,2), 1.0 to 2.7 points below C[b][b]; the galleries of "
    "generations 1-2 hold three or four classes that neither model was trained on, and "
    "nothing in training tells the new model where the old one put them.",
]


def _matrix_table(pairs: list[list[Any]], ids: list[int], fmt: str = "{:.4f}") -> list[str]:
    grid = {(int(a), int(b)): v for a, b, v in pairs}
    lines = ["| a \\ b | " + " | ".join(str(b) for b in ids) + " |"]
    lines.append("|---" * (len(ids) + 1) + "|")
    for a in ids:
        cells = [fmt.format(grid[(a, b)]) if (a, b) in grid else "" for b in ids]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return lines


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    from flows.plots import heatmap  # read-only use of the flows' plotting helper

    out_dir.mkdir(parents=True, exist_ok=True)
    s = report["settings"]
    ids = list(range(1, s["generations"] + 1))
    res = report["methods"]
    tg = report["targets"]
    md = [
        "# Compatibility benchmark",
        "",
        f"Data set `{s['dataset']}`, {s['generations']}-generation chain of the growing "
        f"scenario, {s['epochs']} epochs per generation, seed {s['seed']}, batch "
        f"{s['batch_size']}, lr {s['lr']}, embedding dim {s['embed_dim']}, "
        f"{s.get('jobs', 1)} chains at a time with {s['threads']} CPU thread(s) each. Produced by "
        f"`python -m bench.compat` in {report['wall_seconds'] / 60:.1f} min. Metric "
        "definitions: DESIGN.md; evaluation on the 10,000 test items (C[a][b]: odd items "
        "query, even items gallery).",
        "",
        "Every method but the textbook row runs with the `TrainSpec` defaults: the "
        "scenario's stationary (`fixed`) head, warm start from the newest constrained "
        "ancestor, influence on a head of the ancestor's class centroids. `none` trains "
        "each generation from scratch without constraints. The textbook row is BCT+PCT as "
        "the papers state it: learned heads, the ancestor's own head (BCT prototypes for "
        "classes it never saw), fresh initialisation, weights 1.",
        "",
        "Generations (stage = generation - 1): "
        + "; ".join(
            f"{g['id']}: {len(g['classes'])} classes, {g['train_samples']} items, "
            f"{g['architecture']['kind']} w{g['architecture']['width']} "
            f"d{g['architecture']['depth']}"
            for g in report["chain"]
        )
        + ".",
        "",
        "## Summary",
        "",
        "| method | recipe | acc per generation | final acc | AC | AM | mean NFR | max NFR "
        "| max NFR / none's | final NFR_any |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, ev in res.items():
        nfr = [v for _, _, v in ev["nfr"]]
        ratio = tg.get(name, {}).get("max_nfr_ratio")
        md.append(
            f"| {name} | {report['recipes'][name]} | "
            + " ".join(f"{a:.4f}" for a in ev["accuracy"])
            + f" | {ev['accuracy'][-1]:.4f} | {ev['ac']:.2f} | {ev['am']:.4f} | "
            f"{np.mean(nfr):.4f} | {max(nfr):.4f} | "
            + ("—" if ratio is None else f"{ratio:.2f}")
            + f" | {ev['nfr_any'][-1][1]:.4f} |"
        )
    md += [
        "",
        "## Targets",
        "",
        "Over all pairs of the chain: AC = 1.0; NFR(g, k) at most half of `none`'s for "
        "every pair; final accuracy within 1 point of `none`'s "
        f"({res['none']['accuracy'][-1]:.4f}).",
        "",
        "| method | AC = 1.0 | NFR <= none/2 (pairs) | final acc within 1 pt (gap) | all hold |",
        "|---|---|---|---|---|",
    ]
    for name, t in tg.items():
        every = t["ac_is_1"] and t["nfr_half_of_none_every_pair"] and t["final_accuracy_within_1pt"]
        md.append(
            f"| {name} | {'yes' if t['ac_is_1'] else 'no'} ({t['ac']:.2f}) | "
            f"{'yes' if t['nfr_half_of_none_every_pair'] else 'no'} "
            f"({t['nfr_pairs_at_most_half']}/{t['nfr_pairs']}, max ratio "
            f"{t['max_nfr_ratio']:.2f}) | "
            f"{'yes' if t['final_accuracy_within_1pt'] else 'no'} "
            f"({100 * t['final_accuracy_gap']:+.2f} pt) | {'**yes**' if every else 'no'} |"
        )
    md += ["", report.get("verdict", ""), "", *headline(report), ""]
    tc = report.get("teacher_cost")
    if tc:
        n = tc["n_many"]
        md += [
            "## Cost of many constraints (teachers precomputed once)",
            "",
            f"One generation, {tc['train_samples']} items, {tc['architecture']}, "
            f"{tc['epochs']} epochs, constrained against 0, 1 and {n} frozen ancestors "
            "(each ancestor's outputs on the training items computed once, before the first "
            "epoch, and stacked per constraint kind); median seconds per epoch after the "
            "first, all measured in one run.",
            "",
            "| constraint kinds | ancestors | s / epoch | vs no constraint | "
            "one-off teacher precompute (s) |",
            "|---|---|---|---|---|",
        ]
        for label, run in tc["runs"].items():
            base = run["ancestors_0"]["median_epoch_seconds"]
            for count in (0, 1, n):
                a = run[f"ancestors_{count}"]
                md.append(
                    f"| {label} | {count} | {a['median_epoch_seconds']:.3f} | "
                    f"{a['median_epoch_seconds'] / base:.3f}x | {a['teacher_seconds']:.2f} |"
                )
        md.append("")
        for label, run in tc["runs"].items():
            md.append(
                f"- {label}: {n} ancestors cost {run['ratio_many_to_one']:.3f}x the per-epoch "
                f"time of one (median epochs; fastest epochs: "
                f"{run['ratio_many_to_one_min']:.3f}x)."
            )
        ms = tc.get("loss_ms_per_step")
        if ms:
            first_run = tc["runs"][next(iter(tc["runs"]))]
            steps = math.ceil(tc["train_samples"] / 128)
            step_ms = 1e3 * first_run["ancestors_0"]["median_epoch_seconds"] / steps
            md += [
                "",
                "The constraint terms alone (loss + backward per step, batch 128, 60,000 "
                "precomputed items), in milliseconds, against one full training step of "
                f"about {step_ms:.1f} ms:",
                "",
                f"| kind | 1 ancestor | {n} ancestors |",
                "|---|---|---|",
                *[f"| {kind} | {v['1']:.2f} | {v[str(n)]:.2f} |" for kind, v in ms.items()],
            ]
        md += [
            "",
            "Without the precomputation every ancestor would add a forward pass of its "
            "whole model on every batch (not measured here); with it, an ancestor costs one "
            "pass over the training items before the first epoch (the precompute column) "
            "and a slice of a stacked tensor per step.",
            "",
        ]
    md += [
        "## How the recipe was found",
        "",
        "Each row is one full chain with this benchmark's settings (8 epochs, seed 0), run "
        "once during development; none's NFR is the first row's. Notation: fixed / "
        "learned head; ws = warm start from the newest ancestor; C = influence on a head "
        "of the ancestor's class centroids; weights influence/focal/embedding; mix = mixup "
        "distillation inputs (`distill_mix`). These runs predate one fix to the warm "
        "start (the new units of an added layer started inactive and stayed so), so the "
        "rows with ws differ a little from the tables above, which come from the current "
        "code; the last two rows (marked) are current.",
        "",
        "| recipe | final acc | AC | AM | max NFR / none's | mean NFR / none's |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r} | {a:.4f} | {c:.1f} | {m:.4f} | {x:.2f} | {y:.2f} |"
            for r, a, c, m, x, y in report.get("screening", SCREENING)
        ],
        "",
        *FINDINGS,
        "",
        "## Per method",
        "",
    ]
    for name, ev in res.items():
        nfr_png = f"{NAME}_{name}_nfr.png".replace("+", "_")
        c_png = f"{NAME}_{name}_compat.png".replace("+", "_")
        heatmap(ev["nfr"], f"NFR(g, k) — {name}", out_dir / nfr_png, cmap="magma")
        heatmap(ev["compat_top1"], f"C[a][b] top-1 — {name}", out_dir / c_png)
        md += [
            f"### {name}",
            "",
            f"{report['recipes'][name]}. AC {ev['ac']:.2f}, AM {ev['am']:.4f}; NFR_any per "
            "generation: " + ", ".join(f"{g}: {v:.4f}" for g, v in ev["nfr_any"]) + ".",
            "",
            "NFR(g, k) (rows g, columns k):",
            "",
            *_matrix_table(ev["nfr"], ids),
            "",
            "C[a][b] top-1 (queries by a, gallery by b); ECC holds where C[a][b] > C[b][b]:",
            "",
            *_matrix_table(ev["compat_top1"], ids),
            "",
            f"![NFR {name}]({nfr_png}) ![C {name}]({c_png})",
            "",
        ]
    (out_dir / f"{NAME}.md").write_text("\n".join(md))
    (out_dir / f"{NAME}.json").write_text(json.dumps(report, indent=1, default=float) + "\n")


def describe(m: Method) -> str:
    text = "+".join(m.kinds) + f" against {m.against}" if m.kinds else "no constraint"
    weights = {k: v for k, v in m.weights.items() if k in m.kinds}
    extra = {**{f"{k} weight": v for k, v in weights.items()}, **m.train, **m.architecture}
    if extra:
        text += " (" + ", ".join(f"{k}={v}" for k, v in extra.items()) + ")"
    return text


def _chain_job(job: tuple[str, str, int, int, int, str, int]) -> tuple[str, dict, list]:
    """One method's chain in a worker process: (name, evaluation, generations)."""
    name, dataset, generations, epochs, seed, workdir, threads = job
    torch.set_num_threads(threads)
    ds = load_dataset(dataset)
    chain = run_chain(ds, METHODS[name], generations, epochs, seed, Path(workdir), threads)
    gens = [
        {k: v for k, v in g.items() if k not in ("checkpoint", "sha256")}
        for g in chain["generations"]
    ]
    return name, evaluate_chain(chain["outputs"], ds.y_test), gens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compat", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--generations", type=int, default=5)
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--jobs", type=int, default=2, help="chains trained at once, one process each")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (on a busy machine more threads than free cores "
        "make torch spin: one thread per process is the robust choice)",
    )
    p.add_argument("--teacher-epochs", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="2 epochs, 3 generations: a smoke run")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument(
        "--render", action="store_true", help="only rewrite the report from OUT/compat.json"
    )
    p.add_argument(
        "--teacher-only",
        action="store_true",
        help="only re-measure the cost of many constraints into OUT/compat.json",
    )
    args = p.parse_args(argv)
    if args.teacher_only:
        path = Path(args.out) / f"{NAME}.json"
        report = json.loads(path.read_text())
        ds = load_dataset(report["settings"]["dataset"])
        with tempfile.TemporaryDirectory(prefix="graceful-bench-") as tmp:
            report["teacher_cost"] = teacher_cost(
                ds,
                Path(tmp),
                args.teacher_epochs,
                args.threads,
                kinds_list=(("influence", "focal"), ("influence", "focal", "embedding")),
            )
        path.write_text(json.dumps(report, indent=1, default=float) + "\n")
        args.render = True
    if args.render:
        report = json.loads((Path(args.out) / f"{NAME}.json").read_text())
        report["screening"] = SCREENING
        report["settings"].setdefault("constraint_weights", WEIGHTS)
        report["recipes"] |= {n: describe(METHODS[n]) for n in report["methods"] if n in METHODS}
        report["verdict"] = verdict(report["targets"])
        write_report(report, Path(args.out))
        print(f"rewrote {Path(args.out) / (NAME + '.md')}")
        return 0
    if args.quick:
        args.epochs, args.generations, args.teacher_epochs = 2, 3, 2
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or "none" not in names:
        p.error(f"methods must include none and be among {', '.join(METHODS)}; got {names}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    ds = load_dataset(args.dataset)
    spec_defaults = TrainSpec(0, ds.x_train[:2], ds.y_train[:2], ds.num_classes, [], {})
    results: dict[str, dict[str, Any]] = {}
    chains: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="graceful-bench-") as tmp:
        work = Path(tmp)
        jobs = [
            (n, ds.spec, args.generations, args.epochs, args.seed, str(work), args.threads)
            for n in names
        ]
        for n in names:
            print(f"method {n}: {describe(METHODS[n])}", flush=True)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max(1, args.jobs), mp_context=ctx) as pool:
            for name, ev, gens in pool.map(_chain_job, jobs):
                results[name], chains[name] = ev, gens
                print(summary_line(name, ev, results.get("none")), flush=True)
        print("teacher cost", flush=True)
        cost = teacher_cost(
            ds,
            work,
            args.teacher_epochs,
            args.threads,
            kinds_list=(("influence", "focal"), ("influence", "focal", "embedding")),
        )
    first = chains["none"]
    for name in results:
        results[name]["train_seconds"] = [g["train_seconds"] for g in chains[name]]
        results[name]["generations"] = chains[name]
    report = {
        "settings": {
            "dataset": ds.spec,
            "generations": args.generations,
            "epochs": args.epochs,
            "seed": args.seed,
            "jobs": args.jobs,
            "threads": args.threads,
            "batch_size": spec_defaults.batch_size,
            "lr": spec_defaults.lr,
            "embed_dim": spec_defaults.embed_dim,
            "head": first[0]["architecture"]["head"],
            "constraint_weights": WEIGHTS,
            "train_spec_defaults": {
                k: v
                for k, v in asdict(spec_defaults).items()
                if k not in ("x", "y", "classes", "architecture", "constraints", "generation")
            },
            "quick": args.quick,
        },
        "chain": [
            {k: g[k] for k in ("id", "classes", "train_samples", "architecture")} for g in first
        ],
        "recipes": {n: describe(METHODS[n]) for n in names},
        "methods": results,
        "targets": check_targets(results),
        "teacher_cost": cost,
        "screening": SCREENING,
    }
    report["wall_seconds"] = time.perf_counter() - started
    report["verdict"] = verdict(report["targets"])
    write_report(report, Path(args.out))
    print(report["verdict"])
    print(f"wrote {Path(args.out) / (NAME + '.md')} in {report['wall_seconds'] / 60:.1f} min")
    return 0


def headline(report: dict[str, Any]) -> list[str]:
    """The targets in one paragraph, with the numbers."""
    res, tg = report["methods"], report["targets"]
    best_ac = max(tg, key=lambda n: (tg[n]["ac"], res[n]["am"]))
    all_three = [n for n, t in tg.items() if t["ac_is_1"] and t["nfr_half_of_none_every_pair"]]
    two = [
        n
        for n, t in tg.items()
        if t["nfr_half_of_none_every_pair"] and t["final_accuracy_within_1pt"]
    ]
    lines = [
        f"**AC = 1.0 holds for no method** (best: `{best_ac}`, AC {tg[best_ac]['ac']:.2f}, "
        f"AM {res[best_ac]['am']:.4f})."
        if not all_three
        else f"AC = 1.0 holds for {', '.join(all_three)}.",
    ]
    if two:
        lines.append(
            "NFR at most half of none's on every pair *and* final accuracy within one point "
            "hold together for "
            + ", ".join(
                f"`{n}` (max NFR ratio {tg[n]['max_nfr_ratio']:.2f}, accuracy "
                f"{100 * tg[n]['final_accuracy_gap']:+.2f} pt)"
                for n in two
            )
            + "."
        )
    return [" ".join(lines)]


def verdict(targets: dict[str, Any]) -> str:
    lines = []
    for name, t in targets.items():
        held = [
            k
            for k, ok in (
                ("AC = 1.0", t["ac_is_1"]),
                ("NFR <= none/2 on every pair", t["nfr_half_of_none_every_pair"]),
                ("final accuracy within 1 point", t["final_accuracy_within_1pt"]),
            )
            if ok
        ]
        lines.append(f"- {name}: " + (", ".join(held) if held else "none of the targets") + ".")
    return "Targets that hold:\n\n" + "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

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
import statistics
import sys
import tempfile
import time
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


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("none", (), note="no constraint"),
        Method("bct-last", ("influence",), "last", note="BCT against the previous generation"),
        Method("bct-all", ("influence",), "all", note="BCT against every earlier generation"),
        Method("pct", ("focal",), "all", note="PCT focal distillation against every one"),
        Method("bct+pct", ("influence", "focal"), "all", note="both, against every one"),
    )
}


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
    ds: Dataset, workdir: Path, epochs: int, threads: int | None, n_many: int = 10, log=print
) -> dict[str, Any]:
    """Per-epoch time of one generation with 0, 1 and ``n_many`` constrained ancestors
    (bct+pct: influence and focal against each), on the same data and seed."""
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
        "method": "bct+pct",
    }
    for count in (0, 1, n_many):
        constraints = [
            ConstraintSpec(k, kind, 1.0, ckpt, sha, cls)
            for k, ckpt, sha, cls in ancestors[:count]
            for kind in ("influence", "focal")
        ]
        r = train_generation(
            TrainSpec(
                generation=200 + count,
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
            "teacher_seconds": r["teacher_seconds"],
        }
        log(
            f"  teacher cost: {count} ancestors -> {per_epoch:.3f}s/epoch, "
            f"precompute {r['teacher_seconds']:.2f}s"
        )
    one, many = out["ancestors_1"], out[f"ancestors_{n_many}"]
    base = out["ancestors_0"]["median_epoch_seconds"]
    out["ratio_many_to_one"] = many["median_epoch_seconds"] / one["median_epoch_seconds"]
    out["overhead_one"] = one["median_epoch_seconds"] / base - 1.0
    out["overhead_many"] = many["median_epoch_seconds"] / base - 1.0
    out["n_many"] = n_many
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
            [g, k, v / base_nfr[(g, k)] if base_nfr[(g, k)] > 0 else None]
            for g, k, v in ev["nfr"]
        ]
        half = all(v <= 0.5 * base_nfr[(g, k)] for g, k, v in ev["nfr"])
        acc_gap = ev["accuracy"][-1] - base["accuracy"][-1]
        out[name] = {
            "ac_is_1": ev["ac"] == 1.0,
            "ac": ev["ac"],
            "nfr_half_of_none_every_pair": half,
            "nfr_pairs_at_most_half": sum(
                v <= 0.5 * base_nfr[(g, k)] for g, k, v in ev["nfr"]
            ),
            "nfr_pairs": len(ev["nfr"]),
            "nfr_ratio_to_none": ratios,
            "max_nfr_ratio": max((r for _, _, r in ratios if r is not None), default=None),
            "final_accuracy_gap": acc_gap,
            "final_accuracy_within_1pt": acc_gap >= -0.01,
        }
    return out


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
        f"{s['threads']} CPU threads; head `{s['head']}`. Produced by `python -m bench.compat` "
        f"in {report['wall_seconds'] / 60:.1f} min. Metric definitions: DESIGN.md.",
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
    md += ["", report.get("verdict", ""), ""]
    tc = report.get("teacher_cost")
    if tc:
        n = tc["n_many"]
        md += [
            "## Cost of many constraints (teachers precomputed once)",
            "",
            f"One generation, {tc['train_samples']} items, {tc['architecture']}, "
            f"{tc['epochs']} epochs, bct+pct (influence + focal) against 0, 1 and {n} frozen "
            "ancestors; median seconds per epoch after the first (measured in one run).",
            "",
            "| ancestors | s / epoch | vs none | one-off teacher precompute (s) |",
            "|---|---|---|---|",
        ]
        base = tc["ancestors_0"]["median_epoch_seconds"]
        for count in (0, 1, n):
            a = tc[f"ancestors_{count}"]
            md.append(
                f"| {count} | {a['median_epoch_seconds']:.3f} | "
                f"{a['median_epoch_seconds'] / base:.3f}x | {a['teacher_seconds']:.2f} |"
            )
        md += [
            "",
            f"{n} ancestors cost {tc['ratio_many_to_one']:.3f}x the per-epoch time of one.",
            "",
        ]
    md += ["## Per method", ""]
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
    if not m.kinds:
        text = "no constraint"
    else:
        text = "+".join(m.kinds) + f" against {m.against}"
    extra = {**m.train, **m.architecture}
    if extra:
        text += " (" + ", ".join(f"{k}={v}" for k, v in extra.items()) + ")"
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compat", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--generations", type=int, default=5)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--teacher-epochs", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="2 epochs, 3 generations: a smoke run")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
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
        for name in names:
            m = METHODS[name]
            print(f"method {name}: {describe(m)}", flush=True)
            chain = run_chain(ds, m, args.generations, args.epochs, args.seed, work, args.threads)
            results[name] = evaluate_chain(chain["outputs"], ds.y_test)
            chains[name] = chain["generations"]
            print(summary_line(name, results[name], results.get("none")), flush=True)
        print("teacher cost", flush=True)
        cost = teacher_cost(ds, work, args.teacher_epochs, args.threads)
    first = next(iter(chains.values()))
    for name in results:
        results[name]["train_seconds"] = [g["train_seconds"] for g in chains[name]]
        results[name]["generations"] = [
            {k: v for k, v in g.items() if k not in ("checkpoint", "sha256")} for g in chains[name]
        ]
    report = {
        "settings": {
            "dataset": ds.spec,
            "generations": args.generations,
            "epochs": args.epochs,
            "seed": args.seed,
            "threads": args.threads,
            "batch_size": spec_defaults.batch_size,
            "lr": spec_defaults.lr,
            "embed_dim": spec_defaults.embed_dim,
            "head": first[0]["architecture"]["head"],
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
    }
    report["wall_seconds"] = time.perf_counter() - started
    report["verdict"] = verdict(report["targets"])
    write_report(report, Path(args.out))
    print(report["verdict"])
    print(f"wrote {Path(args.out) / (NAME + '.md')} in {report['wall_seconds'] / 60:.1f} min")
    return 0


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

"""Image-model benchmark: the default image backbone (a small residual CNN) against the MLP.

    python -m bench.models [--epochs 8] [--threads 2] [--models mlp,cnn]

Fashion-MNIST (``load_dataset("fashion-mnist")``, the product's loader), all 10 classes,
all 60,000 training images: the scenario's last stage. Each model trains unconstrained
through the product's own training function, ``workers.train.train_generation``, with a
``TrainSpec`` as ``flows.cycle.train_step`` builds it from the ``TrainConfig`` defaults
(batch 128, lr 0.002, embedding dimension 64, the stationary head, ``augment="auto"``
for this data set), for the compatibility benchmark's epochs (bench/compat.py: 8):

- ``mlp``: ``default_architecture(None)``, the last-stage MLP (what image data sets
  trained with before; it stays the backbone for feature vectors), no augmentation;
- ``cnn``: ``default_architecture((1, 28, 28))``, the last-stage residual CNN, random
  crop with padding 3 and horizontal flip (``augment="auto"`` on Fashion-MNIST).

Test accuracy after every epoch: each epoch is one call of ``train_generation`` that
stops after it (its ``stop_after_epochs`` hook) leaving the resume file, which the next
call continues from exactly (tests/unit/test_train.py: a resumed training equals an
uninterrupted one); the model in the resume file is evaluated on the 10,000 test images
with ``workers.embed.forward``. Seconds per epoch: the call's wall time (training and
the call's set-up; the evaluation is timed apart), and the process's CPU seconds in it
(the better figure on a shared machine: other processes stretch the wall time, the
1-minute load average is recorded with each epoch). CPU, torch threads ``--threads``.

Writes ``bench/results/models.md`` (table, ``models_accuracy.png``) and
``bench/results/models.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.datasets import Dataset, load_dataset
from workers.embed import forward
from workers.metrics import accuracy
from workers.models import EmbeddingNet
from workers.scenario import default_architecture
from workers.train import TrainingInterrupted, TrainSpec, train_generation

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "models"
TARGET = 0.92  # the bar for the default image model, unconstrained, last stage
DEFAULT_EPOCHS = 8  # bench/compat.py's DEFAULT_EPOCHS: the benchmark's epochs


def architectures(ds: Dataset) -> dict[str, dict[str, Any]]:
    return {"mlp": default_architecture(None), "cnn": default_architecture(ds.input_shape)}


def run_model(
    name: str, arch: dict, ds: Dataset, epochs: int, threads: int, tmp: Path
) -> dict[str, Any]:
    """Train ``arch`` epoch by epoch through ``train_generation``; test accuracy per epoch."""
    from flows.config import TrainConfig

    t = TrainConfig(epochs=epochs)
    spec = TrainSpec(
        generation=1,
        x=ds.x_train,
        y=ds.y_train,
        num_classes=ds.num_classes,
        classes=list(range(ds.num_classes)),
        architecture=dict(arch),
        embed_dim=t.embed_dim,
        epochs=t.epochs,
        batch_size=t.batch_size,
        lr=t.lr,
        seed=t.seed,
        augment=t.augment,
        dataset=ds.spec,
        checkpoint_dir=str(tmp / name),
        threads=threads,
        stop_after_epochs=1,
    )
    resume = tmp / name / "gen-1.resume.pt"
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    for epoch in range(epochs):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            result = train_generation(spec)
            model_state = None
        except TrainingInterrupted:
            model_state = torch.load(resume, map_location="cpu", weights_only=True)["model"]
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        if model_state is not None:
            model = EmbeddingNet(ds.input_shape, ds.num_classes, t.embed_dim, arch)
            model.load_state_dict(model_state)
        else:
            from workers.models import load_model

            model = load_model(result["checkpoint"], result["sha256"])
        t1 = time.perf_counter()
        acc = accuracy(forward(model, ds.x_test).prediction, ds.y_test)
        rows.append(
            {
                "epoch": epoch + 1,
                "test_accuracy": acc,
                "seconds": seconds,
                "cpu_seconds": cpu,
                "load_average": os.getloadavg()[0],
                "eval_seconds": time.perf_counter() - t1,
            }
        )
        print(
            f"{name} epoch {epoch + 1}: acc {acc:.4f}, {seconds:.1f} s, cpu {cpu:.1f} s", flush=True
        )
    params = sum(p.numel() for p in model.parameters())
    train_s = [r["seconds"] for r in rows]
    return {
        "architecture": arch,
        "parameters": int(params),
        "augment": result.get("augment"),
        "epochs": rows,
        "final_accuracy": rows[-1]["test_accuracy"],
        "best_accuracy": max(r["test_accuracy"] for r in rows),
        "seconds_per_epoch": float(np.mean(train_s)),
        "cpu_seconds_per_epoch": float(np.mean([r["cpu_seconds"] for r in rows])),
        "train_seconds": float(np.sum(train_s)),
        "history": result.get("history"),
    }


def projected_epochs(rows: list[dict[str, Any]], target: float) -> int | None:
    """The first epoch at or above ``target``; None if none reached it."""
    return next((r["epoch"] for r in rows if r["test_accuracy"] >= target), None)


def _median(r: dict[str, Any], key: str) -> float:
    """The median over epochs: a shared machine's other jobs stretch some epochs."""
    return float(np.median([e[key] for e in r["epochs"]]))


def report(results: dict[str, Any], settings: dict[str, Any]) -> None:
    from flows.plots import _plt

    cnn = results.get("cnn")
    summary: dict[str, Any] = {"target": TARGET}
    if cnn is not None:
        summary |= {
            "cnn_final_accuracy": cnn["final_accuracy"],
            "cnn_reached_target": cnn["final_accuracy"] >= TARGET,
            "cnn_first_epoch_at_target": projected_epochs(cnn["epochs"], TARGET),
        }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(
        json.dumps({"settings": settings, "models": results, "summary": summary}, indent=1)
    )
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        a = r["architecture"]
        label = f"{name} ({a['kind']} w{a['width']} d{a['depth']})"
        label += f", {_median(r, 'seconds'):.0f} s/epoch"
        ax.plot(
            [e["epoch"] for e in r["epochs"]],
            [e["test_accuracy"] for e in r["epochs"]],
            "o-",
            label=label,
        )
    ax.axhline(TARGET, color="grey", ls=":", label=f"target {TARGET:.0%}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("Fashion-MNIST test accuracy")
    ax.set_title("Default image backbone vs MLP (unconstrained, all data)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{NAME}_accuracy.png", dpi=120)

    names = list(results)
    which = " (bench/compat.py's)" if settings["epochs"] == DEFAULT_EPOCHS else ""
    lines = [
        "# Image models: residual CNN vs MLP on Fashion-MNIST",
        "",
        f"`python -m bench.models` (see its docstring), {settings['minutes']:.1f} min on "
        f"{settings['machine']}, torch {settings['torch']}, {settings['threads']} torch "
        f"thread(s), CPU. Fashion-MNIST, all 10 classes, all 60,000 training images, "
        f"{settings['epochs']} epochs{which}, unconstrained, through "
        "`workers.train.train_generation` with the `TrainConfig` defaults (batch "
        f"{settings['batch_size']}, lr {settings['lr']}, embedding dim "
        f"{settings['embed_dim']}, stationary head, cosine learning-rate schedule).",
        "",
        "| model | architecture | weights | augmentation | final test acc | best "
        "| s / epoch (median) | CPU s / epoch (median) |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for name in names:
        r = results[name]
        a = r["architecture"]
        lines.append(
            f"| {name} | {a['kind']} width {a['width']} depth {a['depth']} | "
            f"{r['parameters']:,} | {r['augment']} | {r['final_accuracy']:.4f} | "
            f"{r['best_accuracy']:.4f} | {_median(r, 'seconds'):.1f} "
            f"| {_median(r, 'cpu_seconds'):.1f} |"
        )
    lines += [
        "",
        "Test accuracy after each epoch (wall seconds of the epoch / CPU seconds / "
        "1-minute load average of the machine at its end):",
        "",
        "| epoch | " + " | ".join(names) + " |",
        "|---:|" + "---:|" * len(names),
    ]
    for i in range(settings["epochs"]):
        cells = []
        for name in names:
            e = results[name]["epochs"][i]
            cells.append(
                f"{e['test_accuracy']:.4f} ({e['seconds']:.0f} s / {e['cpu_seconds']:.0f} s"
                f" / {e['load_average']:.1f})"
            )
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    if cnn is not None:
        hit = summary["cnn_first_epoch_at_target"]
        verdict = (
            f"met: {cnn['final_accuracy']:.2%} after {settings['epochs']} epochs"
            f" (first at or above it after epoch {hit})"
            if summary["cnn_reached_target"]
            else f"missed: {cnn['final_accuracy']:.2%} after {settings['epochs']} epochs"
        )
        lines += ["", f"Target: the CNN at least {TARGET:.0%} at the last epoch: {verdict}."]
    lines += ["", f"![accuracy per epoch]({NAME}_accuracy.png)", ""]
    (RESULTS / f"{NAME}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--dataset", default="fashion-mnist")
    args = ap.parse_args()
    from flows.config import TrainConfig

    started = time.perf_counter()
    ds = load_dataset(args.dataset)
    archs = architectures(ds)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            results[name] = run_model(name, archs[name], ds, args.epochs, args.threads, Path(tmp))
    t = TrainConfig()
    settings = {
        "dataset": ds.spec,
        "epochs": args.epochs,
        "threads": args.threads,
        "batch_size": t.batch_size,
        "lr": t.lr,
        "embed_dim": t.embed_dim,
        "seed": t.seed,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} core(s)",
        "minutes": (time.perf_counter() - started) / 60,
    }
    report(results, settings)


if __name__ == "__main__":
    main()

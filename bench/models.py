"""Image models: the product's training against a plain PyTorch loop, on any item order.

    python -m bench.models [--datasets photos=imagefolder:DIR,fashion-mnist,digits]
                           [--epochs 15] [--stages 4] [--parts ratio,scenario]

Per data set (the product's own loader, ``workers.data.datasets.load_dataset``):

- **ratio**: one unconstrained generation on all training items, through the product's
  training function ``workers.learning.train.train_generation`` with a ``TrainSpec`` built from
  the ``TrainConfig`` defaults and the scenario's last-stage architecture
  (``workers.data.scenario.default_architecture``), against a plain 40-line loop
  (:func:`plain_loop`: the same ``EmbeddingNet``, AdamW at the same rate, cosine
  schedule, batch 128, a uniform shuffle of all items every epoch, the same augmentation
  done with plain tensor ops), on the same items in two orders: ``class-sorted`` (as an
  image folder lists them: class by class) and ``shuffled``. Each run in its own
  process (its peak RSS is its own). ``product_vs_plain_ratio`` = product accuracy /
  plain accuracy (target >= 0.97).
- **scenario**: the growing scenario (``--stages``, default 4) through the product's
  update cycle (``bench.compat.run_chain``: start_cycle, train_step on Ray,
  evaluate_step, gate, promote, backfill), unconstrained (``none``) and with the default
  method; test accuracy per stage, which must grow with the data.

Writes ``bench/results/models.md`` (tables, ``models_*.png``) and ``models.json``:
``results[<data set>][<order>]`` (``product_accuracy``, ``plain_accuracy``,
``product_vs_plain_ratio``, seconds per epoch, peak RSS) and
``results[<data set>]["scenario"][<method>]`` (accuracy per stage).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "models"
ORDERS = ("class-sorted", "shuffled")
RATIO_TARGET = 0.97
ACC_TARGETS = {"photos": 0.65, "fashion-mnist": 0.92, "digits": 0.97}


def _items(spec: str, order: str) -> tuple[Any, np.ndarray]:
    """The data set and its training positions in ``order``."""
    from workers.data.datasets import load_dataset

    ds = load_dataset(spec)
    if order == "class-sorted":
        idx = np.argsort(ds.y_train, kind="stable")
    else:
        idx = np.random.default_rng(0).permutation(len(ds.y_train))
    return ds, idx


def _spec(ds: Any, idx: np.ndarray, epochs: int, tmp: str):
    from flows.config import TrainConfig
    from workers.data.scenario import default_architecture

    return TrainConfig(epochs=epochs).train_spec(
        1,
        x=ds.x_train[idx],
        y=ds.y_train[idx],
        num_classes=ds.num_classes,
        classes=list(range(ds.num_classes)),
        architecture=default_architecture(ds.input_shape) | {"head": "fixed"},
        dataset=ds.spec,
        checkpoint_dir=tmp,
        threads=torch.get_num_threads(),
    )


def _test_accuracy(model: Any, ds: Any) -> float:
    from workers.learning.embed import forward
    from workers.measuring.metrics import accuracy

    return accuracy(forward(model, ds.x_test).prediction, ds.y_test)


def product_run(spec_str: str, order: str, epochs: int) -> dict[str, Any]:
    """One generation through ``train_generation`` (in a fresh process)."""
    from workers.learning.models import load_model
    from workers.learning.train import train_generation

    ds, idx = _items(spec_str, order)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = train_generation(_spec(ds, idx, epochs, tmp))
        seconds = time.perf_counter() - t0
        acc = _test_accuracy(load_model(result["checkpoint"], result["sha256"]), ds)
    return {
        "accuracy": acc,
        "seconds": seconds,
        "seconds_per_epoch": float(np.median(result["epoch_seconds"])),
        "augment": result["augment"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "architecture": _spec(ds, idx[:2], epochs, ".").architecture,
    }


def train_plain(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, spec: Any, epochs: int, augment: str
) -> tuple[Any, list[float], float]:
    """The plain PyTorch reference loop: ``spec``'s model, AdamW with a cosine schedule,
    cross-entropy, the product's crop/flip augmentation written out by hand. Returns the
    model, the seconds of each epoch and of all of them."""
    from workers.learning.models import EmbeddingNet

    torch.manual_seed(spec.seed)
    model = EmbeddingNet(tuple(x.shape[1:]), num_classes, spec.embed_dim, spec.architecture)
    if x.ndim == 4:  # per-channel statistics of the training images, as the product sets
        model.set_input_stats(x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)))
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=spec.lr, weight_decay=1e-4
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    pad = max(1, min(4, min(x.shape[2:]) // 8)) if x.ndim == 4 else 0
    t0 = time.perf_counter()
    epoch_seconds = []
    for _ in range(epochs):
        t_epoch = time.perf_counter()
        model.train()
        perm = torch.randperm(len(y))
        for at in range(0, len(y) - 1, spec.batch_size):
            b = perm[at : at + spec.batch_size]
            xb, yb = x[b], y[b]
            if augment in ("crop", "crop+flip"):  # shift by up to ``pad`` pixels each way
                padded = F.pad(xb, (pad, pad, pad, pad))
                dy, dx = torch.randint(0, 2 * pad + 1, (2, len(b)))
                h, w = xb.shape[2:]
                xb = torch.stack(
                    [padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(len(b))]
                )
            if augment == "crop+flip":
                flip = torch.rand(len(b)) < 0.5
                xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            _, logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        epoch_seconds.append(time.perf_counter() - t_epoch)
    return model, epoch_seconds, time.perf_counter() - t0


def plain_loop(spec_str: str, order: str, epochs: int, augment: str) -> dict[str, Any]:
    """The reference: the same model trained by a plain loop over in-memory tensors."""
    ds, idx = _items(spec_str, order)
    spec = _spec(ds, idx, epochs, ".")
    x, y = torch.from_numpy(ds.x_train[idx].copy()), torch.from_numpy(ds.y_train[idx].copy())
    model, epoch_seconds, seconds = train_plain(x, y, ds.num_classes, spec, epochs, augment)
    return {
        "accuracy": _test_accuracy(model, ds),
        "seconds": seconds,
        "seconds_per_epoch": float(np.median(epoch_seconds)),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _in_process(fn, *args) -> dict[str, Any]:
    """``fn(*args)`` in a fresh process: its peak RSS is its own."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def ratio_part(name: str, spec: str, epochs: int, log=print) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for order in ORDERS:
        product = _in_process(product_run, spec, order, epochs)
        log(f"  [{name} {order}] product {product['accuracy']:.4f}", flush=True)
        plain = _in_process(plain_loop, spec, order, epochs, product["augment"])
        log(f"  [{name} {order}] plain   {plain['accuracy']:.4f}", flush=True)
        out[order] = {
            "product_accuracy": product["accuracy"],
            "plain_accuracy": plain["accuracy"],
            "product_vs_plain_ratio": product["accuracy"] / plain["accuracy"],
            "product_seconds_per_epoch": product["seconds_per_epoch"],
            "plain_seconds_per_epoch": plain["seconds_per_epoch"],
            "product_seconds": product["seconds"],
            "plain_seconds": plain["seconds"],
            "product_peak_rss_mib": product["peak_rss_mib"],
            "plain_peak_rss_mib": plain["peak_rss_mib"],
            "augment": product["augment"],
            "architecture": product["architecture"],
            "epochs": epochs,
        }
    return out


def scenario_part(
    name: str, spec: str, epochs: int, stages: int, methods=("none", "default"), log=print
) -> dict[str, Any]:
    """The growing scenario through the product's cycle, unconstrained and default."""
    from bench.compat import _stop_ray, run_chain
    from flows.config import TrainConfig
    from workers.learning.kinds import TrainMethod

    out: dict[str, Any] = {}
    for method in methods:
        chosen = TrainMethod.NONE if method == "none" else TrainConfig().method
        with tempfile.TemporaryDirectory() as home:
            lin, runs = run_chain(
                spec,
                f"{name}/{method}",
                TrainConfig(method=chosen, epochs=epochs),
                stages,
                Path(home),
                log=log,
                pin=False,
            )
            gens = lin.generations()
            out[method] = {
                "method": chosen.value,
                "accuracy_per_stage": [float(g.accuracy) for g in gens],
                "items_per_stage": [int(g.train_samples) for g in gens],
                "architecture_per_stage": [g.architecture for g in gens],
                "promoted": [bool(runs[int(g.id)]["promoted"]) for g in gens],
                "seconds_per_stage": [float(g.train_seconds) for g in gens],
            }
        _stop_ray()
    return out


def source_run(spec_str: str, epochs: int) -> dict[str, Any]:
    """One generation on an image folder read as a growing source (in a fresh process):
    the product's scan, evaluation set and streaming reader, as ``graceful cycle`` does."""
    import pyarrow.parquet as pq

    from flows.config import TrainConfig
    from workers.data.scenario import default_architecture
    from workers.data.sources import load_eval, scan_source
    from workers.learning.models import load_model
    from workers.learning.spec import SourceItems
    from workers.learning.train import train_generation

    t0 = time.perf_counter()
    scan = scan_source(spec_str)
    ev = load_eval(spec_str)
    names = sorted(set(scan.class_counts()) | set(ev.labels))
    vocab = {n: i for i, n in enumerate(names)}
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys.parquet"
        pq.write_table(scan.table, keys)
        items = SourceItems(spec_str, str(keys), vocab, ev.input_format.as_dict(), scan.fingerprint)
        spec = TrainConfig(epochs=epochs).train_spec(
            1,
            x=None,
            y=None,
            source=items,
            num_classes=len(names),
            classes=list(range(len(names))),
            architecture=default_architecture(ev.input_format.shape) | {"head": "fixed"},
            checkpoint_dir=tmp,
            threads=torch.get_num_threads(),
        )
        result = train_generation(spec)
        model = load_model(result["checkpoint"], result["sha256"])
    from workers.learning.embed import forward
    from workers.measuring.metrics import accuracy

    y = np.asarray([vocab[n] for n in ev.labels])
    full = 0
    for key in scan.table.column("key").to_pylist():
        from PIL import Image

        with Image.open(Path(spec_str.split(":", 1)[1]) / key) as img:
            full += img.width * img.height * 3
    return {
        "items": scan.items,
        "skipped": len(scan.skipped),
        "input_shape": list(ev.input_format.shape),
        "accuracy": accuracy(forward(model, ev.x).prediction, y),
        "seconds": time.perf_counter() - t0,
        "seconds_per_epoch": float(np.median(result["epoch_seconds"])),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "decoded_full_size_mib": full / 2**20,
        "augment": result["augment"],
    }


def _plot(results: dict[str, Any]) -> list[str]:
    from flows.plots import _plt

    plt = _plt()
    names = []
    fig, ax = plt.subplots(figsize=(7, 3.8))
    labels, product, plain = [], [], []
    for ds, r in results.items():
        for order in ORDERS:
            if order in r:
                labels.append(f"{ds}\n{order}")
                product.append(r[order]["product_accuracy"])
                plain.append(r[order]["plain_accuracy"])
    if labels:
        at = np.arange(len(labels))
        ax.bar(at - 0.2, product, 0.4, label="graceful (train_generation)")
        ax.bar(at + 0.2, plain, 0.4, label="plain PyTorch loop")
        ax.set_xticks(at, labels, fontsize=7)
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        ax.set_title("One unconstrained generation, same model, epochs and items")
        fig.tight_layout()
        fig.savefig(RESULTS / f"{NAME}_ratio.png", dpi=120)
        names.append(f"{NAME}_ratio.png")
    plt.close(fig)
    scen = {ds: r["scenario"] for ds, r in results.items() if "scenario" in r}
    if scen:
        fig, axes = plt.subplots(1, len(scen), figsize=(4.5 * len(scen), 3.6), squeeze=False)
        for ax, (ds, r) in zip(axes[0], scen.items(), strict=True):
            for method, m in r.items():
                ax.plot(
                    range(1, len(m["accuracy_per_stage"]) + 1),
                    m["accuracy_per_stage"],
                    "o-",
                    label=f"{method} ({m['method']})",
                )
            ax.set_xlabel("stage (generation)")
            ax.set_ylabel("test accuracy")
            ax.set_title(ds)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(RESULTS / f"{NAME}_scenario.png", dpi=120)
        names.append(f"{NAME}_scenario.png")
        plt.close(fig)
    return names


def render(report: dict[str, Any]) -> None:
    s, results = report["settings"], report["results"]
    lines = [
        "# Image models: the product's training against a plain loop, on any order",
        "",
        f"`python -m bench.models {s['argv']}` ({s['minutes']:.0f} min on {s['machine']}, "
        f"torch {s['torch']}, CPU, {s['threads']} threads; no GPU was lent to this run). "
        "See the module's docstring for what runs.",
        "",
        "## One generation: product / plain loop",
        "",
        "| data set | order | architecture | augment | epochs | product acc | plain acc "
        "| ratio | s/epoch product / plain | peak RSS MiB product / plain |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for ds, r in results.items():
        for order in ORDERS:
            if order not in r:
                continue
            o = r[order]
            a = o["architecture"]
            lines.append(
                f"| {ds} | {order} | {a['kind']} w{a.get('width')} d{a.get('depth')} | "
                f"{o['augment']} | {o['epochs']} | {o['product_accuracy']:.4f} | "
                f"{o['plain_accuracy']:.4f} | **{o['product_vs_plain_ratio']:.3f}** | "
                f"{o['product_seconds_per_epoch']:.1f} / {o['plain_seconds_per_epoch']:.1f} | "
                f"{o['product_peak_rss_mib']:.0f} / {o['plain_peak_rss_mib']:.0f} |"
            )
    lines += ["", f"Target: ratio >= {RATIO_TARGET} on every data set and order.", ""]
    scen = {ds: r["scenario"] for ds, r in results.items() if "scenario" in r}
    if scen:
        lines += [
            "## The growing scenario through the product's cycle",
            "",
            "| data set | method | accuracy per stage | items per stage | promoted |",
            "|---|---|---|---|---|",
        ]
        for ds, r in scen.items():
            for method, m in r.items():
                accs = " → ".join(f"{v:.4f}" for v in m["accuracy_per_stage"])
                items = ", ".join(str(v) for v in m["items_per_stage"])
                promoted = "".join("✓" if p else "✗" for p in m["promoted"])
                lines.append(f"| {ds} | {method} ({m['method']}) | {accs} | {items} | {promoted} |")
        lines.append("")
    src = {ds: r["source"] for ds, r in results.items() if "source" in r}
    if src:
        lines += [
            "## Photos of varying sizes, streamed as a source",
            "",
            "| data set | photos (skipped) | input | augment | accuracy | s/epoch "
            "| peak RSS MiB | the photos decoded at full size, MiB |",
            "|---|---:|---|---|---:|---:|---:|---:|",
        ]
        for ds, o in src.items():
            lines.append(
                f"| {ds} | {o['items']} ({o['skipped']}) | {'x'.join(map(str, o['input_shape']))} "
                f"| {o['augment']} | {o['accuracy']:.4f} | {o['seconds_per_epoch']:.1f} | "
                f"{o['peak_rss_mib']:.0f} | {o['decoded_full_size_mib']:.0f} |"
            )
        lines.append("")
    lines += [f"![{n}]({n})" for n in report.get("plots", [])] + [""]
    (RESULTS / f"{NAME}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default="photos=imagefolder:bench/data/photos")
    ap.add_argument("--epochs", type=int, default=None, help="default: TrainConfig's")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--parts", default="ratio,scenario")
    ap.add_argument("--merge", action="store_true", help="keep other data sets' results")
    ap.add_argument("--methods", default="none,default", help="the scenario's methods")
    args = ap.parse_args(argv)
    from flows.config import TrainConfig

    epochs = args.epochs or TrainConfig().epochs
    started = time.perf_counter()
    path = RESULTS / f"{NAME}.json"
    old = json.loads(path.read_text()) if args.merge and path.exists() else {}
    results: dict[str, Any] = old.get("results", {})
    for item in args.datasets.split(","):
        name, _, spec = item.rpartition("=")
        name = name or spec
        print(f"{name}: {spec}", flush=True)
        r: dict[str, Any] = {}
        if "ratio" in args.parts:
            r |= ratio_part(name, spec, epochs)
        if "scenario" in args.parts:
            old_scenario = results.get(name, {}).get("scenario", {})
            methods = tuple(args.methods.split(","))
            r["scenario"] = old_scenario | scenario_part(name, spec, epochs, args.stages, methods)
        if "source" in args.parts:  # photos of varying sizes, streamed as a source
            r["source"] = _in_process(source_run, spec, epochs)
            print(f"  [{name} source] {r['source']}", flush=True)
        results[name] = results.get(name, {}) | r
    RESULTS.mkdir(exist_ok=True)
    report = {
        "settings": {
            "argv": " ".join(argv if argv is not None else os.sys.argv[1:]),
            "epochs": epochs,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} core(s)",
            "minutes": (time.perf_counter() - started) / 60
            + (old.get("settings", {}).get("minutes", 0) if args.merge else 0),
            "ratio_target": RATIO_TARGET,
        },
        "results": results,
    }
    report["plots"] = _plot(results)
    path.write_text(json.dumps(report, indent=1, default=_json))
    render(report)


def _json(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    return str(v)


if __name__ == "__main__":
    main()

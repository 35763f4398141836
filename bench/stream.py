"""Streaming-training benchmark: peak memory of a training cycle as a source grows 10x.

    python -m bench.stream [--sizes 200000,600000,2000000] [--epochs 1]

A ``parquet:`` source of feature rows (Fashion-MNIST images average-pooled to 7x7 = 49
features, each row a real image with a small per-row jitter so that millions of rows
stay distinct; ``item_id`` keys, class-name labels, 64k-row row groups, 100k-row files)
and a fixed evaluation set (the 10,000 test images). For each size, in a fresh process
(fresh local Ray), two cycles through the flow's own steps (``flows.cycle.run_cycle``: plan_cycle
-> start_cycle -> train_step on Ray -> evaluate_step): generation 1 on the first half of
the rows, then generation 2 on all of them under the default constraints against
generation 1 (its teachers are precomputed to disk in one streamed pass). Measured for
generation 2: the Ray training worker's peak RSS (``ru_maxrss``, reported by
``train_generation``), the driver's peak RSS (the flow's process: it scans the source and
holds the snapshot's keys and labels, O(items) by design; the rows are written by another
process), training seconds and microseconds per item (epochs x items).

Writes ``bench/results/stream.md`` (table, ``stream_memory.png``) and
``bench/results/stream.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "stream"
SIZES = (200_000, 600_000, 2_000_000)
FILE_ROWS = 100_000
FLAT_TOLERANCE = 0.20  # the bar: the largest source's peak within 20% of the smallest's


def _features(x: np.ndarray) -> np.ndarray:
    """(N, 1, 28, 28) in [0, 1] -> (N, 49): 4x4 average pooling."""
    return x.reshape(len(x), 7, 4, 7, 4).mean(axis=(2, 4)).reshape(len(x), 49).astype(np.float32)


def write_source(root: Path, rows: int, seed: int = 0) -> None:
    """``rows`` training rows (and the evaluation set) as Parquet files under ``root``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workers.data.datasets import FASHION_MNIST_CLASSES, load_dataset

    ds = load_dataset("fashion-mnist")
    names = np.asarray(FASHION_MNIST_CLASSES, dtype=object)
    base = _features(ds.x_train)
    root.mkdir(parents=True, exist_ok=True)

    def table(ids, feats, labels, split):
        return pa.table(
            {
                "item_id": ids,
                "label": names[labels].tolist(),
                "split": [split] * len(ids),
                "features": pa.FixedSizeListArray.from_arrays(pa.array(feats.ravel()), 49),
            }
        )

    test = _features(ds.x_test)
    ids = [f"test-{i}" for i in range(len(test))]
    pq.write_table(table(ids, test, ds.y_test, "test"), root / "eval.parquet")
    rng = np.random.default_rng(seed)
    for f, start in enumerate(range(0, rows, FILE_ROWS)):
        n = min(FILE_ROWS, rows - start)
        src = rng.integers(0, len(base), n)
        feats = base[src] + rng.normal(0, 0.02, (n, 49)).astype(np.float32)
        ids = [f"row-{start + i}" for i in range(n)]
        t = table(ids, feats, ds.y_train[src], "train")
        pq.write_table(t, root / f"part-{f:04d}.parquet", row_group_size=65_536)


def _write_in_child(root: Path, rows: int) -> None:
    cmd = [sys.executable, "-m", "bench.stream", "--write", str(rows), "--out", str(root)]
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])


def one_size(rows: int, epochs: int, workdir: Path) -> dict[str, Any]:
    """Two cycles on a source of ``rows`` rows in this process; generation 2's figures."""
    os.environ["GRACEFUL_HOME"] = str(workdir / "home")
    os.environ.pop("GRACEFUL_DB_URL", None)
    from flows.config import CycleConfig, GateConfig, TrainConfig
    from flows.cycle import CycleStep, run_cycle
    from store.lineage import Lineage

    src = workdir / "source"
    half = rows // 2
    _write_in_child(src, half)  # the data's generation does not count in this process's peak
    lin = Lineage()
    cfg = CycleConfig(
        dataset=f"parquet:{src}", train=TrainConfig(epochs=epochs), gate=GateConfig(enabled=False)
    )
    out: dict[str, Any] = {"rows": rows}
    for gen, n in ((1, half), (2, rows)):
        if gen == 2:
            _write_in_child(src, rows)  # the same files, grown (rewritten with more rows)
        t0 = time.perf_counter()
        started: list[float] = []  # when the snapshot and the generation were recorded

        def on_step(event, started=started) -> None:
            if event.step == CycleStep.START:
                started.append(time.perf_counter())

        cycle = run_cycle(lin, cfg, on_step)
        snapshot_s = started[0] - t0
        result = cycle["train"]
        assert result["items"] == n
        out[f"gen{gen}"] = {
            "items": n,
            "snapshot_seconds": snapshot_s,
            "train_seconds": result["train_seconds"],
            "teacher_seconds": result["teacher_seconds"],
            "epoch_seconds": result["epoch_seconds"],
            "us_per_item": 1e6 * sum(result["epoch_seconds"]) / (epochs * n),
            "trainer_peak_rss_bytes": result["peak_rss_bytes"],
            "teachers": result["teachers"],
            "accuracy": cycle["accuracy"],
        }
    out["driver_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def report(results: list[dict[str, Any]], epochs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = 1 << 20
    small, large = results[0], results[-1]
    ratio_trainer = (
        large["gen2"]["trainer_peak_rss_bytes"] / small["gen2"]["trainer_peak_rss_bytes"]
    )
    ratio_driver = large["driver_peak_rss_bytes"] / small["driver_peak_rss_bytes"]
    growth = large["rows"] / small["rows"]
    summary = {
        "growth": growth,
        "trainer_rss_ratio": ratio_trainer,
        "driver_rss_ratio": ratio_driver,
        "flat": ratio_trainer <= 1 + FLAT_TOLERANCE,
        "flat_tolerance": FLAT_TOLERANCE,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(
        json.dumps({"epochs": epochs, "sizes": results, "summary": summary}, indent=1)
    )
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["rows"] for r in results]
    ax.plot(xs, [r["gen2"]["trainer_peak_rss_bytes"] / mib for r in results], "o-", label="trainer")
    ax.plot(xs, [r["driver_peak_rss_bytes"] / mib for r in results], "s--", label="driver")
    ax.set_xscale("log")
    ax.set_xlabel("training rows in the source")
    ax.set_ylabel("peak RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title("Streaming training: peak memory vs source size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{NAME}_memory.png", dpi=120)
    lines = [
        "# Streaming training: memory flat as the source grows",
        "",
        "`python -m bench.stream` (see its docstring). A Parquet source of Fashion-MNIST "
        "feature rows; generation 2 trains on all rows under the default constraints "
        f"against generation 1, {epochs} epoch(s), through `flows.cycle`'s steps.",
        "",
        "| rows | trainer peak RSS (MiB) | driver peak RSS (MiB) | train s | teacher pass s "
        "| µs / item | accuracy |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        g = r["gen2"]
        lines.append(
            f"| {r['rows']:,} | {g['trainer_peak_rss_bytes'] / mib:.0f} "
            f"| {r['driver_peak_rss_bytes'] / mib:.0f} | {g['train_seconds']:.1f} "
            f"| {g['teacher_seconds']:.1f} | {g['us_per_item']:.1f} | {g['accuracy']:.4f} |"
        )
    lines += [
        "",
        f"Source grown {growth:.0f}x: trainer peak RSS x{ratio_trainer:.2f}, driver x"
        f"{ratio_driver:.2f} (target: within {FLAT_TOLERANCE:.0%}: "
        f"{'met' if summary['flat'] else 'missed'}).",
        "",
        f"![memory]({NAME}_memory.png)",
        "",
    ]
    (RESULTS / f"{NAME}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default=",".join(str(s) for s in SIZES))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process: one size
    ap.add_argument("--write", type=int, help=argparse.SUPPRESS)  # a child: write a source
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write:
        write_source(Path(args.out), args.write)
        return
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            res = one_size(args.one, args.epochs, Path(tmp))
        Path(args.out).write_text(json.dumps(res))
        return
    results = []
    for rows in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            cmd = [sys.executable, "-m", "bench.stream", "--one", str(rows)]
            subprocess.run(
                [*cmd, "--epochs", str(args.epochs), "--out", str(out)],
                check=True,
                cwd=Path(__file__).resolve().parents[1],
            )
            results.append(json.loads(out.read_text()))
            print(json.dumps(results[-1])[:400], flush=True)
    report(results, args.epochs)


if __name__ == "__main__":
    main()

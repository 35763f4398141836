"""Selective-backfill benchmark: policy curves, pipeline throughput, memory vs size.

    python -m bench.backfill [--epochs 4] [--sizes 62500,125000,250000,500000,1000000]
                             [--throughput-items 70000] [--home DIR] [--quick]

1. **Curves.** A 3-generation chain on Fashion-MNIST, trained through the product's
   update cycle (``flows.cycle.run_cycle``: bct+pct, the growing scenario, gate off so
   all three are promoted); after generation 2 a 30% random backfill, so the gallery
   mixes generations 1 and 2 when generation 3 becomes champion. For every policy, its
   order over the real gallery (``workers.collection.backfill.policy_order``, the streaming code a
   job uses), the backfill curve M_mix(beta), beta = 0, 0.1, ..., 1, its area M~,
   no-regret and the recovery at beta = 0.2: (M(0.2) - M(0)) / (M(1) - M(0)).
   Robustness: the same over other starting galleries (all items by generation 1, all
   by 2, a 50/50 mix; and generation 2 as champion over generation 1) and five seeds.
   Then one real job with the winner (``run_backfill``) on the real gallery.
2. **Throughput.** A ``parquet:`` data set of Fashion-MNIST images (train and test,
   70,000 real images as 784 features), a gallery of it embedded by generation 1, and a
   full backfill with the champion: Parquet read -> Ray actor embed -> Parquet write +
   commit, against the raw batched forward of the same model on the same part batches
   in this process with the same threads (before and after the pipeline).
3. **Memory.** Galleries of increasing size (features stand in for images: 32-d random
   vectors in a ``parquet:`` data set, a small MLP), each fully backfilled with the
   ``representative`` policy in a fresh process; its peak RSS (``ru_maxrss``) and the
   embedding actor's, and separately the peak of a process syncing the faiss index.

Writes ``bench/results/backfill.md`` (tables, ``backfill_*.png``) and
``bench/results/backfill.json`` (every figure under stable keys).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
NAME = "backfill"
DATASET = "fashion-mnist"
SIZES = (62_500, 125_000, 250_000, 500_000, 1_000_000)
SEEDS = (0, 1, 2, 3, 4)
FLAT_TOLERANCE = 0.10  # "flat": the largest gallery's peak within 10% of the smallest's


def _set_home(home: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    os.environ["GRACEFUL_HOME"] = str(home)
    os.environ.pop("GRACEFUL_DB_URL", None)


def _rec(curve: list[tuple[float, float]]) -> float:
    m = dict(curve)
    gain = m[1.0] - m[0.0]
    return float("nan") if gain == 0 else (m[0.2] - m[0.0]) / gain


def _summary(curve: list[tuple[float, float]]) -> dict[str, Any]:
    from workers.measuring import metrics as M

    return {
        "curve": [[b, round(v, 6)] for b, v in curve],
        "area": M.curve_area(curve),
        "no_regret": M.no_regret(curve),
        "recovery_at_0.2": _rec(curve),
        "m0": curve[0][1],
        "m1": curve[-1][1],
        "min": min(v for _, v in curve),
    }


# -- 1. chain and curves -----------------------------------------------------------------
def build_chain(home: Path, epochs: int, seed: int) -> dict[str, Any]:
    """Three generations through ``flows.cycle.run_cycle``; generation 3 not backfilled."""
    from flows.config import BackfillConfig, CycleConfig, GateConfig, TrainConfig
    from flows.cycle import run_cycle
    from store.lineage import Lineage

    _set_home(home)
    lin = Lineage()
    if len([g for g in lin.generations() if g.status == "promoted"]) == 3:
        return {"reused": True}
    cfg = CycleConfig(
        dataset=DATASET,
        stages=3,
        train=TrainConfig(method="bct+pct", epochs=epochs, seed=seed),
        gate=GateConfig(enabled=False),
        backfill=BackfillConfig(budget=0.3, policy="random", curve=False, seed=seed),
    )
    seconds = []
    for g in range(3):
        t = time.perf_counter()
        # generation 3 is not backfilled: its budget is 0 (the first indexes the gallery)
        budget = cfg.backfill.budget if g < 2 else 0.0
        backfill = cfg.backfill.model_copy(update={"budget": budget})
        step = cfg.model_copy(update={"backfill": backfill})
        result = run_cycle(lin, step)
        seconds.append(time.perf_counter() - t)
        print(f"  generation {result['generation']}: {seconds[-1]:.0f}s", flush=True)
    return {"reused": False, "cycle_seconds": seconds}


def curves(home: Path) -> dict[str, Any]:
    from flows.data import eval_dataset
    from store.collection import Collection
    from store.lineage import Lineage
    from store.settings import subdir
    from workers.collection.backfill import backfill_curve, policy_order
    from workers.collection.policies import POLICIES, backfill_order, n_strata, strata_of
    from workers.measuring.evaluate import generation_outputs

    _set_home(home)
    lin = Lineage()
    gallery = Collection(lin)
    champion = lin.champion()
    ds = eval_dataset(lin)  # the collection is its evaluation reference half, in order
    gens = {g.id: g for g in lin.generations() if g.status == "promoted"}
    outs = {g: generation_outputs(gens[g], ds, subdir("cache")) for g in gens}
    rows = gallery.read_all()
    target = champion.id
    # the curves take the champion's reference embeddings row for row: the same items
    keys = [ds.test_keys[i] for i in outs[target].reference_idx]
    assert list(rows.key) == keys, "the collection is not the reference half, in order"
    qy = ds.y_test[outs[target].query_idx]
    k_classes = len(champion.classes)

    main: dict[str, Any] = {}
    for policy in POLICIES:
        order, _ = policy_order(gallery, target, policy, seed=0, num_classes=k_classes)
        curve = backfill_curve(rows, outs[target].reference_emb, order, outs[target].query_emb, qy)
        main[policy] = _summary(curve)
        print(f"  {policy:15s} area {main[policy]['area']:.4f}", flush=True)

    # robustness: other starting galleries, several seeds (in-memory orders, same code)
    gidx = outs[target].reference_idx
    rng = np.random.default_rng(0)
    ids = sorted(gens)
    scenarios = {
        "actual mix -> champion": (target, rows.generation),
        "all gen 1 -> champion": (target, np.full(len(gidx), ids[0])),
        "all gen 2 -> champion": (target, np.full(len(gidx), ids[1])),
        "50/50 gen 1/2 -> champion": (target, np.where(rng.random(len(gidx)) < 0.5, *ids[:2])),
        "all gen 1 -> gen 2": (ids[1], np.full(len(gidx), ids[0])),
    }
    robust: dict[str, Any] = {}
    for name, (tgt, gen_of) in scenarios.items():
        pairs = list(zip(gen_of.tolist(), gidx.tolist(), strict=True))
        emb = np.stack([outs[g].outputs.embedding[i] for g, i in pairs])
        margin = np.array([outs[g].outputs.margin[i] for g, i in pairs])
        q = outs[tgt].query_emb
        new = outs[tgt].reference_emb
        from store.collection import CollectionRows

        state = CollectionRows(rows.item_id, rows.label, gen_of.astype(np.int32), margin, emb)
        robust[name] = {}
        for policy in POLICIES:
            seeds = SEEDS if policy != "uncertainty" else (0,)  # margins order it alone
            res = []
            for seed in seeds:
                strata = (
                    strata_of(emb, gen_of, tgt, n_strata(len(gens[tgt].classes)), seed)
                    if policy == "representative"
                    else None
                )
                order = backfill_order(
                    state.item_id, gen_of, margin, tgt, policy, seed, strata=strata
                )
                res.append(_summary(backfill_curve(state, new, order, q, qy)))
            areas = [r["area"] for r in res]
            robust[name][policy] = {
                "area_mean": float(np.mean(areas)),
                "area_std": float(np.std(areas)),
                "recovery_mean": float(np.mean([r["recovery_at_0.2"] for r in res])),
                "recovery_min": float(np.min([r["recovery_at_0.2"] for r in res])),
                "no_regret_share": float(np.mean([r["no_regret"] for r in res])),
                "seeds": len(res),
                "m0": res[0]["m0"],
                "m1": res[0]["m1"],
            }
        print(f"  robustness: {name}", flush=True)
    overall = {p: float(np.mean([robust[s][p]["area_mean"] for s in robust])) for p in POLICIES}
    # the winner: on the real gallery after the chain (the measurement the issue asks
    # for), no regret for any seed, then the best area averaged over the seeds (a single
    # curve moves by about +-0.002 with the seed alone); the other starting galleries
    # show where it holds and where it does not
    actual = robust["actual mix -> champion"]
    winner = max(
        POLICIES, key=lambda p: (actual[p]["no_regret_share"] == 1.0, actual[p]["area_mean"])
    )
    return {
        "champion": target,
        "gallery_by_generation": {str(g): n for g, n in lin.gallery_counts().items()},
        "generations": [
            {
                "id": g.id,
                "accuracy": g.accuracy,
                "classes": len(g.classes),
                "train_samples": g.train_samples,
                "architecture": g.architecture,
                "epochs": g.epochs,
                "train_seconds": g.train_seconds,
            }
            for g in gens.values()
        ],
        "policies": main,
        "robustness": robust,
        "robustness_mean_area": overall,
        "winner": winner,
    }


def real_job(home: Path, policy: str, budget: float) -> dict[str, Any]:
    """One real backfill job with ``policy`` on a copy of the chain's home (the flow's
    ``backfill_once``: M_mix before/after, the curve, retirement)."""
    from flows.backfill import backfill_once
    from flows.config import BackfillConfig
    from store.lineage import Lineage

    job_home = home.parent / "job"  # a copy: the chain's gallery stays as measured
    shutil.rmtree(job_home, ignore_errors=True)
    shutil.copytree(home, job_home)
    _set_home(job_home)
    lin = Lineage()
    try:
        cfg = BackfillConfig(budget=budget, policy=policy)
    except ValueError:  # the policy is not yet in flows.config's Policy literal
        cfg = BackfillConfig.model_construct(
            budget=budget, policy=policy, batch_rows=4096, seed=0, curve=True
        )
    t = time.perf_counter()
    result = backfill_once(lin, cfg)
    result["seconds"] = time.perf_counter() - t
    job = next(j for j in lin.backfill_jobs() if j.id == result["job"])
    result["curve"] = job.curve
    result["by_generation"] = {str(k): v for k, v in result["by_generation"].items()}
    result["retired"] = [list(r) for r in result["retired"]]
    return result


# -- 2. throughput -----------------------------------------------------------------------
def _write_fmnist_features(path: Path, copies: int = 1, n_train_extra: int = 10) -> int:
    """Fashion-MNIST's 70,000 images (``copies`` times) as a ``parquet:`` test split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workers.data.datasets import load_dataset

    ds = load_dataset(DATASET)
    x = np.concatenate([ds.x_test, ds.x_train]).reshape(-1, 784)
    y = np.concatenate([ds.y_test, ds.y_train])
    writer = None
    row = 0  # item_id: the row number as text (the one Parquet schema's key)
    try:
        for copy in range(copies):
            for start in range(0, len(x), 10_000):
                xb, yb = x[start : start + 10_000], y[start : start + 10_000]
                split = ["test"] * len(xb)
                if copy == 0 and start == 0:  # a few train rows make it a valid data set
                    xb = np.concatenate([xb[:n_train_extra], xb])
                    yb = np.concatenate([yb[:n_train_extra], yb])
                    split = ["train"] * n_train_extra + split
                ids = [str(i) for i in range(row, row + len(xb))]
                row += len(xb)
                table = pa.table(
                    {
                        "item_id": pa.array(ids, pa.string()),
                        "label": pa.array(yb, pa.int64()),
                        "split": pa.array(split, pa.string()),
                        "features": pa.FixedSizeListArray.from_arrays(
                            pa.array(np.ascontiguousarray(xb, np.float32).ravel()), 784
                        ),
                    }
                )
                if writer is None:  # float features: no dictionary (as feature stores write)
                    writer = pq.ParquetWriter(path, table.schema, use_dictionary=["label", "split"])
                writer.write_table(table, row_group_size=8192)
    finally:
        if writer is not None:
            writer.close()
    return len(x) * copies


def _index_gallery(dataset: str, gen, n: int, part_rows: int = 4096) -> None:
    """Index the ``n`` items of the data set's rows 0..n-1 (item_id = the row number)
    with ``gen``, read by key as the backfill reads them, one part at a time."""
    from store.collection import Collection, CollectionRows
    from store.lineage import Lineage
    from workers.collection.items import open_reader
    from workers.learning.embed import forward
    from workers.learning.models import load_model

    model = load_model(gen.checkpoint_path, gen.checkpoint_sha256)
    reader = open_reader(dataset, tuple(model.config["input_shape"]))

    def batches():
        for start in range(0, n, part_rows):
            ids = np.arange(start, min(n, start + part_rows), dtype=np.int64)
            keys = np.asarray([str(i) for i in ids], dtype=object)
            out = forward(model, reader.take_keys(list(keys)))
            yield CollectionRows(
                ids,
                np.zeros(len(ids), np.int64),
                np.full(len(ids), gen.id, np.int32),
                out.margin,
                out.embedding,
                key=keys,
            )

    Collection(Lineage()).create_from_batches(dataset, gen.embed_dim, batches(), part_rows)


def _register(lin, gen, dataset: str):
    return lin.add_generation(
        dataset=dataset,
        stage=gen.stage,
        architecture=gen.architecture,
        embed_dim=gen.embed_dim,
        classes=list(gen.classes),
        status="trained",
        checkpoint_path=gen.checkpoint_path,
        checkpoint_sha256=gen.checkpoint_sha256,
        accuracy=gen.accuracy,
    )


def throughput(chain_home: Path, work: Path, n_items: int, rounds_n: int = 5) -> dict[str, Any]:
    import ray
    import torch

    from flows.backfill_job import run_backfill
    from store.collection import Collection
    from store.lineage import Lineage
    from workers.collection.backfill import EmbedActor
    from workers.collection.items import open_reader
    from workers.learning.embed import forward
    from workers.learning.models import load_model
    from workers.runtime import task_resources

    _set_home(chain_home)
    chain = {g.id: g for g in Lineage().generations() if g.status == "promoted"}
    first, champion = chain[min(chain)], chain[max(chain)]
    copies = max(1, -(-n_items // 70_000))
    data = work / f"fmnist-features-x{copies}.parquet"
    if not data.exists():
        _write_fmnist_features(data, copies)
    dataset = f"parquet:{data}"
    shutil.rmtree(work / "throughput-home", ignore_errors=True)
    _set_home(work / "throughput-home")
    lin = Lineage()
    g1 = _register(lin, first, dataset)
    lin.promote(g1.id)
    _index_gallery(dataset, g1, n_items)
    # two generation rows for the champion's checkpoint: each round promotes the other
    # one, so every round is a full backfill with the same model
    twins = [_register(lin, champion, dataset), _register(lin, champion, dataset)]
    gallery = Collection(lin)
    batches = [
        gallery.read_part(n, columns=["key"]).column(0).to_pylist() for n in gallery.part_names()
    ]
    items = int(sum(len(b) for b in batches))

    threads = int(task_resources().get("num_cpus", 1))
    # the reference: the same actor class, threads and OpenMP settings as the pipeline's,
    # inputs already in memory, no Parquet work around the forward; it asks for no CPU
    # so the jobs' actors can start while it idles
    env = {"OMP_WAIT_POLICY": os.environ.get("GRACEFUL_OMP_WAIT_POLICY", "PASSIVE")}
    ref_actor = (
        ray.remote(num_cpus=0)(EmbedActor)
        .options(runtime_env={"env_vars": env})
        .remote(champion.checkpoint_path, champion.checkpoint_sha256, threads, dataset)
    )
    ray.get(ref_actor.ready.remote())

    def raw_in_actor() -> float:
        before = ray.get(ref_actor.stats.remote())["embed_seconds"]
        ray.get([ref_actor.embed_items.remote(ids) for ids in batches])
        return ray.get(ref_actor.stats.remote())["embed_seconds"] - before

    def raw_in_process() -> float:
        torch.set_num_threads(threads)
        model = load_model(champion.checkpoint_path, champion.checkpoint_sha256)
        src = open_reader(dataset, tuple(model.config["input_shape"]))
        seconds = 0.0
        for keys in batches:
            x = src.take_keys(keys)
            t = time.perf_counter()
            forward(model, x)
            seconds += time.perf_counter() - t
        return seconds

    in_process = raw_in_process()
    rounds = []
    try:
        for r in range(rounds_n):
            gen = twins[r % 2]
            raw_before = raw_in_actor()
            lin.promote(gen.id)
            stats: dict[str, Any] = {}
            t = time.perf_counter()
            job = run_backfill(
                lin,
                gallery,
                gen,
                "random",
                1.0,
                stats=stats,
                update_index=False,
            )
            wall = time.perf_counter() - t
            raw_after = raw_in_actor()
            assert job.items_done == items, (job.items_done, items)
            raw_seconds = (raw_before + raw_after) / 2
            rounds.append(
                {
                    "raw_forward_seconds": raw_seconds,
                    "raw_forward_seconds_before": raw_before,
                    "raw_forward_seconds_after": raw_after,
                    "raw_forward_items_per_s": items / raw_seconds,
                    "pipeline_seconds": stats["stream_seconds"],
                    "pipeline_items_per_s": items / stats["stream_seconds"],
                    "ratio": raw_seconds / stats["stream_seconds"],
                    "actor_embed_seconds": stats.get("actor_embed_seconds"),
                    "actor_read_seconds": stats.get("actor_read_seconds"),
                    "actor_start_seconds": stats.get("actor_start_seconds"),
                    "verify_seconds": stats.get("verify_seconds"),
                    "select_seconds": stats.get("select_seconds"),
                    "job_wall_seconds": wall,
                    "driver_seconds": {
                        k[len("driver_") : -len("_seconds")]: v
                        for k, v in stats.items()
                        if k.startswith("driver_") and k.endswith("_seconds")
                    },
                }
            )
            print(
                f"  round {r + 1}: pipeline "
                f"{rounds[-1]['pipeline_items_per_s']:,.0f} items/s, raw "
                f"{rounds[-1]['raw_forward_items_per_s']:,.0f} items/s, "
                f"ratio {rounds[-1]['ratio']:.2f}",
                flush=True,
            )
    finally:
        ray.kill(ref_actor)
    main = rounds
    return {
        "dataset": f"fashion-mnist's 70,000 images x{copies} as 784 float features "
        "(a parquet: data set)",
        "model": champion.architecture,
        "items": items,
        "parts": len(batches),
        "threads": threads,
        "rounds": rounds,
        "raw_in_process_items_per_s": items / in_process,
        "pipeline_items_per_s": float(np.median([x["pipeline_items_per_s"] for x in main])),
        "raw_forward_items_per_s": float(np.median([x["raw_forward_items_per_s"] for x in main])),
        "ratio": float(np.median([x["ratio"] for x in main])),
        "ratio_min": float(min(x["ratio"] for x in main)),
        "ratio_max": float(max(x["ratio"] for x in main)),
    }


# -- 3. memory ---------------------------------------------------------------------------
FEAT_DIM = 32


def _write_random_features(path: Path, n: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    writer = None
    try:
        chunks = [("train", 10)] + [("test", min(65_536, n - s)) for s in range(0, n, 65_536)]
        row = 0  # item_id: the row number as text
        for split, m in chunks:
            x = rng.normal(size=(m, FEAT_DIM)).astype(np.float32)
            table = pa.table(
                {
                    "item_id": pa.array([str(i) for i in range(row, row + m)], pa.string()),
                    "label": pa.array(rng.integers(0, 10, m), pa.int64()),
                    "split": pa.array([split] * m, pa.string()),
                    "features": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), FEAT_DIM),
                }
            )
            row += m
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema, use_dictionary=["label", "split"])
            writer.write_table(table, row_group_size=16_384)
    finally:
        if writer is not None:
            writer.close()


def memory_setup(home: Path, n: int) -> None:
    """A gallery of ``n`` feature items embedded by a small generation 1; generation 2
    (another small model) is the champion."""
    import torch

    from store.lineage import Lineage
    from store.settings import subdir
    from workers.learning.models import EmbeddingNet, save_model

    _set_home(home)
    data = home / "features.parquet"
    _write_random_features(data, n)
    dataset = f"parquet:{data}"
    lin = Lineage()
    arch = {"kind": "mlp", "width": 64, "depth": 2}
    gens = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = EmbeddingNet((FEAT_DIM,), 10, FEAT_DIM, arch).eval()
        path = subdir("checkpoints") / f"mem-{seed}.pt"
        sha = save_model(model, path)
        gen = lin.add_generation(
            dataset=dataset,
            stage=0,
            architecture=arch,
            embed_dim=FEAT_DIM,
            classes=list(range(10)),
            status="trained",
            checkpoint_path=str(path),
            checkpoint_sha256=sha,
        )
        lin.promote(gen.id)
        gens.append(lin.generation(gen.id))
        if seed == 1:
            _index_gallery(dataset, gens[0], n)


def memory_child(home: Path, what: str) -> dict[str, Any]:
    """In a fresh process: a full backfill (or an index sync); report peak RSS."""
    from flows.backfill_job import run_backfill
    from store.collection import Collection
    from store.lineage import Lineage
    from workers.collection.backfill import peak_rss_bytes

    _set_home(home)
    lin = Lineage()
    gallery = Collection(lin)
    base = peak_rss_bytes()
    t = time.perf_counter()
    out: dict[str, Any] = {"items": gallery.require().items, "baseline_rss": base}
    if what == "backfill":
        stats: dict[str, Any] = {}
        job = run_backfill(
            lin,
            gallery,
            lin.champion(),
            "representative",
            1.0,
            stats=stats,
            update_index=False,
        )
        out.update(
            items_done=job.items_done,
            actor_peak_rss=stats.get("actor_peak_rss"),
            stream_seconds=stats.get("stream_seconds"),
            select_seconds=stats.get("select_seconds"),
            verify_seconds=stats.get("verify_seconds"),
            peak_rss_after_verify=stats.get("peak_rss_after_verify"),
            peak_rss_after_select=stats.get("peak_rss_after_select"),
            rss_anon=stats.get("rss_RssAnon"),
            rss_shmem=stats.get("rss_RssShmem"),
            actor_rss_anon=stats.get("actor_rss_anon"),
            actor_rss_shmem=stats.get("actor_rss_shmem"),
        )
    else:
        from store.index import CollectionIndex

        out["ntotal"] = CollectionIndex.open(gallery).ntotal
    out["seconds"] = time.perf_counter() - t
    out["peak_rss"] = peak_rss_bytes()
    return out


def _child(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.backfill", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench child {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory(work: Path, sizes: tuple[int, ...]) -> dict[str, Any]:
    import ray

    from workers.runtime import ensure_ray

    ensure_ray()
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    rows = []
    for n in sizes:
        home = work / f"memory-{n}"
        shutil.rmtree(home, ignore_errors=True)  # every size starts from generation 1
        t = time.perf_counter()
        _child(["--child", "setup", str(home), str(n)], env)
        setup = time.perf_counter() - t
        res = _child(["--child", "backfill", str(home)], env)
        idx = _child(["--child", "index", str(home)], env)
        disk = sum(p.stat().st_size for p in (home / "gallery").glob("*.parquet"))
        rows.append(
            {
                "items": n,
                "driver_peak_rss_mb": res["peak_rss"] / 2**20,
                "driver_baseline_rss_mb": res["baseline_rss"] / 2**20,
                "actor_peak_rss_mb": (res["actor_peak_rss"] or 0) / 2**20,
                "backfill_seconds": res["seconds"],
                "stream_seconds": res["stream_seconds"],
                "select_seconds": res["select_seconds"],
                "items_done": res["items_done"],
                "index_sync_peak_rss_mb": idx["peak_rss"] / 2**20,
                "gallery_mb_on_disk": disk / 2**20,
                "setup_seconds": setup,
                "driver_peak_after_select_mb": (res["peak_rss_after_select"] or 0) / 2**20,
                "driver_private_end_mb": (res["rss_anon"] or 0) / 2**20,
                "driver_object_store_pages_end_mb": (res["rss_shmem"] or 0) / 2**20,
                "actor_private_end_mb": (res["actor_rss_anon"] or 0) / 2**20,
                "actor_object_store_pages_end_mb": (res["actor_rss_shmem"] or 0) / 2**20,
            }
        )
        print(
            f"  {n:>9,} items: driver peak {rows[-1]['driver_peak_rss_mb']:.0f} MB, "
            f"actor {rows[-1]['actor_peak_rss_mb']:.0f} MB, {res['seconds']:.0f}s",
            flush=True,
        )
    n = np.array([r["items"] for r in rows], float)
    peak = np.array([r["driver_peak_rss_mb"] for r in rows])
    private = np.array([r["driver_private_end_mb"] for r in rows])
    slope = float(np.polyfit(n / 1e6, peak, 1)[0]) if len(rows) > 1 else 0.0
    growth = float(peak[-1] / peak[0] - 1)
    actor = np.array([r["actor_peak_rss_mb"] for r in rows])
    return {
        "feature_dim": FEAT_DIM,
        "policy": "representative",
        "budget": 1.0,
        "rows": rows,
        "driver_slope_mb_per_million_items": slope,
        "driver_growth_smallest_to_largest": growth,
        "driver_private_growth_smallest_to_largest": float(private[-1] / private[0] - 1),
        "actor_growth_smallest_to_largest": float(actor[-1] / actor[0] - 1),
        "flat": bool(growth <= FLAT_TOLERANCE),
        "flat_tolerance": FLAT_TOLERANCE,
    }


# -- report ------------------------------------------------------------------------------
def plots(result: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for policy, s in result["curves"]["policies"].items():
        b, m = zip(*s["curve"], strict=True)
        ax.plot(b, m, marker="o", ms=3, label=f"{policy} (M~={s['area']:.4f})")
    ax.set_xlabel("β (fraction of old items backfilled)")
    ax.set_ylabel("M_mix (top-1)")
    ax.set_title("Backfill curves, Fashion-MNIST, generation 3 over a 1/2 gallery")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "backfill_curves.png", dpi=120)
    plt.close(fig)
    names.append("backfill_curves.png")

    mem = result.get("memory")
    if mem:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        n = [r["items"] for r in mem["rows"]]
        ax.plot(
            n,
            [r["driver_peak_rss_mb"] for r in mem["rows"]],
            marker="o",
            label="backfill process (driver)",
        )
        ax.plot(
            n, [r["actor_peak_rss_mb"] for r in mem["rows"]], marker="s", label="embedding actor"
        )
        ax.plot(
            n,
            [r["index_sync_peak_rss_mb"] for r in mem["rows"]],
            marker="^",
            linestyle="--",
            label="faiss index sync (flat index: n x d floats)",
        )
        ax.plot(
            n,
            [r["gallery_mb_on_disk"] for r in mem["rows"]],
            color="grey",
            linestyle=":",
            label="gallery size on disk",
        )
        ax.set_xscale("log")
        ax.set_xlabel("gallery items")
        ax.set_ylabel("peak RSS (MB)")
        ax.set_title("Peak memory of a full backfill vs gallery size")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(RESULTS / "backfill_memory.png", dpi=120)
        plt.close(fig)
        names.append("backfill_memory.png")
    return names


def _f(v: Any, fmt: str = "{:.4f}") -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float) and np.isnan(v):
        return "n/a"
    return fmt.format(v)


def markdown(result: dict[str, Any]) -> str:
    c = result["curves"]
    lines = [
        "# Selective backfill",
        "",
        f"Run {result['started']} on {result['cpus']} CPU(s), {result['seconds']:.0f}s "
        f"in all. `python -m bench.backfill` (`{' '.join(result['argv'])}`).",
        "",
        "## Targets",
        "",
        "| target | measured | holds |",
        "|---|---|---|",
    ]
    for t in result["targets"].values():
        lines.append(f"| {t['target']} | {t['measured']} | {_f(t['holds'])} |")
    lines += [
        "",
        "## The chain",
        "",
        "Fashion-MNIST, the growing scenario (generation 1: 6 classes and half the data; "
        "generation 3: all), bct+pct against all active ancestors, "
        f"{result['epochs']} epochs, trained through `flows.cycle.run_cycle`, gate "
        "off. After generation 2 a 30% random backfill; generation 3 is the champion. "
        f"Collection before the measured backfill: {c['gallery_by_generation']} "
        "(5,000 items; 5,000 disjoint queries).",
        "",
        "| generation | classes | train items | accuracy | architecture |",
        "|---|---|---|---|---|",
    ]
    for g in c["generations"]:
        a = g["architecture"]
        lines.append(
            f"| {g['id']} | {g['classes']} | {g['train_samples']} | {_f(g['accuracy'])} | "
            f"{a.get('kind')} {a.get('width')}x{a.get('depth')} |"
        )
    lines += [
        "",
        "## Backfill curves",
        "",
        "M_mix after backfilling fraction β of the old items in policy order "
        "(the order the job computes, streamed from the real gallery; seed 0). "
        "M~ is the trapezoid mean; recovery = (M(0.2) − M(0)) / (M(1) − M(0)).",
        "",
        "![curves](backfill_curves.png)",
        "",
        "| policy | M(0) | M(0.1) | M(0.2) | M(0.3) | M(0.5) | M(1) | min | M~ | no regret | "
        "recovery at 0.2 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p, s in c["policies"].items():
        m = dict((round(b, 1), v) for b, v in s["curve"])
        win = " **(winner)**" if p == c["winner"] else ""
        lines.append(
            f"| {p}{win} | {m[0.0]:.4f} | {m[0.1]:.4f} | {m[0.2]:.4f} | {m[0.3]:.4f} | "
            f"{m[0.5]:.4f} | {m[1.0]:.4f} | {s['min']:.4f} | {s['area']:.4f} | "
            f"{_f(s['no_regret'])} | {_f(s['recovery_at_0.2'], '{:.2f}')} |"
        )
    lines += [
        "",
        "### Robustness: other starting galleries, five seeds",
        "",
        "The same curves from other gallery states built from the cached outputs of the "
        "chain (M~ mean ± std over seeds 0–4; uncertainty has no seed), orders computed "
        "in memory by the same policy code. The winner is decided on the first row, the "
        "real gallery after the chain: no regret for any seed, then the best mean M~.",
        "",
        "| starting gallery | M(0) → M(1) | " + " | ".join(c["policies"]) + " |",
        "|---|---|" + "---|" * len(c["policies"]),
    ]
    for name, per in c["robustness"].items():
        first = next(iter(per.values()))
        cells = []
        for p in c["policies"]:
            r = per[p]
            cell = f"{r['area_mean']:.4f}"
            if r["seeds"] > 1:
                cell += f" ± {r['area_std']:.4f}"
            cell += f"; rec {r['recovery_min']:.2f}"
            if r["no_regret_share"] < 1:
                cell += f"; regret in {1 - r['no_regret_share']:.0%}"
            cells.append(cell)
        head = f"| {name} | {first['m0']:.4f} → {first['m1']:.4f} | "
        lines.append(head + " | ".join(cells) + " |")
    lines.append(
        "| **mean M~** | | "
        + " | ".join(f"**{c['robustness_mean_area'][p]:.4f}**" for p in c["policies"])
        + " |"
    )
    lines += [
        "",
        "(rec = the smallest recovery at β = 0.2 over the seeds.)",
        "",
        "Why: in a mixed gallery, an item embedded by the champion is closer to the "
        "champion's queries than any old item, so whatever is backfilled first captures "
        "the queries around it. *uncertainty* backfills boundary items first; they capture "
        "queries of the neighbouring classes and the curve falls far below its start. "
        "*representative* (k-means strata of the old embeddings, two per class, advanced "
        "at equal rates; inside a stratum the most confident items first) gives every "
        "mode its share, and that share is the mode's core (a gallery of class cores can "
        "retrieve better than the full one: see where its curve passes M(1)). It does not "
        "win everywhere: "
        "see the rows above where random is ahead. A plausible cause, not the whole story: "
        "items of classes the old generation never trained on sit inside other classes' "
        "strata with low stored confidence and come late (yet with every item by "
        "generation 1, which knew the fewest classes, it wins). Averaged over every "
        "starting gallery, the orders that keep coverage (random, oldest-first, "
        "representative) end up close in M~; uncertainty is far behind and regresses.",
    ]
    job = result.get("job")
    if job:
        lines += [
            "",
            "## One real job",
            "",
            f"`flows.backfill.backfill_once` with policy `{job['policy']}`, budget "
            f"{job['budget']}: {job['items_done']} items re-embedded in "
            f"{job['seconds']:.1f}s; M_mix {_f(job['m_mix_before'])} → "
            f"{_f(job['m_mix_after'])}; gallery {job['by_generation']}; retired "
            f"{job['retired'] or 'none'}.",
        ]
    th = result.get("throughput")
    if th:
        lines += [
            "",
            "## Throughput",
            "",
            f"{th['items']:,} items in {th['parts']} parts ({th['dataset']}), model "
            f"{th['model'].get('kind')} {th['model'].get('width')}x{th['model'].get('depth')}, "
            f"{th['threads']} torch threads. Each round: the raw batched forward of the "
            "champion over every part's batch (in an actor like the pipeline's: same "
            "threads, same OpenMP settings, inputs already in memory, no Parquet work; its "
            "compute time), a full backfill job of the same items with the same model, and "
            "the raw forward again; the round's raw time is the mean of the two. Pipeline "
            "time: from the first part read to the last commit (the actor's start, the file "
            "check and the selection are listed apart). The machine is shared with other "
            "jobs, so every round is shown and the target uses the median round. The actor "
            "reads the items by `item_id` from the `parquet:` data set, a row group at a "
            "time (workers.data.readers.ParquetItems, as every backfill of a Parquet "
            "collection does, with bounded memory).",
            "",
            "| round | raw forward (items/s) | pipeline (items/s) | ratio | "
            "actor compute / read (s) | pipeline (s) | driver read / submit / wait / write "
            "(s) | actor start (s) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for i, r in enumerate(th["rounds"], 1):
            d = r["driver_seconds"]
            drv = " / ".join(f"{d.get(k, 0):.2f}" for k in ("read", "submit", "wait", "write"))
            lines.append(
                f"| {i} | {r['raw_forward_items_per_s']:,.0f} | "
                f"{r['pipeline_items_per_s']:,.0f} | {r['ratio']:.2f} | "
                f"{_f(r['actor_embed_seconds'], '{:.2f}')} / "
                f"{_f(r['actor_read_seconds'], '{:.2f}')} | {r['pipeline_seconds']:.2f} | "
                f"{drv} | {_f(r['actor_start_seconds'], '{:.1f}')} |"
            )
        lines += [
            "",
            f"Median round: pipeline **{th['pipeline_items_per_s']:,.0f}** "
            f"items/s vs raw forward **{th['raw_forward_items_per_s']:,.0f}** items/s; ratio "
            f"**{th['ratio']:.2f}** (rounds {th['ratio_min']:.2f}–{th['ratio_max']:.2f}). "
            "The same forward "
            f"in the benchmark's own process (OpenMP threads spinning, as by default): "
            f"{th['raw_in_process_items_per_s']:,.0f} items/s.",
        ]
    mem = result.get("memory")
    if mem:
        lines += [
            "",
            "## Memory",
            "",
            f"Full backfills (policy {mem['policy']}, budget 1.0) of galleries of "
            f"{mem['feature_dim']}-d feature items (a `parquet:` data set streamed as the "
            "source), each in a fresh process; peak RSS is `VmHWM` (`ru_maxrss` would "
            "carry the parent's peak over fork and exec), the split at the end from "
            "`RssAnon` (private) and `RssShmem` (pages of Ray's shared object store).",
            "",
            "![memory](backfill_memory.png)",
            "",
            "| items | gallery on disk (MB) | driver peak (MB) | driver peak after "
            "selection (MB) | driver at the end: private / object-store pages (MB) | "
            "actor peak (MB) | actor at the end: private / object-store pages (MB) | "
            "backfill (s) | faiss index sync peak (MB) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in mem["rows"]:
            lines.append(
                f"| {r['items']:,} | {r['gallery_mb_on_disk']:.0f} | "
                f"{r['driver_peak_rss_mb']:.0f} | {r['driver_peak_after_select_mb']:.0f} | "
                f"{r['driver_private_end_mb']:.0f} / "
                f"{r['driver_object_store_pages_end_mb']:.0f} | "
                f"{r['actor_peak_rss_mb']:.0f} | {r['actor_private_end_mb']:.0f} / "
                f"{r['actor_object_store_pages_end_mb']:.0f} | "
                f"{r['backfill_seconds']:.0f} | {r['index_sync_peak_rss_mb']:.0f} |"
            )
        lines += [
            "",
            f"From {mem['rows'][0]['items']:,} to {mem['rows'][-1]['items']:,} items "
            f"({mem['rows'][-1]['items'] // mem['rows'][0]['items']}x): the driver's peak "
            f"{mem['driver_growth_smallest_to_largest']:+.1%} "
            f"({mem['driver_slope_mb_per_million_items']:.0f} MB per million items), its "
            f"private memory at the end {mem['driver_private_growth_smallest_to_largest']:+.1%}, "
            f"the actor's peak {mem['actor_growth_smallest_to_largest']:+.1%}. What grows: "
            "the selection's per-item scalars while it sorts (id, generation, margin, "
            "stratum, a 32-bit sort key: the peak after the selection), the chosen ids "
            "(8 bytes an item) during the job, and the pages of Ray's shared object store "
            "the embeddings passed through (shared memory, bounded by the store's size). "
            "Embeddings and inputs stream part by part. The faiss index is a flat in-memory "
            "index, so syncing it needs n × d floats by design (an IVF or on-disk index is "
            "the way past one machine).",
        ]
    return "\n".join(lines) + "\n"


def targets(result: dict[str, Any]) -> dict[str, Any]:
    c = result["curves"]
    w = c["policies"][c["winner"]]
    out = {
        "recovery": {
            "target": "best policy recovers >= 60% of the full-backfill gain at β = 0.2",
            "measured": f"{c['winner']}: {w['recovery_at_0.2']:.2f}",
            "holds": bool(w["recovery_at_0.2"] >= 0.6),
        },
        "no_regret": {
            "target": "best policy never regresses (curve >= M(0))",
            "measured": f"{c['winner']}: min {w['min']:.4f} vs M(0) {w['m0']:.4f}",
            "holds": bool(w["no_regret"]),
        },
    }
    th = result.get("throughput")
    if th:
        out["throughput"] = {
            "target": "pipeline throughput >= 0.8 of the raw batched forward",
            "measured": f"{th['ratio']:.2f}, median of {len(th['rounds'])} rounds "
            f"({th['ratio_min']:.2f}–{th['ratio_max']:.2f}; "
            f"{th['pipeline_items_per_s']:,.0f} vs {th['raw_forward_items_per_s']:,.0f} items/s)",
            "holds": bool(th["ratio"] >= 0.8),
        }
    mem = result.get("memory")
    if mem:
        r0, r1 = mem["rows"][0], mem["rows"][-1]
        out["memory"] = {
            "target": f"peak memory flat as the gallery grows (≤ +{FLAT_TOLERANCE:.0%} "
            "for 16x the items)",
            "measured": f"driver peak {r0['driver_peak_rss_mb']:.0f} MB at {r0['items']:,} → "
            f"{r1['driver_peak_rss_mb']:.0f} MB at {r1['items']:,} items "
            f"({mem['driver_growth_smallest_to_largest']:+.1%}; private memory "
            f"{mem['driver_private_growth_smallest_to_largest']:+.1%}); actor "
            f"{mem['actor_growth_smallest_to_largest']:+.1%}",
            "holds": bool(mem["flat"]),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        what, home = argv[1], Path(argv[2])
        if what == "setup":
            memory_setup(home, int(argv[3]))
            print(json.dumps({"ok": True}))
        else:
            print(json.dumps(memory_child(home, what)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sizes", default=",".join(str(s) for s in SIZES))
    ap.add_argument("--throughput-items", type=int, default=210_000)
    ap.add_argument("--job-budget", type=float, default=0.2)
    ap.add_argument("--home", type=Path, default=None, help="work directory (kept; reused)")
    ap.add_argument("--quick", action="store_true", help="1 epoch, small sizes (smoke run)")
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    args = ap.parse_args(argv)
    if args.render:
        result = json.loads((RESULTS / f"{NAME}.json").read_text())
        result["targets"] = targets(result)
        result["plots"] = plots(result)
        (RESULTS / f"{NAME}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        (RESULTS / f"{NAME}.md").write_text(markdown(result))
        return 0
    if args.quick:
        args.epochs, args.sizes, args.throughput_items = 1, "20000,40000", 20_000
    sizes = tuple(int(s) for s in args.sizes.split(",") if s)
    work = args.home or Path(tempfile.mkdtemp(prefix="graceful-bench-backfill-"))
    work.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M")
    t0 = time.perf_counter()
    chain_home = work / "chain"

    print("1/4 chain", flush=True)
    chain = build_chain(chain_home, args.epochs, args.seed)
    print("2/4 curves", flush=True)
    result: dict[str, Any] = {
        "started": started,
        "argv": ["python -m bench.backfill", *argv],
        "cpus": os.cpu_count(),
        "epochs": args.epochs,
        "chain": chain,
        "curves": curves(chain_home),
    }
    winner = result["curves"]["winner"]
    result["job"] = real_job(chain_home, winner, args.job_budget)
    result["job"].update(policy=winner, budget=args.job_budget)
    print("3/4 throughput", flush=True)
    result["throughput"] = throughput(chain_home, work, args.throughput_items)
    print(f"  ratio {result['throughput']['ratio']:.2f}", flush=True)
    print("4/4 memory", flush=True)
    result["memory"] = memory(work, sizes)
    result["seconds"] = time.perf_counter() - t0
    result["targets"] = targets(result)
    result["plots"] = plots(result)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (RESULTS / f"{NAME}.md").write_text(markdown(result))
    print(f"wrote {RESULTS / (NAME + '.md')} in {result['seconds']:.0f}s", flush=True)
    for t in result["targets"].values():
        print(f"  {'OK ' if t['holds'] else 'MISS'} {t['target']}: {t['measured']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

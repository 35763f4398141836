"""Backfill end to end on real Parquet, SQLite, faiss and local Ray: budgets and policy
order, a kill at any point and a resume, bad files, dimension mismatches, and the
retirement of a constraint after a full backfill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sources.data import champion

from flows.backfill_job import run_backfill
from store.collection import Collection, CollectionRows, CollectionStoreError
from store.index import INDEX_FILE, CollectionIndex
from store.lineage import Generation, Lineage
from store.settings import StoreError, subdir
from workers.collection.backfill import policy_order
from workers.collection.items import open_reader
from workers.collection.policies import backfill_order
from workers.data.datasets import load_dataset
from workers.data.readers import ParquetItems, UnreadableItem
from workers.data.scenario import eval_split
from workers.learning.embed import forward
from workers.learning.models import load_model

ROOT = Path(__file__).resolve().parents[2]
DIM = 8
PART_ROWS = 32  # 270 digits gallery items -> 9 parts


def tiny_generation(lin: Lineage, seed: int, embed_dim: int = DIM) -> Generation:
    return champion(lin, seed, embed_dim=embed_dim)


def embed(gen: Generation, ids: np.ndarray):
    ds = load_dataset("digits")
    return forward(load_model(gen.checkpoint_path, gen.checkpoint_sha256), ds.x_test[ids])


@pytest.fixture
def tiny(home: Path) -> tuple[Lineage, Collection, Generation, Generation]:
    """A digits gallery embedded by generation 1; generation 2 is the champion."""
    lin = Lineage()
    g1 = tiny_generation(lin, seed=1)
    ds = load_dataset("digits")
    gidx, _ = eval_split(len(ds.y_test))
    out = embed(g1, gidx)
    gallery = Collection(lin)
    gallery.create(
        "reference:scenario:digits",  # the scenario's collection: keyed by position
        CollectionRows(
            gidx, ds.y_test[gidx], np.full(len(gidx), g1.id, np.int32), out.margin, out.embedding
        ),
        part_rows=PART_ROWS,
    )
    g2 = tiny_generation(lin, seed=2)
    return lin, gallery, g1, g2


def assert_whole(gallery: Collection, champion: Generation, chosen: np.ndarray) -> None:
    """Every item once; chosen items carry the champion's embedding and generation."""
    rows = gallery.read_all()
    ds = load_dataset("digits")
    gidx, _ = eval_split(len(ds.y_test))
    assert rows.item_id.tolist() == gidx.tolist()
    fresh = np.isin(rows.item_id, chosen)
    assert (rows.generation[fresh] == champion.id).all()
    assert (rows.generation[~fresh] != champion.id).all()
    want = embed(champion, rows.item_id[fresh])
    np.testing.assert_allclose(rows.embedding[fresh], want.embedding, atol=1e-5)
    np.testing.assert_allclose(rows.margin[fresh], want.margin, atol=1e-5)
    assert sum(gallery.counts().values()) == len(gidx)
    assert sorted(p.name for p in gallery.root.glob("*.parquet")) == gallery.part_names()


def test_streamed_policy_orders_equal_the_in_memory_orders(tiny) -> None:
    lin, gallery, g1, g2 = tiny
    rows = gallery.read_all()
    for policy in ("random", "oldest-first", "uncertainty"):
        streamed, n = policy_order(gallery, g2.id, policy, seed=3, batch_rows=50)
        expected = backfill_order(rows.item_id, rows.generation, rows.margin, g2.id, policy, 3)
        assert n == 270 and streamed.tolist() == expected.tolist()
    # representative: the sample, the strata and the order do not depend on the batching
    small, _ = policy_order(gallery, g2.id, "representative", seed=1, batch_rows=17)
    whole, _ = policy_order(gallery, g2.id, "representative", seed=1, batch_rows=10_000)
    assert small.tolist() == whole.tolist()
    assert sorted(whole.tolist()) == rows.item_id.tolist()


@pytest.mark.slow  # starts the local Ray cluster (an embedding actor)
def test_a_budgeted_backfill_re_embeds_the_policy_head(tiny) -> None:
    lin, gallery, g1, g2 = tiny
    head, _ = policy_order(gallery, g2.id, "representative", seed=0, num_classes=10)
    stats: dict = {}
    job = run_backfill(lin, gallery, g2, "representative", 0.4, stats=stats)
    assert job.status == "done" and job.items_done == job.total_items == 108
    chosen = np.load(subdir("backfills") / f"job-{job.id}.npy")
    assert chosen.tolist() == head[:108].tolist()  # the policy's first 40% of the gallery
    assert_whole(gallery, g2, chosen)
    assert lin.gallery_counts() == {g1.id: 162, g2.id: 108}
    assert stats["items"] == 108 and stats["actor_embed_seconds"] > 0
    # the persisted index reflects exactly the committed parts, each item once
    idx = CollectionIndex.load(gallery.root / INDEX_FILE, DIM)
    assert idx is not None and set(idx.parts.values()) == set(gallery.part_names())
    ids = faiss.vector_to_array(idx.index.id_map)
    assert len(ids) == 270 and len(np.unique(ids)) == 270
    again = run_backfill(lin, gallery, g2, "representative", 0.4)
    assert again.id != job.id and again.total_items == 108  # a new job: the next 108
    assert lin.gallery_counts() == {g1.id: 54, g2.id: 216}


@pytest.mark.slow  # Ray embedding actors, twice
def test_killed_mid_way_and_resumed_nothing_lost_nothing_duplicated(tiny) -> None:
    lin, gallery, g1, g2 = tiny
    seen: list[tuple[int, int]] = []

    def watch(done: int, total: int) -> None:
        # between commits a reader sees exactly the committed parts
        idx = CollectionIndex.open(gallery, save=False)
        assert set(idx.parts.values()) == set(gallery.part_names())
        assert idx.ntotal == 270
        seen.append((done, sum(n for g, n in gallery.counts().items() if g == g2.id)))

    with pytest.raises(KeyboardInterrupt, match="simulated kill after 2 parts"):
        run_backfill(lin, gallery, g2, "oldest-first", 1.0, progress=watch, crash_after_parts=2)
    [job] = lin.backfill_jobs()
    assert job.items_done == 64  # progress committed per part
    assert job.status == "failed" and "simulated kill" in job.error  # closed, resumable
    assert lin.gallery_counts() == {g1.id: 206, g2.id: 64}
    assert seen == [(0, 0), (32, 32), (64, 64)]

    resumed = run_backfill(lin, gallery, g2, "oldest-first", 1.0, progress=watch)
    assert resumed.id == job.id and resumed.status == "done"  # the same job, same selection
    assert resumed.items_done == resumed.total_items == 270
    assert_whole(gallery, g2, gallery.read_all().item_id)
    assert lin.gallery_counts() == {g2.id: 270}
    assert [d for d, _ in seen[3:]] == [64, 96, 128, 160, 192, 224, 256, 270]


@pytest.mark.slow  # Ray, and a SIGKILL of a backfill process
def test_a_real_kill_of_the_backfill_process_then_resume(tiny) -> None:
    import ray

    from workers.runtime import ensure_ray

    lin, gallery, g1, g2 = tiny
    ensure_ray()
    script = textwrap.dedent(
        """
        import time
        from store.collection import Collection
        from store.lineage import Lineage
        from flows.backfill_job import run_backfill
        lin = Lineage()
        run_backfill(lin, Collection(lin), lin.champion(), "uncertainty", 1.0,
                     progress=lambda done, total: time.sleep(0.5))
        """
    )
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            jobs = lin.backfill_jobs()
            if jobs and jobs[0].items_done > 0:
                break
            assert proc.poll() is None, "the backfill process ended before it was killed"
            time.sleep(0.05)
        else:
            pytest.fail("the backfill never committed a part")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    [job] = lin.backfill_jobs()
    assert job.status == "running" and 0 < job.items_done < 270
    killed_at = job.items_done
    rows = gallery.read_all()  # the committed state is whole after a kill
    assert len(np.unique(rows.item_id)) == 270
    assert (rows.generation == g2.id).sum() == killed_at

    resumed = run_backfill(lin, gallery, g2, "uncertainty", 1.0)
    assert resumed.id == job.id and resumed.items_done == 270
    assert_whole(gallery, g2, rows.item_id)


def _state(gallery: Collection) -> tuple:
    files = {p.name: p.read_bytes() for p in sorted(gallery.root.iterdir())}
    parts = [(p.name, p.sha256, p.counts) for p in gallery.manifest()]
    return files, parts, [j.id for j in gallery.lineage.backfill_jobs()]


@pytest.mark.parametrize("damage", ["corrupt", "foreign", "stray"])
def test_a_bad_file_in_the_gallery_is_named_and_nothing_changes(tiny, damage: str) -> None:
    lin, gallery, g1, g2 = tiny
    target = gallery.root / "part-00004.parquet"
    if damage == "corrupt":
        data = bytearray(target.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 64] = b"\x00" * 64
        target.write_bytes(bytes(data))
        message = r"part-00004\.parquet"
    elif damage == "foreign":
        pq.write_table(pa.table({"id": np.arange(3), "vec": [[0.0]] * 3}), target)
        message = r"foreign Parquet file .*part-00004\.parquet"
    else:
        target = gallery.root / "embeddings-backup.parquet"
        pq.write_table(pa.table({"id": np.arange(3)}), target)
        message = r"foreign file .*embeddings-backup\.parquet"
    before = _state(gallery)
    with pytest.raises(CollectionStoreError, match=message):
        run_backfill(lin, gallery, g2, "random", 1.0)
    assert _state(gallery) == before  # no job, no file, no manifest row changed


def test_an_embedding_dimension_mismatch_is_refused(tiny) -> None:
    lin, gallery, g1, g2 = tiny
    wide = tiny_generation(lin, seed=3, embed_dim=12)
    before = _state(gallery)
    with pytest.raises(CollectionStoreError, match="dim 12 but the collection stores dim 8"):
        run_backfill(lin, gallery, wide, "random", 1.0)
    assert _state(gallery) == before
    with pytest.raises(CollectionStoreError, match="dim mismatch"):
        CollectionIndex.open(gallery).search(np.ones((1, 12), np.float32))


def test_parquet_items_are_read_by_key_row_group_by_row_group(tmp_path: Path) -> None:
    """The backfill reads a Parquet collection's items by item_id (one reader family):
    forward part by part, out of order, and a key that is gone names it."""
    n = 1000
    rng = np.random.default_rng(0)
    split = np.where(rng.random(n) < 0.7, "test", "train")
    feats = rng.normal(size=(n, 5)).astype(np.float32)
    path = tmp_path / "feats.parquet"
    table = pa.table(
        {
            "item_id": [f"item-{i}" for i in range(n)],
            "label": rng.integers(0, 3, n),
            "split": split,
            "features": pa.FixedSizeListArray.from_arrays(pa.array(feats.ravel()), 5),
        }
    )
    pq.write_table(table, path, row_group_size=128)
    reader = open_reader(f"parquet:{path}", (5,))
    assert isinstance(reader, ParquetItems)
    rows = np.sort(rng.choice(n, 300, replace=False))
    keys = np.asarray([f"item-{i}" for i in range(n)], dtype=object)
    for chunk in np.array_split(rows, 7):  # forward, part by part
        np.testing.assert_array_equal(reader.take_keys(list(keys[chunk])), feats[chunk])
    back = rows[::-1][:20]  # out of order: the same answer
    np.testing.assert_array_equal(reader.take_keys(list(keys[back])), feats[back])
    with pytest.raises(UnreadableItem, match="item-9999"):
        reader.take_keys(["item-9999"])


@pytest.mark.slow  # two training cycles and a backfill on Ray
def test_full_backfill_retires_the_constraint_on_the_old_generation(home: Path) -> None:
    from flows import chain
    from flows.backfill import backfill_once
    from flows.config import BackfillConfig, CycleConfig, GateConfig, TrainConfig
    from flows.cycle import run_cycle

    lin = Lineage()
    cfg = CycleConfig(
        dataset="digits",
        stages=2,
        train=TrainConfig(method="bct", epochs=1, embed_dim=16),
        gate=GateConfig(enabled=False),
        backfill=BackfillConfig(budget=0.0, curve=False),
    )
    gens = []
    for _ in range(2):
        result = run_cycle(lin, cfg)
        assert result["promoted"]
        gens.append(result["generation"])
    g1, g2 = gens
    assert chain.retire_unused(lin) == []  # generation 1 still has every gallery item
    assert [(c.target_id, c.status) for c in lin.constraints(g2)] == [(g1, "active")]

    result = backfill_once(lin, BackfillConfig(budget=1.0, policy="oldest-first", curve=False))
    assert result["items_done"] == 270 and result["by_generation"] == {g2: 270}
    assert [g for g, _ in result["retired"]] == [g1]
    assert lin.generation(g1).retired
    assert [(c.target_id, c.status) for c in lin.constraints(g2)] == [(g1, "retired")]
    assert chain.active_generations(lin) == [g2]


def test_search_answers_for_an_item_or_a_file(tiny, tmp_path: Path) -> None:
    from PIL import Image

    from flows.query import search_file, search_item

    lin, gallery, g1, g2 = tiny
    by_item = search_item(lin, 1, k=4)
    assert by_item["label"] == int(load_dataset("digits").y_test[1])
    assert len(by_item["neighbors"]) == 4
    assert (gallery.root / INDEX_FILE).exists()  # persisted for the next search

    x = load_dataset("digits").x_test[1]
    np.save(tmp_path / "q.npy", x)
    by_npy = search_file(lin, tmp_path / "q.npy", k=4)
    assert [n["item_id"] for n in by_npy["neighbors"]] == [
        n["item_id"] for n in by_item["neighbors"]
    ]
    Image.fromarray((x[0] * 255).round().astype(np.uint8), mode="L").save(tmp_path / "q.png")
    by_png = search_file(lin, tmp_path / "q.png", k=4)
    assert by_png["neighbors"][0]["item_id"] == by_item["neighbors"][0]["item_id"]

    np.save(tmp_path / "bad.npy", np.zeros(10))
    with pytest.raises(StoreError, match="10 values"):
        search_file(lin, tmp_path / "bad.npy")
    with pytest.raises(StoreError, match="unsupported query file"):
        (tmp_path / "q.txt").write_text("hi")
        search_file(lin, tmp_path / "q.txt")


def test_a_swapped_champion_checkpoint_is_refused_before_any_job(tiny) -> None:
    from store.files import CheckpointError

    lin, gallery, g1, g2 = tiny
    Path(g2.checkpoint_path).write_bytes(Path(g1.checkpoint_path).read_bytes())
    before = _state(gallery)
    with pytest.raises(CheckpointError, match=f"champion generation {g2.id} .* does not match"):
        run_backfill(lin, gallery, g2, "random", 0.5)
    assert lin.backfill_jobs() == [] and _state(gallery) == before  # no job left running


@pytest.mark.slow  # Ray, and a backfill process killed at a failpoint
def test_a_killed_job_is_closed_by_a_backfill_with_other_settings(tiny) -> None:
    from flows.report import build_report
    from workers.runtime import ensure_ray

    lin, gallery, g1, g2 = tiny
    ensure_ray()
    script = textwrap.dedent(
        """
        from store.collection import Collection
        from store.lineage import Lineage
        from flows.backfill_job import run_backfill
        lin = Lineage()
        run_backfill(lin, Collection(lin), lin.champion(), "oldest-first", 1.0)
        """
    )
    env = dict(os.environ, GRACEFUL_FAILPOINT="backfill-part")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL  # killed right after its first part
    [job] = lin.backfill_jobs()
    assert job.status == "running" and job.items_done == PART_ROWS
    assert not gallery.writer_active()
    assert build_report(lin)["backfills"][0]["status"] == "interrupted"  # not "running"

    other = run_backfill(lin, gallery, g2, "random", 0.5)
    old = lin.backfill_jobs()[0]
    assert (
        old.status == "failed"
        and old.error == f"interrupted: superseded by backfill job {other.id}"
    )
    assert other.status == "done" and [j.status for j in lin.backfill_jobs()] == ["failed", "done"]

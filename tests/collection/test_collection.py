"""A user's collection on real files, Parquet, faiss and Ray Data: indexed, grown, changed,
pruned, searched by key and by file, backfilled by key from its source; bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sources.data import champion, digits, write_pngs

from flows.backfill_job import run_backfill
from flows.collection import index_once
from flows.config import BackfillConfig, IndexConfig
from flows.query import search_file, search_item
from store.collection import UNLABELLED, Collection
from store.index import INDEX_FILE, CollectionIndex
from store.lineage import Lineage
from store.settings import StoreError
from workers.collection.indexing import plan_index, run_index
from workers.collection.items import CollectionError, list_items

DIM = 8
PART = 64


def check_once(gallery: Collection, expected: set[str]) -> None:
    """Every expected key once in the Parquet parts and once in faiss, nothing else."""
    keys = gallery.keys(["key", "item_id"])
    got = keys.column("key").to_pylist()
    assert len(got) == len(set(got)) and set(got) == expected
    idx = CollectionIndex.open(gallery)
    in_faiss = faiss.vector_to_array(idx.index.id_map)
    assert len(in_faiss) == len(set(in_faiss.tolist())) == len(expected)
    assert set(in_faiss.tolist()) == set(keys.column("item_id").to_pylist())


def test_plan_index_by_hand() -> None:
    listing_table = pa.table(
        {"key": ["a", "b", "c", "e"], "label": ["x", None, "y", None], "fingerprint": list("1234")}
    )
    held = pa.table(
        {
            "key": ["a", "b", "d"],
            "item_id": pa.array([10, 11, 12], pa.int64()),
            "fingerprint": ["1", "9", "5"],
        }
    )
    from workers.collection.items import Listing

    plan = plan_index(Listing("images:/x", listing_table), held)
    assert plan.new.column("key").to_pylist() == ["c", "e"]
    assert plan.changed.column("key").to_pylist() == ["b"]  # same key, new fingerprint
    assert plan.changed.column("item_id").to_pylist() == [11]
    assert plan.gone.column("key").to_pylist() == ["d"]
    assert plan.gone.column("item_id").to_pylist() == [12]
    assert plan.unchanged == 1


@pytest.mark.slow
def test_an_image_folder_collection_grows_and_is_pruned(home: Path, tmp_path: Path) -> None:
    lin = Lineage()
    gen = champion(lin, 0)
    root = tmp_path / "photos"
    vocab = {f"digit-{c}": c for c in range(10)}
    # imagefolder: train/<class>/..., labelled by folder
    write_pngs(root / "train", 0, 300, folder=lambda i: f"digit-{digits()[1][i]}")
    spec = f"imagefolder:{root}"
    gallery = Collection(lin)
    r = run_index(lin, gallery, spec, gen, vocab, part_rows=PART)
    assert (r.added, r.reembedded, r.pruned, r.items) == (300, 0, 0, 300)
    keys = {f"train/digit-{digits()[1][i]}/{i:04d}.png" for i in range(300)}
    check_once(gallery, keys)
    # labels are the classes' head rows; generation 1 embedded every item
    table = pa.concat_tables(
        [pa.Table.from_batches([b]) for _, b in gallery.iter_batches(["key", "label"])]
    )
    got = dict(zip(table.column("key").to_pylist(), table.column("label").to_pylist(), strict=True))
    assert all(got[k] == int(k.split("/")[1].split("-")[1]) for k in got)
    assert lin.gallery_counts() == {gen.id: 300}

    # +50 new, one changed in place, nothing new for the rest
    write_pngs(root / "train", 300, 350, folder=lambda i: f"digit-{digits()[1][i]}")
    changed = sorted(keys)[7]
    Image.fromarray(digits()[0][1000]).save(root / changed)
    r = run_index(lin, gallery, spec, gen, vocab, part_rows=PART)
    assert (r.added, r.reembedded, r.unchanged, r.items) == (50, 1, 299, 350)
    keys |= {f"train/digit-{digits()[1][i]}/{i:04d}.png" for i in range(300, 350)}
    check_once(gallery, keys)
    again = run_index(lin, gallery, spec, gen, vocab, part_rows=PART)
    assert (again.added, again.reembedded, again.unchanged) == (0, 0, 350)

    # 20 removed: kept without --prune, gone with it
    gone = sorted(keys)[:20]
    for k in gone:
        (root / k).unlink()
    kept = run_index(lin, gallery, spec, gen, vocab, part_rows=PART)
    assert (kept.pruned, kept.items) == (0, 350)
    r = run_index(lin, gallery, spec, gen, vocab, prune=True, part_rows=PART)
    assert (r.pruned, r.items) == (20, 330)
    check_once(gallery, keys - set(gone))
    assert gallery.require().items == 330 and sum(lin.gallery_counts().values()) == 330
    # ids are never reused: the next new item gets an id above every one assigned
    top = max(gallery.keys(["item_id"]).column("item_id").to_pylist())
    assert gallery.next_item_id() >= top + 1


@pytest.mark.slow
def test_a_parquet_directory_collection_grows_and_is_pruned(home: Path, tmp_path: Path) -> None:
    lin = Lineage()
    gen = champion(lin, 0)
    images = digits()[0]
    data = tmp_path / "items"
    data.mkdir()

    def write(name: str, idx: range) -> None:
        feats = (images[list(idx)].reshape(len(idx), -1) / 255.0).astype(np.float32)
        pq.write_table(
            pa.table(
                {
                    "item_id": [f"sku-{i}" for i in idx],
                    "features": pa.array(list(feats), pa.list_(pa.float32())),
                }
            ),
            data / name,
            row_group_size=40,
        )

    write("a.parquet", range(0, 150))
    write("b.parquet", range(150, 300))
    spec = f"parquet:{data}"
    gallery = Collection(lin)
    r = run_index(lin, gallery, spec, gen, {}, part_rows=PART)
    assert (r.added, r.items) == (300, 300)
    check_once(gallery, {f"sku-{i}" for i in range(300)})
    # unlabelled: every stored label says so
    assert set(gallery.keys(["label"]).column("label").to_pylist()) == {UNLABELLED}

    write("c.parquet", range(300, 350))
    r = run_index(lin, gallery, spec, gen, {}, part_rows=PART)
    assert (r.added, r.unchanged, r.items) == (50, 300, 350)
    write("b.parquet", range(170, 300))  # sku-150..169 gone from the source
    r = run_index(lin, gallery, spec, gen, {}, prune=True, part_rows=PART)
    assert (r.pruned, r.items) == (20, 330)
    check_once(gallery, {f"sku-{i}" for i in range(350) if not 150 <= i < 170})

    # the stored embedding of an item is its features embedded by the champion
    from workers.learning.embed import forward
    from workers.learning.models import load_model

    model = load_model(gen.checkpoint_path, gen.checkpoint_sha256)
    want = forward(model, (images[[200]].reshape(1, 1, 8, 8) / 255.0).astype(np.float32))
    rows = pa.concat_tables(
        [pa.Table.from_batches([b]) for _, b in gallery.iter_batches(["key", "embedding"])]
    )
    at = rows.column("key").to_pylist().index("sku-200")
    got = np.asarray(rows.column("embedding")[at].as_py(), np.float32)
    np.testing.assert_allclose(got, want.embedding[0], atol=1e-5)


@pytest.mark.slow
def test_unlabelled_images_are_indexed_searched_and_backfilled(home: Path, tmp_path: Path) -> None:
    lin = Lineage()
    g1 = champion(lin, 0)
    root = tmp_path / "album"
    write_pngs(root, 0, 200, folder=lambda i: f"2026/{i % 4:02d}")
    out = index_once(lin, IndexConfig(spec=f"images:{root}", part_rows=PART))
    assert (out["added"], out["items"], out["by_generation"]) == (200, 200, {g1.id: 200})
    # a file of the collection finds itself first, answered by key
    probe = "2026/01/0013.png"
    hits = search_file(lin, root / probe, k=3)["neighbors"]
    assert hits[0]["key"] == probe and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert hits[0]["generation"] == g1.id and hits[0]["label"] is None
    by_key = search_item(lin, probe, k=1)["neighbors"]
    assert by_key[0]["key"] == probe
    with pytest.raises(StoreError, match="unknown key 'nope.png'"):
        search_item(lin, "nope.png")

    # a new champion: backfill half the collection by key from its source
    g2 = champion(lin, 1)
    job = run_backfill(lin, Collection(lin), g2, "representative", 0.5)
    assert job.items_done == 100 and job.m_mix_after is None  # no labels: no M_mix
    assert lin.gallery_counts() == {g1.id: 100, g2.id: 100}
    check_once(Collection(lin), {p.relative_to(root).as_posix() for p in root.rglob("*.png")})
    hits = search_file(lin, root / probe, k=1)["neighbors"]
    assert hits[0]["key"] == probe  # still itself: the item kept its key through backfill
    from flows.backfill import backfill_once

    done = backfill_once(lin, BackfillConfig(budget=1.0, curve=False))
    assert done["by_generation"] == {g2.id: 200}
    # a file gone from the source: the backfill of it says so and what to do
    g3 = champion(lin, 2)
    (root / probe).unlink()
    with pytest.raises(StoreError, match="graceful index SPEC --prune"):
        run_backfill(lin, Collection(lin), g3, "random", 1.0)
    assert index_once(lin, IndexConfig(prune=True))["pruned"] == 1  # the recorded spec


@pytest.mark.slow
def test_bad_collection_input(home: Path, tmp_path: Path) -> None:
    lin = Lineage()
    gen = champion(lin, 0)
    root = tmp_path / "album"
    write_pngs(root, 0, 60)
    (root / "shelf-0" / "broken.png").write_bytes(b"not a png")
    gallery = Collection(lin)
    with pytest.raises(CollectionError, match=r"1 unreadable item\(s\).*shelf-0/broken.png"):
        run_index(lin, gallery, f"images:{root}", gen, {}, strict=True, part_rows=PART)
    assert not gallery.exists()  # nothing stored
    r = run_index(lin, gallery, f"images:{root}", gen, {}, part_rows=PART)
    assert (r.added, len(r.skipped), r.skipped[0]["key"]) == (60, 1, "shelf-0/broken.png")
    # another kind of spec for the same collection
    data = tmp_path / "dup.parquet"
    pq.write_table(
        pa.table({"item_id": ["a", "b", "a"], "features": [[0.0] * 64, [1.0] * 64, [2.0] * 64]}),
        data,
    )
    with pytest.raises(CollectionError, match="holds images items.*another kind"):
        run_index(lin, gallery, f"parquet:{data}", gen, {})
    # a key that repeats, a missing directory, a Parquet file without keys
    with pytest.raises(CollectionError, match=r"1 key\(s\) repeat \('a'\)"):
        list_items(f"parquet:{data}")
    with pytest.raises(CollectionError, match="image directory .* does not exist"):
        list_items(f"images:{tmp_path / 'nowhere'}")
    pq.write_table(pa.table({"features": [[0.0] * 64]}), tmp_path / "nokey.parquet")
    with pytest.raises(CollectionError, match="missing column 'item_id'"):
        list_items(f"parquet:{tmp_path / 'nokey.parquet'}")
    assert gallery.require().items == 60  # nothing lost


@pytest.fixture
def fresh_ray():
    """A local Ray cluster started now, so its workers see this test's environment (the
    S3 endpoint and keys, as a `graceful` process started with them would)."""
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


@pytest.mark.slow
def test_a_collection_in_an_s3_bucket(home: Path, s3, fresh_ray) -> None:
    fs, _ = s3
    lin = Lineage()
    gen = champion(lin, 0)
    images = digits()[0]
    feats = (images[:120].reshape(120, -1) / 255.0).astype(np.float32)
    table = pa.table(
        {
            "item_id": pa.array(np.arange(120), pa.int64()),
            "label": [f"digit-{c}" for c in digits()[1][:120]],
            "features": pa.array(list(feats), pa.list_(pa.float32())),
        }
    )
    pq.write_table(table.slice(0, 80), "photos/items/part-0.parquet", filesystem=fs)
    spec = "parquet:s3://photos/items"
    vocab = {f"digit-{c}": c for c in range(10)}
    r = run_index(lin, Collection(lin), spec, gen, vocab, part_rows=32)
    assert (r.added, r.items) == (80, 80)
    pq.write_table(table.slice(80, 40), "photos/items/part-1.parquet", filesystem=fs)
    r = run_index(lin, Collection(lin), spec, gen, vocab, part_rows=32)
    assert (r.added, r.items) == (40, 120)
    check_once(Collection(lin), {str(i) for i in range(120)})
    labels = Collection(lin).keys(["key", "label"])
    assert pc.min(labels.column("label")).as_py() >= 0  # labelled by the vocabulary
    # a backfill reads its items from the bucket by key
    g2 = champion(lin, 1)
    job = run_backfill(lin, Collection(lin), g2, "oldest-first", 1.0)
    assert job.items_done == 120 and lin.gallery_counts() == {g2.id: 120}
    hits = search_item(lin, "42", k=1)["neighbors"]
    assert hits[0]["key"] == "42"


def test_the_index_file_survives_a_prune_after_reload(home: Path, tmp_path: Path) -> None:
    """A persisted index loaded in a new process removes the ids of pruned parts."""
    from store.collection import CollectionRows

    lin = Lineage()
    gallery = Collection(lin)
    for start in (0, 16, 32):
        ids = np.arange(start, start + 16, dtype=np.int64)
        emb = np.eye(DIM, dtype=np.float32)[ids % DIM]
        rows = CollectionRows(
            ids,
            np.full(16, UNLABELLED),
            np.ones(16, np.int32),
            np.zeros(16, np.float32),
            emb,
            np.asarray([f"k{i}" for i in ids], dtype=object),
            np.asarray(["f"] * 16, dtype=object),
        )
        gallery.append("images:/x", rows)
    CollectionIndex.open(gallery)
    names = gallery.part_names()
    gallery.drop_part(names[1])  # ids 16..31
    part = gallery.read_rows(names[0])
    gallery.rewrite_part(names[0], part.take(np.arange(8)))  # ids 0..7 stay
    idx = CollectionIndex.load(gallery.root / INDEX_FILE, DIM)  # as a new process would
    assert idx is not None
    idx.sync(gallery)
    ids = set(faiss.vector_to_array(idx.index.id_map).tolist())
    assert ids == set(range(8)) | set(range(32, 48))
    assert idx.id_of("k20") is None and idx.id_of("k40") == 40
    assert [r["key"] for r in idx.rows_of(np.array([3, 33]))] == ["k3", "k33"]
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_parquet_rows_are_read_by_key(tmp_path: Path) -> None:
    """Keys located once (fixed-width UTF-8), rows read from their row groups in the
    order asked; a key that is only a prefix or an extension of a stored one is absent."""
    from workers.data.readers import ParquetItems, fixed_bytes
    from workers.data.sources import input_format

    assert fixed_bytes(pa.array(["ab", "é", ""])).tolist() == [b"ab", "é".encode(), b""]
    keys = ["b-2", "ab", "été", "a", "zz-10"]
    feats = np.arange(len(keys) * 3, dtype=np.float32).reshape(len(keys), 3)
    pq.write_table(
        pa.table({"item_id": keys, "features": pa.array(list(feats), pa.list_(pa.float32()))}),
        tmp_path / "c.parquet",
        row_group_size=2,  # three row groups
    )
    reader = ParquetItems(str(tmp_path / "c.parquet"), input_format((3,)))
    got = reader.take_keys(["zz-10", "été", "a"])
    np.testing.assert_array_equal(got, feats[[4, 2, 3]])
    x, missing = reader.take_each(["abc", "ab", "été!", "b-"])
    assert missing == ["abc", "été!", "b-"] and x.tolist() == [feats[1].tolist()]
    with pytest.raises(CollectionError, match=r"item_id \['nope'\] no longer in it"):
        reader.take_keys(["a", "nope"])

"""The Parquet gallery on real files and a real SQLite manifest: versions, atomic
rewrites, crash leftovers, and clear errors for corrupt, foreign or mismatched files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from store.collection import (
    Collection,
    CollectionRows,
    CollectionStoreError,
    gallery_schema,
    parse_part_name,
    part_name,
)
from store.lineage import BackfillJob, Lineage

DIM = 4


def rows(ids, gen: int = 1, dim: int = DIM, seed: int = 0) -> CollectionRows:
    ids = np.asarray(ids, dtype=np.int64)
    rng = np.random.default_rng(seed + gen)
    emb = rng.normal(size=(len(ids), dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return CollectionRows(
        item_id=ids,
        label=ids % 3,
        generation=np.full(len(ids), gen, np.int32),
        margin=rng.random(len(ids)).astype(np.float32),
        embedding=emb,
    )


@pytest.fixture
def gallery(home: Path) -> Collection:
    g = Collection(Lineage())
    g.create("digits", rows(np.arange(0, 20, 2)), part_rows=4)  # 10 items in 3 parts
    return g


def snapshot(g: Collection) -> tuple[dict[str, bytes], list[tuple]]:
    files = {p.name: p.read_bytes() for p in sorted(g.root.iterdir())}
    manifest = [(p.name, p.rows, p.sha256, p.counts) for p in g.manifest()]
    return files, manifest


def test_create_writes_sorted_parts_and_reads_back(gallery: Collection) -> None:
    assert gallery.part_names() == [part_name(i) for i in range(3)]
    assert [p.rows for p in gallery.manifest()] == [4, 4, 2]
    back = gallery.read_all()
    assert back.item_id.tolist() == list(range(0, 20, 2))
    np.testing.assert_array_equal(back.embedding, rows(np.arange(0, 20, 2)).embedding)
    assert gallery.counts() == {1: 10}
    assert gallery.verify() == gallery.manifest()
    with pytest.raises(CollectionStoreError, match="already exists"):
        gallery.create("digits", rows([100]))


def test_create_refuses_duplicate_or_unordered_items(home: Path) -> None:
    g = Collection(Lineage())
    with pytest.raises(CollectionStoreError, match="duplicate"):
        g.create("digits", rows([1, 2, 2]))
    batches = [rows([5, 6]), rows([3, 4])]
    with pytest.raises(CollectionStoreError, match="increasing"):
        g.create_from_batches("digits", DIM, batches, part_rows=2)
    assert not g.exists() and list(g.root.glob("*.parquet")) == []  # all or nothing


def test_part_names_carry_slot_and_version() -> None:
    assert part_name(3) == "part-00003.parquet"
    assert part_name(3, 2) == "part-00003.v2.parquet"
    assert parse_part_name("part-00003.v2.parquet") == (3, 2)
    assert parse_part_name("part-00003.parquet") == (3, 0)
    assert parse_part_name("notes.parquet") is None


def test_rewrite_commits_a_new_version_with_the_callers_changes(gallery: Collection) -> None:
    lin = gallery.lineage
    job = lin.add_backfill_job(generation_id=1, policy="random", budget=1.0)
    old = gallery.part_names()[1]
    new_rows = rows([8, 10, 12, 14], gen=2)

    def progress(session) -> None:
        j = session.get(BackfillJob, job.id)
        j.items_done = 4
        session.add(j)

    new = gallery.rewrite_part(old, new_rows, also=progress)
    assert new == "part-00001.v1.parquet"
    assert gallery.part_names() == ["part-00000.parquet", new, "part-00002.parquet"]
    assert not (gallery.root / old).exists()  # superseded and deleted after the commit
    assert gallery.counts() == {1: 6, 2: 4}
    assert lin.backfill_jobs()[0].items_done == 4
    back = gallery.read_all()
    assert back.item_id.tolist() == list(range(0, 20, 2))  # every item exactly once
    assert back.generation.tolist() == [1, 1, 1, 1, 2, 2, 2, 2, 1, 1]
    gallery.verify()


def test_a_failed_commit_changes_nothing(gallery: Collection) -> None:
    before = snapshot(gallery)
    job = gallery.lineage.add_backfill_job(generation_id=1, policy="random", budget=1.0)

    def fail(session) -> None:
        j = session.get(BackfillJob, job.id)
        j.items_done = 99
        session.add(j)
        raise RuntimeError("the machine died inside the transaction")

    with pytest.raises(RuntimeError, match="machine died"):
        gallery.rewrite_part("part-00001.parquet", rows([8, 10, 12, 14], gen=2), also=fail)
    assert snapshot(gallery) == before  # no new file, old file and manifest untouched
    assert gallery.lineage.backfill_jobs()[0].items_done == 0


def test_leftovers_of_a_kill_are_never_read_and_reconcile_removes_them(gallery: Collection) -> None:
    files, manifest = snapshot(gallery)
    # killed after writing the next version, before its commit ...
    uncommitted = gallery._stage("part-00001.v1.parquet", rows([8, 10, 12, 14], gen=2), DIM)
    # ... killed while writing a temporary file ...
    (gallery.root / ".part-00002.v1.parquet.tmp-4242").write_bytes(b"half a file")
    # ... and killed after a commit, before deleting the superseded version
    gallery.rewrite_part("part-00000.parquet", rows([0, 2, 4, 6], gen=2))
    (gallery.root / "part-00000.parquet").write_bytes(files["part-00000.parquet"])

    assert uncommitted.path.exists()
    assert gallery.read_all().generation.tolist() == [2] * 4 + [1] * 6  # committed state only
    gallery.verify()  # leftovers of the gallery's own slots are not foreign files
    removed = gallery.reconcile()
    assert sorted(removed) == sorted(
        [".part-00002.v1.parquet.tmp-4242", "part-00000.parquet", "part-00001.v1.parquet"]
    )
    assert sorted(p.name for p in gallery.root.iterdir()) == sorted(gallery.part_names())
    assert gallery.read_all().generation.tolist() == [2] * 4 + [1] * 6
    assert manifest[1:] == snapshot(gallery)[1][1:]


def test_a_corrupt_part_is_named(gallery: Collection) -> None:
    path = gallery.root / "part-00001.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file PAR1")
    with pytest.raises(CollectionStoreError, match=r"corrupt Parquet file .*part-00001\.parquet"):
        gallery.verify()
    with pytest.raises(CollectionStoreError, match=r"corrupt Parquet file .*part-00001\.parquet"):
        gallery.read_all()


def test_a_truncated_part_is_named(gallery: Collection) -> None:
    path = gallery.root / "part-00002.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CollectionStoreError, match=r"corrupt Parquet file .*part-00002\.parquet"):
        gallery.verify()


def test_a_foreign_schema_part_is_named(gallery: Collection) -> None:
    path = gallery.root / "part-00001.parquet"
    pq.write_table(pa.table({"id": [1, 2], "vector": [[0.1], [0.2]]}), path)
    with pytest.raises(CollectionStoreError, match=r"foreign Parquet file .*part-00001\.parquet"):
        gallery.verify()
    with pytest.raises(CollectionStoreError, match="foreign Parquet file"):
        list(gallery.iter_batches(["item_id"]))


def test_a_part_changed_behind_the_manifest_is_named(gallery: Collection) -> None:
    path = gallery.root / "part-00000.parquet"
    pq.write_table(rows([0, 2, 4, 6], gen=7).to_table(DIM), path)  # valid, but not ours
    with pytest.raises(CollectionStoreError, match=r"part-00000\.parquet was modified outside"):
        gallery.verify()


@pytest.mark.parametrize("name", ["extra.parquet", "part-00099.parquet"])
def test_a_foreign_file_in_the_directory_is_named(gallery: Collection, name: str) -> None:
    pq.write_table(pa.table({"x": [1]}), gallery.root / name)
    with pytest.raises(CollectionStoreError, match="foreign file .*" + re.escape(name)):
        gallery.verify()
    assert gallery.reconcile() == []  # never deletes what is not the gallery's own
    assert (gallery.root / name).exists()


def test_a_missing_part_is_named(gallery: Collection) -> None:
    (gallery.root / "part-00002.parquet").unlink()
    with pytest.raises(CollectionStoreError, match=r"part-00002\.parquet is missing"):
        gallery.verify()


def test_embedding_dimension_mismatch_is_refused(gallery: Collection) -> None:
    before = snapshot(gallery)
    with pytest.raises(
        CollectionStoreError, match="embedding dim mismatch: the collection stores dim 4"
    ):
        gallery.rewrite_part("part-00000.parquet", rows([0, 2, 4, 6], gen=2, dim=6))
    assert snapshot(gallery) == before
    # a part file holding another dimension is named
    path = gallery.root / "part-00001.parquet"
    pq.write_table(rows([8, 10, 12, 14], dim=6).to_table(6), path)
    with pytest.raises(
        CollectionStoreError, match=r"embedding dim mismatch in .*part-00001\.parquet"
    ):
        gallery.verify()


def test_iter_batches_streams_only_the_requested_columns(home: Path) -> None:
    g = Collection(Lineage())
    g.create("digits", rows(np.arange(1000)), part_rows=300)
    seen = 0
    for _, batch in g.iter_batches(["item_id", "generation"], batch_rows=128):
        assert batch.schema.names == ["item_id", "generation"]
        assert batch.num_rows <= 128
        seen += batch.num_rows
    assert seen == 1000


def test_foreign_schema_detection_is_strict_about_types(gallery: Collection) -> None:
    table = rows([8, 10, 12, 14]).to_table(DIM)
    wrong = table.set_column(2, "generation", pa.array([1, 1, 1, 1], pa.int64()))
    pq.write_table(wrong, gallery.root / "part-00001.parquet")
    assert not wrong.schema.equals(gallery_schema(DIM))
    with pytest.raises(CollectionStoreError, match="foreign Parquet file"):
        gallery.read_part("part-00001.parquet")


def test_one_writer_at_a_time(gallery: Collection) -> None:
    other = Collection(gallery.lineage)  # another job on the same home
    with gallery.writing():
        with gallery.writing():  # re-entrant for the holder
            assert gallery.reconcile() == []
        busy = "another backfill is writing the collection"
        with pytest.raises(CollectionStoreError, match=busy):
            other.reconcile()
    assert other.reconcile() == []  # released


def test_a_collection_with_parts_from_before_keys_reads_whole(gallery: Collection) -> None:
    """A lineage made before items had keys keeps its old parts (item_id, label,
    generation, margin, embedding) beside new ones: read together, an old item's key is
    its id and its fingerprint empty, and the keys of old and new parts concatenate."""
    old = gallery.root / gallery.part_names()[0]
    table = pq.read_table(old)
    legacy = table.select(["item_id", "label", "generation", "margin", "embedding"])
    pq.write_table(legacy, old)
    keys = gallery.keys()
    assert keys.column("key").to_pylist() == [str(i) for i in range(0, 20, 2)]
    assert keys.column("fingerprint").to_pylist()[:4] == [""] * 4
    assert keys.schema == pa.schema([gallery_schema(DIM).field(c) for c in keys.column_names])
    assert gallery.read_part(gallery.part_names()[0]).schema == gallery_schema(DIM)
    assert gallery.read_all().item_id.tolist() == list(range(0, 20, 2))

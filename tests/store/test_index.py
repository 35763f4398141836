"""The faiss index over the gallery: no duplicate ids, persisted with the manifest state
it reflects, incremental sync, and readers that only ever see committed parts."""

from __future__ import annotations

import threading
from pathlib import Path

import faiss
import numpy as np
import pytest

from store.collection import Collection, CollectionRows, CollectionStoreError
from store.index import INDEX_FILE, CollectionIndex
from store.lineage import Lineage

DIM = 8
N_PARTS, PART = 4, 16
IDS = np.arange(N_PARTS * PART, dtype=np.int64) * 3  # not contiguous on purpose


def one_hot_rows(ids: np.ndarray, gen: int) -> CollectionRows:
    """Every item of generation ``gen`` embeds to basis vector ``gen % DIM``."""
    emb = np.zeros((len(ids), DIM), np.float32)
    emb[:, gen % DIM] = 1.0
    return CollectionRows(
        item_id=np.asarray(ids, np.int64),
        label=np.asarray(ids, np.int64) % 5,
        generation=np.full(len(ids), gen, np.int32),
        margin=np.full(len(ids), 0.5, np.float32),
        embedding=emb,
    )


@pytest.fixture
def gallery(home: Path) -> Collection:
    g = Collection(Lineage())
    g.create("digits", one_hot_rows(IDS, 1), part_rows=PART)
    return g


def index_ids(idx: CollectionIndex) -> np.ndarray:
    return faiss.vector_to_array(idx.index.id_map)


def generation_in_index(idx: CollectionIndex, item: int) -> int:
    return int(np.argmax(idx.index.reconstruct(int(item))))


def test_upsert_replaces_instead_of_duplicating() -> None:
    idx = CollectionIndex(DIM)
    ids = np.array([5, 6, 7])
    idx.upsert(ids, one_hot_rows(ids, 1).embedding, [0, 1, 2])
    idx.upsert(ids[:2], one_hot_rows(ids[:2], 2).embedding, [0, 1])
    assert idx.ntotal == 3 and sorted(index_ids(idx).tolist()) == [5, 6, 7]
    assert [generation_in_index(idx, i) for i in ids] == [2, 2, 1]
    scores, found = idx.search(np.eye(DIM, dtype=np.float32)[[2]], k=3)
    assert sorted(found[0][:2].tolist()) == [5, 6] and scores[0][0] == pytest.approx(1.0)
    assert idx.label_of(np.array([7, 5])).tolist() == [2, 0]
    with pytest.raises(CollectionStoreError, match="duplicate item ids"):
        idx.upsert(np.array([1, 1]), np.ones((2, DIM)), [0, 0])
    with pytest.raises(CollectionStoreError, match="dim mismatch: the index has dim 8"):
        idx.upsert(np.array([9]), np.ones((1, 3)), [0])
    with pytest.raises(CollectionStoreError, match="dim mismatch"):
        idx.search(np.ones((1, 3)))
    with pytest.raises(CollectionStoreError, match="not in the index"):
        idx.label_of(np.array([404]))


def test_open_persists_and_syncs_only_changed_parts(gallery: Collection, monkeypatch) -> None:
    idx = CollectionIndex.open(gallery)
    path = gallery.root / INDEX_FILE
    assert path.exists() and idx.ntotal == len(IDS)
    assert set(idx.parts.values()) == set(gallery.part_names())

    reads: list[str] = []
    real = Collection.read_rows

    def counting(self, name, info=None):
        reads.append(name)
        return real(self, name, info)

    monkeypatch.setattr(Collection, "read_rows", counting)
    again = CollectionIndex.open(gallery)  # loaded from disk; nothing to re-read
    assert reads == [] and again.ntotal == len(IDS)

    new = gallery.rewrite_part("part-00002.parquet", one_hot_rows(IDS[32:48], 2))
    synced = CollectionIndex.open(gallery)
    assert reads == [new]  # only the part that changed
    ids = index_ids(synced)
    assert len(ids) == len(IDS) and len(np.unique(ids)) == len(IDS)  # no id twice
    assert [generation_in_index(synced, i) for i in IDS[30:34]] == [1, 1, 2, 2]
    assert synced.label_of(IDS).tolist() == (IDS % 5).tolist()
    reloaded = CollectionIndex.load(path, DIM)
    assert reloaded is not None and set(reloaded.parts.values()) == set(gallery.part_names())


def test_a_torn_index_file_is_rebuilt(gallery: Collection) -> None:
    CollectionIndex.open(gallery)
    path = gallery.root / INDEX_FILE
    path.write_bytes(path.read_bytes()[:100])
    assert CollectionIndex.load(path, DIM) is None
    idx = CollectionIndex.open(gallery)
    assert idx.ntotal == len(IDS) and CollectionIndex.load(path, DIM) is not None


def test_index_of_another_dimension_is_refused(gallery: Collection) -> None:
    with pytest.raises(
        CollectionStoreError, match="the index has dim 3, the collection stores dim 8"
    ):
        CollectionIndex(3).sync(gallery)


def test_a_part_deleted_while_its_hash_is_read_is_gone_not_a_crash(
    gallery: Collection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer may supersede and delete a part between the reader's existence check and
    its sha256 read (the race the next test once lost: FileNotFoundError from the index's
    sync); the reader must see PartGone, which makes the sync start over."""
    import store.collection as G
    from store.collection import PartGone

    real = G.file_sha256
    part = gallery.manifest()[0]

    def deleted_first(path):
        Path(path).unlink()  # the writer's delete lands here
        return real(path)

    monkeypatch.setattr(G, "file_sha256", deleted_first)
    with pytest.raises(PartGone, match="superseded"):
        gallery.check_part(part)


def test_readers_see_whole_committed_parts_during_rewrites(gallery: Collection) -> None:
    """A writer rewrites every part again and again; a reader that opens the index in a
    loop must always find every item once and each part entirely in one version."""
    rounds = 12
    errors: list[BaseException] = []
    looked = threading.Event()  # the reader finished a look
    stop = threading.Event()  # the reader failed: the writer ends at once

    def writer() -> None:
        try:
            for gen in range(2, 2 + rounds):
                if stop.is_set():
                    return
                for name in gallery.part_names():
                    slot = int(name[5:10])
                    gallery.rewrite_part(
                        name, one_hot_rows(IDS[slot * PART : (slot + 1) * PART], gen)
                    )
                # the reader looks again while rounds remain, however busy the machine
                looked.clear()
                looked.wait(10)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    looks = 0
    seen_versions = set()
    try:
        while t.is_alive() or looks == 0:
            idx = CollectionIndex.open(gallery, save=looks % 2 == 0)
            ids = index_ids(idx)
            assert len(ids) == len(IDS) and len(np.unique(ids)) == len(IDS)
            for slot in range(N_PARTS):
                gens = {generation_in_index(idx, i) for i in IDS[slot * PART : (slot + 1) * PART]}
                assert len(gens) == 1, f"slot {slot} mixes versions {gens}"
            seen_versions.update(idx.parts.values())
            looks += 1
            looked.set()
    finally:  # a failed look stops the writer now, not after its remaining rounds' waits
        stop.set()
        looked.set()
        t.join()
    assert not errors, errors
    final = CollectionIndex.open(gallery)
    assert {generation_in_index(final, i) for i in IDS} == {(1 + rounds) % DIM}
    assert looks > 1 and len(seen_versions) > N_PARTS  # it did read while parts changed


def test_an_ivf_index_past_the_threshold_is_exact_at_full_probe_and_retrains(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past IVF_MIN_ITEMS the collection gets an IVF index: searching every cell is exact,
    a pruned part's ids leave it, and a recall below RETRAIN_RECALL after an update
    retrains it (the threshold is lowered/raised here to force each case)."""
    import store.index as I

    monkeypatch.setattr(I, "IVF_MIN_ITEMS", 64)
    rng = np.random.default_rng(0)
    g = Collection(Lineage())
    emb = rng.normal(size=(len(IDS), DIM)).astype(np.float32)
    rows = one_hot_rows(IDS, 1)
    rows.embedding = emb
    g.create("digits", rows, part_rows=PART)
    idx = CollectionIndex.open(g)
    assert idx.kind is I.IndexKind.IVF and idx.nlist == I.ivf_cells(len(IDS)) == 16
    assert idx.trainings == 1 and idx.nprobe == 1
    flat = CollectionIndex(DIM)
    flat.upsert(IDS, emb, np.zeros(len(IDS)))
    q = rng.normal(size=(20, DIM)).astype(np.float32)
    np.testing.assert_array_equal(idx.search(q, 5, nprobe=idx.nlist)[1], flat.search(q, 5)[1])
    assert idx.measure_recall(q, k=5) == pytest.approx(
        np.mean(
            [
                len(set(a) & set(b)) / 5
                for a, b in zip(
                    idx.search(q, 5)[1].tolist(), flat.search(q, 5)[1].tolist(), strict=True
                )
            ]
        )
    )
    # each item finds itself when every cell is probed
    assert (idx.search(emb, 1, nprobe=idx.nlist)[1][:, 0] == IDS).all()
    # an update with recall below the bar retrains it; the count is kept in the file
    monkeypatch.setattr(I, "RETRAIN_RECALL", 1.01)
    name = g.part_names()[0]
    part = g.read_rows(name)
    part.embedding = -part.embedding
    g.rewrite_part(name, part)
    again = CollectionIndex.open(g)
    assert again.trainings == 2 and again.recall is not None
    assert I.CollectionIndex.load(g.root / INDEX_FILE, DIM).trainings == 2
    # at or above the bar: kept as it is
    monkeypatch.setattr(I, "RETRAIN_RECALL", 0.0)
    g.rewrite_part(g.part_names()[1], g.read_rows(g.part_names()[1]))
    assert CollectionIndex.open(g).trainings == 2

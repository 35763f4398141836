"""A faiss index over the collection's current embeddings, keyed by item id, persisted.

``IndexIDMap2`` over an inner-product index: cosine similarity on L2-normalised
embeddings. faiss ``add_with_ids`` does not replace an existing id, so every update
removes the ids first: each item is in the index exactly once.

Two kinds (:class:`IndexKind`): ``flat`` (exact) for collections below
``IVF_MIN_ITEMS``, ``ivf`` (an inverted file of ``nlist`` k-means cells, ``nprobe`` of
them searched) above it; bench/collection.py measured where IVF starts to pay and the
``nprobe`` that keeps recall@10 against exact search at 0.95 or more. An IVF index is
trained on a sample of the collection; when backfills move the embeddings away from
its cells its recall drops, so every sync measures recall@10 on a sample of the items
it just read (IVF with ``nprobe`` against the exhaustive IVF search, which is exact) and
retrains when it falls below ``RETRAIN_RECALL``.

The index is a derived cache of the committed collection. It records which part file of
each slot it reflects (the manifest state) and is persisted as one file,
``GRACEFUL_HOME/gallery/index.faiss`` (each item's id, key, label and generation; that
manifest state; then the faiss index as faiss writes it), written under a temporary
name, fsynced and renamed. :meth:`CollectionIndex.open` loads it and brings it up to the
current committed manifest by re-reading only the parts that changed, so a search
during a backfill or an indexing answers from the committed state: parts committed so
far in their new version, the rest in their old one, never half a part.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import uuid
from enum import StrEnum
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from store.collection import Collection, CollectionStoreError, PartGone, slot_of

INDEX_FILE = "index.faiss"
MAGIC = b"graceful-index\n"
FORMAT = 3
# measured in bench/results/collection.md: below this size exact search is fast enough
# (p99 of one query under a few milliseconds) and IVF's training is not worth it
IVF_MIN_ITEMS = 200_000
IVF_NPROBE_SHARE = 1 / 16  # cells searched: measured recall@10 >= 0.95 (collection.md)
RETRAIN_RECALL = 0.9  # an IVF index whose measured recall@10 falls below this is retrained
PROBE_QUERIES = 256  # items a sync measures recall on
TRAIN_PER_CELL = 64  # k-means training points per cell


class IndexKind(StrEnum):
    FLAT = "flat"
    IVF = "ivf"


def wanted_kind(items: int) -> IndexKind:
    """The index kind for a collection of ``items`` items."""
    return IndexKind.IVF if items >= IVF_MIN_ITEMS else IndexKind.FLAT


def ivf_cells(items: int) -> int:
    """Cells of an IVF index over ``items`` items: about sqrt(n), a power of two."""
    return int(2 ** round(math.log2(max(16.0, math.sqrt(max(items, 1))))))


_LOOKUP_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.int64()),
        pa.field("key", pa.string()),
        pa.field("label", pa.int64()),
        pa.field("generation", pa.int32()),
        pa.field("slot", pa.int32()),  # the part slot the item came from; -1: an upsert
    ]
)


def _lookup_table(ids, keys, labels, generations, slot: int) -> pa.Table:
    return pa.table(
        {
            "item_id": np.asarray(ids, dtype=np.int64),
            "key": pa.array(list(keys), pa.string()),
            "label": np.asarray(labels, np.int64),
            "generation": np.asarray(generations, np.int32),
            "slot": np.full(len(ids), slot, np.int32),
        },
        schema=_LOOKUP_SCHEMA,
    )


class CollectionIndex:
    """Nearest-neighbour search over collection items."""

    def __init__(self, dim: int, kind: IndexKind = IndexKind.FLAT, nlist: int = 0) -> None:
        self.dim = int(dim)
        self.kind = IndexKind(kind)
        self.nlist = int(nlist)
        if self.kind is IndexKind.IVF:
            if self.nlist < 1:
                raise CollectionStoreError("an IVF index needs nlist >= 1")
            quantizer = faiss.IndexFlatIP(self.dim)
            inner = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
            self._quantizer = quantizer  # faiss does not own it from Python: keep it alive
            self.index = faiss.IndexIDMap2(inner)
            self.nprobe = max(1, round(self.nlist * IVF_NPROBE_SHARE))
        else:
            self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
            self.nprobe = 0
        self.parts: dict[int, str] = {}  # slot -> the part file this index reflects
        self._table = _LOOKUP_SCHEMA.empty_table()  # one row per indexed item
        self._lookup: pa.Table | None = None  # the same, sorted by item id
        self.recall: float | None = None  # the last measured recall@10 (IVF)
        self.trainings = 0  # how often this index's cells were trained (IVF)
        self._probe: np.ndarray | None = None  # a few embeddings the last sync read

    # -- building ----------------------------------------------------------------------
    @classmethod
    def for_collection(cls, dim: int, items: int) -> CollectionIndex:
        """An empty index of the kind a collection of ``items`` items gets."""
        kind = wanted_kind(items)
        return cls(dim, kind, ivf_cells(items) if kind is IndexKind.IVF else 0)

    @classmethod
    def open(
        cls, collection: Collection, path: Path | None = None, save: bool = True
    ) -> CollectionIndex:
        """The persisted index, brought up to the committed collection (saved if it moved).

        A missing, unreadable or mismatched index file is rebuilt from the collection; so
        is one of the wrong kind for the collection's size, and an IVF index whose recall
        fell below ``RETRAIN_RECALL`` (it is trained again on the current embeddings).
        """
        info = collection.require()
        path = path or collection.root / INDEX_FILE
        with contextlib.suppress(OSError):  # the format before 3: rebuilt under the new name
            (collection.root / "index.npz").unlink(missing_ok=True)
        idx = cls.load(path, info.embed_dim)
        fresh = idx is None or idx.kind is not wanted_kind(int(info.items))
        if fresh:
            idx = cls.for_collection(info.embed_dim, int(info.items))
        assert idx is not None
        changed = idx.sync(collection)
        if idx.kind is IndexKind.IVF and changed and not fresh:
            recall = idx.measure_recall()
            if recall is not None and recall < RETRAIN_RECALL:  # the cells no longer fit
                before = idx.trainings
                idx = cls.for_collection(info.embed_dim, int(info.items))
                idx.sync(collection)
                idx.measure_recall()
                idx.trainings += before
                fresh = True
        if save and (changed or fresh):
            # a read-only home still answers searches from the synced copy
            with contextlib.suppress(OSError):
                idx.save(path)
        return idx

    def _check(self, emb: np.ndarray) -> np.ndarray:
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise CollectionStoreError(
                f"embedding dim mismatch: the index has dim {self.dim}, got shape {emb.shape}"
            )
        emb = emb.copy()
        faiss.normalize_L2(emb)
        return emb

    def _replace_rows(self, drop: pa.Array | None, new: list[pa.Table]) -> None:
        """Lookup rows: those where ``drop`` is true go, ``new`` ones are added."""
        table = self._table if drop is None else self._table.filter(pc.invert(drop))
        self._table = pa.concat_tables([table, *new]).combine_chunks()
        self._lookup = None

    def _ids_where(self, mask: pa.Array) -> np.ndarray:
        return np.asarray(self._table.column("item_id").filter(mask).to_numpy(), dtype=np.int64)

    def train(self, sample: np.ndarray) -> None:
        """Train an IVF index's cells on ``sample`` (a no-op for a flat index)."""
        if self.kind is IndexKind.FLAT:
            return
        sample = self._check(sample)
        if len(sample) < self.nlist:
            raise CollectionStoreError(f"{len(sample)} training vectors for {self.nlist} IVF cells")
        self.index.train(sample)
        self.trainings += 1

    def upsert(self, ids: np.ndarray, emb: np.ndarray, labels: np.ndarray) -> None:
        """Insert or replace items (each id once; keyed by their ids, of no generation)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        emb = self._check(emb)
        if len(np.unique(ids)) != len(ids):
            raise CollectionStoreError("duplicate item ids in one upsert")
        if len(labels) != len(ids) or len(emb) != len(ids):
            raise CollectionStoreError(
                f"{len(ids)} ids but {len(emb)} embeddings, {len(labels)} labels"
            )
        if not self.index.is_trained:
            self.train(emb)
        if self.index.ntotal:
            self.index.remove_ids(ids)
        self.index.add_with_ids(emb, ids)
        drop = pc.is_in(self._table.column("item_id"), pa.array(ids))
        keys = [str(int(i)) for i in ids]
        self._replace_rows(drop, [_lookup_table(ids, keys, labels, np.full(len(ids), -1), -1)])

    def sync(self, collection: Collection, attempts: int = 64) -> bool:
        """Bring the index to the collection's committed manifest; True if anything changed.

        Only parts whose file changed since the index last saw them are read, each checked
        against its manifest row (row count, sha256) first; parts gone from the manifest
        (pruned) have their ids removed. Ids are removed in one pass,
        then the new embeddings added: no id twice. A part superseded while being read
        makes it start over from a fresh manifest.
        """
        info = collection.require()
        if info.embed_dim != self.dim:
            raise CollectionStoreError(
                f"embedding dim mismatch: the index has dim {self.dim}, "
                f"the collection stores dim {info.embed_dim}"
            )
        changed = False
        for _ in range(attempts):
            committed = collection.manifest()
            manifest = {slot_of(p.name): p.name for p in committed}
            gone = sorted(set(self.parts) - set(manifest))
            if gone:
                self._remove_slots(gone)
                changed = True
            stale = [(s, n) for s, n in sorted(manifest.items()) if self.parts.get(s) != n]
            if not stale:
                return changed
            changed = True
            try:
                # every part read into the index is the one committed: a part changed
                # behind the manifest (its sha256 differs) is named, nothing is indexed
                names = {n for _, n in stale}
                for part in committed:
                    if part.name in names:
                        collection.check_part(part, info)
                if not self.index.is_trained:
                    self.train(_training_sample(collection, TRAIN_PER_CELL * self.nlist))
                self._replace_parts(collection, stale)
            except PartGone:  # a writer committed meanwhile: start over from its manifest
                continue
            return changed
        raise CollectionStoreError(
            "the collection kept changing while the index was read; try the search again"
        )

    def _remove_slots(self, slots: list[int]) -> None:
        """Take out the items of slots that left the manifest (their parts were dropped)."""
        mask = pc.is_in(self._table.column("slot"), pa.array(slots, pa.int32()))
        ids = self._ids_where(mask)
        if len(ids):
            self.index.remove_ids(ids)
        for s in slots:
            self.parts.pop(s, None)
        self._replace_rows(mask, [])

    def _replace_parts(self, collection: Collection, stale: list[tuple[int, str]]) -> None:
        info = collection.require()
        # out go the ids the index holds for these slots (a pruned part holds fewer now)
        # and the ids the new versions hold (wherever the index had them)
        new_ids = [
            np.asarray(batch.column(0).to_numpy(), dtype=np.int64)
            for _, batch in collection.iter_batches(["item_id"], names=[n for _, n in stale])
        ]
        ids = np.concatenate(new_ids) if new_ids else np.zeros(0, np.int64)
        mask = pc.or_(
            pc.is_in(self._table.column("slot"), pa.array([s for s, _ in stale], pa.int32())),
            pc.is_in(self._table.column("item_id"), pa.array(ids)),
        )
        # faiss may hold ids the lookup does not know yet (a sync cut short by PartGone)
        old = np.union1d(self._ids_where(mask), ids)
        if len(old) and self.index.ntotal:
            self.index.remove_ids(old)
        for slot, _ in stale:
            self.parts.pop(slot, None)
        probe: list[np.ndarray] = []
        tables: list[pa.Table] = []
        try:
            for slot, name in stale:
                rows = collection.read_rows(name, info)
                emb = self._check(rows.embedding)
                self.index.add_with_ids(emb, rows.item_id)
                tables.append(
                    _lookup_table(rows.item_id, rows.key, rows.label, rows.generation, slot)
                )
                self.parts[slot] = name
                if len(emb):
                    probe.append(emb[:: max(1, len(emb) // 16)])
        finally:  # the lookup follows faiss, also when a part vanished half-way
            self._replace_rows(mask, tables)
        if probe:
            sample = np.concatenate(probe)
            rng = np.random.default_rng(0)
            take = rng.choice(len(sample), min(PROBE_QUERIES, len(sample)), replace=False)
            self._probe = sample[np.sort(take)]

    def measure_recall(self, queries: np.ndarray | None = None, k: int = 10) -> float | None:
        """Recall@k of the IVF search against exact search (every cell probed), on
        ``queries`` or the items the last sync read; None for a flat index."""
        if self.kind is IndexKind.FLAT or self.ntotal == 0:
            return None
        q = self._probe if queries is None else self._check(queries)
        if q is None or len(q) == 0:
            return self.recall
        k = min(k, self.ntotal)
        _, approx = self.search(q, k, normalised=True)
        _, exact = self.search(q, k, nprobe=self.nlist, normalised=True)
        hits = sum(
            len(set(a) & set(e)) for a, e in zip(approx.tolist(), exact.tolist(), strict=True)
        )
        self.recall = hits / float(len(q) * k)
        return self.recall

    def clone(self) -> CollectionIndex:
        """An independent copy (faiss index and lookup): a reader keeps searching this one
        while the copy is synced, then the copy replaces it (copy-on-write)."""
        twin = copy.copy(self)  # Arrow tables are immutable: shared until replaced
        twin.index = faiss.clone_index(self.index)
        twin.parts = dict(self.parts)
        return twin

    def embedding_of(self, item_id: int) -> np.ndarray | None:
        """The stored (L2-normalised) embedding of one item, or None where the index
        cannot give it back (an IVF index keeps no direct map)."""
        try:
            return np.asarray(self.index.reconstruct(int(item_id)), dtype=np.float32)
        except RuntimeError:
            return None

    # -- persistence -------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Write the index and the manifest state it reflects, atomically.

        One file: a magic line, the metadata (JSON) and the lookup rows (Arrow IPC), each
        length-prefixed, then the faiss index streamed to the file as faiss writes it (no
        in-memory copy of the vectors).
        """
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, _LOOKUP_SCHEMA) as writer:
            writer.write_table(self._table)
        meta = {
            "format": FORMAT,
            "dim": self.dim,
            "kind": self.kind.value,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "recall": self.recall,
            "trainings": self.trainings,
            "parts": sorted(self.parts.values()),
        }
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC)
                for blob in (json.dumps(meta).encode(), sink.getvalue()):
                    f.write(len(blob).to_bytes(8, "little"))
                    f.write(memoryview(blob))
                faiss.write_index(self.index, faiss.PyCallbackIOWriter(f.write))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path, dim: int) -> CollectionIndex | None:
        """The saved index, or None when there is none or it cannot be used."""
        if not path.exists():
            return None
        try:
            with open(path, "rb") as f:
                if f.read(len(MAGIC)) != MAGIC:
                    return None
                blobs = []
                for _ in range(2):
                    size = int.from_bytes(f.read(8), "little")
                    blobs.append(f.read(size))
                meta = json.loads(blobs[0].decode())
                if meta.get("format") != FORMAT or int(meta["dim"]) != dim:
                    return None
                rows = pa.ipc.open_stream(pa.py_buffer(blobs[1])).read_all()
                index = faiss.read_index(faiss.PyCallbackIOReader(f.read))
        except Exception:  # a torn or foreign file: the index is rebuilt from the collection
            return None
        if not isinstance(index, faiss.IndexIDMap2) or index.ntotal != rows.num_rows:
            return None
        idx = cls(dim, IndexKind(meta["kind"]), int(meta.get("nlist") or 0))
        idx.index = index
        idx.nprobe = int(meta.get("nprobe") or 0)
        idx.recall = meta.get("recall")
        idx.trainings = int(meta.get("trainings") or 0)
        idx.parts = {slot_of(n): n for n in meta["parts"]}
        idx._table = rows.combine_chunks()
        return idx

    # -- searching ---------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(
        self, queries: np.ndarray, k: int = 5, nprobe: int | None = None, normalised: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, item ids) of the k nearest items for each query."""
        if self.ntotal == 0:
            raise CollectionStoreError("the index is empty")
        if k < 1:
            raise CollectionStoreError(f"k must be >= 1, got {k}")
        q = queries if normalised else self._check(queries)
        params = None
        if self.kind is IndexKind.IVF:
            params = faiss.SearchParametersIVF(nprobe=int(nprobe or self.nprobe))
        return self.index.search(q, min(k, self.ntotal), params=params)

    def _rows(self) -> pa.Table:
        """One row per indexed item, sorted by item id."""
        if self._lookup is None:
            order = np.argsort(self._table.column("item_id").to_numpy(), kind="stable")
            self._lookup = self._table.take(pa.array(order))
        return self._lookup

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        table = self._rows()
        known = table.column("item_id").to_numpy()
        flat = np.asarray(ids, dtype=np.int64).ravel()
        pos = np.searchsorted(known, flat)
        ok = pos < len(known)
        ok[ok] = known[pos[ok]] == flat[ok]
        if not ok.all():
            raise CollectionStoreError(f"item ids not in the index: {flat[~ok][:10].tolist()}")
        return pos

    def label_of(self, ids: np.ndarray) -> np.ndarray:
        pos = self._positions(ids)
        labels = self._rows().column("label").to_numpy()
        return labels[pos].reshape(np.shape(ids)) if len(pos) else np.zeros(np.shape(ids))

    def rows_of(self, ids: np.ndarray) -> list[dict]:
        """Key, label and generation of each of ``ids`` (as the index last saw them)."""
        pos = self._positions(ids)
        return self._rows().take(pa.array(pos)).to_pylist()

    def id_of(self, key: str) -> int | None:
        """The item id of ``key``, or None when the collection does not hold it."""
        table = self._rows()
        hit = pc.index(table.column("key"), key).as_py()
        return None if hit < 0 else int(table.column("item_id")[hit].as_py())


def _training_sample(collection: Collection, n: int, seed: int = 0) -> np.ndarray:
    """About ``n`` embeddings of the committed collection, a seeded even sample."""
    info = collection.require()
    share = min(1.0, n / max(1, int(info.items)))
    rng = np.random.default_rng(seed)
    out = []
    for _, batch in collection.iter_batches(["embedding"]):
        emb = batch.column(0).flatten().to_numpy(zero_copy_only=False).reshape(batch.num_rows, -1)
        keep = rng.random(len(emb)) < share
        out.append(np.array(emb[keep], dtype=np.float32))
    return np.concatenate(out) if out else np.zeros((0, info.embed_dim), np.float32)

"""A faiss index over the gallery's current embeddings, keyed by item id, persisted.

``IndexIDMap2`` over an inner-product index: cosine similarity on L2-normalised
embeddings. faiss ``add_with_ids`` does not replace an existing id, so every update
removes the ids first: each item is in the index exactly once.

The index is a derived cache of the committed gallery. It records which part file of
each slot it reflects (the manifest state) and is persisted as one file,
``GRACEFUL_HOME/gallery/index.npz`` (the serialised faiss index, item ids, labels and
that manifest state), written under a temporary name, fsynced and renamed.
:meth:`GalleryIndex.open` loads it and brings it up to the current committed manifest
by re-reading only the parts that changed (a backfill rewrites whole parts), so a
search during a backfill answers from the committed state: parts committed so far in
their new version, the rest in their old one, never half a part.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path

import faiss
import numpy as np

from store.gallery import Gallery, GalleryError, PartGone, slot_of

INDEX_FILE = "index.npz"
FORMAT = 1


class GalleryIndex:
    """Nearest-neighbour search over gallery items."""

    def __init__(self, dim: int) -> None:
        self.dim = int(dim)
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        self.parts: dict[int, str] = {}  # slot -> the part file this index reflects
        self._chunks: dict[object, tuple[np.ndarray, np.ndarray]] = {}  # label chunks
        self._lookup: tuple[np.ndarray, np.ndarray] | None = None
        self._n_upserts = 0

    # -- building ----------------------------------------------------------------------
    @classmethod
    def from_gallery(cls, gallery: Gallery) -> GalleryIndex:
        """Build from the committed gallery, part by part (not persisted)."""
        idx = cls(gallery.require().embed_dim)
        idx.sync(gallery)
        return idx

    @classmethod
    def open(cls, gallery: Gallery, path: Path | None = None, save: bool = True) -> GalleryIndex:
        """The persisted index, brought up to the committed gallery (and saved if it moved).

        A missing, unreadable or mismatched index file is rebuilt from the gallery.
        """
        info = gallery.require()
        path = path or gallery.root / INDEX_FILE
        idx = cls.load(path, info.embed_dim)
        fresh = idx is None
        if idx is None:
            idx = cls(info.embed_dim)
        changed = idx.sync(gallery)
        if save and (changed or fresh):
            # a read-only home still answers searches from the synced copy
            with contextlib.suppress(OSError):
                idx.save(path)
        return idx

    def _check(self, emb: np.ndarray) -> np.ndarray:
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise GalleryError(
                f"embedding dim mismatch: the index has dim {self.dim}, got shape {emb.shape}"
            )
        emb = emb.copy()
        faiss.normalize_L2(emb)
        return emb

    def _set_labels(self, key: object, ids: np.ndarray, labels: np.ndarray) -> None:
        self._chunks.pop(key, None)  # re-inserting moves the chunk last: last write wins
        self._chunks[key] = (ids.copy(), np.asarray(labels, dtype=np.int64).copy())
        self._lookup = None

    def upsert(self, ids: np.ndarray, emb: np.ndarray, labels: np.ndarray) -> None:
        """Insert or replace items (each id once)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        emb = self._check(emb)
        if len(np.unique(ids)) != len(ids):
            raise GalleryError("duplicate item ids in one upsert")
        if len(labels) != len(ids) or len(emb) != len(ids):
            raise GalleryError(f"{len(ids)} ids but {len(emb)} embeddings, {len(labels)} labels")
        if self.index.ntotal:
            self.index.remove_ids(ids)
        self.index.add_with_ids(emb, ids)
        self._n_upserts += 1
        self._set_labels(("upsert", self._n_upserts), ids, labels)

    def sync(self, gallery: Gallery, attempts: int = 8) -> bool:
        """Bring the index to the gallery's committed manifest; True if anything changed.

        Only parts whose file changed since the index last saw them are read. Their ids
        are removed in one pass, then their embeddings added: no id twice. A part
        superseded while being read makes it start over from a fresh manifest.
        """
        info = gallery.require()
        if info.embed_dim != self.dim:
            raise GalleryError(
                f"embedding dim mismatch: the index has dim {self.dim}, "
                f"the gallery stores dim {info.embed_dim}"
            )
        changed = False
        for _ in range(attempts):
            manifest = {slot_of(p.name): p.name for p in gallery.manifest()}
            if set(self.parts) - set(manifest):  # a slot vanished: start from scratch
                self.reset()
                changed = True
            stale = [(s, n) for s, n in sorted(manifest.items()) if self.parts.get(s) != n]
            if not stale:
                return changed
            changed = True
            try:
                self._replace_parts(gallery, stale)
            except PartGone:
                continue
            return changed
        raise GalleryError(
            "the gallery kept changing while the index was read; try the search again"
        )

    def _replace_parts(self, gallery: Gallery, stale: list[tuple[int, str]]) -> None:
        info = gallery.require()
        if self.index.ntotal:
            old = [
                np.asarray(batch.column(0).to_numpy(), dtype=np.int64)
                for _, batch in gallery.iter_batches(["item_id"], names=[n for _, n in stale])
            ]
            for slot, _ in stale:
                self.parts.pop(slot, None)
            if old:
                self.index.remove_ids(np.concatenate(old))
        for slot, name in stale:
            rows = gallery.read_rows(name, info)
            self.index.add_with_ids(self._check(rows.embedding), rows.item_id)
            self._set_labels(("slot", slot), rows.item_id, rows.label)
            self.parts[slot] = name

    def reset(self) -> None:
        self.index.reset()
        self.parts.clear()
        self._chunks.clear()
        self._lookup = None

    # -- persistence -------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Write the index and the manifest state it reflects, atomically."""
        ids, labels = self._labels()
        meta = {"format": FORMAT, "dim": self.dim, "parts": sorted(self.parts.values())}
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                np.savez(
                    f,
                    index=faiss.serialize_index(self.index),
                    ids=ids,
                    labels=labels,
                    meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                )
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path, dim: int) -> GalleryIndex | None:
        """The saved index, or None when there is none or it cannot be used."""
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                if meta.get("format") != FORMAT or int(meta["dim"]) != dim:
                    return None
                index = faiss.deserialize_index(np.ascontiguousarray(z["index"]))
                ids, labels = z["ids"].astype(np.int64), z["labels"].astype(np.int64)
        except Exception:  # a torn or foreign file: the index is rebuilt from the gallery
            return None
        if not isinstance(index, faiss.IndexIDMap2) or index.ntotal != len(ids):
            return None
        idx = cls(dim)
        idx.index = index
        idx.parts = {slot_of(n): n for n in meta["parts"]}
        idx._set_labels("saved", ids, labels)
        return idx

    # -- searching ---------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """(scores, item ids) of the k nearest items for each query."""
        if self.ntotal == 0:
            raise GalleryError("the index is empty")
        if k < 1:
            raise GalleryError(f"k must be >= 1, got {k}")
        return self.index.search(self._check(queries), min(k, self.ntotal))

    def _labels(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted ids, labels), the latest label of each id."""
        if self._lookup is None:
            if not self._chunks:
                self._lookup = (np.zeros(0, np.int64), np.zeros(0, np.int64))
            else:
                ids = np.concatenate([c[0] for c in self._chunks.values()])
                labels = np.concatenate([c[1] for c in self._chunks.values()])
                # the last occurrence of each id wins
                uniq, first_in_rev = np.unique(ids[::-1], return_index=True)
                self._lookup = (uniq, labels[::-1][first_in_rev])
            # compact: one chunk from now on
            self._chunks = {"merged": self._lookup}
        return self._lookup

    def label_of(self, ids: np.ndarray) -> np.ndarray:
        known, labels = self._labels()
        flat = np.asarray(ids, dtype=np.int64).ravel()
        if len(known) == 0:
            if len(flat):
                raise GalleryError(f"item ids not in the index: {flat[:10].tolist()}")
            return np.zeros(np.shape(ids), np.int64)
        pos = np.searchsorted(known, flat)
        ok = (pos < len(known)) & (known[np.minimum(pos, len(known) - 1)] == flat)
        if not ok.all():
            raise GalleryError(f"item ids not in the index: {flat[~ok][:10].tolist()}")
        return labels[pos].reshape(np.shape(ids))

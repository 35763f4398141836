"""A faiss index over the gallery's current embeddings, keyed by item id.

``IndexIDMap2`` over an inner-product index: cosine similarity on L2-normalised
embeddings. faiss ``add_with_ids`` does not replace an existing id, so :meth:`upsert`
removes the ids first: every item is in the index exactly once.
"""

from __future__ import annotations

import faiss
import numpy as np

from store.gallery import Gallery, GalleryError


class GalleryIndex:
    """Nearest-neighbour search over gallery items."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.labels: dict[int, int] = {}

    @classmethod
    def from_gallery(cls, gallery: Gallery) -> GalleryIndex:
        """Build from the committed gallery, part by part (bounded memory per part)."""
        info = gallery.require()
        idx = cls(info.embed_dim)
        for _, rows in gallery.iter_parts():
            idx.upsert(rows.item_id, rows.embedding, rows.label)
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

    def upsert(self, ids: np.ndarray, emb: np.ndarray, labels: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        emb = self._check(emb)
        if len(np.unique(ids)) != len(ids):
            raise GalleryError("duplicate item ids in one upsert")
        self.index.remove_ids(ids)
        self.index.add_with_ids(emb, ids)
        self.labels.update(zip(ids.tolist(), np.asarray(labels).tolist(), strict=True))

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """(scores, item ids) of the k nearest items for each query."""
        return self.index.search(self._check(queries), min(k, self.ntotal))

    def label_of(self, ids: np.ndarray) -> np.ndarray:
        return np.array([self.labels[int(i)] for i in np.ravel(ids)]).reshape(np.shape(ids))

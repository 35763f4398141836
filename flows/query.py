"""Search over the committed gallery (answers during a backfill from committed parts)."""

from __future__ import annotations

from typing import Any

from store.gallery import Gallery
from store.index import GalleryIndex
from store.lineage import Lineage
from store.settings import StoreError, subdir
from workers.datasets import load_dataset
from workers.evaluate import generation_outputs


def search_item(lineage: Lineage, item: int, k: int = 5) -> dict[str, Any]:
    """The ``k`` nearest gallery items to evaluation item ``item``, embedded by the champion."""
    gallery = Gallery(lineage)
    info = gallery.require()
    champion = lineage.champion()
    if champion is None:
        raise StoreError("no champion generation")
    ds = load_dataset(info.dataset)
    if not 0 <= item < len(ds.y_test):
        raise StoreError(f"item {item} is outside the evaluation split (0..{len(ds.y_test) - 1})")
    out = generation_outputs(champion, ds, subdir("cache"))
    index = GalleryIndex.from_gallery(gallery)
    scores, ids = index.search(out.outputs.embedding[item : item + 1], k)
    labels = index.label_of(ids[0])
    return {
        "item": item,
        "label": int(ds.y_test[item]),
        "generation": champion.id,
        "neighbors": [
            {"item_id": int(i), "label": int(lab), "score": float(s)}
            for i, lab, s in zip(ids[0], labels, scores[0], strict=True)
        ],
    }

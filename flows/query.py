"""Search over the committed collection (answers during a backfill from committed parts).

Answers are keys: each hit is the item's ``key``, its ``score`` (cosine similarity), the
``generation`` that embedded it and its ``label`` (None when unlabelled). A query is an
item of the collection by key (read from the collection's source, or for the
scenario's collection any position of the evaluation split) or a file, embedded by the
champion in this process (one item needs no Ray task);
the persisted faiss index is brought up to the committed manifest first, so a search
running next to a backfill sees every part either in its old or in its new committed
version, never half of one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from flows.cycle import resolve_dataset
from store.gallery import UNLABELLED, Gallery
from store.index import GalleryIndex
from store.lineage import Generation, Lineage
from store.settings import StoreError
from workers.collection import CollectionError, open_reader
from workers.embed import forward
from workers.models import load_model

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _champion(lineage: Lineage) -> Generation:
    champion = lineage.champion()
    if champion is None or not champion.checkpoint_path:
        raise StoreError("no champion generation")
    return champion


def search_embedding(
    lineage: Lineage, query: np.ndarray, k: int = 5, index: GalleryIndex | None = None
) -> list[dict[str, Any]]:
    """The ``k`` nearest committed collection items to one query embedding (``index``:
    the collection's index, already opened)."""
    if index is None:
        index = GalleryIndex.open(Gallery(lineage))
    scores, ids = index.search(np.asarray(query, dtype=np.float32).reshape(1, -1), k)
    found = ids[0][ids[0] >= 0]  # an IVF search may find fewer than k
    hits = []
    for row, score in zip(index.rows_of(found), scores[0][: len(found)], strict=True):
        label = int(row["label"])
        hits.append(
            {
                "key": row["key"],
                "score": float(score),
                "generation": int(row["generation"]),
                "label": None if label == UNLABELLED else label,
                "item_id": int(row["item_id"]),
            }
        )
    return hits


def _embed(champion: Generation, x: np.ndarray) -> np.ndarray:
    model = load_model(champion.checkpoint_path, champion.checkpoint_sha256)
    shape = tuple(model.config["input_shape"])
    if math.prod(x.shape[1:]) != math.prod(shape):
        raise StoreError(
            f"the query has shape {tuple(x.shape[1:])}; generation {champion.id} takes "
            f"inputs of shape {shape}"
        )
    return forward(model, np.ascontiguousarray(x.reshape(len(x), *shape))).embedding


def search_item(lineage: Lineage, key: str | int, k: int = 5) -> dict[str, Any]:
    """The ``k`` nearest collection items to the collection's item ``key``, read from its
    source and embedded by the champion."""
    info = Gallery(lineage).require()
    champion = _champion(lineage)
    key = str(key)
    model = load_model(champion.checkpoint_path, champion.checkpoint_sha256)
    shape = tuple(model.config["input_shape"])
    label, index = None, None
    if info.scenario:  # any position of the evaluation split
        ds = resolve_dataset(lineage, info.dataset)
        if not key.isdigit() or int(key) >= len(ds.y_test):
            raise StoreError(
                f"unknown key {key!r}: the collection's keys are positions of the evaluation "
                f"split (0..{len(ds.y_test) - 1})"
            )
        x = ds.x_test[int(key) : int(key) + 1]
        label = int(ds.y_test[int(key)])
    else:
        index = GalleryIndex.open(Gallery(lineage))
        item = index.id_of(key)
        if item is None:
            raise StoreError(
                f"unknown key {key!r}: the collection ({info.dataset}) does not hold it; "
                "`graceful index SPEC` adds new items"
            )
        row = index.rows_of(np.asarray([item]))[0]
        label = None if int(row["label"]) == UNLABELLED else int(row["label"])
        try:
            x = open_reader(info.dataset, shape).take_keys([key])
        except CollectionError as exc:
            raise StoreError(f"cannot read item {key!r} from {info.dataset}: {exc}") from None
    emb = forward(model, np.ascontiguousarray(x.reshape(len(x), *shape), np.float32)).embedding
    return {
        "item": key,
        "label": label,
        "generation": champion.id,
        "neighbors": search_embedding(lineage, emb[0], k, index),
    }


def load_query_file(path: Path, input_shape: tuple[int, ...]) -> np.ndarray:
    """One query input from a file: an image (PNG, JPEG, ...) or a ``.npy`` array.

    Images are converted like the data sets: grey or RGB by the model's channels,
    resized to its height and width, scaled to [0, 1].
    """
    path = Path(path)
    if not path.exists():
        raise StoreError(f"query file {path} does not exist")
    if path.is_dir():
        raise StoreError(
            f"query file {path} is a directory: give one image file (PNG, JPEG, ...) or a .npy"
        )
    if not path.is_file():  # a device (/dev/zero), a pipe, a socket: it may never end
        raise StoreError(
            f"query file {path} is not a regular file (a device, pipe or socket): give an "
            "image file (PNG, JPEG, ...) or a .npy"
        )
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            x = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read query array {path}: {exc}") from exc
        x = np.asarray(x, dtype=np.float32)
    elif suffix in IMAGE_SUFFIXES:
        from PIL import Image, UnidentifiedImageError

        channels = input_shape[0] if len(input_shape) == 3 else 1
        try:
            with Image.open(path) as img:
                img = img.convert("L" if channels == 1 else "RGB")
                if len(input_shape) == 3:
                    img = img.resize((input_shape[2], input_shape[1]), Image.Resampling.BILINEAR)
                arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
        except (UnidentifiedImageError, OSError) as exc:
            raise StoreError(f"cannot decode query image {path}: {exc}") from exc
        x = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    else:
        raise StoreError(
            f"unsupported query file {path}: use an image ({', '.join(IMAGE_SUFFIXES)}) "
            "or a .npy array"
        )
    if x.size != math.prod(input_shape):
        raise StoreError(
            f"query {path} has {x.size} values; the model takes inputs of shape {input_shape}"
        )
    if not np.isfinite(x).all():
        raise StoreError(f"query {path} contains NaN or inf")
    return x.reshape(1, *input_shape)


def search_file(lineage: Lineage, path: Path | str, k: int = 5) -> dict[str, Any]:
    """The ``k`` nearest gallery items to a query file, embedded by the champion."""
    Gallery(lineage).require()
    champion = _champion(lineage)
    model = load_model(champion.checkpoint_path, champion.checkpoint_sha256)
    x = load_query_file(Path(path), tuple(model.config["input_shape"]))
    emb = forward(model, x).embedding
    return {
        "file": str(path),
        "label": None,
        "generation": champion.id,
        "neighbors": search_embedding(lineage, emb[0], k),
    }

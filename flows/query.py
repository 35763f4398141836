"""Search over the committed collection (answers during a backfill from committed parts).

Answers are keys: each hit is the item's ``key``, its ``score`` (cosine similarity), the
``generation`` that embedded it and its ``label`` (None when unlabelled). A query is an
item of the collection by key, an image, a model input (``.npy``) or an embedding,
embedded by the champion in this process (one item needs no Ray task).

:class:`Searcher` is one served state: the champion's query encoder and the collection's
faiss index, both loaded once (the CLI makes one per search, ``graceful search-server``
keeps one and swaps it whole, ``flows/search_service.py``). The persisted faiss index is
brought up to the committed manifest first, so a search running next to a backfill sees
every part either in its old or in its new committed version, never half of one.

A query by key needs neither the model nor the source when the champion embedded the
item: its stored embedding is the one the champion computes (a search by key then
imports no torch). Otherwise the item is read from the collection's source by key and
embedded; on a collection that is the evaluation set's reference half, the query half's
items can be searched by key too. Prefect is never imported.
"""

from __future__ import annotations

import math
import threading
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from flows.data import class_vocabulary
from store.collection import UNLABELLED, Collection
from store.index import CollectionIndex
from store.lineage import CollectionInfo, Generation, Lineage
from store.settings import StoreError
from workers.collection.items import is_reference

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MAX_K = 100  # the most neighbours one search returns


class BadQuery(StoreError):
    """A query that cannot be answered as asked (the service answers 400)."""


class UnknownKey(BadQuery):
    """A key the collection does not hold (404)."""


class NotReady(StoreError):
    """No champion or no collection yet (503)."""


def check_key(key: str) -> str:
    """A key as the collection names items: a relative path without ``..``, never absolute."""
    key = str(key)
    parts = key.replace("\\", "/").split("/")
    if not key or "\x00" in key:
        raise BadQuery("the key is empty or contains a NUL character")
    if key.startswith(("/", "\\")) or (len(key) > 1 and key[1] == ":") or ".." in parts:
        raise BadQuery(f"key {key!r} is not a relative path inside the collection's source")
    return key


def check_k(k: Any) -> int:
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise BadQuery(f"k must be an integer, got {k!r}") from None
    if not 1 <= k <= MAX_K:
        raise BadQuery(f"k must be between 1 and {MAX_K}, got {k}")
    return k


def _hit(row: dict[str, Any]) -> dict[str, Any]:
    """An index row as answers show it (the label None when unlabelled)."""
    label = int(row["label"])
    return {
        "key": row["key"],
        "generation": int(row["generation"]),
        "label": None if label == UNLABELLED else label,
        "item_id": int(row["item_id"]),
    }


class Searcher:
    """The champion's encoder and the collection's index: one consistent served state.

    Immutable once made (the model and the source's reader load lazily, once); a new
    champion or a newly committed part makes a new Searcher (:meth:`advance`).
    """

    def __init__(
        self,
        lineage: Lineage,
        champion: Generation,
        index: CollectionIndex,
        info: CollectionInfo,
        model: Any = None,
    ) -> None:
        self.lineage = lineage
        self.generation = champion
        self.champion = int(champion.id)  # type: ignore[arg-type]
        self.index = index
        self.dataset = info.dataset
        # a source's evaluation reference half: its query half is searchable by key too
        self.reference = is_reference(info.dataset)
        self.manifest = tuple(sorted(index.parts.values()))
        self._model = model
        self._reader: Any = None
        self._lock = threading.RLock()  # the reader asks for the model

    @classmethod
    def open(cls, lineage: Lineage, save: bool = True) -> Searcher:
        """The champion and the persisted index brought up to the committed collection."""
        champion = lineage.champion()
        if champion is None or not champion.checkpoint_path:
            raise NotReady(
                "no champion generation yet: run `graceful run` or `graceful cycle` to train and "
                "promote one"
            )
        collection = Collection(lineage)
        info = collection.info()
        if info is None:
            raise NotReady("the collection is empty: `graceful index SPEC` adds items")
        return cls(lineage, champion, CollectionIndex.open(collection, save=save), info)

    def advance(self, champion: Generation, manifest: list[str]) -> Searcher:
        """The next state: the encoder of ``champion`` (kept when it did not change) and
        a copy of the index synced to the committed manifest (this one is left as it is,
        for the requests still using it)."""
        collection = Collection(self.lineage)
        info = collection.require()
        index = self.index
        if tuple(sorted(manifest)) != self.manifest:
            try:
                index = self.index.clone()
                index.sync(collection)
            except StoreError:  # another dimension or kind: the persisted index, rebuilt
                index = CollectionIndex.open(collection, save=False)
        same = champion.id == self.champion
        return Searcher(self.lineage, champion, index, info, self._model if same else None)

    # -- the encoder ---------------------------------------------------------------------
    @property
    def model(self) -> Any:
        with self._lock:
            if self._model is None:
                from workers.learning.models import load_model

                g = self.generation
                self._model = load_model(g.checkpoint_path, g.checkpoint_sha256)
            return self._model

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.model.config["input_shape"])

    def load(self) -> Searcher:
        """Load the encoder and count the items now (a service does it before it serves
        this state)."""
        _ = self.model, self.counts
        return self

    def embed(self, x: np.ndarray) -> np.ndarray:
        """The champion's embeddings of model inputs ``x`` (one per row)."""
        from workers.learning.embed import forward

        shape = self.input_shape
        if math.prod(x.shape[1:]) != math.prod(shape):
            raise BadQuery(
                f"the query has shape {tuple(x.shape[1:])}; generation {self.champion} takes "
                f"inputs of shape {shape}"
            )
        x = np.ascontiguousarray(x.reshape(len(x), *shape), dtype=np.float32)
        return forward(self.model, x).embedding

    def _source(self) -> Any:
        from workers.collection.items import open_reader

        with self._lock:
            if self._reader is None:
                self._reader = open_reader(self.dataset, self.input_shape)
            return self._reader

    @cached_property
    def _labels(self) -> dict[str, int]:
        """Class name -> head row, read once for this state (a read path repeats)."""
        return class_vocabulary(self.lineage)

    # -- queries -------------------------------------------------------------------------
    def key_query(self, key: str) -> tuple[np.ndarray, int | None]:
        """The champion's embedding of the collection's item ``key``, and its label."""
        from workers.collection.items import CollectionError
        from workers.data.readers import UnreadableItem

        row = self.row(key)
        label = None if row is None else row["label"]
        if row is None and not self.reference:
            raise UnknownKey(
                f"unknown key {key!r}: the collection ({self.dataset}) does not hold it; "
                "`graceful index SPEC` adds new items"
            )
        if row is not None and row["generation"] == self.champion:  # stored: what it computes
            stored = self.index.embedding_of(row["item_id"])
            if stored is not None:
                return stored, label
        try:
            reader = self._source()
            x = reader.take_keys([key])
        except CollectionError as exc:
            if row is None and isinstance(exc, UnreadableItem):  # nor an evaluation set item
                raise UnknownKey(f"unknown key {key!r}: {exc}") from None
            raise StoreError(f"cannot read item {key!r} from {self.dataset}: {exc}") from None
        if label is None and hasattr(reader, "label_of"):  # a labelled evaluation item
            label = self._labels.get(reader.label_of(key))
        return self.embed(x)[0], label

    def image_query(self, data: bytes | Path, name: str = "upload") -> np.ndarray:
        """The champion's embedding of an encoded image (PNG, JPEG, ...; its bytes, or a
        file opened lazily), decoded as the collection's items are (EXIF orientation,
        cover and centre crop, the pixel limit read from the header before any pixel:
        an image above ``workers.data.datasets.MAX_IMAGE_PIXELS`` is refused as it stands)."""
        from workers.collection.items import input_format
        from workers.data.datasets import DatasetError, decode_images_as

        if isinstance(data, bytes) and not data:
            raise BadQuery("the upload is empty")
        fmt = input_format(self.input_shape)
        if fmt.mode is None:
            raise BadQuery(
                f"generation {self.champion} embeds feature vectors of shape {fmt.shape}, not "
                "images: query by key or vector"
            )
        try:
            x = decode_images_as([(name, data)], fmt.mode, fmt.shape[1:])
        except DatasetError as exc:
            raise BadQuery(str(exc)) from None
        return self.embed(x)[0]

    def file_query(self, path: Path | str) -> np.ndarray:
        """The champion's embedding of a query file: an image or a ``.npy`` model input."""
        path = Path(path)
        if not path.exists():
            raise BadQuery(f"query file {path} does not exist")
        if path.is_dir():
            raise BadQuery(
                f"query file {path} is a directory: give one image file (PNG, JPEG, ...) or a .npy"
            )
        if not path.is_file():  # a device (/dev/zero), a pipe, a socket: it may never end
            raise BadQuery(
                f"query file {path} is not a regular file (a device, pipe or socket): give an "
                "image file (PNG, JPEG, ...) or a .npy"
            )
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:  # the file, not its bytes: the header is read first
            return self.image_query(path, str(path))
        if suffix != ".npy":
            raise BadQuery(
                f"unsupported query file {path}: use an image ({', '.join(IMAGE_SUFFIXES)}) "
                "or a .npy array"
            )
        try:
            x = np.asarray(np.load(path, allow_pickle=False), dtype=np.float32)
        except (OSError, ValueError) as exc:
            raise BadQuery(f"cannot read query array {path}: {exc}") from exc
        shape = self.input_shape
        if x.size != math.prod(shape):
            raise BadQuery(
                f"query {path} has {x.size} values; the model takes inputs of shape {shape}"
            )
        if not np.isfinite(x).all():
            raise BadQuery(f"query {path} contains NaN or inf")
        return self.embed(x.reshape(1, *shape))[0]

    def vector_query(self, vector: Any) -> np.ndarray:
        """A query embedding given as numbers (the collection's dimension, finite)."""
        try:
            v = np.asarray(vector, dtype=np.float32)
        except (TypeError, ValueError):
            raise BadQuery("the vector must be a list of numbers") from None
        if v.ndim != 1 or len(v) != self.index.dim:
            raise BadQuery(
                f"the vector has shape {list(v.shape)}; the collection's embeddings have "
                f"dimension {self.index.dim}"
            )
        if not np.isfinite(v).all():
            raise BadQuery("the vector contains NaN or inf")
        if not np.any(v):
            raise BadQuery("the vector is all zeros (no direction to search)")
        return v

    def nearest(self, query: np.ndarray, k: int) -> list[dict[str, Any]]:
        """The ``k`` nearest committed collection items to one query embedding (``k`` not
        bounded: a search filtered by label asks for more)."""
        scores, ids = self.index.search(np.asarray(query, dtype=np.float32).reshape(1, -1), k)
        found = ids[0][ids[0] >= 0]  # an IVF search may find fewer than k
        return [
            {"key": row["key"], "score": float(score)} | _hit(row)
            for row, score in zip(self.index.rows_of(found), scores[0][: len(found)], strict=True)
        ]

    def row(self, key: str) -> dict[str, Any] | None:
        """The collection's item ``key`` as answers show it, or None when it holds none."""
        item = self.index.id_of(check_key(key))
        return None if item is None else _hit(self.index.rows_of(np.asarray([item]))[0])

    @cached_property
    def counts(self) -> dict[int, int]:
        """Items of the served index by the generation that embedded them."""
        gens, counts = np.unique(
            self.index._rows().column("generation").to_numpy(), return_counts=True
        )
        return {int(g): int(c) for g, c in zip(gens, counts, strict=True)}


def search_item(lineage: Lineage, key: str | int, k: int = 5) -> dict[str, Any]:
    """The ``k`` nearest collection items to the collection's item ``key``, read from its
    source and embedded by the champion."""
    s = Searcher.open(lineage)
    emb, label = s.key_query(str(key))
    return {"item": str(key), "label": label, **_answer(s, emb, k)}


def search_file(lineage: Lineage, path: Path | str, k: int = 5) -> dict[str, Any]:
    """The ``k`` nearest collection items to a query file, embedded by the champion."""
    s = Searcher.open(lineage)
    return {"file": str(path), "label": None, **_answer(s, s.file_query(path), k)}


def _answer(s: Searcher, emb: np.ndarray, k: int) -> dict[str, Any]:
    return {"generation": s.champion, "neighbors": s.nearest(emb, check_k(k))}

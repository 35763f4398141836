"""A collection's items: listed by key with a content fingerprint, and read back by key.

A collection is what users search. Its spec is one of:

- ``images:DIR``: every PNG/JPEG under DIR, recursively, unlabelled; key = the path
  relative to DIR;
- ``imagefolder:DIR``: a source's training images (``DIR/train/<class>/*``), labelled by
  their folder; key = the path relative to DIR;
- ``parquet:PATH``: the non-test rows of Parquet files (a file, a directory, hive
  partitions, ``s3://...``); key = ``item_id`` (required, unique), ``label`` optional
  (a class name or an integer with an optional ``class_name``), a feature column or
  ``image`` bytes;
- ``reference:<kind>:<source spec>``: the reference half of a source's evaluation set
  (workers.data.source.reference_spec; the scenario's collection, which the first
  champion indexes); key = the evaluation item's key (the scenario's: its position in
  the evaluation split).

:func:`list_items` lists the items (key, class name or None, fingerprint) without
decoding pixels; a file whose size and modification time match what the collection
recorded keeps its fingerprint without being read again. :func:`open_reader` returns
the reader (workers.data.readers) whose ``take_keys(keys)`` gives the items' model
inputs, in the order asked; the embedding actors and the Ray Data workers use it, so a
backfill reads the items it re-embeds from the collection's source by key.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from workers.data.datasets import parse_spec
from workers.data.errors import CollectionError
from workers.data.parquet_schema import (
    _class_names,
    _clean,
    _parquet_columns,
    redact,
    repeated_keys,
)
from workers.data.readers import ArrayItems, FileItems, ParquetItems
from workers.data.scenario import eval_split
from workers.data.source import REFERENCE, reference_source
from workers.data.sources import (
    _parquet_dataset,
    _units,
    hashed_files,
    image_files,
    input_format,
    keyed_rows,
)

COLLECTION_KINDS = ("images", "imagefolder", "parquet", REFERENCE)
ITEMS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("label", pa.string()),  # class name; null when the source has none
        pa.field("fingerprint", pa.string()),
    ]
)


def parse_collection_spec(spec: str) -> tuple[str, str | None]:
    """(kind, path) of a collection spec (one of COLLECTION_KINDS); for ``reference:``
    the path is the whole spec."""
    head, sep, tail = (spec or "").strip().partition(":")
    kind = head.strip().lower()
    if kind == REFERENCE:
        reference_source(spec.strip())  # a clear error for a malformed one
        return REFERENCE, spec.strip()
    if kind == "images":
        raw = tail.strip()
        if not sep or not raw:
            raise CollectionError(f"spec {spec!r}: 'images' needs a directory, images:DIR")
        path = os.path.abspath(os.path.expanduser(raw))
        if not os.path.isdir(path):
            raise CollectionError(f"spec {spec!r}: image directory {path} does not exist")
        return "images", path
    kind, path = parse_spec(spec)
    if kind not in COLLECTION_KINDS:
        raise CollectionError(
            f"spec {spec!r} is a data set, not a collection: index images:DIR, "
            "imagefolder:DIR or parquet:PATH"
        )
    return kind, path


def is_reference(spec: str) -> bool:
    """Whether collection ``spec`` is a source's evaluation reference half: it follows the
    evaluation set, and the query half beside it gives labelled queries (M_mix) and can
    be searched by key too. (A read path asks: a spec of no collection kind is simply not
    one, not an error here.)"""
    return (spec or "").strip().lower().startswith(f"{REFERENCE}:")


def same_kind(a: str, b: str) -> bool:
    return parse_collection_spec(a)[0] == parse_collection_spec(b)[0]


@dataclass
class Listing:
    """A collection spec's items now: ``table`` (key, label, fingerprint) and what was
    left out because it could not be read."""

    spec: str
    table: pa.Table
    skipped: list[dict[str, str]] = field(default_factory=list)


# -- listing ---------------------------------------------------------------------------
def file_fingerprint(size: int, mtime_ns: int, sha256: str) -> str:
    """A file's fingerprint: size and mtime (to skip re-hashing) and the content hash."""
    return f"{size}:{mtime_ns}:{sha256}"


def _list_files(spec: str, root: Path, below: str | None, known: dict[str, str] | None) -> Listing:
    known = known or {}
    recorded = {}  # key -> (size, mtime, sha) of the fingerprints the collection holds
    for key, fp in known.items():
        size, mtime, sha = (fp.split(":", 2) + ["", ""])[:3]
        with contextlib.suppress(ValueError):  # not a file's fingerprint: hashed again
            recorded[key] = (int(size), int(mtime), sha)
    skipped: list[dict[str, str]] = []
    files = sorted(image_files(root, below, skipped), key=lambda r: r[0])
    keys, labels, prints = [], [], []
    for key, label, st, sha in hashed_files(root, files, recorded, skipped):
        keys.append(key)
        labels.append(label)
        # the same content (unchanged, or touched): the recorded fingerprint, nothing to
        # re-embed
        same = key in recorded and recorded[key][2] == sha
        prints.append(known[key] if same else file_fingerprint(st.st_size, st.st_mtime_ns, sha))
    table = pa.table({"key": keys, "label": labels, "fingerprint": prints}, schema=ITEMS_SCHEMA)
    return Listing(spec, table, skipped)


def _row_hashes(col: Any, name: str) -> pa.Array:
    """A content hash of each row of an input column (features or image bytes)."""
    if name == "image":
        values = col.to_pylist()
        return pa.array(
            [None if v is None else hashlib.blake2b(v, digest_size=16).hexdigest() for v in values],
            pa.string(),
        )
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    x = np.ascontiguousarray(flat.reshape(len(col), -1))
    # a seeded 64-bit polynomial hash of the float bits, vectorised (a change detector)
    bits = x.view(np.uint32).astype(np.uint64)
    weights = np.random.default_rng(0x5EED).integers(1, 2**63, size=x.shape[1], dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = (bits * weights).sum(axis=1, dtype=np.uint64) ^ np.uint64(x.shape[1])
    return pa.array([f"{v:016x}" for v in h.tolist()], pa.string())


def _list_parquet(spec: str, path: str) -> Listing:
    import pyarrow.compute as pc

    ds = _parquet_dataset(path)
    column, name_col = _parquet_columns(ds, path, "collection", ("item_id",))
    has_label = "label" in ds.schema.names
    cols = ["item_id", column] + [
        c for c in ("label", "split", name_col) if c and c in ds.schema.names
    ]
    parts: list[list[pa.Array]] = [[], [], []]  # key, label, fingerprint of each batch
    try:
        for frag in _units(ds):  # the scan's walk: by file path, then row group
            for batch in keyed_rows(ds, frag, cols, path, noun="collection"):
                named = has_label and batch.column("label").null_count == 0
                nulls = pa.nulls(batch.num_rows, pa.string())
                parts[1].append(_class_names(batch, name_col, path) if named else nulls)
                parts[0].append(pc.cast(batch.column("item_id"), pa.string()))
                parts[2].append(_row_hashes(batch.column(column), column))
    except (pa.ArrowException, OSError) as exc:
        raise CollectionError(f"cannot read Parquet {redact(path)}: {_clean(exc)}") from None
    columns = [pa.concat_arrays(p) if p else pa.array([], pa.string()) for p in parts]
    return Listing(spec, pa.Table.from_arrays(columns, schema=ITEMS_SCHEMA))


def _list_reference(spec: str) -> Listing:
    """The reference half of a source's evaluation set, in evaluation order."""
    ev = reference_source(spec).evaluation()
    ref, _ = eval_split(len(ev.x))
    table = pa.table(
        {
            "key": [ev.keys[i] for i in ref],
            "label": [ev.labels[i] for i in ref],
            "fingerprint": [ev.digests[i] for i in ref],
        },
        schema=ITEMS_SCHEMA,
    )
    return Listing(spec, table)


def check_unique(listing: Listing) -> None:
    """A key that repeats is an error naming it (a collection holds each key once)."""
    n_repeat, shown = repeated_keys(listing.table.column("key"))
    if n_repeat:
        raise CollectionError(
            f"collection {redact(listing.spec)}: {n_repeat} key(s) repeat ({shown}); each item "
            "needs a unique key"
        )


def list_items(spec: str, known: dict[str, str] | None = None) -> Listing:
    """The items of collection ``spec`` now, in key order for files, source order for
    Parquet. ``known`` (key -> fingerprint the collection holds) spares re-reading
    unchanged files. Unreadable images are left out and listed in ``skipped``."""
    kind, path = parse_collection_spec(spec)
    if kind == "images":
        listing = _list_files(spec, Path(path), None, known)  # type: ignore[arg-type]
    elif kind == "imagefolder":
        root = Path(path)  # type: ignore[arg-type]
        if not (root / "train").is_dir():
            raise CollectionError(
                f"imagefolder {root}: no train/ directory; index images:DIR for a folder of "
                "unlabelled images"
            )
        listing = _list_files(spec, root, "train", known)
    elif kind == "parquet":
        listing = _list_parquet(spec, path)  # type: ignore[arg-type]
    else:
        listing = _list_reference(spec)
    check_unique(listing)
    return listing


# -- reading by key --------------------------------------------------------------------
def _reference_items(spec: str, input_shape: tuple[int, ...]) -> ArrayItems:
    """A source's evaluation set by key (a ``reference:`` collection's items and the
    labelled queries beside them), decoded at the model's input size."""
    source = reference_source(spec)
    ev = source.evaluation()
    if tuple(ev.x.shape[1:]) != tuple(input_shape):
        # the lineage chose image_size: its images were decoded to the model's squares
        ev = source.evaluation(int(input_shape[-1]))
    return ArrayItems(ev.x, keys=ev.keys, names=ev.labels)


def open_reader(spec: str, input_shape: tuple[int, ...]) -> ArrayItems | FileItems | ParquetItems:
    """A reader (workers.data.readers) of collection ``spec``'s items by key, as inputs of
    ``input_shape``."""
    kind, path = parse_collection_spec(spec)
    fmt = input_format(input_shape)
    if kind in ("images", "imagefolder"):
        if len(fmt.shape) != 3:
            raise CollectionError(
                f"collection {spec!r} holds images, but the champion takes feature vectors of "
                f"shape {fmt.shape}"
            )
        return FileItems(path, fmt)  # type: ignore[arg-type]
    if kind == "parquet":
        return ParquetItems(path, fmt)  # type: ignore[arg-type]
    return _reference_items(spec, fmt.shape)

"""One ``Source`` for everything a lineage trains and evaluates on.

A source answers the same questions whatever it is:

- :meth:`Source.evaluation`: the fixed labelled evaluation set (decoded, fingerprinted);
- :meth:`Source.draw`: the training items now (a :class:`~workers.data.sources.Scan`:
  key, class name, what identifies each item's content, and a fingerprint of it all),
  with the stage they are and the backbone a model of that stage has;
- :meth:`Source.training_reader`: the snapshot's items streamed by position, as the
  trainer reads them;
- :meth:`Source.class_order` and :meth:`Source.capacity`: the order new classes take
  head rows in, and how many rows the lineage reserves.

Two implementations:

- :class:`ScenarioSource`: a fixed data set (``digits``, ``fashion-mnist``, a CIFAR
  folder, ``parquet:`` or ``imagefolder:`` read whole) stepped through the growing
  scenario (workers.data.scenario): its snapshot is the next stage, its training items
  are keyed ``train/<row>`` and its evaluation items by their position in the
  evaluation split (``<row>``, the keys its collection has always had);
- :class:`ItemSource`: a user's growing source (``imagefolder:DIR``, ``parquet:PATH``
  files, directories, hive partitions, ``s3://``), scanned by key and never read whole.

:func:`open_source` is the one entry. A lineage records the kind once, with its first
snapshot: a snapshot with a stage count is the scenario's (flows.data.lineage_source).

A source whose ``reference_collection`` is true has the reference half of its evaluation
set as the lineage's collection: :func:`reference_spec` names it as a collection spec
(``reference:<kind>:<source spec>``), which workers.collection.items lists and reads
like any other collection.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from workers.data.datasets import Dataset, load_dataset, load_dataset_as, parse_spec
from workers.data.readers import ArrayItems, snapshot_reader
from workers.data.scenario import default_architecture, stage_indices, stage_plan
from workers.data.sources import (
    SOURCE_KINDS,
    EvalSet,
    InputFormat,
    Scan,
    SourceError,
    input_format,
    load_eval,
    scan_source,
)

DEFAULT_STAGES = 3  # the scenario's stage count when neither the config nor the lineage says
_CHUNK = 4096  # rows hashed at a time: no copy of a whole split


class SourceKind(StrEnum):
    """What a lineage trains on (recorded with its snapshots)."""

    SCENARIO = "scenario"  # a fixed data set, a stage per generation
    ITEMS = "items"  # a user's growing image folder or Parquet data, read by key


@dataclass(frozen=True)
class Position:
    """Where the lineage stands when it asks for its next training items."""

    index: int  # generations trained so far (not failed): the scenario's stage
    stages: int | None = None  # the scenario's stage count (asked, else recorded)
    backbone: str | None = None  # the lineage's backbone kind: a warm start cannot cross kinds
    previous: pa.Table | None = None  # the last snapshot's items: unchanged files not re-hashed
    image_size: int | None = None  # the lineage's image side (None: the source's own)


@dataclass
class Draw:
    """A source's training items now, the stage they are and its model's backbone."""

    scan: Scan
    stage: int
    stages: int | None  # the scenario's stage count; None for a user's source
    architecture: dict[str, Any]


class Source(Protocol):
    """What graceful reads to train and evaluate a lineage."""

    spec: str
    kind: SourceKind
    # whether the evaluation set's reference half is the lineage's collection (the
    # scenario's, indexed by its first champion); a user's source has a collection of its own
    reference_collection: bool

    def evaluation(self, image_size: int | None = None) -> EvalSet:
        """The labelled evaluation set, decoded (images to squares of ``image_size``)."""
        ...

    def draw(self, at: Position, input_shape: tuple[int, ...]) -> Draw:
        """The training items at ``at`` (keys in training order, class names)."""
        ...

    def training_reader(self, table: pa.Table, labels: np.ndarray, fmt: InputFormat) -> Any:
        """A stream reader (workers.data.stream) of a snapshot's items, by position."""
        ...

    def class_order(self, names: set[str]) -> list[str]:
        """The order new classes take the next free head rows in."""
        ...

    def capacity(self, n_classes: int, asked: int | None, embed_dim: int) -> int:
        """Head rows a new lineage reserves for ``n_classes`` classes seen now."""
        ...


def open_source(spec: str, kind: SourceKind | str | None = None) -> Source:
    """The source ``spec`` names: the scenario when ``kind`` says so or the spec is a
    fixed data set; a user's image folder or Parquet source otherwise."""
    spec_kind, _ = parse_spec(spec)  # a clear error before anything is read
    if kind is None:
        kind = SourceKind.ITEMS if spec_kind in SOURCE_KINDS else SourceKind.SCENARIO
    if SourceKind(kind) == SourceKind.SCENARIO:
        return ScenarioSource(spec)
    if spec_kind not in SOURCE_KINDS:
        raise SourceError(f"{spec!r} is not a source; use imagefolder:DIR or parquet:PATH")
    return ItemSource(spec)


REFERENCE = "reference"  # the collection-spec kind of a source's evaluation reference half


def reference_spec(source: Source) -> str:
    """The collection spec of ``source``'s evaluation reference half."""
    return f"{REFERENCE}:{source.kind.value}:{source.spec}"


def reference_source(spec: str) -> Source:
    """The source a ``reference:<kind>:<source spec>`` collection spec names."""
    head, _, tail = spec.strip().partition(":")
    kind, _, inner = tail.partition(":")
    if head != REFERENCE or kind not in tuple(SourceKind) or not inner:
        raise SourceError(
            f"collection spec {spec!r}: expected reference:<kind>:<source spec>, kind one of "
            f"{', '.join(SourceKind)}"
        )
    return open_source(inner, kind)


# -- the scenario ----------------------------------------------------------------------
def _hash_rows(digest: Any, x: np.ndarray, rows: np.ndarray | None = None) -> None:
    n = len(x) if rows is None else len(rows)
    for start in range(0, n, _CHUNK):
        part = x[start : start + _CHUNK] if rows is None else x[rows[start : start + _CHUNK]]
        digest.update(np.ascontiguousarray(part).tobytes())


def eval_fingerprint(ds: Dataset) -> str:
    """The evaluation split's content and labels."""
    digest = hashlib.sha256(b"graceful-eval-v1")
    digest.update(repr(ds.x_test.shape).encode())
    _hash_rows(digest, ds.x_test)
    digest.update(np.ascontiguousarray(ds.y_test, dtype=np.int64).tobytes())
    digest.update("\0".join(ds.class_names).encode())
    return digest.hexdigest()


def row_digests(x: np.ndarray) -> list[str]:
    """Each item's content hash (what a changed evaluation set is told against)."""
    flat = x.reshape(len(x), -1)
    return [
        hashlib.blake2b(np.ascontiguousarray(r).tobytes(), digest_size=16).hexdigest() for r in flat
    ]


def train_rows(keys: Any) -> np.ndarray:
    """The scenario's training rows from their keys (``train/<row>``)."""
    values = keys.to_pylist() if hasattr(keys, "to_pylist") else list(keys)
    try:
        return np.asarray([int(str(k).removeprefix("train/")) for k in values], dtype=np.int64)
    except ValueError as exc:
        raise SourceError(f"not a scenario training key: {exc}") from None


@functools.lru_cache(maxsize=4)
def _scenario_evaluation(spec: str, image_size: int | None) -> EvalSet:
    """A fixed data set's evaluation set, hashed once per process (the data set is cached
    too: workers.data.datasets.load_dataset); reports and queries ask for it again."""
    ds = load_dataset(spec, image_size)
    return EvalSet(
        x=ds.x_test,
        labels=[ds.class_names[int(y)] for y in ds.y_test],
        fingerprint=eval_fingerprint(ds),
        input_format=input_format(ds.input_shape),
        keys=[str(i) for i in range(len(ds.y_test))],  # the position: the collection's key
        digests=row_digests(ds.x_test),
    )


class ScenarioSource:
    """A fixed data set stepped through the growing scenario (workers.data.scenario)."""

    kind = SourceKind.SCENARIO
    reference_collection = True

    def __init__(self, spec: str) -> None:
        kind, path = parse_spec(spec)
        self.spec = kind if path is None else f"{kind}:{path}"  # as workers.data.datasets names it

    def dataset(self, image_size: int | None = None) -> Dataset:
        """The whole data set, its images at ``image_size`` (cached per process)."""
        return load_dataset(self.spec, image_size)

    def evaluation(self, image_size: int | None = None) -> EvalSet:
        return _scenario_evaluation(self.spec, image_size)

    def draw(self, at: Position, input_shape: tuple[int, ...]) -> Draw:
        ds = self.dataset(at.image_size)
        stages = at.stages or DEFAULT_STAGES
        index = min(at.index, stages - 1)
        # a lineage keeps its backbone kind: one begun with the MLP on images (before the
        # residual CNN was the default, or asked for) goes on with the MLP's sizes
        shape = None if at.backbone == "mlp" else ds.input_shape
        stage = stage_plan(ds.num_classes, stages, index, shape)
        rows = stage_indices(ds.y_train, stage, seed=0)
        labels = ds.y_train[rows]
        digest = hashlib.sha256(b"graceful-snapshot-v1")  # unchanged: old lineages compare
        digest.update(ds.spec.encode())
        digest.update(rows.tobytes())
        digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
        _hash_rows(digest, ds.x_train, rows)
        names = pa.array(list(ds.class_names), pa.string())
        table = pa.table(
            {
                "key": [f"train/{i}" for i in rows.tolist()],
                "label": pa.DictionaryArray.from_arrays(pa.array(labels, pa.int32()), names),
            }
        )
        return Draw(Scan(ds.spec, table, digest.hexdigest()), index, stages, stage.architecture)

    def training_reader(self, table: pa.Table, labels: np.ndarray, fmt: InputFormat) -> Any:
        ds = load_dataset_as(self.spec, fmt.shape)
        return ArrayItems(ds.x_train[train_rows(table.column("key"))], labels)

    def class_order(self, names: set[str]) -> list[str]:
        return [n for n in self.dataset().class_names if n in names]

    def capacity(self, n_classes: int, asked: int | None, embed_dim: int) -> int:
        return self.dataset().num_classes  # every class is known from the start


# -- a user's source -------------------------------------------------------------------
class ItemSource:
    """A user's growing image folder or Parquet data (workers.data.sources)."""

    kind = SourceKind.ITEMS
    reference_collection = False

    def __init__(self, spec: str) -> None:
        self.spec = spec

    def evaluation(self, image_size: int | None = None) -> EvalSet:
        return load_eval(self.spec, image_size)

    def draw(self, at: Position, input_shape: tuple[int, ...]) -> Draw:
        scan = scan_source(self.spec, at.previous)
        # the scenario's last-stage model for these inputs, in the lineage's backbone kind
        shape = None if at.backbone == "mlp" else tuple(input_shape)
        return Draw(scan, at.index, None, default_architecture(shape, grow=1.0))

    def training_reader(self, table: pa.Table, labels: np.ndarray, fmt: InputFormat) -> Any:
        return snapshot_reader(self.spec, table, labels, fmt)

    def class_order(self, names: set[str]) -> list[str]:
        return sorted(names)

    def capacity(self, n_classes: int, asked: int | None, embed_dim: int) -> int:
        return asked or max(embed_dim, 2 * n_classes)  # room for classes still to come

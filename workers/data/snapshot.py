"""Snapshots: what one cycle trains on, identified by content, recorded before training.

A snapshot names its source, the keys of its items, how many items each class has, and
a fingerprint of all of it (keys, labels and the items' content), plus the fingerprint of
the evaluation set every generation is measured on. Two snapshots with one fingerprint
are the same training data: a cycle whose snapshot equals the champion's has nothing new
to learn and is skipped. The growing scenario (workers.data.scenario) is one data provider:
stage s of a fixed data set is one snapshot, keyed ``train/<row>``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from workers.data.datasets import Dataset
from workers.data.scenario import Stage
from workers.data.sources import EvalSet, Scan, label_indices

_CHUNK = 4096  # rows hashed at a time: no copy of a whole split


@dataclass(frozen=True)
class Snapshot:
    """One cycle's training data, as the lineage records it."""

    source: str  # the data set spec
    keys: list[str]
    labels: np.ndarray
    classes: dict[str, int]  # class name -> items
    fingerprint: str
    eval_fingerprint: str
    stage: int | None = None  # the scenario's stage and stage count, when it is one
    stages: int | None = None
    table: pa.Table | None = None  # a source's items as its scan listed them
    skipped: list[dict[str, str]] = field(default_factory=list)  # unreadable: key, reason
    eval_items: pa.Table | None = None  # a source's evaluation items (key, label, sha256)

    @property
    def items(self) -> int:
        return len(self.labels)


def _hash_rows(digest, x: np.ndarray, rows: np.ndarray | None = None) -> None:
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


def class_counts(labels: np.ndarray, names: tuple[str, ...]) -> dict[str, int]:
    """Items per class name, for the classes that have any."""
    counts = np.bincount(labels, minlength=len(names))
    return {names[c]: int(n) for c, n in enumerate(counts) if n > 0}


def scenario_snapshot(ds: Dataset, stage: Stage, stages: int, train_idx: np.ndarray) -> Snapshot:
    """Stage ``stage`` of ``stages`` of the growing scenario over ``ds``."""
    rows = np.asarray(train_idx, dtype=np.int64)
    labels = ds.y_train[rows]
    keys = [f"train/{i}" for i in rows.tolist()]
    digest = hashlib.sha256(b"graceful-snapshot-v1")
    digest.update(ds.spec.encode())
    digest.update(rows.tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    _hash_rows(digest, ds.x_train, rows)
    return Snapshot(
        source=ds.spec,
        keys=keys,
        labels=labels,
        classes=class_counts(labels, ds.class_names),
        fingerprint=digest.hexdigest(),
        eval_fingerprint=eval_fingerprint(ds),
        stage=stage.index,
        stages=stages,
    )


def source_snapshot(scan: Scan, ev: EvalSet, vocabulary: dict[str, int]) -> Snapshot:
    """A source's snapshot: its scan (keys in training order) and its evaluation set."""
    labels = label_indices(scan.table.column("label"), vocabulary)
    return Snapshot(
        source=scan.source,
        keys=[],  # in ``table``: a source's keys are not copied into Python strings
        labels=labels,
        classes=scan.class_counts(),
        fingerprint=scan.fingerprint,
        eval_fingerprint=ev.fingerprint,
        table=scan.table,
        skipped=scan.skipped,
        eval_items=ev.items_table(),
    )

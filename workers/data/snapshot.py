"""Snapshots: what one cycle trains on, identified by content, recorded before training.

A snapshot names its source, the keys of its items, how many items each class has, and
a fingerprint of all of it (keys, labels and the items' content), plus the fingerprint of
the evaluation set every generation is measured on. Two snapshots with one fingerprint
are the same training data: a cycle whose snapshot equals the champion's has nothing new
to learn and is skipped. Every source (workers.data.source) gives one the same way; the
scenario's is its next stage of a fixed data set, keyed ``train/<row>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from workers.data.source import Draw
from workers.data.sources import EvalSet, label_indices


@dataclass(frozen=True)
class Snapshot:
    """One cycle's training data, as the lineage records it."""

    source: str  # the source's spec
    table: pa.Table  # the items as the source listed them: key, label (class name), ...
    labels: np.ndarray  # head rows, in ``table``'s order
    classes: dict[str, int]  # class name -> items
    fingerprint: str
    eval_fingerprint: str
    stage: int | None = None  # the scenario's stage and stage count, when it is one
    stages: int | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)  # unreadable: key, reason
    eval_items: pa.Table | None = None  # the evaluation items (key, label, sha256)

    @property
    def items(self) -> int:
        return len(self.labels)


def take_snapshot(draw: Draw, ev: EvalSet, vocabulary: dict[str, int]) -> Snapshot:
    """A source's draw (keys in training order) and its evaluation set, as a snapshot."""
    scan = draw.scan
    return Snapshot(
        source=scan.source,
        table=scan.table,
        labels=label_indices(scan.table.column("label"), vocabulary),
        classes=scan.class_counts(),
        fingerprint=scan.fingerprint,
        eval_fingerprint=ev.fingerprint,
        stage=draw.stage if draw.stages else None,
        stages=draw.stages,
        skipped=scan.skipped,
        eval_items=ev.items_table(),
    )

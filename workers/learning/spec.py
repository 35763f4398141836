"""What one generation's training is given: its items, head, architecture, constraints
and knobs (no torch: the typed config reads the knobs' defaults here without loading the
trainer). ``workers.learning.train.train_generation`` runs a :class:`TrainSpec`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from workers.learning.kinds import ConstraintKind

if TYPE_CHECKING:
    import numpy as np


@dataclass
class ConstraintSpec:
    """One constraint: stay compatible with generation ``target`` (a frozen checkpoint)."""

    target: int
    kind: ConstraintKind
    weight: float
    checkpoint: str
    sha256: str | None
    classes: list[int]  # the classes the target generation was trained on


@dataclass
class SourceItems:
    """A snapshot of a source, as the worker streams it (instead of in-memory arrays)."""

    spec: str
    keys_path: str  # the snapshot's items (workers.data.sources.Scan.table) as Parquet
    vocabulary: dict[str, int]  # class name -> head row
    input_format: dict[str, Any]  # workers.data.sources.InputFormat.as_dict()
    fingerprint: str  # the snapshot's
    kind: str = "items"  # workers.data.source.SourceKind: which source reads the items


@dataclass
class TrainSpec:
    """One generation's training: its items, head, architecture, constraints and knobs.

    The knobs' defaults are written here once: ``flows.config.TrainConfig`` reads them
    (:func:`spec_default`) and ``TrainConfig.train_spec`` passes every knob it shares.
    """

    generation: int
    x: np.ndarray | None  # items in memory (a caller's arrays), or None with ``source``
    y: np.ndarray | None
    num_classes: int  # head rows: the lineage's reserved class capacity
    classes: list[int]
    architecture: dict[str, Any]
    embed_dim: int = 64
    epochs: int = 15
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    constraints: list[ConstraintSpec] = field(default_factory=list)
    focal_alpha: float = 1.0
    focal_beta: float = 5.0
    focal_temperature: float = 2.0
    checkpoint_dir: str = "."
    threads: int | None = None
    source: SourceItems | None = None
    loader_workers: int = 0  # DataLoader processes decoding items (0: in the trainer)
    # -- compatibility knobs (defaults: the recipe that won bench/compat.py) ------------
    # cosine scale of the influence loss; None = the heads' own scale (LOGIT_SCALE)
    influence_scale: float | None = None
    # BCT's treatment of classes an ancestor never saw: its head rows become the
    # normalised mean old embedding of that class. False: those items are masked out.
    bct_prototypes: bool = True
    # the head the influence loss applies: "head" (the ancestor's own head, with BCT
    # prototypes as above) or "centroids" (for every class with training items, the
    # normalised mean embedding the ancestor gives that class: new embeddings are pulled
    # to where the ancestor's gallery items of their class lie; better AC, same accuracy)
    influence_head: str = "centroids"
    # which items the embedding constraint pulls: "all", "known" (classes the ancestor
    # saw) or "unknown" (classes it never saw: where no head row says anything)
    embedding_scope: str = "all"
    # temperature of the contrastive (d-Simplex-HOC) term: 0.1 as in the paper (mu = 10)
    contrastive_temperature: float = 0.1
    # start from the newest constrained ancestor's weights, expanded to this architecture
    # without changing its function (workers.learning.models.inherit_weights), when it allows that
    # (an mlp, or a resnet with as many stages, as wide and deep or more); otherwise, and
    # without constraints, start fresh.
    # The largest single gain in AC: classes no generation has seen keep their place.
    warm_start: bool = True
    # augmentation of image batches (resolve_augment): "auto" (the rule there), "none",
    # "crop" (random crop with zero padding) or "crop+flip" (and a horizontal flip)
    augment: str = "auto"
    # the data set's spec (e.g. "fashion-mnist"), for augment="auto"; a source's own spec
    # when None
    dataset: str | None = None
    # test hook: raise TrainingInterrupted after this many epochs of this call, once the
    # resume file is written, as if the process had been killed there
    stop_after_epochs: int | None = None
    # data-parallel training processes (Ray Train, DDP); each takes batch_size / workers
    # items of every batch. 1: the single process, no Ray Train.
    workers: int = 1


def spec_default(name: str) -> Any:
    """A TrainSpec knob's default (the one place it is written)."""
    return TrainSpec.__dataclass_fields__[name].default

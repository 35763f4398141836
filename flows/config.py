"""Typed configuration of the flows; each model is also a deployment's parameter form."""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from workers.learning.kinds import ConstraintKind, TrainMethod, full_weights
from workers.learning.spec import TrainSpec, spec_default

Against = Literal["all", "last"]
Policy = Literal["random", "oldest-first", "uncertainty", "representative"]
MAX_EPOCHS = 1000  # a generation's epoch budget is bounded: a runaway one cannot be asked for


class OnIncompatible(StrEnum):
    """What the gate does when a generation is not compatible with an ancestor that
    still holds collection items (flows/gate.py)."""

    REJECT = "reject"  # reject the generation
    BACKFILL = "backfill"  # promote; re-embed every item of that ancestor first
    TARGETED = "targeted"  # promote; re-embed only the items whose served search regresses


class GateConfig(BaseModel):
    """Promotion thresholds, decided on paired evidence (``flows/gate.py``,
    ``workers/measuring/stats.py``).

    A check fails only when its whole interval at ``confidence`` lies on the bad side of
    its threshold; a generation that fails one is rejected, with the reasons and intervals.
    ``ecc_margin`` defaults to 0: the textbook criterion itself (new queries must not do
    worse against an old gallery than that generation's own queries), tested rather than
    compared point to point; the interval already absorbs the noise of a few hundred
    queries, so a margin is only for accepting a real, bounded loss of compatibility.
    """

    enabled: bool = Field(True, description="false: promote every generation (--no-gate)")
    accuracy_tolerance: float = Field(0.02, ge=0, description="accuracy >= champion's - this")
    require_ecc: bool = Field(
        True,
        description="reject when C[g][k] - C[k][k] is below -ecc_margin beyond doubt, for any "
        "active ancestor k",
    )
    ecc_margin: float = Field(
        0.0, ge=0, le=1, description="C[g][k] - C[k][k] may be this far below 0 (top-1 share)"
    )
    max_nfr: float = Field(
        0.10, ge=0, le=1, description="reject when NFR(g, k) is above this beyond doubt"
    )
    confidence: float = Field(
        0.95, gt=0, lt=1, description="two-sided level of the intervals the checks use"
    )
    bootstrap_resamples: int = Field(
        10_000, ge=100, description="paired bootstrap resamples for C[g][k] - C[k][k]"
    )
    first_above_chance: bool = Field(
        True,
        description="promote a first generation only if its accuracy's exact interval lies "
        "above chance (the evaluation set's largest class share)",
    )
    on_incompatible: OnIncompatible = Field(
        OnIncompatible.TARGETED,
        description="when a generation is not compatible with an ancestor that holds "
        "collection items: 'targeted' promotes it if its served search, after re-embedding "
        "only the items of the classes that would regress (at most max_backfill of the "
        "collection), is no worse in any class; 'backfill' promotes it and re-embeds every "
        "item of that ancestor; 'reject' rejects it",
    )
    # 0.7: above the largest targeted backfill a better generation needed in the measured
    # chains (62.5% of the collection, Fashion-MNIST's first update after a weak first
    # generation; bench/results/lifelong.md), where 0.5 rejected two better generations;
    # an update needing nearly everything is a full backfill, better asked for as one
    max_backfill: float = Field(
        0.7,
        gt=0,
        le=1,
        description="the most a targeted backfill may re-embed, as a share of the collection; "
        "a generation that needs more is rejected with the cost in its reason",
    )


def _spec(name: str, description: str, **constraints: Any) -> Any:
    """A field whose default is the trainer's own (:func:`workers.learning.spec.spec_default`)."""
    return Field(spec_default(name), description=description, **constraints)


class TrainConfig(BaseModel):
    """How one generation is trained."""

    method: TrainMethod = Field(  # best measured: bench/results/compat.md
        TrainMethod.BCT_PCT_EMB,
        description="the constraint kinds every active ancestor gets (bct: influence, pct: "
        "focal, emb: embedding, hoc: contrastive)",
    )
    against: Against = Field(
        "all", description="constrain against every active ancestor, or the last one only"
    )
    ancestor_weights: Literal["each", "share"] = Field(
        "share",
        description="each ancestor gets every kind's weight, or the ancestors share it "
        "equally (the constraints' total stays the same as the chain grows)",
    )
    epochs: int = _spec(
        "epochs",
        f"training epochs per generation (1 to {MAX_EPOCHS}; a kill resumes them)",
        ge=1,
        le=MAX_EPOCHS,
    )
    batch_size: int = _spec("batch_size", "items per training batch", ge=2)
    lr: float = _spec("lr", "AdamW's learning rate, cosine-annealed over the epochs", gt=0)
    seed: int = _spec("seed", "seed of the initialisation and of every epoch's order")
    embed_dim: int = _spec("embed_dim", "dimension of the L2-normalised embedding", ge=2)
    weights: dict[ConstraintKind, float] = Field(
        default_factory=full_weights,
        description="weight per constraint kind (one constraint per active ancestor and kind "
        "of the method); kinds left out keep their default",
    )
    focal_alpha: float = _spec(
        "focal_alpha",
        "PCT focal distillation: every item's weight alpha + beta x 1[the ancestor was right]",
        ge=0,
    )
    focal_beta: float = _spec("focal_beta", "PCT focal distillation: see focal_alpha", ge=0)
    focal_temperature: float = _spec(
        "focal_temperature", "PCT focal distillation: temperature of both models' logits", gt=0
    )
    contrastive_temperature: float = _spec(
        "contrastive_temperature", "temperature of the contrastive (d-Simplex-HOC) constraint", gt=0
    )
    weight_decay: float = _spec("weight_decay", "AdamW's weight decay", ge=0)
    influence_scale: float | None = _spec(
        "influence_scale",
        "cosine scale of BCT's influence loss (default: the heads' own scale)",
        gt=0,
    )
    bct_prototypes: bool = _spec(
        "bct_prototypes",
        "BCT: an ancestor's rows for classes it never saw become the mean old "
        "embedding of their items (false: those items are left out of its loss)",
    )
    embedding_scope: Literal["all", "known", "unknown"] = _spec(
        "embedding_scope",
        "which items the embedding constraint pulls: all, those of classes the "
        "ancestor saw, or of classes it never saw",
    )
    loader_workers: int = _spec(
        "loader_workers", "DataLoader processes decoding a source's items (0: in the trainer)", ge=0
    )
    workers: int = _spec(
        "workers",
        "data-parallel training processes (Ray Train, DDP: gloo on CPUs, NCCL with "
        "a GPU each); every batch is split among them, so batch_size must be at least 2 x "
        "workers; 1: one process, no Ray Train (deploy/CLUSTER.md)",
        ge=1,
    )
    influence_head: Literal["centroids", "head"] = _spec(
        "influence_head", "BCT's frozen head: the ancestor's class centroids, or its own head rows"
    )
    warm_start: bool = _spec(
        "warm_start", "start from the newest constrained ancestor's weights, expanded"
    )
    architecture: dict | None = Field(
        None, description="keys that override the scenario's architecture (kind, width, head…)"
    )
    augment: Literal["auto", "none", "crop", "crop+flip"] = _spec(
        "augment",
        "image augmentation in training: a random crop with zero padding and a "
        "horizontal flip; auto: the resnet's images are cropped, and also flipped for "
        "Fashion-MNIST, CIFAR and colour photographs (never grey images of unknown kind: a "
        "mirrored 'b' is a 'd'; pass crop where your photos' classes are not "
        "mirror-symmetric); ancestors distilled per item embed each augmented batch; "
        "feature vectors never (workers.learning.train.resolve_augment)",
    )
    image_size: int | None = Field(
        None,
        ge=2,
        le=1024,
        description="side of the square images are decoded to (shorter side scaled to it, "
        "centre crop; training adds crops and flips); default: the first evaluation image's "
        "size, scaled down to at most 32 a side (a generation of 10,000 photos in minutes on "
        "2 CPU cores); a lineage keeps the size it began with",
    )
    class_capacity: int | None = Field(
        None,
        ge=2,
        description="head rows a source's lineage reserves at its first cycle, so classes "
        "that appear later need no renumbering; default max(embed_dim, 2 x classes seen)",
    )

    def train_spec(self, generation: int, **data: Any) -> TrainSpec:
        """The trainer's spec: every knob this config shares with TrainSpec, plus ``data``
        (the items, classes, architecture, constraints and where checkpoints go)."""
        shared = set(TrainSpec.__dataclass_fields__) & set(type(self).model_fields)
        shared.discard("architecture")  # here: overrides; the spec gets the whole one
        knobs = {name: getattr(self, name) for name in shared}
        return TrainSpec(generation=generation, **(knobs | data))

    @field_validator("architecture")
    @classmethod
    def _factory_imports(cls, v: dict | None) -> dict | None:
        """A team's own backbone factory must import where the config is read."""
        if v and v.get("kind") == "import":
            from workers.learning.models import import_factory

            import_factory(str(v.get("factory", "")))
        return v

    @field_validator("weights", mode="before")
    @classmethod
    def _every_kind(cls, v: dict | None) -> dict[ConstraintKind, float]:
        return full_weights(v)

    @model_validator(mode="after")
    def _a_share_per_worker(self) -> TrainConfig:
        """Each worker takes its share of every batch: two items at least (BatchNorm)."""
        if self.batch_size < 2 * self.workers:
            raise ValueError(
                f"batch_size {self.batch_size} leaves fewer than 2 items of a batch to each "
                f"of {self.workers} workers: raise batch_size or lower workers"
            )
        return self


class BackfillConfig(BaseModel):
    """A partial backfill: re-embed ``budget`` of the collection with the champion."""

    budget: float = Field(0.3, ge=0, description="a fraction (<= 1) or a count of items (> 1)")
    policy: Policy = Field(  # best curve area over seeds: bench/results/backfill.md
        "representative", description="the order in which stale items are re-embedded"
    )
    retire_share: float = Field(
        0.1,
        ge=0,
        le=1,
        description="generations holding at most this share of the collection are backfilled "
        "first (within the budget), so they retire and later generations are not "
        "constrained against them: the constraints stay bounded as the chain grows",
    )
    batch_rows: int = Field(4096, ge=1, description="items re-embedded per committed batch")
    seed: int = Field(0, description="seed of the policy's order (random, k-means samples)")
    curve: bool = Field(
        True,
        description="measure the backfill curve (M_mix over beta; the scenario's labelled "
        "evaluation reference half only: a user's collection has no labelled queries against it)",
    )

    @field_validator("budget", mode="before")
    @classmethod
    def _finite_count(cls, v: Any) -> Any:
        """inf and nan (a TOML file's, a deployment run's "inf") are no budget; above 1 it is
        a count of items, a whole number."""
        try:
            number = float(v)
        except (TypeError, ValueError, OverflowError):  # not a number: the type check says so
            return v
        if not math.isfinite(number):
            raise ValueError(
                "the budget must be a finite number: a fraction of the collection (0 to 1) or "
                "a count of items (a whole number above 1), e.g. 0.3 or 500"
            )
        if number > 1 and number != int(number):
            raise ValueError("a budget above 1 is a count of items: give a whole number")
        return v


class IndexConfig(BaseModel):
    """Index a collection: embed with the champion what it does not hold yet."""

    spec: str | None = Field(
        None,
        description="the collection: images:DIR, imagefolder:DIR or parquet:PATH; default: "
        "the spec this collection was indexed from",
    )
    prune: bool = Field(False, description="remove items gone from the spec")
    strict: bool = Field(False, description="refuse unreadable items (else: skip and count)")
    part_rows: int = Field(4096, ge=1, description="items per committed Parquet part")


class CycleConfig(BaseModel):
    """One update cycle: train -> evaluate -> gate -> promote -> backfill -> publish."""

    dataset: str | None = Field(None, description="data-set spec; default: the lineage's")
    stages: int | None = Field(
        None, ge=1, description="stages of the growing scenario; default: the lineage's, else 3"
    )
    stage: int | None = Field(None, ge=0, description="default: the next stage")
    train: TrainConfig = TrainConfig()
    gate: GateConfig = GateConfig()
    backfill: BackfillConfig = BackfillConfig()
    force: bool = Field(
        False, description="train even when the snapshot equals the champion's (else: skip)"
    )
    strict: bool = Field(
        False, description="refuse a source with unreadable items (else: skip and record them)"
    )
    reevaluate: bool = Field(
        False,
        description="when the evaluation set changed: measure every kept generation on the "
        "new one (and rebuild the scenario's collection) instead of refusing",
    )
    wait_for_lock: bool = Field(
        True, description="wait for a cycle already running on this lineage; false: refuse"
    )


class ServeConfig(BaseModel):
    """``graceful serve``: the update cycle deployment's name and schedule, and the index
    deployment's default collection (the ``[serve]`` section of a config file)."""

    interval_minutes: float = Field(
        24 * 60,
        gt=0,
        le=366 * 24 * 60,  # a schedule fires at least once a year
        allow_inf_nan=False,
        description="the update cycle's schedule: one run every this many minutes (above 0, "
        "at most a year)",
    )
    cron: str | None = Field(
        None,
        description="a cron schedule instead of the interval: five fields, minute hour "
        "day-of-month month day-of-week, e.g. '0 3 * * *' (every day at 03:00)",
    )
    name: str = Field("scheduled-update", min_length=1, description="the update cycle's name")
    collection: str | None = Field(
        None, description="the index deployment's default spec (images:DIR, parquet:PATH, ...)"
    )

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, v: str | None) -> str | None:
        """The cron string Prefect's scheduler takes, checked here: a bad one is one error
        line before anything is served, not a traceback from the deployment."""
        if v is None:
            return v
        from prefect.client.schemas.schedules import CronSchedule
        from pydantic import ValidationError

        try:
            CronSchedule(cron=v)
        except ValidationError:
            raise ValueError(
                f"{v!r} is not a cron schedule: give five fields, minute hour day-of-month "
                "month day-of-week, e.g. '0 3 * * *' (every day at 03:00) or '*/30 * * * *'"
            ) from None
        return v


class GracefulConfig(CycleConfig):
    """A ``--config`` file: the cycle's typed config (top-level keys and ``[train]``,
    ``[gate]``, ``[backfill]``) and ``[serve]``, read by ``run``, ``cycle`` and ``serve``
    (``graceful config --show`` prints it in effect)."""

    serve: ServeConfig = ServeConfig()

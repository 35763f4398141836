"""The vocabulary of compatibility constraints: one registry, kind -> loss, teacher tensors,
default weight.

A constraint says "generation g stays compatible with generation k". Its *kind* names the
loss that enforces it; its *weight* scales that loss. The kinds, the methods the CLI
offers (which kinds a method uses) and the default weights live here and nowhere else:
the typed config (``flows.config.TrainConfig.weights``) carries one ``{kind: weight}``
mapping, the lineage stores one row per (ancestor, kind, weight), and the training loop
builds one stack per kind from those rows through :data:`REGISTRY`. A new kind is one
entry here; nothing else names kinds one by one.

Each kind stacks its K teachers along a leading dimension, so one batched operation per
step covers every ancestor it constrains against (workers.losses).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, TypeVar

import torch

from workers.losses import embedding_distillation_loss, focal_distillation_loss, influence_loss
from workers.models import LOGIT_SCALE

_E = TypeVar("_E", bound=StrEnum)

if TYPE_CHECKING:  # only for annotations: train.py imports this module
    from workers.train import Teacher, TrainSpec


class ConstraintKind(StrEnum):
    """What a constraint against an ancestor enforces."""

    INFLUENCE = "influence"  # BCT: the ancestor's (centroid) head judges the new embedding
    FOCAL = "focal"  # PCT: focal distillation toward the ancestor's logits
    EMBEDDING = "embedding"  # 1 - cos(new embedding, ancestor's embedding)


class TrainMethod(StrEnum):
    """The recipes ``--method`` offers: which constraint kinds each ancestor gets."""

    NONE = "none"
    BCT = "bct"
    PCT = "pct"
    BCT_PCT = "bct+pct"
    BCT_PCT_EMB = "bct+pct+emb"


METHOD_KINDS: dict[TrainMethod, tuple[ConstraintKind, ...]] = {
    TrainMethod.NONE: (),
    TrainMethod.BCT: (ConstraintKind.INFLUENCE,),
    TrainMethod.PCT: (ConstraintKind.FOCAL,),
    TrainMethod.BCT_PCT: (ConstraintKind.INFLUENCE, ConstraintKind.FOCAL),
    TrainMethod.BCT_PCT_EMB: (
        ConstraintKind.INFLUENCE,
        ConstraintKind.FOCAL,
        ConstraintKind.EMBEDDING,
    ),
}


@dataclass
class Stack:
    """The teachers of one kind, stacked along a leading dimension K."""

    targets: list[int]  # the ancestors, in stacking order
    weight: torch.Tensor  # (K,)
    tensors: dict[str, torch.Tensor | None] = field(default_factory=dict)
    mask: torch.Tensor | None = None  # (K, N) bool, or None for every item


@dataclass
class StepInputs:
    """What one mini-batch gives the constraint losses."""

    emb: torch.Tensor  # (n, d) new embeddings
    logits: torch.Tensor  # (n, C) new logits
    labels: torch.Tensor  # (n,)
    batch: torch.Tensor  # (n,) indices of the items into the precomputed teacher tensors
    extra_emb: torch.Tensor | None = None  # new embeddings of the extra distillation inputs
    extra_batch: torch.Tensor | None = None  # their indices


# Each kind's ``stack`` returns its stacked teacher tensors and its item mask (or None);
# ``stack_teachers`` adds the ancestors and their weights, the same for every kind.
Tensors = dict[str, torch.Tensor | None]


# -- influence (BCT) -------------------------------------------------------------------
def _stack_influence(
    teachers: list[Teacher], spec: TrainSpec
) -> tuple[Tensors, torch.Tensor | None]:
    # without BCT prototypes an ancestor cannot judge classes it never saw
    judged_all = spec.bct_prototypes or spec.influence_head == "centroids"
    mask = None if judged_all else torch.stack([t.known for t in teachers])
    return {"head": torch.stack([t.head for t in teachers])}, mask


def _loss_influence(s: Stack, b: StepInputs, spec: TrainSpec) -> torch.Tensor:
    mask = None if s.mask is None else s.mask[:, b.batch]
    scale = spec.influence_scale or LOGIT_SCALE
    return influence_loss(b.emb, s.tensors["head"], b.labels, scale, mask)  # type: ignore[arg-type]


# -- focal distillation (PCT) ----------------------------------------------------------
def _stack_focal(teachers: list[Teacher], spec: TrainSpec) -> tuple[Tensors, torch.Tensor | None]:
    tensors: Tensors = {
        "logits": torch.stack([t.logits for t in teachers]),
        "correct": torch.stack([t.correct for t in teachers]),
    }
    return tensors, torch.stack([t.known for t in teachers])  # its logits on unseen classes lie


def _loss_focal(s: Stack, b: StepInputs, spec: TrainSpec) -> torch.Tensor:
    return focal_distillation_loss(
        b.logits,
        s.tensors["logits"][:, b.batch],  # type: ignore[index]
        s.tensors["correct"][:, b.batch],  # type: ignore[index]
        spec.focal_alpha,
        spec.focal_beta,
        spec.focal_temperature,
        s.mask[:, b.batch],  # type: ignore[index]
    )


# -- embedding distillation ------------------------------------------------------------
def _stack_embedding(
    teachers: list[Teacher], spec: TrainSpec
) -> tuple[Tensors, torch.Tensor | None]:
    mask = None
    if spec.embedding_scope == "known":
        mask = torch.stack([t.known for t in teachers])
    elif spec.embedding_scope == "unknown":
        mask = ~torch.stack([t.known for t in teachers])
    has_extra = teachers[0].extra_embedding is not None
    tensors: Tensors = {
        "embedding": torch.stack([t.embedding for t in teachers]),  # type: ignore[misc]
        "extra": torch.stack([t.extra_embedding for t in teachers])  # type: ignore[misc]
        if has_extra
        else None,
    }
    return tensors, mask


def _loss_embedding(s: Stack, b: StepInputs, spec: TrainSpec) -> torch.Tensor:
    mask = None if s.mask is None else s.mask[:, b.batch]
    per = embedding_distillation_loss(b.emb, s.tensors["embedding"][:, b.batch], mask)  # type: ignore[index]
    extra = s.tensors.get("extra")
    if extra is not None and b.extra_emb is not None and len(b.extra_batch):  # type: ignore[arg-type]
        per = per + embedding_distillation_loss(b.extra_emb, extra[:, b.extra_batch])
    return per


@dataclass(frozen=True)
class KindSpec:
    """How one constraint kind is trained."""

    kind: ConstraintKind
    default_weight: float  # what bench/compat.py measured best (bench/results/compat.md)
    teacher_tensors: tuple[str, ...]  # the Teacher fields it reads, precomputed once
    stack: Callable[[list[Teacher], TrainSpec], tuple[Tensors, torch.Tensor | None]]
    loss: Callable[[Stack, StepInputs, TrainSpec], torch.Tensor]  # (K,): one per ancestor


REGISTRY: dict[ConstraintKind, KindSpec] = {
    s.kind: s
    for s in (
        KindSpec(
            ConstraintKind.INFLUENCE, 1.0, ("head", "known"), _stack_influence, _loss_influence
        ),
        KindSpec(
            ConstraintKind.FOCAL, 0.3, ("logits", "correct", "known"), _stack_focal, _loss_focal
        ),
        KindSpec(
            ConstraintKind.EMBEDDING,
            2.0,
            ("embedding", "known", "extra_embedding"),
            _stack_embedding,
            _loss_embedding,
        ),
    )
}

DEFAULT_WEIGHTS: dict[ConstraintKind, float] = {k: s.default_weight for k, s in REGISTRY.items()}


def _parse(enum: type[_E], value: str, what: str) -> _E:
    try:
        return enum(value)
    except ValueError:
        known = ", ".join(m.value for m in enum)
        raise ValueError(f"unknown {what} {value!r}; choose one of {known}") from None


def parse_kind(value: str) -> ConstraintKind:
    """A kind from its name, or a ValueError naming the known ones."""
    return _parse(ConstraintKind, value, "constraint kind")


def parse_method(value: str) -> TrainMethod:
    """A method from its name, or a ValueError naming the known ones."""
    return _parse(TrainMethod, value, "method")


def full_weights(weights: Mapping[str, float] | None = None) -> dict[ConstraintKind, float]:
    """Every kind's weight: the defaults, overridden by ``weights`` (checked)."""
    out = dict(DEFAULT_WEIGHTS)
    for name, value in (weights or {}).items():
        kind = parse_kind(str(name))
        if not float(value) >= 0:
            raise ValueError(f"constraint weight must be >= 0, got {value} ({kind.value})")
        out[kind] = float(value)
    return out


def stack_teachers(teachers: list[Teacher], spec: TrainSpec) -> dict[ConstraintKind, Stack]:
    """One stack per kind, holding only the teachers with a non-zero weight of that kind."""
    stacks: dict[ConstraintKind, Stack] = {}
    for kind, entry in REGISTRY.items():
        members = [t for t in teachers if t.weights.get(kind, 0.0)]
        if members:
            tensors, mask = entry.stack(members, spec)
            device = members[0].logits.device
            weight = torch.tensor([t.weights[kind] for t in members], device=device)
            stacks[kind] = Stack([t.target for t in members], weight, tensors, mask)
    return stacks


def constraint_losses(
    stacks: dict[ConstraintKind, Stack], inputs: StepInputs, spec: TrainSpec
) -> dict[ConstraintKind, torch.Tensor]:
    """Each kind's weighted sum over its ancestors, for one mini-batch (zero when absent)."""
    zero = torch.zeros((), device=inputs.emb.device)
    out = {kind: zero for kind in REGISTRY}
    for kind, stack in stacks.items():
        out[kind] = (stack.weight * REGISTRY[kind].loss(stack, inputs, spec)).sum()
    return out


def received_weights(stacks: dict[ConstraintKind, Stack]) -> dict[str, dict[str, float]]:
    """``{kind: {ancestor: weight}}`` as the loop applies them (reported with the result)."""
    return {
        kind.value: {str(t): float(w) for t, w in zip(s.targets, s.weight.tolist(), strict=True)}
        for kind, s in stacks.items()
    }

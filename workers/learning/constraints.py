"""The losses of compatibility constraints: one registry, kind -> loss, teacher tensors.

A constraint says "generation g stays compatible with generation k". Its *kind* names the
loss that enforces it; its *weight* scales that loss. The kinds, the methods the CLI
offers (which kinds a method uses) and the default weights live in
``workers.learning.kinds`` and nowhere else, the losses here:
the typed config (``flows.config.TrainConfig.weights``) carries one ``{kind: weight}``
mapping, the lineage stores one row per (ancestor, kind, weight), and the training loop
builds one stack per kind from those rows through :data:`REGISTRY`. A new kind is one
entry there and one here; nothing else names kinds one by one.

Each kind stacks its K teachers along a leading dimension, so one batched operation per
step covers every ancestor it constrains against (workers.learning.losses). What varies per item
(the ancestors' embeddings of the batch) arrives with the batch; what does not (heads,
the classes each ancestor knew) is stacked once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from workers.learning.kinds import ConstraintKind
from workers.learning.losses import (
    contrastive_compatibility_loss,
    embedding_distillation_loss,
    focal_distillation_loss,
    influence_loss,
)
from workers.learning.models import LOGIT_SCALE, cosine_logits


class LossSettings(Protocol):
    """The trainer's settings the losses read (``workers.learning.train.TrainSpec`` has them)."""

    bct_prototypes: bool
    influence_head: str
    influence_scale: float | None
    focal_alpha: float
    focal_beta: float
    focal_temperature: float
    contrastive_temperature: float
    embedding_scope: str


@dataclass
class Teacher:
    """A frozen earlier generation: its heads, the classes it knew, its weights."""

    target: int
    slot: int  # its index along the K axis of the precomputed embeddings
    head: torch.Tensor  # (C, d): the influence head (centroids / BCT prototypes)
    own_head: torch.Tensor  # (C, d): its cosine head, which gives its logits
    known: torch.Tensor  # (C,) bool: classes in its training data
    # summed weight per constraint kind against this ancestor (workers.learning.constraints)
    weights: dict[ConstraintKind, float] = field(default_factory=dict)


@dataclass
class Stack:
    """The teachers of one kind, stacked along a leading dimension K."""

    targets: list[int]  # the ancestors, in stacking order
    weight: torch.Tensor  # (K,)
    slots: torch.Tensor  # (K,) their rows in StepInputs.teachers
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # (K, ...) each
    mask: torch.Tensor | None = None  # (K, C) bool: classes whose items count, or None


@dataclass
class StepInputs:
    """What one mini-batch gives the constraint losses."""

    emb: torch.Tensor  # (n, d) new embeddings
    logits: torch.Tensor  # (n, C) new logits
    labels: torch.Tensor  # (n,)
    teachers: torch.Tensor | None  # (K_all, n, d): every ancestor's precomputed embeddings


# Each kind's ``stack`` returns its stacked static teacher tensors and its class mask (or
# None); ``stack_teachers`` adds the ancestors, their slots and weights, alike for every kind.
Tensors = dict[str, torch.Tensor]


def _item_mask(s: Stack, b: StepInputs) -> torch.Tensor | None:
    """(K, n): whether each ancestor's constraint counts each item (by its class)."""
    return None if s.mask is None else s.mask[:, b.labels]


def _old_emb(s: Stack, b: StepInputs) -> torch.Tensor:
    assert b.teachers is not None, "a constrained step needs the teachers' embeddings"
    return b.teachers[s.slots]


# -- influence (BCT) -------------------------------------------------------------------
def _stack_influence(
    teachers: list[Teacher], spec: LossSettings
) -> tuple[Tensors, torch.Tensor | None]:
    # without BCT prototypes an ancestor cannot judge classes it never saw
    judged_all = spec.bct_prototypes or spec.influence_head == "centroids"
    mask = None if judged_all else torch.stack([t.known for t in teachers])
    return {"head": torch.stack([t.head for t in teachers])}, mask


def _loss_influence(s: Stack, b: StepInputs, spec: LossSettings) -> torch.Tensor:
    scale = spec.influence_scale or LOGIT_SCALE
    return influence_loss(b.emb, s.tensors["head"], b.labels, scale, _item_mask(s, b))


# -- focal distillation (PCT) ----------------------------------------------------------
def _stack_focal(
    teachers: list[Teacher], spec: LossSettings
) -> tuple[Tensors, torch.Tensor | None]:
    own = torch.stack([t.own_head for t in teachers])
    # its logits on classes it never saw lie: those items are masked out
    return {"own_head": own}, torch.stack([t.known for t in teachers])


def _loss_focal(s: Stack, b: StepInputs, spec: LossSettings) -> torch.Tensor:
    # the ancestor's logits: its cosine head on its (precomputed) embeddings, (K, n, C)
    old_logits = cosine_logits(_old_emb(s, b), s.tensors["own_head"])  # stacked: (K, n, C)
    return focal_distillation_loss(
        b.logits,
        old_logits,
        old_logits.argmax(dim=-1) == b.labels,
        spec.focal_alpha,
        spec.focal_beta,
        spec.focal_temperature,
        _item_mask(s, b),
    )


# -- contrastive compatibility (d-Simplex-HOC): the embedding term's items, stacked alike
def _loss_contrastive(s: Stack, b: StepInputs, spec: LossSettings) -> torch.Tensor:
    return contrastive_compatibility_loss(
        b.emb, _old_emb(s, b), b.labels, spec.contrastive_temperature, _item_mask(s, b)
    )


# -- embedding distillation ------------------------------------------------------------
def _stack_embedding(
    teachers: list[Teacher], spec: LossSettings
) -> tuple[Tensors, torch.Tensor | None]:
    known = torch.stack([t.known for t in teachers])
    return {}, {"all": None, "known": known, "unknown": ~known}[spec.embedding_scope]


def _loss_embedding(s: Stack, b: StepInputs, spec: LossSettings) -> torch.Tensor:
    return embedding_distillation_loss(b.emb, _old_emb(s, b), _item_mask(s, b))


@dataclass(frozen=True)
class KindSpec:
    """How one constraint kind is trained."""

    kind: ConstraintKind
    stack: Callable[[list[Teacher], LossSettings], tuple[Tensors, torch.Tensor | None]]
    loss: Callable[[Stack, StepInputs, LossSettings], torch.Tensor]  # (K,): one per ancestor


REGISTRY: dict[ConstraintKind, KindSpec] = {
    s.kind: s
    for s in (
        KindSpec(ConstraintKind.INFLUENCE, _stack_influence, _loss_influence),
        KindSpec(ConstraintKind.FOCAL, _stack_focal, _loss_focal),
        KindSpec(ConstraintKind.EMBEDDING, _stack_embedding, _loss_embedding),
        KindSpec(ConstraintKind.CONTRASTIVE, _stack_embedding, _loss_contrastive),
    )
}


def stack_teachers(teachers: list[Teacher], spec: LossSettings) -> dict[ConstraintKind, Stack]:
    """One stack per kind, holding only the teachers with a non-zero weight of that kind."""
    stacks: dict[ConstraintKind, Stack] = {}
    for kind, entry in REGISTRY.items():
        members = [t for t in teachers if t.weights.get(kind, 0.0)]
        if members:
            tensors, mask = entry.stack(members, spec)
            device = members[0].head.device
            weight = torch.tensor([t.weights[kind] for t in members], device=device)
            slots = torch.tensor([t.slot for t in members], device=device)
            stacks[kind] = Stack([t.target for t in members], weight, slots, tensors, mask)
    return stacks


def constraint_losses(
    stacks: dict[ConstraintKind, Stack], inputs: StepInputs, spec: LossSettings
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

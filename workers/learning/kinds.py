"""The names of compatibility constraints, without the losses (no torch): the kinds, the
methods the CLI offers (which kinds each uses) and each kind's default weight. The losses
that enforce them are ``workers.learning.constraints.REGISTRY``, one entry per kind here.
The typed config, the CLI and the lineage read these names; nothing else lists kinds."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import TypeVar

_E = TypeVar("_E", bound=StrEnum)


class ConstraintKind(StrEnum):
    """What a constraint against an ancestor enforces."""

    INFLUENCE = "influence"  # BCT: the ancestor's (centroid) head judges the new embedding
    FOCAL = "focal"  # PCT: focal distillation toward the ancestor's logits
    EMBEDDING = "embedding"  # 1 - cos(new embedding, ancestor's embedding)
    CONTRASTIVE = "contrastive"  # d-Simplex-HOC: InfoNCE to the ancestor's embeddings


class TrainMethod(StrEnum):
    """The recipes ``--method`` offers: which constraint kinds each ancestor gets."""

    NONE = "none"
    BCT = "bct"
    PCT = "pct"
    BCT_PCT = "bct+pct"
    BCT_PCT_EMB = "bct+pct+emb"
    HOC = "hoc"
    BCT_HOC = "bct+hoc"
    BCT_PCT_HOC = "bct+pct+hoc"
    BCT_PCT_EMB_HOC = "bct+pct+emb+hoc"


# each "+"-separated part of a method's name is one kind, in that order
METHOD_PARTS: dict[str, ConstraintKind] = {
    "bct": ConstraintKind.INFLUENCE,
    "pct": ConstraintKind.FOCAL,
    "emb": ConstraintKind.EMBEDDING,
    "hoc": ConstraintKind.CONTRASTIVE,
}
METHOD_KINDS: dict[TrainMethod, tuple[ConstraintKind, ...]] = {
    m: () if m is TrainMethod.NONE else tuple(METHOD_PARTS[p] for p in m.value.split("+"))
    for m in TrainMethod
}


# what bench/compat.py measured best (bench/results/compat.md)
DEFAULT_WEIGHTS: dict[ConstraintKind, float] = {
    ConstraintKind.INFLUENCE: 1.0,
    ConstraintKind.FOCAL: 0.3,
    ConstraintKind.EMBEDDING: 2.0,
    ConstraintKind.CONTRASTIVE: 1.0,
}


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

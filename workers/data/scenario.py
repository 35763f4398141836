"""The default growing scenario: later stages see more data and more classes.

Stage s of n sees the first ``classes(s)`` classes and a ``fraction(s)`` of each class's
training items; both grow linearly to all classes and all data at the last stage. The
subsets are nested (a fixed permutation per class), so every stage extends the last.

The model grows with the stages (:func:`default_architecture`): images, ``(C, H, W)``
inputs, get a small residual CNN that widens with every stage (width 12 to 16) and
gains a residual block in the second half (3 to 4 blocks); feature vectors an MLP
(width 128 to 256, 2 to 3 layers). Each growth is one a generation can inherit its
ancestor's function across (workers.learning.models.inherit_weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FIRST_CLASS_SHARE = 0.6
FIRST_DATA_SHARE = 0.5
HEAD = "fixed"


@dataclass(frozen=True)
class Stage:
    index: int
    classes: tuple[int, ...]
    fraction: float
    architecture: dict


def _ramp(first: float, stage: int, n_stages: int) -> float:
    if n_stages <= 1:
        return 1.0
    return first + (1.0 - first) * min(stage, n_stages - 1) / (n_stages - 1)


def default_architecture(input_shape: tuple[int, ...] | None, grow: float = 1.0) -> dict:
    """The backbone of a model ``grow`` (0 to 1) of the way to the scenario's last stage.

    Images (``input_shape`` of 3 dims): a residual CNN, width ``12 + 4 grow``, 3 blocks,
    4 from half way (the last stage: 16 channels, blocks 1-1-2, ~0.16M weights; 92.65% on
    Fashion-MNIST in 8 epochs, bench/results/models.md). Features, or no shape given:
    the MLP, width ``128 + 128 grow``, 2 layers, 3 from half way.
    """
    if input_shape is not None and len(input_shape) == 3:
        kind, width, depth = "resnet", int(12 + 4 * grow), 3
    else:
        kind, width, depth = "mlp", int(128 + 128 * grow), 2
    return {"kind": kind, "width": width, "depth": depth + int(grow >= 0.5), "head": HEAD}


def stage_plan(
    num_classes: int, n_stages: int, stage: int, input_shape: tuple[int, ...] | None = None
) -> Stage:
    """Classes, data share and architecture of stage ``stage`` (0-based) of ``n_stages``.

    ``input_shape`` (one item's) picks the backbone (:func:`default_architecture`); without
    it, the MLP.
    """
    if n_stages < 1 or stage < 0:
        raise ValueError(f"bad stage {stage} of {n_stages}")
    n_cls = max(2, math.ceil(num_classes * _ramp(FIRST_CLASS_SHARE, stage, n_stages)))
    n_cls = min(n_cls, num_classes)
    frac = _ramp(FIRST_DATA_SHARE, stage, n_stages)
    # the model grows too: wider with every stage, one layer deeper in the second half;
    # a single stage is the last one (the whole model, as the whole data)
    arch = default_architecture(input_shape, grow=_ramp(0.0, stage, n_stages))
    return Stage(stage, tuple(range(n_cls)), frac, arch)


def stage_indices(y: np.ndarray, stage: Stage, seed: int = 0) -> np.ndarray:
    """Indices of the training items of this stage (nested across stages)."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in stage.classes:
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        picked.append(idx[: max(1, round(len(idx) * stage.fraction))])
    return np.sort(np.concatenate(picked))


def eval_split(n_test: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint, deterministic gallery and query parts of the evaluation data."""
    idx = np.arange(n_test)
    return idx[idx % 2 == 0], idx[idx % 2 == 1]

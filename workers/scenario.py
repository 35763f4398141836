"""The default growing scenario: later stages see more data and more classes.

Stage s of n sees the first ``classes(s)`` classes and a ``fraction(s)`` of each class's
training items; both grow linearly to all classes and all data at the last stage. The
subsets are nested (a fixed permutation per class), so every stage extends the last.
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


def stage_plan(num_classes: int, n_stages: int, stage: int) -> Stage:
    """Classes, data share and architecture of stage ``stage`` (0-based) of ``n_stages``."""
    if n_stages < 1 or stage < 0:
        raise ValueError(f"bad stage {stage} of {n_stages}")
    n_cls = max(2, math.ceil(num_classes * _ramp(FIRST_CLASS_SHARE, stage, n_stages)))
    n_cls = min(n_cls, num_classes)
    frac = _ramp(FIRST_DATA_SHARE, stage, n_stages)
    # the model grows too: wider with every stage, one layer deeper in the second half
    grow = min(stage, n_stages - 1) / max(1, n_stages - 1)
    arch = {
        "kind": "mlp",
        "width": int(128 + 128 * grow),
        "depth": 2 + int(grow >= 0.5),
        "head": HEAD,
    }
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

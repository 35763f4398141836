"""Where a generation stands in its cycle: the one rule recovery and the report share."""

from __future__ import annotations

from enum import IntEnum

from store.lineage import Generation, GenerationStatus


class Step(IntEnum):
    """The steps of a cycle that a resumed cycle continues from, in order."""

    TRAIN = 1
    EVALUATE = 2  # evaluate, then gate
    PROMOTE = 3


def interrupted_step(gen: Generation) -> Step | None:
    """The step a generation's cycle has not done yet, or None when its cycle ended."""
    if gen.status == GenerationStatus.TRAINING:
        return Step.TRAIN
    if gen.status == GenerationStatus.TRAINED and gen.gate_passed is None:
        return Step.EVALUATE
    if gen.status == GenerationStatus.TRAINED and gen.gate_passed:
        return Step.PROMOTE
    return None

"""TrainConfig and the trainer's TrainSpec: one set of knobs, defaults written once."""

from __future__ import annotations

import dataclasses

from flows.config import TrainConfig
from workers.learning.spec import TrainSpec

# what a cycle supplies per generation (items, head, constraints, where files go), not
# knobs; stop_after_epochs is a test hook
DATA = {
    "generation",
    "x",
    "y",
    "num_classes",
    "classes",
    "architecture",
    "constraints",
    "checkpoint_dir",
    "threads",
    "source",
    "dataset",
    "stop_after_epochs",
}


def test_every_knob_the_trainer_reads_is_in_the_config_with_its_default() -> None:
    knobs = {f.name: f for f in dataclasses.fields(TrainSpec) if f.name not in DATA}
    fields = TrainConfig.model_fields
    assert set(knobs) - set(fields) == set()
    for name, f in knobs.items():
        assert fields[name].default == f.default, name


def test_train_spec_carries_every_setting() -> None:
    cfg = TrainConfig(
        epochs=3,
        lr=0.01,
        weight_decay=0.5,
        embedding_scope="known",
        influence_scale=7.0,
        bct_prototypes=False,
        loader_workers=2,
        focal_beta=1.5,
        architecture={"width": 8},
    )
    spec = cfg.train_spec(4, x=None, y=None, num_classes=5, classes=[0], architecture={"a": 1})
    assert (spec.generation, spec.epochs, spec.lr, spec.weight_decay) == (4, 3, 0.01, 0.5)
    assert (spec.embedding_scope, spec.influence_scale, spec.bct_prototypes) == (
        "known",
        7.0,
        False,
    )
    assert (spec.loader_workers, spec.focal_beta) == (2, 1.5)
    assert spec.architecture == {"a": 1}  # the cycle's whole architecture, not the overrides

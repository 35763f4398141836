"""A team's own backbone by import path: graceful adds projection, embedding and head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from workers.learning.embed import forward
from workers.learning.kinds import ConstraintKind
from workers.learning.models import EmbeddingNet, inherit_weights, load_model
from workers.learning.spec import ConstraintSpec, TrainSpec
from workers.learning.train import train_generation

FACTORY = "tests.unit.own_backbones:tiny_conv"


def _images(n: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Two classes: reddish or bluish noise, 3 x 8 x 8."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    x = rng.random((n, 3, 8, 8)).astype(np.float32) * 0.3
    for i, c in enumerate(y):
        x[i, 0] += 0.7 * (c == 0)
        x[i, 2] += 0.7 * (c == 1)
    return x, y.astype(np.int64)


def _spec(tmp: Path, gen: int, arch: dict, **kw) -> TrainSpec:
    x, y = _images()
    base = dict(
        generation=gen,
        x=x,
        y=y,
        num_classes=2,
        classes=[0, 1],
        architecture=arch,
        embed_dim=4,
        epochs=3,
        batch_size=32,
        lr=1e-2,
        seed=0,
        checkpoint_dir=str(tmp),
        threads=1,
    )
    return TrainSpec(**(base | kw))


def test_own_backbone_trains_embeds_and_carries_its_constraints(tmp_path: Path) -> None:
    arch = {"kind": "import", "factory": FACTORY, "options": {"width": 8}}
    first = train_generation(_spec(tmp_path, 1, arch))
    model = load_model(first["checkpoint"], first["sha256"])  # re-imported by path
    assert model.config["architecture"] == {**arch, "head": "learned"}
    x, y = _images()
    out = forward(model, x)
    assert out.embedding.shape == (len(x), 4)
    assert np.allclose(np.linalg.norm(out.embedding, axis=1), 1.0, atol=1e-5)
    assert (out.prediction == y).mean() > 0.9
    # a wider second generation, constrained to the first, starts as its expansion
    wider = {"kind": "import", "factory": FACTORY, "options": {"width": 12}}
    c = ConstraintSpec(
        1, ConstraintKind.INFLUENCE, 1.0, first["checkpoint"], first["sha256"], [0, 1]
    )
    second = train_generation(_spec(tmp_path, 2, wider, constraints=[c]))
    assert second["warm_start_from"] == 1 and second["warm_start_note"] is None
    assert second["constraint_weights"] == {"influence": {"1": 1.0}}
    # a narrower backbone cannot hold the ancestor's function: from scratch, and it says so
    narrower = {"kind": "import", "factory": FACTORY, "options": {"width": 4}}
    third = train_generation(_spec(tmp_path, 3, narrower, constraints=[c]))
    assert third["warm_start_from"] is None
    assert "generation 3 trains from scratch" in third["warm_start_note"]
    assert "tests.unit.own_backbones:tiny_conv" in third["warm_start_note"]


def test_own_backbone_warm_start_is_function_preserving() -> None:
    x = torch.from_numpy(_images(16)[0])
    old = EmbeddingNet((3, 8, 8), 2, 4, {"kind": "import", "factory": FACTORY})
    same = EmbeddingNet((3, 8, 8), 2, 4, {"kind": "import", "factory": FACTORY})
    grown = EmbeddingNet(
        (3, 8, 8), 2, 4, {"kind": "import", "factory": FACTORY, "options": {"width": 12}}
    )
    old.set_input_stats([0.5, 0.4, 0.3], [0.2, 0.2, 0.2])
    for new in (same, grown):
        assert inherit_weights(new, old)
        old.eval(), new.eval()
        torch.testing.assert_close(new.embed(x), old.embed(x))
    # a built-in backbone cannot grow from a team's own: it starts fresh
    resnet = EmbeddingNet((3, 8, 8), 2, 4, {"kind": "resnet", "width": 8, "depth": 3})
    assert not inherit_weights(resnet, old)


def test_an_own_backbone_narrower_than_its_ancestor_is_left_untouched() -> None:
    # its grow_from claims success, but the projection cannot read the ancestor's wider
    # features: no warm start, and the new model keeps its own weights and normalisation
    eager = "tests.unit.own_backbones:over_eager_conv"
    old = EmbeddingNet((3, 8, 8), 2, 4, {"kind": "import", "factory": eager})
    new = EmbeddingNet(
        (3, 8, 8), 2, 4, {"kind": "import", "factory": eager, "options": {"width": 4}}
    )
    old.set_input_stats([0.5, 0.4, 0.3], [0.2, 0.2, 0.2])
    new.set_input_stats([0.1, 0.2, 0.3], [0.3, 0.3, 0.3])
    before = {k: v.clone() for k, v in new.state_dict().items()}
    assert not inherit_weights(new, old)
    assert all(torch.equal(before[k], v) for k, v in new.state_dict().items())


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("no_such_module_here:build", r"does not import .*PYTHONPATH"),
        ("tests.unit.own_backbones:missing", r"does not import"),
        ("tests.unit.own_backbones", r"as 'module:function'"),
        ("tests.unit.own_backbones:not_a_module", r"not a torch.nn.Module"),
        ("tests.unit.own_backbones:flat_vector", r"it must return \(batch, features\)"),
    ],
)
def test_bad_factory_is_one_clear_error(factory: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EmbeddingNet((3, 8, 8), 2, 4, {"kind": "import", "factory": factory})

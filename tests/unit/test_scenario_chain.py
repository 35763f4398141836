"""The growing scenario and the planning of the constraint chain."""

import numpy as np
import pytest
import torch

from flows.chain import plan_constraints
from workers.data.scenario import default_architecture, eval_split, stage_indices, stage_plan
from workers.learning.constraints import REGISTRY
from workers.learning.kinds import DEFAULT_WEIGHTS, METHOD_KINDS, ConstraintKind
from workers.learning.models import EmbeddingNet, inherit_weights


def test_stages_grow_in_classes_data_and_width() -> None:
    stages = [stage_plan(10, 3, s) for s in range(3)]
    assert [len(s.classes) for s in stages] == [6, 8, 10]
    assert [s.fraction for s in stages] == [0.5, 0.75, 1.0]
    widths = [s.architecture["width"] for s in stages]
    assert widths == sorted(widths) and widths[0] < widths[-1]
    assert stage_plan(10, 1, 0).classes == tuple(range(10))
    # a single stage is the last one: the whole model too, not the first stage's
    one = stage_plan(10, 1, 0, (3, 32, 32)).architecture
    assert one == stage_plan(10, 4, 3, (3, 32, 32)).architecture
    assert (one["width"], one["depth"]) == (16, 4)


def test_images_get_a_growing_resnet_features_the_mlp() -> None:
    image = [stage_plan(10, 3, s, (1, 28, 28)).architecture for s in range(3)]
    assert [(a["kind"], a["width"], a["depth"]) for a in image] == [
        ("resnet", 12, 3),
        ("resnet", 14, 4),
        ("resnet", 16, 4),
    ]
    for shape in ((49,), None):  # feature vectors, or no shape given: the MLP as before
        feats = [stage_plan(10, 3, s, shape).architecture for s in range(3)]
        assert [(a["kind"], a["width"], a["depth"]) for a in feats] == [
            ("mlp", 128, 2),
            ("mlp", 192, 3),
            ("mlp", 256, 3),
        ]
    assert all(a["head"] == "fixed" for a in image)
    assert default_architecture((3, 32, 32)) == image[-1]  # a source's: the last stage's


@pytest.mark.parametrize("shape", [(1, 8, 8), (16,)])
def test_every_stage_can_inherit_the_last_ones_function(shape) -> None:
    """The scenario only grows the model in ways the warm start preserves."""
    torch.manual_seed(0)
    x = torch.rand(32, *shape)
    archs = [stage_plan(10, 5, s, shape).architecture for s in range(5)]
    for old_arch, new_arch in zip(archs[:-1], archs[1:], strict=True):
        old = EmbeddingNet(shape, 10, 16, old_arch)
        old.train()
        with torch.no_grad():
            old(x)
        old.eval()
        new = EmbeddingNet(shape, 10, 16, new_arch)
        assert inherit_weights(new, old, x), (old_arch, new_arch)
        with torch.no_grad():
            assert torch.allclose(old(x)[1], new.eval()(x)[1], atol=1e-4)


def test_a_users_source_gets_the_last_stage_model_for_its_inputs(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workers.data.source import ItemSource, Position

    path = tmp_path / "f.parquet"
    pq.write_table(
        pa.table(
            {
                "item_id": ["a", "b", "c", "d"],
                "label": ["x", "y", "x", "y"],
                "features": [[0.0] * 49] * 4,
                "split": ["train", "train", "test", "test"],
            }
        ),
        path,
    )
    source = ItemSource(f"parquet:{path}")
    draw = source.draw(Position(index=0), (1, 28, 28))
    assert draw.architecture["kind"] == "resnet"
    assert draw.stage == 0 and draw.stages is None
    assert (
        source.draw(Position(2), (3, 64, 64)).architecture
        == stage_plan(10, 3, 2, (3, 64, 64)).architecture
    )
    mlp = {"kind": "mlp", "width": 256, "depth": 3, "head": "fixed"}
    assert source.draw(Position(1), (49,)).architecture == mlp
    # a lineage begun with the MLP on images keeps it (a warm start cannot cross kinds)
    assert source.draw(Position(1, backbone="mlp"), (1, 28, 28)).architecture == mlp


def test_stage_subsets_are_nested_and_per_class() -> None:
    y = np.repeat(np.arange(10), 20)
    idx = [set(stage_indices(y, stage_plan(10, 3, s)).tolist()) for s in range(3)]
    assert idx[0] < idx[1] < idx[2]
    assert len(idx[0]) == 6 * 10 and len(idx[2]) == 200
    assert set(np.unique(y[sorted(idx[0])]).tolist()) == set(range(6))


def test_eval_split_is_disjoint_and_covers() -> None:
    g, q = eval_split(7)
    assert g.tolist() == [0, 2, 4, 6] and q.tolist() == [1, 3, 5]


def test_plan_constraints_by_method_and_against() -> None:
    assert plan_constraints([1, 2], "none", "all", {"influence": 1.0}) == []
    assert plan_constraints([1, 2], "bct", "all", {"influence": 2.0}) == [
        (1, "influence", 2.0),
        (2, "influence", 2.0),
    ]
    assert plan_constraints([1, 2], "bct", "last", {"influence": 1.0}) == [(2, "influence", 1.0)]
    assert plan_constraints([3], "bct+pct", "all", {"influence": 1.0, "focal": 0.5}) == [
        (3, "influence", 1.0),
        (3, "focal", 0.5),
    ]
    # the ancestors share each kind's weight: the sum stays that of one ancestor
    assert plan_constraints([1, 2, 4, 8], "bct", "all", {"influence": 2.0}, "share") == [
        (1, "influence", 0.5),
        (2, "influence", 0.5),
        (4, "influence", 0.5),
        (8, "influence", 0.5),
    ]
    assert plan_constraints([1, 2], "bct", "last", {"influence": 2.0}, "share") == [
        (2, "influence", 2.0)
    ]
    with pytest.raises(ValueError, match="ancestor_weights"):
        plan_constraints([1], "bct", "all", None, "most")
    with pytest.raises(ValueError, match="unknown method"):
        plan_constraints([1], "magic", "all")
    with pytest.raises(ValueError, match="unknown constraint kind 'magic'"):
        plan_constraints([1], "bct", "all", {"magic": 1.0})


def test_every_kind_of_every_method_gets_its_configured_weight() -> None:
    """The default recipe's embedding constraint once got weight 0.0 (issue 7)."""
    weights = {"influence": 0.7, "focal": 0.2, "embedding": 1.5, "contrastive": 0.4}
    for method, kinds in METHOD_KINDS.items():
        plan = plan_constraints([1, 4], method.value, "all", weights)
        assert plan == [(k, kind.value, weights[kind.value]) for k in (1, 4) for kind in kinds]
    # kinds left out keep the registry's default, never 0
    plan = plan_constraints([1], "bct+pct+emb", "all", {"focal": 0.1})
    assert plan == [
        (1, "influence", DEFAULT_WEIGHTS[ConstraintKind.INFLUENCE]),
        (1, "focal", 0.1),
        (1, "embedding", DEFAULT_WEIGHTS[ConstraintKind.EMBEDDING]),
    ]
    assert all(w > 0 for w in DEFAULT_WEIGHTS.values())
    assert set(DEFAULT_WEIGHTS) == set(ConstraintKind) == set(REGISTRY)


def test_train_config_weights_travel_whole() -> None:
    from flows.config import TrainConfig

    cfg = TrainConfig(weights={"embedding": 0.5})
    assert cfg.weights == {**DEFAULT_WEIGHTS, ConstraintKind.EMBEDDING: 0.5}
    assert TrainConfig().weights == DEFAULT_WEIGHTS
    # the deployment's parameter form round-trips (JSON keys are strings)
    again = TrainConfig.model_validate(cfg.model_dump(mode="json"))
    assert again.weights == cfg.weights
    with pytest.raises(ValueError, match="unknown constraint kind"):
        TrainConfig(weights={"embeding": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        TrainConfig(weights={"focal": -1.0})


def test_train_config_augment_knob() -> None:
    from flows.config import TrainConfig

    assert TrainConfig().augment == "auto"
    assert TrainConfig(augment="crop+flip").augment == "crop+flip"
    with pytest.raises(ValueError):
        TrainConfig(augment="rotate")

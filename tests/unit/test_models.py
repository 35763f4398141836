"""The embedding model: architectures, the stationary head, weight inheritance, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workers.models import (
    CheckpointError,
    EmbeddingNet,
    fixed_prototypes,
    inherit_weights,
    load_model,
    save_model,
)

SHAPE = (1, 4, 4)


def trained_bn(model: EmbeddingNet, x: torch.Tensor) -> EmbeddingNet:
    """Give BatchNorm non-trivial running statistics, then switch to eval mode."""
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(x)
    return model.eval()


@pytest.mark.parametrize(
    "arch",
    [
        {"kind": "mlp", "width": 8, "depth": 1},
        {"kind": "mlp", "width": 32, "depth": 3},
        {"kind": "cnn", "width": 4, "depth": 2},
    ],
)
def test_architectures_share_the_embedding_dimension(arch: dict) -> None:
    model = EmbeddingNet(SHAPE, 5, 12, arch).eval()
    emb, logits = model(torch.randn(3, *SHAPE))
    assert emb.shape == (3, 12) and logits.shape == (3, 5)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)  # L2-normalised
    # logits are LOGIT_SCALE * cosine: within [-16, 16]
    assert logits.abs().max() <= 16.0 + 1e-4


def test_bad_architectures_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown architecture kind 'rnn'"):
        EmbeddingNet(SHAPE, 5, 8, {"kind": "rnn"})
    with pytest.raises(ValueError, match="unknown head 'magic'"):
        EmbeddingNet(SHAPE, 5, 8, {"head": "magic"})
    with pytest.raises(ValueError, match="a cnn needs"):
        EmbeddingNet((16,), 5, 8, {"kind": "cnn"})


def test_fixed_head_is_orthonormal_shared_and_frozen() -> None:
    p = fixed_prototypes(5, 8)
    assert torch.allclose(p @ p.T, torch.eye(5), atol=1e-5)  # orthonormal class directions
    assert torch.equal(p, fixed_prototypes(5, 8))  # the same for every generation
    a = EmbeddingNet(SHAPE, 5, 8, {"kind": "mlp", "width": 8, "depth": 1, "head": "fixed"})
    torch.manual_seed(123)
    b = EmbeddingNet(SHAPE, 5, 8, {"kind": "cnn", "width": 4, "depth": 1, "head": "fixed"})
    assert torch.equal(a.head.weight, b.head.weight) and not a.head.weight.requires_grad
    # more classes than dimensions: unit rows, still deterministic
    q = fixed_prototypes(10, 4)
    assert q.shape == (10, 4) and torch.allclose(q.norm(dim=1), torch.ones(10), atol=1e-5)


@pytest.mark.parametrize(
    "arch",
    [
        {"kind": "mlp", "width": 16, "depth": 1},  # the same
        {"kind": "mlp", "width": 24, "depth": 1},  # wider
        {"kind": "mlp", "width": 24, "depth": 3},  # wider and deeper
    ],
)
def test_inherit_weights_preserves_the_function(arch: dict) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, *SHAPE)
    old = trained_bn(EmbeddingNet(SHAPE, 5, 8, {"kind": "mlp", "width": 16, "depth": 1}), x)
    new = EmbeddingNet(SHAPE, 5, 8, arch)
    assert inherit_weights(new, old, x)
    new.eval()
    with torch.no_grad():
        (e_old, z_old), (e_new, z_new) = old(x), new(x)
    assert torch.allclose(e_old, e_new, atol=1e-5)
    assert torch.allclose(z_old, z_new, atol=1e-4)
    assert new.config["architecture"]["width"] == arch["width"]


def test_inherit_weights_refuses_what_it_cannot_preserve() -> None:
    old = EmbeddingNet(SHAPE, 5, 8, {"kind": "mlp", "width": 16, "depth": 2})
    for arch in (
        {"kind": "mlp", "width": 8, "depth": 2},  # narrower
        {"kind": "mlp", "width": 16, "depth": 1},  # shallower
        {"kind": "cnn", "width": 16, "depth": 2},  # another kind
    ):
        new = EmbeddingNet(SHAPE, 5, 8, arch)
        before = {k: v.clone() for k, v in new.state_dict().items()}
        assert not inherit_weights(new, old)
        assert all(torch.equal(before[k], v) for k, v in new.state_dict().items())
    assert not inherit_weights(EmbeddingNet(SHAPE, 5, 4, {"width": 16, "depth": 2}), old)


def test_checkpoint_round_trip_and_hash(tmp_path: Path) -> None:
    model = EmbeddingNet(SHAPE, 5, 8, {"kind": "mlp", "width": 8, "depth": 1, "head": "fixed"})
    path = tmp_path / "m.pt"
    sha = save_model(model, path)
    loaded = load_model(path, sha)
    assert loaded.config == model.config and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        load_model(path, "0" * 64)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot load"):
        load_model(tmp_path / "bad.pt")


def test_inherited_new_units_are_alive() -> None:
    """New units, also those of an added layer, are active and learn: the expansion adds
    capacity (zero weights out of a new unit start moving at once, its incoming weights
    one step later)."""
    torch.manual_seed(0)
    x = torch.randn(64, *SHAPE)
    y = torch.arange(64) % 5
    old = trained_bn(EmbeddingNet(SHAPE, 5, 8, {"kind": "mlp", "width": 16, "depth": 1}), x)
    new = EmbeddingNet(SHAPE, 5, 8, {"kind": "mlp", "width": 24, "depth": 2})
    assert inherit_weights(new, old, x)
    assert torch.equal(new.project.weight[:, 16:], torch.zeros(8, 8))
    new.train()
    opt = torch.optim.SGD([p for p in new.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(new(x)[1], y).backward()
        assert new.project.weight.grad[:, 16:].abs().sum() > 0
        opt.step()
    for lin in [m for m in new.backbone if isinstance(m, torch.nn.Linear)]:
        assert lin.weight.grad[16:].abs().sum() > 0  # rows 16.. are the new units

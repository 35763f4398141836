"""The embedding model: architectures, the stationary head, weight inheritance, checkpoints,
the residual CNN and its growth, image augmentation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workers.learning.models import (
    BasicBlock,
    CheckpointError,
    EmbeddingNet,
    fixed_prototypes,
    inherit_weights,
    load_model,
    resnet_blocks,
    resnet_channels,
    save_model,
)
from workers.learning.train import augment_batch, crop_padding, resolve_augment

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
        {"kind": "resnet", "width": 4, "depth": 3},
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
    with pytest.raises(ValueError, match=r"a resnet needs \(C, H, W\)"):
        EmbeddingNet((16,), 5, 8, {"kind": "resnet"})
    with pytest.raises(ValueError, match="a resnet needs depth >= 1"):
        EmbeddingNet(SHAPE, 5, 8, {"kind": "resnet", "width": 4, "depth": 0})


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
        {"kind": "resnet", "width": 16, "depth": 3},  # another kind
    ):
        new = EmbeddingNet(SHAPE, 5, 8, arch)
        before = {k: v.clone() for k, v in new.state_dict().items()}
        assert not inherit_weights(new, old)
        assert all(torch.equal(before[k], v) for k, v in new.state_dict().items())
    assert not inherit_weights(EmbeddingNet(SHAPE, 5, 4, {"width": 16, "depth": 2}), old)


def test_a_resnet_gaining_a_stage_is_left_untouched_input_statistics_included() -> None:
    # depth 2 -> 3 adds a stage (another resolution): no warm start, and the new model keeps
    # the normalisation of its own training data, not its ancestor's
    image = (1, 8, 8)
    old = EmbeddingNet(image, 5, 8, {"kind": "resnet", "width": 4, "depth": 2})
    old.set_input_stats([0.7], [0.2])
    new = EmbeddingNet(image, 5, 8, {"kind": "resnet", "width": 4, "depth": 3})
    new.set_input_stats([0.3], [0.5])
    before = {k: v.clone() for k, v in new.state_dict().items()}
    assert not inherit_weights(new, old)
    assert all(torch.equal(before[k], v) for k, v in new.state_dict().items())


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


# --------------------------------------------------------------------------- the resnet


def resnet(width: int, depth: int, shape: tuple[int, ...] = (1, 8, 8), **kw) -> EmbeddingNet:
    return EmbeddingNet(shape, 5, 8, {"kind": "resnet", "width": width, "depth": depth} | kw)


def test_resnet_stages_blocks_and_channels() -> None:
    # depth residual blocks over min(3, depth) stages, the extra ones in the later stages
    assert [resnet_blocks(d) for d in (1, 2, 3, 4, 5, 6, 7)] == [
        [1],
        [1, 1],
        [1, 1, 1],
        [1, 1, 2],
        [1, 2, 2],
        [2, 2, 2],
        [2, 2, 3],
    ]
    assert resnet_channels(16, 4) == [16, 32, 64]
    model = resnet(16, 4)
    stages = model.backbone.stages
    assert [len(s) for s in stages] == [1, 1, 2]
    # the first block of a later stage halves the resolution, with a 1x1 projection
    assert stages[0][0].shortcut is None and stages[2][1].shortcut is None
    proj = stages[1][0].shortcut[0]
    assert proj.kernel_size == (1, 1) and proj.stride == (2, 2) and proj.out_channels == 32
    assert model.project.in_features == 64  # global average pooling of 4 x 16 channels


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_resnet_works_for_digits_fashion_and_rgb_sizes(shape: tuple[int, ...]) -> None:
    model = resnet(4, 4, shape).eval()
    emb, logits = model(torch.randn(3, *shape))
    assert emb.shape == (3, 8) and logits.shape == (3, 5)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)


def test_a_residual_block_with_zero_last_gamma_is_the_identity() -> None:
    torch.manual_seed(0)
    block = BasicBlock(3, 3).eval()
    x = torch.relu(torch.randn(4, 3, 5, 5))  # a block's input is a ReLU's output: >= 0
    assert not torch.allclose(block(x), x)  # a fresh block changes its input
    with torch.no_grad():
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()
    assert torch.equal(block(x), x)  # relu(0 + x) = x
    assert torch.equal(block.train()(x), x)  # in training mode too: gamma 0 whatever the stats
    # on a negative input it is a ReLU, not the identity: why only stream inputs qualify
    assert torch.equal(block.eval()(-x), torch.zeros_like(x))


def _grown(old_arch: tuple[int, int], new_arch: tuple[int, int], shape=(1, 8, 8)):
    torch.manual_seed(0)
    x = torch.randn(32, *shape)
    old = trained_bn(resnet(*old_arch, shape, head="fixed"), x)
    new = resnet(*new_arch, shape, head="fixed")
    assert inherit_weights(new, old)
    return old, new.eval(), x


@pytest.mark.parametrize(
    ("old_arch", "new_arch"),
    [
        ((4, 3), (4, 3)),  # the same
        ((4, 3), (6, 3)),  # wider: channels 4-8-16 -> 6-12-24
        ((4, 3), (4, 4)),  # deeper: a block appended to the last stage
        ((4, 4), (4, 6)),  # deeper: blocks appended to the first two stages
        ((4, 3), (7, 5)),  # both
        ((3, 1), (5, 1)),  # one stage
    ],
)
def test_resnet_growth_preserves_the_function(old_arch, new_arch) -> None:
    for shape in ((1, 8, 8), (3, 12, 12)):
        old, new, x = _grown(old_arch, new_arch, shape)
        with torch.no_grad():
            (e_old, z_old), (e_new, z_new) = old(x), new(x)
        assert (e_old - e_new).abs().max() < 1e-5
        assert (z_old - z_new).abs().max() < 1e-4
        # in training mode too: Net2Net replicas share their batch statistics
        with torch.no_grad():
            (e_old, _), (e_new, _) = old.train()(x), new.train()(x)
        assert (e_old - e_new).abs().max() < 1e-4


def test_widening_copies_channels_and_splits_their_outgoing_weights() -> None:
    old, new, _ = _grown((4, 3), (6, 3))
    w_old, w_new = old.backbone.stem[0].weight, new.backbone.stem[0].weight
    assert torch.equal(w_new[:4], w_old)  # the old channels keep their filters
    for j in (4, 5):  # a new channel is a copy of an old one, its BatchNorm too
        i = next(i for i in range(4) if torch.equal(w_new[j], w_old[i]))
        bn_old, bn_new = old.backbone.stem[1], new.backbone.stem[1]
        assert bn_new.running_var[j] == bn_old.running_var[i]
        assert bn_new.weight[j] == bn_old.weight[i]
        # what reads channel i and its copy j: the old weight, shared between them
        c_old, c_new = old.backbone.stages[0][0].conv1, new.backbone.stages[0][0].conv1
        split = c_new.weight[:4, i] + c_new.weight[:4, j]
        assert torch.allclose(split, c_old.weight[:, i], atol=1e-6)
        assert not torch.allclose(c_new.weight[:4, i], c_new.weight[:4, j])  # not halves


def test_grown_resnet_learns_in_new_blocks_and_replicas_drift_apart() -> None:
    old, new, x = _grown((4, 3), (6, 4))
    appended = new.backbone.stages[2][1]
    assert torch.equal(appended.bn2.weight, torch.zeros(24))
    y = torch.arange(len(x)) % 5
    opt = torch.optim.SGD([p for p in new.parameters() if p.requires_grad], lr=0.1)
    new.train()
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(new(x)[1], y).backward()
        opt.step()
    assert appended.bn2.weight.abs().sum() > 0  # the new block's scale moved at once
    assert appended.conv2.weight.grad.abs().sum() > 0  # and its convolutions learn
    stem = new.backbone.stem[0].weight
    copies = [i for i in range(4) if torch.allclose(stem[4], stem[i], atol=1e-3)]
    assert not copies  # a replica no longer equals its original: symmetry is broken


def test_resnet_inheritance_refuses_what_it_cannot_preserve() -> None:
    old = resnet(6, 4)
    for new in (
        resnet(4, 4),  # narrower
        resnet(6, 3),  # shallower
        resnet(6, 4, (1, 10, 10)),  # other inputs
        EmbeddingNet((1, 8, 8), 5, 8, {"kind": "mlp", "width": 16, "depth": 2}),
    ):
        before = {k: v.clone() for k, v in new.state_dict().items()}
        assert not inherit_weights(new, old)
        assert all(torch.equal(before[k], v) for k, v in new.state_dict().items())
    # a stage more changes resolution and channels: no function-preserving start
    assert not inherit_weights(resnet(4, 3), resnet(4, 2))


def test_resnet_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    model = trained_bn(resnet(4, 4, head="fixed"), x)
    path = tmp_path / "resnet.pt"
    loaded = load_model(path, save_model(model, path))  # torch.load(weights_only=True)
    assert loaded.config == model.config
    assert loaded.config["architecture"] == {
        "kind": "resnet",
        "width": 4,
        "depth": 4,
        "head": "fixed",
    }
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])


# --------------------------------------------------------------------------- augmentation


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_augmentation_keeps_shapes_and_leaves_features_alone() -> None:
    x = torch.rand(16, 3, 12, 12)
    for mode in ("crop", "crop+flip", "none"):
        out = augment_batch(x, mode, _gen())
        assert out.shape == x.shape and out.dtype == x.dtype
    assert augment_batch(x, "none", _gen()) is x
    feats = torch.rand(16, 49)
    assert augment_batch(feats, "crop+flip", _gen()) is feats  # 1-D items: untouched
    a, b = augment_batch(x, "crop+flip", _gen(3)), augment_batch(x, "crop+flip", _gen(3))
    assert torch.equal(a, b)  # the generator decides, nothing else
    assert not torch.equal(a, x)


CROP_TRAINING = """
import torch, torch.nn.functional as F
from workers.learning.models import EmbeddingNet
from workers.learning.train import augment_batch
torch.set_num_threads(2)
torch.manual_seed(0)
m = EmbeddingNet((1, 28, 28), 20, 64, {"kind": "resnet", "width": 12, "depth": 3})
opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
for n in [128] * 18 + [27]:
    e, logits = m(augment_batch(torch.rand(n, 1, 28, 28), "crop"))
    loss = F.cross_entropy(logits, torch.randint(0, 7, (n,)))
    opt.zero_grad()
    loss.backward()
    opt.step()
print("trained")
"""


@pytest.mark.slow  # trains in a subprocess: ~10 s on 2 cores
def test_cropped_one_channel_batches_have_standard_strides_and_train() -> None:
    """A one-channel crop once came back permuted, with a channel stride of 1: oneDNN's
    two-thread convolution backward then aborted with "double free or corruption"."""
    import subprocess
    import sys

    for c in (1, 3):
        out = augment_batch(torch.rand(5, c, 28, 28), "crop+flip", _gen())
        assert out.stride() == (c * 28 * 28, 28 * 28, 28, 1)
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run(
        [sys.executable, "-c", CROP_TRAINING], cwd=root, capture_output=True, text=True
    )
    assert run.returncode == 0 and "trained" in run.stdout, run.stderr[-2000:]


def test_crop_with_padding_zero_is_the_identity() -> None:
    x = torch.rand(32, 1, 8, 8)
    assert torch.equal(augment_batch(x, "crop", _gen(), pad=0), x)


def test_crop_is_a_shift_within_the_padding() -> None:
    x = torch.rand(64, 1, 6, 6) + 0.5  # no zeros inside: the padding shows where it went
    out = augment_batch(x, "crop", _gen(), pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    shifts = set()
    for n in range(len(x)):
        match = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(out[n], padded[n, :, dy : dy + 6, dx : dx + 6])
        ]
        assert len(match) == 1
        shifts.add(match[0])
    assert len(shifts) > 10  # the offsets vary over the batch


def test_without_flip_never_mirrors_with_flip_sometimes() -> None:
    # one bright pixel in column 1 of 8; a crop (pad 1) moves it to columns 0..2 at most,
    # a mirror would put it in columns 5..7
    x = torch.zeros(256, 1, 8, 8)
    x[:, 0, 4, 1] = 1.0
    for seed in range(4):
        cols = augment_batch(x, "crop", _gen(seed), pad=1).sum(dim=(1, 2)).argmax(dim=1)
        assert cols.max() <= 2
    mirrored = augment_batch(x, "crop+flip", _gen(), pad=1).sum(dim=(1, 2)).argmax(dim=1)
    share = (mirrored >= 5).float().mean().item()
    assert 0.35 < share < 0.65  # about half are mirrored
    pad0 = augment_batch(x, "crop+flip", _gen(), pad=0)
    assert set(pad0.sum(dim=(1, 2)).argmax(dim=1).tolist()) == {1, 6}  # exactly: 7 - 1


def test_augmentation_rule() -> None:
    cnn, mlp = {"kind": "resnet"}, {"kind": "mlp"}
    img = (1, 28, 28)
    assert resolve_augment("auto", img, cnn, "fashion-mnist") == "crop+flip"
    assert resolve_augment("auto", (3, 32, 32), cnn, "cifar10:/data/c") == "crop+flip"
    assert resolve_augment("auto", (1, 8, 8), cnn, "digits") == "crop"  # a 2 is no mirrored 2
    assert resolve_augment("auto", img, cnn, "imagefolder:/photos") == "crop"  # grey: unknown
    assert resolve_augment("auto", img, cnn, None) == "crop"
    # colour photographs: a mirrored cat is a cat (crop, where a team says it is not)
    assert resolve_augment("auto", (3, 32, 32), cnn, "imagefolder:/photos") == "crop+flip"
    assert resolve_augment("auto", (3, 32, 32), {"kind": "import"}, None) == "crop+flip"
    assert resolve_augment("crop", (3, 32, 32), cnn, "imagefolder:/photos") == "crop"
    assert resolve_augment("auto", img, mlp, "fashion-mnist") == "none"  # pixels as features
    assert resolve_augment("auto", img, {"kind": "cnn"}, "fashion-mnist") == "none"
    assert resolve_augment("crop+flip", img, mlp, "digits") == "crop+flip"  # asked for
    assert resolve_augment("crop", (49,), cnn, "parquet:/f") == "none"  # features: never
    with pytest.raises(ValueError, match="unknown augment 'rotate'"):
        resolve_augment("rotate", img, cnn, None)
    assert [crop_padding(s, s) for s in (4, 8, 28, 32, 96)] == [1, 1, 3, 4, 4]

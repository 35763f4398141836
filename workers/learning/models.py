"""A small embedding model: backbone -> L2-normalised embedding -> cosine classifier head.

The architecture (``kind``, ``width``, ``depth``) may change between generations; the
embedding dimension stays fixed so that embeddings of all generations are comparable.
Checkpoints hold only tensors and plain values, loaded with ``weights_only=True``.

Backbones: ``mlp`` (features, or images seen as flat vectors), ``cnn`` (plain conv
layers) and ``resnet``, the default for images: a stem conv, then up to three stages of
basic residual blocks (two 3x3 convs with BatchNorm; the first block of a later stage
halves the resolution with stride 2 and a 1x1 projection shortcut), channels ``width``,
``2 width``, ``4 width``, then global average pooling. ``depth`` is the number of
residual blocks, spread over ``min(3, depth)`` stages, extra blocks in the later stages
(3: 1-1-1, 4: 1-1-2, 5: 1-2-2, 6: 2-2-2).

A generation can start as a function-preserving expansion of its ancestor
(:func:`inherit_weights`): an MLP as wide and deep or more, or a residual net as wide
and deep or more with the same number of stages (channels widened as in Net2Net, new
blocks appended whose last BatchNorm scale is zero: the identity).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from store.files import CheckpointError as CheckpointError  # re-exported: callers catch it
from store.files import file_sha256, verify_checkpoint

LOGIT_SCALE = 16.0  # cosine-classifier temperature, shared by every generation


def fixed_prototypes(num_classes: int, embed_dim: int) -> torch.Tensor:
    """Class directions shared by every generation (a stationary head, after CoReS).

    Orthonormal rows when ``embed_dim >= num_classes`` (seeded QR), so classes a
    generation has not seen yet already own a direction that later ones will use.
    """
    g = torch.Generator().manual_seed(0)
    a = torch.randn(max(embed_dim, num_classes), embed_dim, generator=g)
    q, _ = torch.linalg.qr(a.T if embed_dim >= num_classes else a)
    w = q.T[:num_classes] if embed_dim >= num_classes else q[:num_classes]
    return F.normalize(w, dim=1)


class CosineHead(nn.Module):
    """Logits = s * cos(embedding, class weight): heads of any generation apply to any embedding.

    ``fixed=True`` freezes the weights at :func:`fixed_prototypes` (a stationary head).
    """

    def __init__(self, embed_dim: int, num_classes: int, fixed: bool = False) -> None:
        super().__init__()
        if fixed:
            weight = fixed_prototypes(num_classes, embed_dim)
        else:
            weight = torch.randn(num_classes, embed_dim) / math.sqrt(embed_dim)
        self.weight = nn.Parameter(weight, requires_grad=not fixed)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return cosine_logits(emb, self.weight)


def cosine_logits(
    emb: torch.Tensor, weight: torch.Tensor, scale: float = LOGIT_SCALE
) -> torch.Tensor:
    """(n, d) embeddings and (C, d) heads -> (n, C) scaled cosine logits; stacked, (K, n, d)
    and (K, C, d) -> (K, n, C)."""
    return scale * F.normalize(emb, dim=-1) @ F.normalize(weight, dim=-1).transpose(-2, -1)


KINDS = ("mlp", "cnn", "resnet", "import")


def import_factory(path: str) -> Any:
    """The callable named ``module:function`` (a team's own backbone factory)."""
    import importlib

    module, _, name = str(path).partition(":")
    if not module or not name:
        raise ValueError(f"architecture factory {path!r}: give it as 'module:function'")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"architecture factory {path!r} does not import ({exc}); install its package or "
            "put it on PYTHONPATH on every machine that trains or embeds"
        ) from None
    if not callable(factory):
        raise ValueError(f"architecture factory {path!r} is not callable")
    return factory


def _imported_backbone(
    input_shape: tuple[int, ...], factory: str, options: dict[str, Any]
) -> tuple[nn.Module, int]:
    """``factory(input_shape=..., **options)``: a module mapping a batch of inputs to
    ``(N, features)``; its feature count is read off one forward pass of zeros."""
    net = import_factory(factory)(input_shape=tuple(input_shape), **options)
    if not isinstance(net, nn.Module):
        raise ValueError(
            f"architecture factory {factory!r} returned {type(net).__name__}, not a torch.nn.Module"
        )
    was = net.training
    net.eval()
    with torch.no_grad():
        out = net(torch.zeros(2, *input_shape))
    net.train(was)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"architecture factory {factory!r}: its module maps a batch of shape "
            f"{(2, *input_shape)} to {shape}; it must return (batch, features)"
        )
    return net, int(out.shape[1])


def resnet_blocks(depth: int) -> list[int]:
    """Residual blocks per stage: ``depth`` blocks over ``min(3, depth)`` stages, the
    extra ones in the later stages (3: [1, 1, 1], 4: [1, 1, 2], 5: [1, 2, 2])."""
    if depth < 1:
        raise ValueError(f"a resnet needs depth >= 1 (residual blocks), got {depth}")
    stages = min(3, depth)
    base, extra = divmod(depth, stages)
    return [base + (s >= stages - extra) for s in range(stages)]


def resnet_channels(width: int, depth: int) -> list[int]:
    """Channels per stage: ``width``, doubled at each later stage."""
    return [width * 2**s for s in range(len(resnet_blocks(depth)))]


class BasicBlock(nn.Module):
    """x -> relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); the shortcut is the
    identity, or a 1x1 conv + BatchNorm where the block changes stride or channels."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNetBackbone(nn.Module):
    """stem (3x3 conv, BN, ReLU) -> stages of :class:`BasicBlock` -> global average pool."""

    def __init__(self, in_channels: int, width: int, depth: int) -> None:
        super().__init__()
        channels = resnet_channels(width, depth)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        stages, c_in = [], width
        for s, (n, c) in enumerate(zip(resnet_blocks(depth), channels, strict=True)):
            blocks = [
                BasicBlock(c_in if b == 0 else c, c, 2 if s > 0 and b == 0 else 1) for b in range(n)
            ]
            stages.append(nn.Sequential(*blocks))
            c_in = c
        self.stages = nn.Sequential(*stages)
        self.out_features = channels[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x)).mean(dim=(2, 3))


def _backbone(
    input_shape: tuple[int, ...], kind: str, width: int, depth: int
) -> tuple[nn.Module, int]:
    """The backbone and the size of its output."""
    if kind in ("cnn", "resnet") and len(input_shape) != 3:
        raise ValueError(f"a {kind} needs (C, H, W) inputs, got shape {input_shape}")
    if kind == "mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = math.prod(input_shape)
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), nn.BatchNorm1d(width), nn.ReLU()]
            fan_in = width
        return nn.Sequential(*layers), width
    if kind == "cnn":
        layers = []
        channels, side = input_shape[0], min(input_shape[1:])
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            if side >= 8:
                layers.append(nn.MaxPool2d(2))
                side //= 2
            channels = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        return nn.Sequential(*layers), width
    if kind == "resnet":
        net = ResNetBackbone(input_shape[0], width, depth)
        return net, net.out_features
    raise ValueError(f"unknown architecture kind {kind!r}; use one of {', '.join(KINDS)}")


def is_convolutional(architecture: dict[str, Any]) -> bool:
    """Whether the architecture sees images as images (a cnn, a resnet, or a team's own
    backbone, which is given them as they are), not as vectors."""
    return architecture.get("kind", "mlp") in ("cnn", "resnet", "import")


class EmbeddingNet(nn.Module):
    """backbone -> linear -> L2-normalised embedding (dim d) -> cosine head."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        embed_dim: int,
        architecture: dict[str, Any],
    ) -> None:
        super().__init__()
        kind = architecture.get("kind", "mlp")
        head = architecture.get("head", "learned")
        if head not in ("learned", "fixed"):
            raise ValueError(f"unknown head {head!r}; use 'learned' or 'fixed'")
        if kind == "import":  # a team's own backbone; graceful adds projection and head
            arch = {
                "kind": kind,
                "factory": str(architecture.get("factory", "")),
                "options": dict(architecture.get("options") or {}),
                "head": head,
            }
            self.backbone, features = _imported_backbone(
                tuple(input_shape), arch["factory"], arch["options"]
            )
        else:
            width, depth = int(architecture.get("width", 128)), int(architecture.get("depth", 2))
            arch = {"kind": kind, "width": width, "depth": depth, "head": head}
            self.backbone, features = _backbone(tuple(input_shape), kind, width, depth)
        self.config = {
            "input_shape": list(input_shape),
            "num_classes": int(num_classes),
            "embed_dim": int(embed_dim),
            "architecture": arch,
        }
        self.project = nn.Linear(features, embed_dim)
        self.head = CosineHead(embed_dim, num_classes, fixed=head == "fixed")
        if len(input_shape) == 3:
            # per-channel input normalisation, measured on the first generation's training
            # items and carried by every checkpoint, so whatever embeds with the model
            # (evaluation, indexing, search, backfill) normalises as training did;
            # identity until set (checkpoints from before it load as identity)
            channels = int(input_shape[0])
            self.register_buffer("input_mean", torch.zeros(channels, 1, 1))
            self.register_buffer("input_std", torch.ones(channels, 1, 1))

    def set_input_stats(self, mean: Any, std: Any) -> None:
        """Per-channel mean and standard deviation of the inputs (images only)."""
        if hasattr(self, "input_mean"):
            with torch.no_grad():
                self.input_mean.copy_(torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1))
                self.input_std.copy_(torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's output for raw inputs (normalised here)."""
        if hasattr(self, "input_mean"):
            x = (x - self.input_mean) / self.input_std
        return self.backbone(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.project(self.features(x)), dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.embed(x)
        return emb, self.head(emb)


def save_model(model: EmbeddingNet, path: Path) -> str:
    """Write the model atomically; returns the file's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"config": model.config, "state_dict": model.state_dict()}, tmp)
    tmp.replace(path)
    return file_sha256(path)


def load_model(path: str | Path, sha256: str | None = None) -> EmbeddingNet:
    """Load a checkpoint safely (``weights_only``), checking its hash against the lineage."""
    path = verify_checkpoint(path, sha256)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot load checkpoint {path}: {exc}") from exc
    cfg = blob["config"]
    model = EmbeddingNet(
        tuple(cfg["input_shape"]), cfg["num_classes"], cfg["embed_dim"], cfg["architecture"]
    )
    # checkpoints from before the input normalisation lack its buffers: the identity
    own = {k: v for k, v in model.state_dict().items() if k in ("input_mean", "input_std")}
    model.load_state_dict(own | dict(blob["state_dict"]))
    model.eval()
    return model


@torch.no_grad()
def inherit_weights(new: EmbeddingNet, old: EmbeddingNet, x: torch.Tensor | None = None) -> bool:
    """Start ``new`` as a function-preserving expansion of ``old`` (after Net2Net).

    Both must be of one kind, as wide and as deep or more, with the same embedding
    dimension, classes and input shape; returns False, leaving ``new`` untouched, when
    they are not. In eval mode ``new`` then computes what ``old`` did:

    - ``mlp``: the old units keep their weights, new units keep their fresh incoming
      weights and get zero weights into old units (they change nothing until trained),
      and extra layers start as identities on the old layers' output (BatchNorm set from
      its statistics on ``x``);
    - ``resnet`` (same number of stages): :func:`_inherit_resnet`.
    """
    a_new, a_old = new.config["architecture"], old.config["architecture"]
    if a_new["kind"] == "import" or a_old["kind"] == "import":
        return _inherit_imported(new, old)
    if (
        a_new["kind"] != a_old["kind"]
        or a_new["kind"] not in ("mlp", "resnet")
        or a_new["width"] < a_old["width"]
        or a_new["depth"] < a_old["depth"]
        or new.config["embed_dim"] != old.config["embed_dim"]
        or new.config["num_classes"] != old.config["num_classes"]
        or new.config["input_shape"] != old.config["input_shape"]
        # a resnet's new stage would change resolution and channels
        or a_new["kind"] == "resnet"
        and len(resnet_blocks(a_new["depth"])) != len(resnet_blocks(a_old["depth"]))
    ):
        return False
    if hasattr(new, "input_mean"):  # the ancestor's normalisation, or its function changes
        new.set_input_stats(old.input_mean, old.input_std)
    if a_new["kind"] == "resnet":
        _inherit_resnet(new, old)
        new.head.weight.copy_(old.head.weight)
        return True
    w_old, d_old = a_old["width"], a_old["depth"]
    new_lin = [m for m in new.backbone if isinstance(m, nn.Linear)]
    new_bn = [m for m in new.backbone if isinstance(m, nn.BatchNorm1d)]
    old_lin = [m for m in old.backbone if isinstance(m, nn.Linear)]
    old_bn = [m for m in old.backbone if isinstance(m, nn.BatchNorm1d)]
    for i in range(d_old):
        lin, o = new_lin[i], old_lin[i]
        fan = o.weight.shape[1]
        lin.weight[:w_old, :fan] = o.weight
        lin.weight[:w_old, fan:] = 0.0  # new units of the layer below do not reach old units
        lin.bias[:w_old] = o.bias
        _copy_bn(new_bn[i], old_bn[i], w_old)
    if len(new_lin) > d_old:
        # the old backbone's output h >= 0 (after ReLU); Linear = identity, BatchNorm
        # undoing its own normalisation with h's statistics, ReLU(h) = h
        old.eval()
        h = old.features(x) if x is not None and len(x) > 1 else None
        mean = h.mean(0) if h is not None else torch.zeros(w_old)
        var = h.var(0, unbiased=False) if h is not None else torch.ones(w_old)
        for i in range(d_old, len(new_lin)):
            lin, bn = new_lin[i], new_bn[i]
            # old units: the identity on the old units below; new units keep their fresh
            # weights (so they are alive and learn) and reach no old unit above
            lin.weight[:w_old] = 0.0
            lin.weight[:w_old, :w_old] = torch.eye(w_old)
            lin.bias[:w_old] = 0.0
            bn.weight[:w_old] = torch.sqrt(var + bn.eps)
            bn.bias[:w_old] = mean
            bn.running_mean[:w_old] = mean
            bn.running_var[:w_old] = var
    new.project.weight.zero_()
    new.project.weight[:, :w_old] = old.project.weight
    new.project.bias.copy_(old.project.bias)
    new.head.weight.copy_(old.head.weight)
    return True


def _inherit_imported(new: EmbeddingNet, old: EmbeddingNet) -> bool:
    """A team's own backbone starts from its ancestor's weights when both are built by the
    same factory with the same options (the same function, exactly), or when the new
    backbone says how by a method ``grow_from(old_backbone) -> bool``: it returns True
    when its first features now compute the old backbone's features (any added ones
    after them); the projection then reads the old features with the old weights and the
    added ones with zero weights, so the embedding is the ancestor's. Otherwise False:
    it trains from scratch."""
    if dict(new.config, architecture=None) != dict(old.config, architecture=None):
        return False
    if new.config["architecture"] == old.config["architecture"]:
        new.load_state_dict(old.state_dict())
        return True
    f_old = old.project.weight.shape[1]
    if new.project.weight.shape[1] < f_old:  # fewer features than the ancestor's to read
        return False
    grow = getattr(new.backbone, "grow_from", None)
    if not callable(grow) or not grow(old.backbone):
        return False
    if hasattr(new, "input_mean"):
        new.set_input_stats(old.input_mean, old.input_std)
    new.project.weight.zero_()
    new.project.weight[:, :f_old] = old.project.weight
    new.project.bias.copy_(old.project.bias)
    new.head.weight.copy_(old.head.weight)
    return True


def _copy_bn(new: nn.BatchNorm1d, old: nn.BatchNorm1d, n: int) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(new, name)[:n] = getattr(old, name)
    new.num_batches_tracked.copy_(old.num_batches_tracked)


class _Widen:
    """A Net2Net channel mapping from ``c_old`` to ``c_new >= c_old`` channels.

    New channel j copies old channel ``g[j]`` (``g[j] = j`` for the old ones, a random
    old channel for the added ones). A layer reading the widened channels weighs replica
    j of old channel i by ``share[j]``; the shares of i's replicas are random, positive
    and sum to 1, so the sum is what the old layer computed, and replicas, which start
    with equal incoming weights, get different gradients and drift apart.
    """

    def __init__(self, c_old: int, c_new: int, gen: torch.Generator) -> None:
        extra = torch.randint(0, c_old, (c_new - c_old,), generator=gen)
        self.g = torch.cat([torch.arange(c_old), extra])
        u = torch.rand(c_new, generator=gen, dtype=torch.float64) + 0.5
        total = torch.zeros(c_old, dtype=torch.float64).index_add_(0, self.g, u)
        self.share = (u / total[self.g]).float()


def _widen_conv(new: nn.Conv2d, old: nn.Conv2d, w_in: _Widen, w_out: _Widen) -> None:
    """Outgoing filters replicate the old ones; inputs are weighed by their shares."""
    w = old.weight[w_out.g.to(old.weight.device)][:, w_in.g.to(old.weight.device)]
    new.weight.copy_(w * w_in.share.to(w)[None, :, None, None])


def _widen_bn(new: nn.BatchNorm2d, old: nn.BatchNorm2d, w_out: _Widen) -> None:
    g = w_out.g.to(old.weight.device)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(new, name).copy_(getattr(old, name)[g])
    new.num_batches_tracked.copy_(old.num_batches_tracked)


def _inherit_resnet(new: EmbeddingNet, old: EmbeddingNet) -> None:
    """Net2Net for a residual net with the same stages, as wide and as deep or more.

    Every stage's residual stream has one channel mapping (the skip connections add
    stream channels to stream channels); each block's inner channels have their own.
    Blocks the old net lacks are appended at the end of their stage with the last
    BatchNorm's scale and shift at zero: the residual branch outputs 0 and the block
    is relu(0 + x) = x, since x, a ReLU's output, is >= 0. Its scale gets a gradient at
    once, so the block starts learning with the first step.
    """
    a_new, a_old = new.config["architecture"], old.config["architecture"]
    gen = torch.Generator().manual_seed(0)  # the expansion is reproducible
    c_old = resnet_channels(a_old["width"], a_old["depth"])
    c_new = resnet_channels(a_new["width"], a_new["depth"])
    streams = [_Widen(o, n, gen) for o, n in zip(c_old, c_new, strict=True)]
    nb, ob = new.backbone, old.backbone
    assert isinstance(nb, ResNetBackbone) and isinstance(ob, ResNetBackbone)
    # the image's channels as they are: c to c channels, every share u / u = 1 exactly
    image = _Widen(nb.stem[0].in_channels, nb.stem[0].in_channels, torch.Generator())
    _widen_conv(nb.stem[0], ob.stem[0], image, streams[0])
    _widen_bn(nb.stem[1], ob.stem[1], streams[0])
    below = streams[0]
    for s, (new_stage, old_stage) in enumerate(zip(nb.stages, ob.stages, strict=True)):
        stream = streams[s]
        for b, block in enumerate(new_stage):
            if b >= len(old_stage):  # an appended block: the identity
                block.bn2.weight.zero_()
                block.bn2.bias.zero_()
                continue
            o = old_stage[b]
            inner = _Widen(o.conv1.out_channels, block.conv1.out_channels, gen)
            into = below if b == 0 else stream
            _widen_conv(block.conv1, o.conv1, into, inner)
            _widen_bn(block.bn1, o.bn1, inner)
            _widen_conv(block.conv2, o.conv2, inner, stream)
            _widen_bn(block.bn2, o.bn2, stream)
            if block.shortcut is not None:
                _widen_conv(block.shortcut[0], o.shortcut[0], into, stream)
                _widen_bn(block.shortcut[1], o.shortcut[1], stream)
        below = stream
    last = streams[-1]
    g = last.g.to(old.project.weight.device)
    new.project.weight.copy_(old.project.weight[:, g] * last.share.to(old.project.weight)[None])
    new.project.bias.copy_(old.project.bias)

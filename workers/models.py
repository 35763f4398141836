"""A small embedding model: backbone -> L2-normalised embedding -> cosine classifier head.

The architecture (``kind``, ``width``, ``depth``) may change between generations; the
embedding dimension stays fixed so that embeddings of all generations are comparable.
Checkpoints hold only tensors and plain values, loaded with ``weights_only=True``.
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

    def __init__(
        self, embed_dim: int, num_classes: int, scale: float = LOGIT_SCALE, fixed: bool = False
    ) -> None:
        super().__init__()
        if fixed:
            weight = fixed_prototypes(num_classes, embed_dim)
        else:
            weight = torch.randn(num_classes, embed_dim) / math.sqrt(embed_dim)
        self.weight = nn.Parameter(weight, requires_grad=not fixed)
        self.scale = scale

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return cosine_logits(emb, self.weight, self.scale)


def cosine_logits(
    emb: torch.Tensor, weight: torch.Tensor, scale: float = LOGIT_SCALE
) -> torch.Tensor:
    return scale * F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).T


def _backbone(input_shape: tuple[int, ...], kind: str, width: int, depth: int) -> nn.Module:
    if kind == "mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = math.prod(input_shape)
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), nn.BatchNorm1d(width), nn.ReLU()]
            fan_in = width
        return nn.Sequential(*layers)
    if kind == "cnn":
        if len(input_shape) != 3:
            raise ValueError(f"a cnn needs (C, H, W) inputs, got shape {input_shape}")
        layers = []
        channels, side = input_shape[0], min(input_shape[1:])
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            if side >= 8:
                layers.append(nn.MaxPool2d(2))
                side //= 2
            channels = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        return nn.Sequential(*layers)
    raise ValueError(f"unknown architecture kind {kind!r}; use 'mlp' or 'cnn'")


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
        width, depth = int(architecture.get("width", 128)), int(architecture.get("depth", 2))
        head = architecture.get("head", "learned")
        if head not in ("learned", "fixed"):
            raise ValueError(f"unknown head {head!r}; use 'learned' or 'fixed'")
        self.config = {
            "input_shape": list(input_shape),
            "num_classes": int(num_classes),
            "embed_dim": int(embed_dim),
            "architecture": {"kind": kind, "width": width, "depth": depth, "head": head},
        }
        self.backbone = _backbone(tuple(input_shape), kind, width, depth)
        self.project = nn.Linear(width, embed_dim)
        self.head = CosineHead(embed_dim, num_classes, fixed=head == "fixed")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.project(self.backbone(x)), dim=1)

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
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return model


@torch.no_grad()
def inherit_weights(new: EmbeddingNet, old: EmbeddingNet, x: torch.Tensor | None = None) -> bool:
    """Start ``new`` as a function-preserving expansion of ``old`` (after Net2Net).

    Works for MLPs that are as wide and as deep or more: the old units keep their weights,
    new units keep their fresh incoming weights and get zero weights into old units (they
    change nothing until trained), and extra layers start as identities on the old
    layers' output (BatchNorm set from its statistics on ``x``). Returns False, leaving
    ``new`` untouched, when the architectures do not allow it (another kind, narrower,
    shallower, other dimensions).
    """
    a_new, a_old = new.config["architecture"], old.config["architecture"]
    if (
        a_new["kind"] != "mlp"
        or a_old["kind"] != "mlp"
        or a_new["width"] < a_old["width"]
        or a_new["depth"] < a_old["depth"]
        or new.config["embed_dim"] != old.config["embed_dim"]
        or new.config["num_classes"] != old.config["num_classes"]
        or new.config["input_shape"] != old.config["input_shape"]
    ):
        return False
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
        h = old.backbone(x) if x is not None and len(x) > 1 else None
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


def _copy_bn(new: nn.BatchNorm1d, old: nn.BatchNorm1d, n: int) -> None:
    new.weight[:n] = old.weight
    new.bias[:n] = old.bias
    new.running_mean[:n] = old.running_mean
    new.running_var[:n] = old.running_var
    new.num_batches_tracked.copy_(old.num_batches_tracked)

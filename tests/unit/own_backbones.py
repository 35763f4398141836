"""Backbone factories a team might bring (imported by path in tests/unit/test_own_model.py)."""

from __future__ import annotations

import torch
from torch import nn


class TinyConv(nn.Module):
    """conv -> ReLU -> global average pool: (N, C, H, W) -> (N, width)."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, width, 3, padding=1)
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3))

    def grow_from(self, old: nn.Module) -> bool:
        """Wider: the old filters come first (the added ones keep their fresh weights)."""
        if not isinstance(old, TinyConv) or old.width > self.width:
            return False
        with torch.no_grad():
            self.conv.weight[: old.width] = old.conv.weight
            self.conv.bias[: old.width] = old.conv.bias
        return True


def tiny_conv(input_shape: tuple[int, ...], width: int = 8) -> nn.Module:
    return TinyConv(input_shape[0], width)


def flat_vector(input_shape: tuple[int, ...]) -> nn.Module:
    """Returns (N, C, H, W) unchanged: not a feature vector."""
    return nn.Identity()


def not_a_module(input_shape: tuple[int, ...]) -> str:
    return "a string"


class OverEagerConv(TinyConv):
    """Says it grew from any ancestor, even a wider one (a team's bug graceful guards)."""

    def grow_from(self, old: nn.Module) -> bool:
        return True


def over_eager_conv(input_shape: tuple[int, ...], width: int = 8) -> nn.Module:
    return OverEagerConv(input_shape[0], width)

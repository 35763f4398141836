"""The compatibility losses on hand-computed cases.

Embeddings and head rows sit on the coordinate axes, so every cosine is 0 or 1 and the
logits are ``scale * cos``: each expected value below is worked out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from workers.learning.losses import (
    contrastive_compatibility_loss,
    embedding_distillation_loss,
    focal_distillation_loss,
    influence_loss,
)
from workers.learning.models import LOGIT_SCALE

E = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # two new embeddings, on the axes
HEAD = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # old head rows along the axes (norm ignored)
SWAPPED = HEAD.flip(0)  # row 0 along y, row 1 along x

# log(1 + e^-1): CE when the right class has cos 1 and the other cos 0 (scale 1)
RIGHT = math.log(1 + math.exp(-1))  # 0.313262
# log(1 + e^1): CE when the right class has cos 0 and the other cos 1
WRONG = math.log(1 + math.exp(1))  # 1.313262


def test_influence_loss_on_axes() -> None:
    # labels [0, 1]: item 0 -> logits (1, 0), CE = log(1 + e^-1); item 1 -> logits (0, 1), same
    labels = torch.tensor([0, 1])
    assert influence_loss(E, HEAD, labels, scale=1.0).item() == pytest.approx(RIGHT, abs=1e-6)
    # the swapped head judges both items wrong: logits (0, 1) for label 0, (1, 0) for label 1
    assert influence_loss(E, SWAPPED, labels, scale=1.0).item() == pytest.approx(WRONG, abs=1e-6)
    # labels [0, 0]: item 0 right (RIGHT), item 1 wrong (WRONG); mean = (RIGHT + WRONG) / 2
    both = influence_loss(E, HEAD, torch.tensor([0, 0]), scale=1.0).item()
    assert both == pytest.approx((RIGHT + WRONG) / 2, abs=1e-6)  # 0.813262
    # a mask drops item 1; the mean stays over both items: RIGHT / 2
    masked = influence_loss(E, HEAD, torch.tensor([0, 0]), 1.0, torch.tensor([True, False]))
    assert masked.item() == pytest.approx(RIGHT / 2, abs=1e-6)


def test_influence_loss_three_classes_and_default_scale() -> None:
    # d = 3, head = identity, item (1, 0, 0) with label 0, scale 1: logits (1, 0, 0)
    # CE = -log(e / (e + 2)) = log(1 + 2/e) = 0.551445
    head = torch.eye(3)
    loss = influence_loss(torch.tensor([[1.0, 0.0, 0.0]]), head, torch.tensor([0]), scale=1.0)
    assert loss.item() == pytest.approx(math.log(1 + 2 / math.e), abs=1e-6)
    # the default scale is the heads' LOGIT_SCALE (16): item (0, 1, 0) with label 0 has
    # logits (0, 16, 0), CE = log(1 + e^16 + 1) = 16.0000002
    loss = influence_loss(torch.tensor([[0.0, 1.0, 0.0]]), head, torch.tensor([0]))
    assert loss.item() == pytest.approx(math.log(2 + math.exp(LOGIT_SCALE)), rel=1e-6)


def test_influence_loss_stacked_ancestors_give_one_loss_each() -> None:
    labels = torch.tensor([0, 1])
    per = influence_loss(E, torch.stack([HEAD, SWAPPED]), labels, scale=1.0)
    assert per.shape == (2,)
    assert per.tolist() == pytest.approx([RIGHT, WRONG], abs=1e-6)
    # a (K, n) mask: ancestor 0 judges only item 0, ancestor 1 only item 1
    mask = torch.tensor([[True, False], [False, True]])
    per = influence_loss(E, torch.stack([HEAD, SWAPPED]), labels, 1.0, mask)
    assert per.tolist() == pytest.approx([RIGHT / 2, WRONG / 2], abs=1e-6)


# Focal distillation, T = 1: old logits (ln 3, 0) -> p_old = (3/4, 1/4); new logits (0, 0)
# -> p_new = (1/2, 1/2); KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.304099 - 0.173287 = 0.130812.
# Item 1 mirrors it: old (0, ln 3), new (0, 0): the same KL.
KL1 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
NEW = torch.zeros(2, 2)
OLD = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]])


def test_focal_distillation_weights_old_right_items() -> None:
    right = torch.tensor([True, False])  # the old model was right on item 0 only
    # weights alpha + beta*1[right] = (1 + 5, 1) = (6, 1): mean = (6 + 1) * KL / 2
    loss = focal_distillation_loss(NEW, OLD, right, alpha=1.0, beta=5.0, temperature=1.0)
    assert loss.item() == pytest.approx(7 * KL1 / 2, abs=1e-6)  # 0.457842
    # alpha 0, beta 1: only old-right items count: KL / 2
    loss = focal_distillation_loss(NEW, OLD, right, alpha=0.0, beta=1.0, temperature=1.0)
    assert loss.item() == pytest.approx(KL1 / 2, abs=1e-6)
    # identical logits: nothing to distil
    assert focal_distillation_loss(OLD, OLD, right, temperature=1.0).item() == pytest.approx(0)


def test_focal_distillation_temperature() -> None:
    # T = 2: old (ln 3 / 2, 0) -> p_old = (sqrt3, 1) / (sqrt3 + 1) = (0.633975, 0.366025)
    # KL = 0.633975 ln(1.267949) + 0.366025 ln(0.732051) = 0.150503 - 0.114165 = 0.036341;
    # times T^2 = 4
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    kl2 = p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))
    assert kl2 == pytest.approx(0.036341, abs=1e-6)
    right = torch.tensor([True, True])  # both weighted alpha + beta = 6
    loss = focal_distillation_loss(NEW, OLD, right, alpha=1.0, beta=5.0, temperature=2.0)
    assert loss.item() == pytest.approx(6 * kl2 * 4, abs=1e-6)  # mean of two equal items


def test_focal_distillation_known_mask_and_stacking() -> None:
    right = torch.tensor([True, False])
    # known = (1, 0): item 1 (a class the old model never saw) is dropped: 6 * KL / 2
    loss = focal_distillation_loss(
        NEW, OLD, right, 1.0, 5.0, 1.0, known=torch.tensor([True, False])
    )
    assert loss.item() == pytest.approx(6 * KL1 / 2, abs=1e-6)  # 0.392436
    loss = focal_distillation_loss(
        NEW, OLD, right, 1.0, 5.0, 1.0, known=torch.tensor([False, True])
    )
    assert loss.item() == pytest.approx(KL1 / 2, abs=1e-6)  # 0.065406
    # two ancestors stacked: the second one agrees with the new model everywhere (KL 0)
    per = focal_distillation_loss(
        NEW,
        torch.stack([OLD, NEW]),
        torch.stack([right, right]),
        1.0,
        5.0,
        1.0,
        known=torch.ones(2, 2, dtype=torch.bool),
    )
    assert per.tolist() == pytest.approx([7 * KL1 / 2, 0.0], abs=1e-6)


def test_embedding_distillation() -> None:
    old = torch.tensor([[3.0, 0.0], [1.0, 0.0]])  # item 0 agrees (cos 1), item 1 is 90 deg off
    # 1 - cos: (0, 1); mean 0.5; the mask drops item 1 -> 0
    assert embedding_distillation_loss(E, old).item() == pytest.approx(0.5)
    assert embedding_distillation_loss(E, old, torch.tensor([True, False])).item() == 0.0
    # opposite embeddings: 1 - (-1) = 2
    assert embedding_distillation_loss(E, -E).item() == pytest.approx(2.0)
    per = embedding_distillation_loss(E, torch.stack([old, E]))
    assert per.tolist() == pytest.approx([0.5, 0.0])


def test_stacked_losses_match_one_by_one() -> None:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(7, 4, generator=g)
    logits = torch.randn(7, 3, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    heads = torch.randn(3, 3, 4, generator=g)
    old_logits = torch.randn(3, 7, 3, generator=g)
    right = torch.rand(3, 7, generator=g) > 0.5
    known = torch.rand(3, 7, generator=g) > 0.3
    old_emb = torch.randn(3, 7, 4, generator=g)
    stacked = influence_loss(emb, heads, labels)
    focal = focal_distillation_loss(logits, old_logits, right, 1.0, 5.0, 2.0, known)
    embd = embedding_distillation_loss(emb, old_emb, known)
    for k in range(3):
        assert stacked[k].item() == pytest.approx(influence_loss(emb, heads[k], labels).item())
        one = focal_distillation_loss(logits, old_logits[k], right[k], 1.0, 5.0, 2.0, known[k])
        assert focal[k].item() == pytest.approx(one.item(), rel=1e-5)
        one = embedding_distillation_loss(emb, old_emb[k], known[k])
        assert embd[k].item() == pytest.approx(one.item(), rel=1e-5)


def test_contrastive_compatibility_by_hand() -> None:
    # three items, labels 0 0 1, temperature 1; s_ij = cos(new_i, old_j)
    new = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    old = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0]])  # norms do not matter
    y = torch.tensor([0, 0, 1])
    e = math.e
    # item 0: its own 1, item 1 is of its class (masked), item 2 gives 0: log(e + 1) - 1
    # item 1: its own 0, item 0 masked, item 2 gives 1: log(1 + e) - 0
    # item 2: its own 0, items 0 and 1 (another class) give 1 each: log(1 + 2e) - 0
    per_item = [math.log(e + 1) - 1, math.log(1 + e), math.log(1 + 2 * e)]
    got = contrastive_compatibility_loss(new, old, y, temperature=1.0)
    assert got.item() == pytest.approx(sum(per_item) / 3, rel=1e-6)
    # a mask zeroes item 1; the mean is still over all three
    masked = contrastive_compatibility_loss(
        new, old, y, temperature=1.0, mask=torch.tensor([True, False, True])
    )
    assert masked.item() == pytest.approx((per_item[0] + per_item[2]) / 3, rel=1e-6)
    # temperature 0.5 doubles every similarity: items 1 and 2 alone, each meets the
    # other (another class) at 2 and its own at 0: log(1 + e^2) each
    pair = contrastive_compatibility_loss(new[1:], old[1:], y[1:], temperature=0.5)
    assert pair.item() == pytest.approx((math.log(1 + e**2) + math.log(1 + e**2)) / 2, rel=1e-6)
    # stacked ancestors: one loss each, equal to the single ones
    stacked = contrastive_compatibility_loss(new, torch.stack([old, -old]), y, temperature=1.0)
    assert stacked.shape == (2,)
    assert stacked[0].item() == pytest.approx(got.item(), rel=1e-6)
    alone = contrastive_compatibility_loss(new, -old, y, temperature=1.0)
    assert stacked[1].item() == pytest.approx(alone.item(), rel=1e-6)

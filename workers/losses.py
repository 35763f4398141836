"""The loss terms of compatibility training, each written out.

- ``influence_loss`` (BCT, Shen et al. 2020): the frozen head of an earlier generation
  applied to the new embeddings, cross-entropy on the labels.
- ``focal_distillation_loss`` (PCT, Yan et al. 2021): KL divergence toward the earlier
  generation's logits at temperature T, each sample weighted ``alpha + beta * 1[old right]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.models import LOGIT_SCALE, cosine_logits


def influence_loss(
    new_emb: torch.Tensor,
    old_head: torch.Tensor,
    labels: torch.Tensor,
    scale: float = LOGIT_SCALE,
) -> torch.Tensor:
    """Cross-entropy of the frozen old head (C, d) applied to the new embeddings (n, d)."""
    return F.cross_entropy(cosine_logits(new_emb, old_head, scale), labels)


def focal_distillation_loss(
    new_logits: torch.Tensor,
    old_logits: torch.Tensor,
    old_correct: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 5.0,
    temperature: float = 2.0,
    known: torch.Tensor | None = None,
) -> torch.Tensor:
    """mean_i known_i * (alpha + beta*1[old right on i]) * T^2 * KL(p_old_i^T || p_new_i^T).

    ``known`` (default all ones) masks out items of classes the old generation never
    saw: its logits there only encode a wrong answer, and distilling them costs accuracy.
    """
    t = temperature
    log_p_new = F.log_softmax(new_logits / t, dim=1)
    log_p_old = F.log_softmax(old_logits / t, dim=1)
    kl = (log_p_old.exp() * (log_p_old - log_p_new)).sum(dim=1)
    weight = alpha + beta * old_correct.float()
    if known is not None:
        weight = weight * known.float()
    # T^2 keeps the gradient's size independent of the temperature (Hinton et al.)
    return (weight * kl).mean() * t * t

"""The loss terms of compatibility training, each written out.

- ``influence_loss`` (BCT, Shen et al. 2020): the frozen head of an earlier generation
  applied to the new embeddings, cross-entropy on the labels.
- ``focal_distillation_loss`` (PCT, Yan et al. 2021): KL divergence toward the earlier
  generation's logits at temperature T, each sample weighted ``alpha + beta * 1[old right]``.
- ``embedding_distillation_loss``: ``1 - cos(new embedding, old embedding)`` per item, a
  direct pull of the new embedding space onto the old one (it also constrains the parts
  of the space that no head row describes, e.g. classes neither generation trained on).

Every loss takes one ancestor's tensors, or the tensors of ``K`` ancestors stacked along
a new leading dimension: then it returns one loss per ancestor, shape ``(K,)``, computed
in one batched operation. That is how the training loop keeps ten constraints about as
cheap per step as one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.models import LOGIT_SCALE


def _mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the last (item) dimension; masked-out items count as zeros."""
    if mask is not None:
        values = values * mask.to(values.dtype)
    return values.mean(dim=-1)


def influence_loss(
    new_emb: torch.Tensor,
    old_head: torch.Tensor,
    labels: torch.Tensor,
    scale: float = LOGIT_SCALE,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of the frozen old cosine head applied to the new embeddings.

    ``new_emb`` (n, d); ``old_head`` (C, d) -> a scalar, or (K, C, d) -> (K,).
    ``mask`` ((n,) or (K, n), optional) zeroes the items an ancestor must not judge;
    the mean is still over all n items.
    """
    single = old_head.dim() == 2
    heads = old_head[None] if single else old_head
    # (K, n, C): s * cos(new embedding_i, old class row c)
    logits = scale * F.normalize(new_emb, dim=1) @ F.normalize(heads, dim=2).transpose(1, 2)
    k, n, c = logits.shape
    ce = F.cross_entropy(logits.reshape(k * n, c), labels.repeat(k), reduction="none")
    if mask is not None and single:
        mask = mask[None]
    out = _mean(ce.view(k, n), mask)
    return out[0] if single else out


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

    ``new_logits`` (n, C); ``old_logits`` (n, C) -> a scalar, or (K, n, C) -> (K,), with
    ``old_correct`` and ``known`` shaped (n,) or (K, n) alike. ``known`` (default all
    ones) masks out items of classes the old generation never saw: its logits there only
    encode a wrong answer, and distilling them costs accuracy.
    """
    t = temperature
    log_p_new = F.log_softmax(new_logits / t, dim=-1)
    log_p_old = F.log_softmax(old_logits / t, dim=-1)
    kl = (log_p_old.exp() * (log_p_old - log_p_new)).sum(dim=-1)  # (n,) or (K, n)
    weight = alpha + beta * old_correct.to(kl.dtype)
    # T^2 keeps the gradient's size independent of the temperature (Hinton et al.)
    return _mean(weight * kl, known) * t * t


def embedding_distillation_loss(
    new_emb: torch.Tensor, old_emb: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """mean_i mask_i * (1 - cos(new_i, old_i)).

    ``new_emb`` (n, d); ``old_emb`` (n, d) -> a scalar, or (K, n, d) -> (K,).
    """
    cos = (F.normalize(new_emb, dim=-1) * F.normalize(old_emb, dim=-1)).sum(dim=-1)
    return _mean(1.0 - cos, mask)

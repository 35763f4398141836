"""The loss terms of compatibility training, each written out.

- ``influence_loss`` (BCT, Shen et al. 2020): the frozen head of an earlier generation
  applied to the new embeddings, cross-entropy on the labels.
- ``focal_distillation_loss`` (PCT, Yan et al. 2021): KL divergence toward the earlier
  generation's logits at temperature T, each sample weighted ``alpha + beta * 1[old right]``.
- ``embedding_distillation_loss``: ``1 - cos(new embedding, old embedding)`` per item, a
  direct pull of the new embedding space onto the old one (it also constrains the parts
  of the space that no head row describes, e.g. classes neither generation trained on).
- ``contrastive_compatibility_loss`` (d-Simplex-HOC, Biondi et al. 2024, Eq. 4): InfoNCE
  between each new embedding and the batch's old embeddings, its own as the positive and
  those of other classes as negatives (same-class pairs are masked: they may stay close).
  Beyond the pull of the embedding term it pushes a new embedding away from where the
  ancestor put other classes, which is what a new query meets in an old gallery.

Every loss takes one ancestor's tensors, or the tensors of ``K`` ancestors stacked along
a new leading dimension: then it returns one loss per ancestor, shape ``(K,)``, computed
in one batched operation. That is how the training loop keeps ten constraints about as
cheap per step as one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.learning.models import LOGIT_SCALE, cosine_logits


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
    # (K, n, C): s * cos(new embedding_i, old class row c)
    logits = cosine_logits(new_emb, old_head[None] if single else old_head, scale)
    k, n, c = logits.shape
    ce = F.cross_entropy(logits.reshape(k * n, c), labels.repeat(k), reduction="none")
    out = _mean(ce.view(k, n), mask)  # an (n,) mask broadcasts over K
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


def contrastive_compatibility_loss(
    new_emb: torch.Tensor,
    old_emb: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """mean_i mask_i * (log sum_{j in P(i)} exp(s_ij) - s_ii), s_ij = cos(new_i, old_j) / T.

    P(i) is item i itself and every item of another class: a new embedding (the query
    of a new generation) must find its own old embedding (the old gallery's copy) before
    any old embedding of another class. ``new_emb`` (n, d); ``old_emb`` (n, d) -> a
    scalar, or (K, n, d) -> (K,); ``labels`` (n,); ``mask`` (n,) or (K, n).
    """
    single = old_emb.dim() == 2
    old = F.normalize(old_emb[None] if single else old_emb, dim=-1)
    new = F.normalize(new_emb, dim=-1)
    sim = torch.einsum("nd,kmd->knm", new, old) / temperature  # (K, n, n)
    n = new.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=new.device)
    same_class_other = (labels[:, None] == labels[None, :]) & ~eye
    sim = sim.masked_fill(same_class_other, float("-inf"))
    per_item = torch.logsumexp(sim, dim=-1) - sim.diagonal(dim1=1, dim2=2)  # (K, n)
    out = _mean(per_item, mask)
    return out[0] if single else out

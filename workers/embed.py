"""Batched forward passes: embeddings, predictions and the stored uncertainty margin."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from workers.models import EmbeddingNet


@dataclass
class Outputs:
    embedding: np.ndarray  # float32 (n, d), L2-normalised
    prediction: np.ndarray  # int64 (n,)
    margin: np.ndarray  # float32 (n,): top-1 minus top-2 class probability (low = uncertain)


@torch.no_grad()
def forward(model: EmbeddingNet, x: np.ndarray, batch_size: int = 2048) -> Outputs:
    """Run ``model`` over ``x`` in batches (eval mode, no autograd)."""
    model.eval()
    embs, preds, margins = [], [], []
    for start in range(0, len(x), batch_size):
        xb = torch.tensor(
            x[start : start + batch_size], dtype=torch.float32
        )  # copies: inputs may be read-only
        emb, logits = model(xb)
        top2 = torch.softmax(logits, dim=1).topk(2, dim=1).values
        embs.append(emb.numpy())
        preds.append(logits.argmax(dim=1).numpy())
        margins.append((top2[:, 0] - top2[:, 1]).numpy())
    if not embs:
        d = model.config["embed_dim"]
        return Outputs(np.zeros((0, d), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32))
    return Outputs(
        np.concatenate(embs).astype(np.float32),
        np.concatenate(preds).astype(np.int64),
        np.concatenate(margins).astype(np.float32),
    )

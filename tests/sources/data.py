"""Real image-folder and Parquet sources built from scikit-learn's digits, grown on demand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from workers.data.datasets import load_dataset

ARCH = {"kind": "mlp", "width": 16, "depth": 1}


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels) as uint8 8x8 arrays."""
    ds = load_dataset("digits")
    to_u8 = lambda x: np.round(x[:, 0] * 255).astype(np.uint8)  # noqa: E731
    return to_u8(ds.x_train), ds.y_train, to_u8(ds.x_test), ds.y_test


def write_images(root: Path, split: str, images, labels, start: int, stop: int, classes) -> int:
    """Items start..stop of each class in ``classes`` as PNGs; returns how many written."""
    n = 0
    for c in classes:
        idx = np.flatnonzero(labels == c)[start:stop]
        d = root / split / f"digit-{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in idx:
            Image.fromarray(images[i]).save(d / f"{split}-{i:04d}.png")
            n += 1
    return n


def parquet_rows(images, labels, split: str, start: int, stop: int, classes) -> pa.Table:
    """Rows of features (flattened pixels in [0, 1]) with item_id, class-name label, split."""
    idx = np.concatenate([np.flatnonzero(labels == c)[start:stop] for c in classes])
    feats = (images[idx].reshape(len(idx), -1) / 255.0).astype(np.float32)
    return pa.table(
        {
            "item_id": [f"{split}-{i}" for i in idx],
            "label": [f"digit-{c}" for c in labels[idx]],
            "split": [split] * len(idx),
            "features": pa.array(list(feats), type=pa.list_(pa.float32())),
        }
    )


def write_parquet(table: pa.Table, where, filesystem=None) -> None:
    pq.write_table(table, str(where), filesystem=filesystem, row_group_size=64)


def champion(lin, seed: int, input_shape=(1, 8, 8), embed_dim: int = 8):
    """A small real model, recorded in ``lin`` and promoted: what a cycle would leave."""
    import torch

    from store.settings import subdir
    from workers.learning.models import EmbeddingNet, save_model

    torch.manual_seed(seed)
    model = EmbeddingNet(input_shape, 10, embed_dim, ARCH).eval()
    path = subdir("checkpoints") / f"gen-{seed}-d{embed_dim}.pt"
    sha = save_model(model, path)
    gen = lin.add_generation(
        dataset="digits",
        stage=0,
        architecture=ARCH,
        embed_dim=embed_dim,
        classes=list(range(10)),
        status="trained",
        checkpoint_path=str(path),
        checkpoint_sha256=sha,
    )
    lin.promote(gen.id)
    return lin.generation(gen.id)


def write_pngs(root: Path, start: int, stop: int, folder=lambda i: f"shelf-{i % 3}") -> None:
    images = digits()[0]
    for i in range(start, stop):
        d = root / folder(i)
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(d / f"{i:04d}.png")

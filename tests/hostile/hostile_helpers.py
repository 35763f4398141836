"""Shared pieces of the hostile tests: a small real collection and the CLI's answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from store.collection import Collection, CollectionRows

DIM = 8  # the embedding dimension of sources.data.champion's model


def rows(start: int, n: int, generation: int, dim: int = DIM, seed: int = 0) -> CollectionRows:
    """``n`` collection items with ids and keys from ``start``, unit embeddings."""
    ids = np.arange(start, start + n, dtype=np.int64)
    emb = np.random.default_rng(seed + start).normal(size=(n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return CollectionRows(
        item_id=ids,
        label=np.full(n, -1, np.int64),
        generation=np.full(n, generation, np.int32),
        margin=np.zeros(n, np.float32),
        embedding=emb,
        key=np.asarray([f"item-{i:05d}.png" for i in ids], dtype=object),
        fingerprint=np.asarray([f"fp-{i}" for i in ids], dtype=object),
    )


def collection(gallery: Collection, spec: str, parts: int, per_part: int, generation: int) -> None:
    """A user's collection of ``parts`` committed parts, as `graceful index` leaves one."""
    for p in range(parts):
        gallery.append(spec, rows(p * per_part, per_part, generation))


def error_line(stderr: str) -> str:
    """The one `error:` line of a refused command, last on stderr (a cycle's progress bar
    may precede it); no traceback, no box."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), stderr
    assert sum(ln.startswith("error:") for ln in lines) == 1, stderr
    assert "Traceback" not in stderr and "╭" not in stderr and "│" not in stderr, stderr
    return lines[-1]


def files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())

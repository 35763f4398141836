"""Streaming a snapshot through training: bounded memory however large the source.

A reader (workers.sources) yields a snapshot's items as contiguous position ranges in
"units" (a block of image files, a Parquet row group). Each epoch, :class:`ShuffledItems`
visits the units in a seeded random order and shuffles the items of a bounded window of
them (32 MiB of inputs and teacher rows) before cutting mini-batches, as Ray Data's
local shuffle buffer or WebDataset do: memory is one window, not the source.

The frozen ancestors' embeddings of every training item are computed once, before the
first epoch, in one pass over the snapshot (:func:`precompute_teachers`), and kept on
disk in position order (:class:`TeacherStore`); each window reads its rows back with
plain file reads (no memory map, so nothing of it stays resident). The same pass sums
each ancestor's embeddings per class, for BCT's centroid head.

It is a ``torch.utils.data.IterableDataset``: a ``DataLoader`` with workers decodes
images in parallel (each worker takes every W-th unit) and pins memory for a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

WINDOW_BYTES = 32 << 20  # shuffle window: this many bytes of inputs and teacher rows
MIN_WINDOW_BATCHES = 8


class Reader(Protocol):
    def __len__(self) -> int: ...
    def units(self) -> list[Any]: ...
    def read(self, unit: Any) -> Iterator[tuple[int, np.ndarray, np.ndarray]]: ...


class TeacherStore:
    """Float32 rows ``(K, d)`` per training position, in a file: written once, read by range."""

    def __init__(self, path: str | Path, n: int, k: int, d: int) -> None:
        self.path, self.n, self.k, self.d = Path(path), n, k, d
        self.row_bytes = k * d * 4

    def create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("wb") as f:
            f.truncate(self.n * self.row_bytes)

    def write(self, start: int, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows, dtype=np.float32).tobytes()
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, start * self.row_bytes)
        finally:
            os.close(fd)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as ``(stop - start, K, d)``."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            data = os.pread(fd, (stop - start) * self.row_bytes, start * self.row_bytes)
        finally:
            os.close(fd)
        return np.frombuffer(data, dtype=np.float32).reshape(stop - start, self.k, self.d)


@torch.no_grad()
def precompute_teachers(
    reader: Reader,
    models: list[torch.nn.Module],
    store: TeacherStore,
    num_classes: int,
    device: torch.device,
    batch: int = 2048,
    on_chunk: Callable[[np.ndarray], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass: every teacher's embedding of every item into ``store``.

    Returns per-class embedding sums ``(K, C, d)`` and item counts ``(C,)``.
    ``on_chunk`` sees each chunk's inputs (the warm start takes a sample from it).
    """
    store.create()
    sums = torch.zeros(len(models), num_classes, store.d, device=device)
    counts = torch.zeros(num_classes, device=device)
    for unit in reader.units():
        for start, x, y in reader.read(unit):
            if on_chunk is not None:
                on_chunk(x)
            yt = torch.as_tensor(y, device=device)
            rows = torch.empty(len(y), len(models), store.d, device=device)
            for at in range(0, len(y), batch):
                xb = torch.as_tensor(x[at : at + batch])
                if device.type == "cuda":  # a pinned copy goes over without blocking
                    xb = xb.pin_memory()
                xb = xb.to(device, non_blocking=True)
                for j, m in enumerate(models):
                    rows[at : at + batch, j] = m.embed(xb)
            for j in range(len(models)):
                sums[j].index_add_(0, yt, rows[:, j])
            counts += torch.bincount(yt, minlength=num_classes).to(counts.dtype)
            store.write(start, rows.cpu().numpy())
    return sums, counts


def window_items(item_shape: tuple[int, ...], batch_size: int, extra_bytes: int = 0) -> int:
    """Items in a shuffle window: WINDOW_BYTES of inputs (and ``extra_bytes`` per item:
    teacher rows), at least a few batches."""
    item_bytes = 4 * int(np.prod(item_shape) or 1) + extra_bytes
    return max(MIN_WINDOW_BATCHES * batch_size, WINDOW_BYTES // item_bytes)


class ShuffledItems(IterableDataset):
    """One epoch of mini-batches: units in random order, items shuffled within a window.

    Yields dicts ``pos`` (positions), ``x``, ``y`` and, with a store, ``teacher``
    ``(K, n, d)``. The order depends only on (seed, epoch): a resumed run repeats it.
    Batches of one item are dropped (BatchNorm needs two).
    """

    def __init__(
        self,
        reader: Reader,
        batch_size: int,
        window: int,
        seed: int,
        epoch: int,
        store: TeacherStore | None = None,
    ) -> None:
        super().__init__()
        self.reader, self.batch_size, self.window = reader, batch_size, window
        self.seed, self.epoch, self.store = seed, epoch, store

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng([self.seed, self.epoch, worker])
        units = self.reader.units()
        # one unit order for every worker; each takes its share of it
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(units))
        units = [units[i] for i in order]
        buf: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]] = []
        held = 0
        for unit in units[worker::workers]:
            for start, x, y in self.reader.read(unit):
                pos = np.arange(start, start + len(y), dtype=np.int64)
                t = self.store.read(start, start + len(y)) if self.store is not None else None
                buf.append((pos, x, y, t))
                held += len(y)
                if held >= self.window:
                    buf, held = yield from self._drain(buf, rng, keep_tail=True)
        yield from self._drain(buf, rng, keep_tail=False)

    def _drain(self, buf, rng, keep_tail: bool):
        pos = np.concatenate([b[0] for b in buf]) if buf else np.zeros(0, np.int64)
        if not len(pos):
            return [], 0
        x = np.concatenate([b[1] for b in buf])
        y = np.concatenate([b[2] for b in buf])
        t = np.concatenate([b[3] for b in buf]) if buf[0][3] is not None else None
        order = rng.permutation(len(pos))
        n_full = (len(order) // self.batch_size) * self.batch_size
        cut = n_full if keep_tail else len(order)
        for at in range(0, cut, self.batch_size):
            idx = order[at : at + self.batch_size]
            if len(idx) < 2:
                continue
            out = {
                "pos": torch.from_numpy(pos[idx]),
                "x": torch.from_numpy(x[idx]),
                "y": torch.from_numpy(y[idx]),
            }
            if t is not None:
                out["teacher"] = torch.from_numpy(np.ascontiguousarray(t[idx].transpose(1, 0, 2)))
            yield out
        if not keep_tail or n_full == len(order):
            return [], 0
        rest = order[n_full:]
        tail = (pos[rest], x[rest], y[rest], t[rest] if t is not None else None)
        return [tail], len(rest)

"""Streaming a snapshot through training: a uniform shuffle, bounded memory.

A reader (workers.data.sources) yields a snapshot's items as contiguous position ranges in
"units" (a block of image files, a Parquet row group). Before the first epoch, one pass
over them (:func:`prepare`) decodes every item once into an on-disk :class:`ItemStore`
(one fixed-size row per position; pixels as bytes), computes every frozen ancestor's
embedding of it into a :class:`TeacherStore`, and sums what the model and the
constraints need (per-class embedding sums for BCT's centroid head, per-channel pixel
statistics for the input normalisation). Items already in memory (the scenario's
arrays, :class:`workers.data.readers.ArrayItems`) are not copied.

Each epoch, :class:`ShuffledItems` draws a uniform random permutation of *all* positions,
as a plain training loop does, and cuts it into windows of a bounded number of items
(32 MiB of inputs and teacher rows); a window's rows are read back by position with
plain file reads (no memory map, so nothing of the stores stays resident) and cut into
mini-batches in the permutation's order. Memory is one window, not the source, and the
label mix of every batch is that of the whole snapshot whatever order the source lists
its items in: a source whose units each hold one class (an image folder read class by
class, a Parquet file sorted by label) trains as well as a shuffled one. (Shuffling
units and then items within a window, as before, left batches of two or three classes
on such sources and halved the accuracy on class-sorted photos: issue 16.)

It is a ``torch.utils.data.IterableDataset``: a ``DataLoader`` with workers reads the
windows in parallel (worker w takes every W-th window) and pins memory for a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


class Items(Protocol):
    """Training items by position: what an epoch reads."""

    def __len__(self) -> int: ...
    def take(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class RowFile:
    """Fixed-size rows of one dtype per position, in a file: written once, read by position."""

    def __init__(self, path: str | Path, n: int, row_shape: tuple[int, ...], dtype: Any) -> None:
        self.path, self.n = Path(path), n
        self.row_shape, self.dtype = tuple(row_shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize

    def create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("wb") as f:
            f.truncate(self.n * self.row_bytes)

    def write(self, start: int, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows, dtype=self.dtype).tobytes()
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, start * self.row_bytes)
        finally:
            os.close(fd)

    def take(self, positions: np.ndarray) -> np.ndarray:
        """Rows at ascending ``positions``: one read per run of consecutive positions."""
        positions = np.asarray(positions, dtype=np.int64)
        out = bytearray(len(positions) * self.row_bytes)
        if len(positions):
            breaks = np.flatnonzero(np.diff(positions) != 1) + 1
            starts = np.concatenate([[0], breaks])
            stops = np.concatenate([breaks, [len(positions)]])
            view = memoryview(out)
            fd = os.open(self.path, os.O_RDONLY)
            try:
                for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
                    want = (b - a) * self.row_bytes
                    got = os.preadv(
                        fd,
                        [view[a * self.row_bytes : b * self.row_bytes]],
                        int(positions[a]) * self.row_bytes,
                    )
                    if got != want:
                        raise OSError(f"{self.path}: short read ({got} of {want} bytes)")
            finally:
                os.close(fd)
        return np.frombuffer(out, dtype=self.dtype).reshape(len(positions), *self.row_shape)


class TeacherStore(RowFile):
    """Float32 rows ``(K, d)`` per training position: every frozen ancestor's embedding."""

    def __init__(self, path: str | Path, n: int, k: int, d: int) -> None:
        super().__init__(path, n, (k, d), np.float32)
        self.d = d


class ItemStore(RowFile):
    """A snapshot's decoded inputs, one row per position, and its labels (in memory).

    Images decoded from 8-bit files are kept as bytes (exact: they are ``v / 255``) and
    read back as float32 in [0, 1]; other inputs as float32.
    """

    def __init__(self, path: str | Path, labels: np.ndarray, shape: tuple[int, ...], u8: bool):
        super().__init__(path, len(labels), shape, np.uint8 if u8 else np.float32)
        self.y = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return self.n

    def write(self, start: int, rows: np.ndarray) -> None:
        if self.dtype == np.uint8:
            rows = np.rint(np.asarray(rows, dtype=np.float32) * np.float32(255.0))
        super().write(start, rows)

    def take(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[override]
        x = super().take(positions)
        if self.dtype == np.uint8:
            x = x.astype(np.float32) / np.float32(255.0)  # as workers.data.datasets decodes
        return x, self.y[positions]


@dataclass
class Prepared:
    """What the one pass before training found."""

    class_sums: torch.Tensor  # (K, C, d): each teacher's embeddings summed per class
    counts: torch.Tensor  # (C,): items per class
    channel_mean: np.ndarray | None  # (C,) per image channel; None for feature vectors
    channel_std: np.ndarray | None


@torch.no_grad()
def prepare(
    reader: Reader,
    models: list[torch.nn.Module],
    teachers: TeacherStore | None,
    num_classes: int,
    device: torch.device,
    items: ItemStore | None = None,
    batch: int = 2048,
    on_chunk: Callable[[np.ndarray], None] | None = None,
) -> Prepared:
    """One pass over the snapshot: items decoded into ``items``, every teacher's
    embedding of every item into ``teachers`` (when given), its class sums, and the
    channel statistics.

    ``on_chunk`` sees each chunk's inputs (the warm start takes a sample from it).
    """
    for store in (items, teachers):
        if store is not None:
            store.create()
    d = teachers.d if teachers is not None else (models[0].config["embed_dim"] if models else 1)
    sums = torch.zeros(len(models), num_classes, d, device=device)
    counts = torch.zeros(num_classes, device=device)
    moments: np.ndarray | None = None  # per channel: count, sum, sum of squares
    for unit in reader.units():
        for start, x, y in reader.read(unit):
            if on_chunk is not None:
                on_chunk(x)
            if items is not None:
                items.write(start, x)
            if x.ndim == 4:
                flat = x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1).astype(np.float64)
                m = np.stack([np.full(len(flat), flat.shape[1]), flat.sum(1), (flat**2).sum(1)])
                moments = m if moments is None else moments + m
            yt = torch.as_tensor(np.array(y, dtype=np.int64), device=device)  # a copy
            counts += torch.bincount(yt, minlength=num_classes).to(counts.dtype)
            if not models:
                continue
            rows = torch.empty(len(y), len(models), d, device=device)
            for at in range(0, len(y), batch):
                xb = torch.as_tensor(x[at : at + batch])
                if device.type == "cuda":  # a pinned copy goes over without blocking
                    xb = xb.pin_memory()
                xb = xb.to(device, non_blocking=True)
                for j, m in enumerate(models):
                    rows[at : at + batch, j] = m.embed(xb)
            for j in range(len(models)):
                sums[j].index_add_(0, yt, rows[:, j])
            if teachers is not None:  # None: the loop embeds each augmented batch itself
                teachers.write(start, rows.cpu().numpy())
    mean = std = None
    if moments is not None:
        n, s, ss = moments
        mean = s / n
        std = np.sqrt(np.maximum(ss / n - mean**2, 0.0))
        std = np.where(std > 1e-3, std, 1.0)  # a constant channel is left as it is
        mean, std = mean.astype(np.float32), std.astype(np.float32)
    return Prepared(sums, counts, mean, std)


def window_items(item_shape: tuple[int, ...], batch_size: int, extra_bytes: int = 0) -> int:
    """Items in a shuffle window: WINDOW_BYTES of inputs (and ``extra_bytes`` per item:
    teacher rows), at least a few batches."""
    item_bytes = 4 * int(np.prod(item_shape) or 1) + extra_bytes
    return max(MIN_WINDOW_BATCHES * batch_size, WINDOW_BYTES // item_bytes)


class ShuffledItems(IterableDataset):
    """One epoch of mini-batches in a uniform random order of all items.

    Yields dicts ``pos`` (positions), ``x``, ``y`` and, with a teacher store,
    ``teacher`` ``(K, n, d)``. The order depends only on (seed, epoch): a resumed run
    repeats it. Batches of one item are dropped (BatchNorm needs two).

    In a data-parallel training of ``world_size`` processes, each batch of that order is
    split: rank ``r`` takes its every ``world_size``-th item from the ``r``-th on. The
    ranks' batches of one step are the batch a single process takes, every rank takes
    as many steps (the gradients' all-reduce needs that), and over the ranks an epoch is
    every item once. A batch too short to leave each rank two items is dropped by all.
    """

    def __init__(
        self,
        items: Items,
        batch_size: int,
        window: int,
        seed: int,
        epoch: int,
        store: TeacherStore | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of {world_size} processes")
        self.items, self.batch_size, self.store = items, batch_size, store
        # whole batches per window, so only the epoch's last batch may be short
        self.window = max(1, window // batch_size) * batch_size
        self.seed, self.epoch = seed, epoch
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.items))
        starts = range(0, len(order), self.window)
        for at in list(starts)[worker::workers]:
            yield from self._window(order[at : at + self.window])

    def _window(self, chunk: np.ndarray) -> Iterator[dict[str, torch.Tensor]]:
        # this rank's share of each batch of the window (a single process: the batch)
        parts = [
            chunk[at : at + self.batch_size][self.rank :: self.world_size]
            for at in range(0, len(chunk), self.batch_size)
            if len(chunk[at : at + self.batch_size]) >= 2 * self.world_size
        ]
        if not parts:
            return
        mine = np.concatenate(parts)
        ascending = np.sort(mine)  # read by position, then serve in the random order
        x, y = self.items.take(ascending)
        t = self.store.take(ascending) if self.store is not None else None
        local = np.searchsorted(ascending, mine)
        at = 0
        for part in parts:
            idx = local[at : at + len(part)]
            at += len(part)
            out = {
                "pos": torch.from_numpy(ascending[idx]),
                "x": torch.from_numpy(np.ascontiguousarray(x[idx])),
                "y": torch.from_numpy(np.ascontiguousarray(y[idx])),
            }
            if t is not None:
                out["teacher"] = torch.from_numpy(np.ascontiguousarray(t[idx].transpose(1, 0, 2)))
            yield out

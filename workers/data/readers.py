"""Every reader of items, one family: one class per place items live.

- :class:`ArrayItems`: inputs in memory (a stage of the scenario's data set, a source's
  evaluation set, a caller's arrays);
- :class:`FileItems`: image files under a root (an image folder, ``images:DIR``);
- :class:`ParquetItems`: Parquet rows (files, directories, hive partitions, ``s3://``).

Each reads items two ways:

- **as a snapshot's stream** (``len``, ``units``, ``read``: workers.data.stream): the
  trainer's items by position, a unit (a block of files, a row group) at a time; built
  over a snapshot's table (its keys, labels as head rows);
- **by key** (``take_keys``, ``take_each``): a collection's items, for indexing, the
  backfill and search by key. An item that is gone or cannot be decoded raises
  :class:`UnreadableItem` naming it; ``take_each`` skips it instead.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from workers.data.errors import CollectionError, DatasetError, SourceError
from workers.data.parquet_schema import _parquet_columns, redact
from workers.data.sources import (
    BLOCK,
    InputFormat,
    _decode,
    _is_test,
    _local,
    _parquet_dataset,
    _parquet_inputs,
    _units,
    fragment_scanner,
)

Chunk = tuple[int, np.ndarray, np.ndarray]  # (first position, inputs, labels)


class UnreadableItem(CollectionError):
    """An item that is gone or cannot be decoded (the reader names its key)."""


def _no_stream(reader: Any) -> SourceError:
    return SourceError(f"{type(reader).__name__} was made to read by key, not a snapshot")


# -- in memory -------------------------------------------------------------------------
class ArrayItems:
    """Items already in memory: by position (``y``: their head rows) and, given their
    ``keys``, by key (``names``: their class names, for labelled queries)."""

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray | None = None,
        block: int = BLOCK,
        keys: list[str] | None = None,
        names: list[str] | None = None,
    ) -> None:
        self.x, self.block, self.names = x, block, names
        self.y = np.asarray(y if y is not None else np.zeros(len(x)), dtype=np.int64)
        self.rows = {k: i for i, k in enumerate(keys or [])}

    # the stream
    def __len__(self) -> int:
        return len(self.y)

    def units(self) -> list[Any]:
        return list(range(0, len(self.y), self.block))

    def read(self, unit: Any) -> Iterator[Chunk]:
        stop = unit + self.block
        yield unit, np.ascontiguousarray(self.x[unit:stop], np.float32), self.y[unit:stop]

    def take(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Items at ``positions`` (in memory already: nothing is stored on disk)."""
        return np.ascontiguousarray(self.x[positions], np.float32), self.y[positions]

    # by key
    def _rows(self, keys: list[str]) -> list[int]:
        missing = [k for k in keys if k not in self.rows]
        if missing:
            raise UnreadableItem(f"keys {missing[:5]} are not among these items")
        return [self.rows[k] for k in keys]

    def take_keys(self, keys: list[str]) -> np.ndarray:
        return np.ascontiguousarray(self.x[self._rows(keys)], dtype=np.float32)

    def take_each(self, keys: list[str]) -> tuple[np.ndarray, list[str]]:
        good = [k for k in keys if k in self.rows]
        return self.take_keys(good), [k for k in keys if k not in self.rows]

    def label_of(self, key: str) -> str | None:
        """The class name of item ``key`` (None when these items have none)."""
        return None if self.names is None else self.names[self._rows([key])[0]]


class _Stored:
    """Items stored at ``where`` (a directory, Parquet files), decoded to ``fmt``: by key,
    and a snapshot's stream when given its ``table`` and ``labels`` (their head rows)."""

    def __init__(
        self,
        where: str,
        fmt: InputFormat,
        table: pa.Table | None = None,
        labels: np.ndarray | None = None,
    ) -> None:
        self.where, self.fmt, self.y = where, fmt, labels
        if table is not None:
            self._snapshot(table)

    def _snapshot(self, table: pa.Table) -> None:
        """Take what the stream reads from the snapshot's table."""

    def __len__(self) -> int:
        if self.y is None:
            raise _no_stream(self)
        return len(self.y)


# -- image files -----------------------------------------------------------------------
class FileItems(_Stored):
    """Image files under a root (``where``), keyed by their relative path."""

    keys: pa.ChunkedArray | None = None  # the snapshot's keys, in stream order

    @property
    def root(self) -> Path:
        return Path(self.where)

    def _snapshot(self, table: pa.Table) -> None:
        self.keys = table.column("key")

    # the stream
    def units(self) -> list[Any]:
        return list(range(0, len(self), BLOCK))

    def read(self, unit: Any) -> Iterator[Chunk]:
        if self.keys is None or self.y is None:
            raise _no_stream(self)
        keys = self.keys.slice(unit, BLOCK).to_pylist()
        try:
            x = _decode([(k, self.root / k) for k in keys], self.fmt)
        except DatasetError as exc:
            raise SourceError(
                f"{exc}: the source changed after its snapshot; run the cycle again"
            ) from None
        yield unit, x, self.y[unit : unit + len(keys)]

    # by key
    def take_keys(self, keys: list[str]) -> np.ndarray:
        try:
            return _decode([(k, self.root / k) for k in keys], self.fmt)
        except (DatasetError, OSError) as exc:
            raise UnreadableItem(f"{exc}") from None

    def take_each(self, keys: list[str]) -> tuple[np.ndarray, list[str]]:
        """The readable items' inputs, and the keys that could not be read (skipped)."""
        try:
            return self.take_keys(keys), []  # the usual case: all of them, in one pass
        except UnreadableItem:
            pass
        good, bad, arrays = [], [], []
        for k in keys:
            try:
                arrays.append(self.take_keys([k]))
                good.append(k)
            except UnreadableItem:
                bad.append(k)
        x = np.concatenate(arrays) if arrays else np.zeros((0, *self.fmt.shape), np.float32)
        return x, bad


# -- Parquet ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _KeyIndex:
    """Where each key of a Parquet collection is: about (longest key + 12) bytes an item,
    no Python object per key."""

    order: np.ndarray  # listing row of each sorted key
    keys: np.ndarray  # the keys sorted, as fixed-width UTF-8 bytes
    unit: np.ndarray  # row group of each listing row
    start: np.ndarray  # first listing row of each row group (and the total at the end)


class ParquetItems(_Stored):
    """Parquet rows of ``where`` (a file, a directory, hive partitions, ``s3://``).

    As a snapshot's stream (given its ``table``: each item's file and row group, and
    ``labels``): a row group at a time, in the order the scan numbered them. By
    ``item_id``: the keys are located once (file and row group of each, on the first
    request), then each request reads only the row groups holding its keys, the last
    two kept (parts of a collection follow the source's order).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._ds: Any = None
        self._keys: _KeyIndex | None = None  # built on the first read by key
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()  # row groups read by key
        self._places: list[tuple[str, int]] = []  # the stream's units: (file, row group)
        self._first: list[int] = []  # the first position of each unit
        super().__init__(*args, **kwargs)

    def _snapshot(self, table: pa.Table) -> None:
        # a unit is a row group: one contiguous range of positions, named by file and id
        files = table.column("file").combine_chunks()
        file_idx = files.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        groups = table.column("row_group").to_numpy().astype(np.int64)
        change = np.flatnonzero((np.diff(file_idx) != 0) | (np.diff(groups) != 0)) + 1
        starts = np.concatenate([[0], change]) if len(groups) else np.zeros(0, np.int64)
        names = files.dictionary.to_pylist()
        self._places = [(names[file_idx[i]], int(groups[i])) for i in starts]
        self._first = starts.tolist()

    def _open(self) -> None:
        if self._ds is None:
            self._ds = _parquet_dataset(self.where)
            noun = "collection" if self.y is None else "source"  # read by key, or streamed
            self.column, _ = _parquet_columns(self._ds, self.where, noun, ("item_id",))
            self.row_groups = _units(self._ds)
            self.by_place = {(f.path, f.row_groups[0].id): f for f in self.row_groups}

    # the stream
    def units(self) -> list[Any]:
        return list(range(len(self._places)))

    def read(self, unit: Any) -> Iterator[Chunk]:
        if self.y is None:
            raise _no_stream(self)
        self._open()
        frag = self.by_place.get(self._places[unit])
        if frag is None:
            raise SourceError(
                f"Parquet source {redact(self.where)}: {redact(self._places[unit][0])} row group "
                f"{self._places[unit][1]} is gone since the snapshot; run the cycle again"
            )
        cols = [self.column] + (["split"] if "split" in self._ds.schema.names else [])
        pos = int(self._first[unit])
        # memory: one batch ahead, not sixteen
        scanner = fragment_scanner(self._ds, frag, cols, batch_size=BLOCK, batch_readahead=1)
        for batch in scanner.to_batches():
            train = ~_is_test(batch)
            if not train.any():
                continue
            col = batch.column(0).filter(pa.array(train))
            x, _ = _parquet_inputs(col, self.column, self.fmt, self.where)
            yield pos, x, self.y[pos : pos + len(x)]
            pos += len(x)

    # by key
    def _table(self, frag: Any, columns: list[str]) -> pa.Table:
        """``columns`` of every row of Parquet fragment ``frag`` (test rows too)."""
        return fragment_scanner(self._ds, frag, columns).to_table()

    def _located(self) -> _KeyIndex:
        """The key index, built once from the ``item_id`` column alone."""
        import pyarrow.compute as pc

        if self._keys is not None:
            return self._keys
        self._open()
        keys = [
            pc.cast(self._table(frag, ["item_id"]).column("item_id"), pa.string()).combine_chunks()
            for frag in self.row_groups
        ]
        sizes = np.asarray([len(k) for k in keys], dtype=np.int64)
        flat = pa.concat_arrays(keys) if keys else pa.array([], pa.string())
        del keys
        every = fixed_bytes(flat)  # sortable, searchable fixed-width UTF-8 bytes
        del flat
        order = np.argsort(every, kind="stable")
        unit = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
        # row group u holds the listing's rows start[u] .. start[u + 1] - 1, in order
        start = np.concatenate([[0], np.cumsum(sizes)])
        self._keys = _KeyIndex(order, every[order], unit, start)
        return self._keys

    def _found(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(position of each key in the sorted keys, whether it is there)."""
        ordered = self._located().keys
        width = ordered.dtype.itemsize
        enc = [k.encode() for k in keys]
        fits = np.asarray([len(e) <= width for e in enc], dtype=bool)
        want = np.asarray(enc, dtype=f"S{width}")  # a longer key is not there
        pos = np.searchsorted(ordered, want)
        at = np.minimum(pos, max(0, len(ordered) - 1))
        ok = fits & (pos < len(ordered))
        if len(ordered):
            ok &= ordered[at] == want
        return at, ok

    def _group(self, u: int) -> np.ndarray:
        """The inputs of row group ``u`` (in its row order), the last two kept."""
        if u in self._cache:
            self._cache.move_to_end(u)
            return self._cache[u]
        start = self._located().start
        t = self._table(self.row_groups[u], ["item_id", self.column])
        fmt = self.fmt if self.column == "image" else None
        x, _ = _parquet_inputs(t.column(1).combine_chunks(), self.column, fmt, self.where)
        if x.size != len(x) * int(np.prod(self.fmt.shape)):
            raise CollectionError(
                f"Parquet collection {redact(self.where)}: rows of {self.column!r} have "
                f"{x.size // max(1, len(x))} values; the champion takes inputs of shape "
                f"{self.fmt.shape}"
            )
        x = x.reshape(len(x), *self.fmt.shape)
        if len(x) != start[u + 1] - start[u]:
            raise UnreadableItem(
                f"Parquet collection {redact(self.where)}: {redact(self.row_groups[u].path)} "
                "changed while it was read; index again"
            )
        self._cache[u] = x
        while len(self._cache) > 2:
            self._cache.popitem(last=False)
        return x

    def take_keys(self, keys: list[str]) -> np.ndarray:
        pos, ok = self._found(keys)
        if not ok.all():
            missing = [k for k, f in zip(keys, ok, strict=True) if not f][:5]
            raise UnreadableItem(
                f"Parquet collection {redact(self.where)}: item_id {missing} no longer in it"
            )
        located = self._located()
        rows = located.order[pos]
        units = located.unit[rows]
        out = np.empty((len(keys), *self.fmt.shape), np.float32)  # _group reshapes rows to it
        for u in np.unique(units):
            mine = np.flatnonzero(units == u)
            out[mine] = self._group(int(u))[rows[mine] - located.start[u]]
        return out

    def take_each(self, keys: list[str]) -> tuple[np.ndarray, list[str]]:
        _, found = self._found(keys)
        good = [k for k, f in zip(keys, found, strict=True) if f]
        return self.take_keys(good), [k for k, f in zip(keys, found, strict=True) if not f]


def snapshot_reader(
    spec: str, table: pa.Table, labels: np.ndarray, fmt: InputFormat
) -> FileItems | ParquetItems:
    """The stream of a user's source's snapshot ``table`` (labels: their head rows)."""
    kind, path = _local(spec)
    if kind == "imagefolder":
        return FileItems(path, fmt, table, labels)
    return ParquetItems(path, fmt, table, labels)


def fixed_bytes(strings: pa.Array, chunk: int = 65_536) -> np.ndarray:
    """UTF-8 strings as one fixed-width bytes array (sortable and searchable with numpy),
    built from Arrow's buffers a chunk at a time, without a Python object per string."""
    arr = strings.cast(pa.large_string())  # 64-bit offsets
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype="S1")
    _, off_buf, data_buf = arr.buffers()
    offs = np.frombuffer(off_buf, dtype=np.int64, count=n + 1, offset=arr.offset * 8)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(1, "u1")
    lens = np.diff(offs)
    width = max(1, int(lens.max()))
    out = np.zeros((n, width), dtype=np.uint8)
    cols = np.arange(width)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        mask = cols[None, :] < lens[a:b, None]
        out[a:b][mask] = data[(offs[a:b, None] + cols[None, :])[mask]]
    return out.view(f"S{width}").ravel()

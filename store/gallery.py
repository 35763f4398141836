"""The gallery: every indexed item with exactly one current embedding, in Parquet.

Layout: ``GRACEFUL_HOME/gallery/part-NNNNN.parquet``, each part a fixed range of items.
A part is rewritten whole: written under a temporary name, then renamed over the old
one inside the same SQL transaction that records its sha256 and per-generation counts
in the lineage's manifest. A crash between the rename and the commit leaves a part
whose hash differs from the manifest; :meth:`Gallery.reconcile` re-reads such parts
(the file is always whole, since the rename is atomic) and fixes the manifest.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sqlmodel import Session

from store.lineage import GalleryInfo, GalleryPart, Lineage
from store.settings import StoreError, subdir

COLUMNS = ("item_id", "label", "generation", "margin", "embedding")


class GalleryError(StoreError):
    """A bad gallery file or a mismatched write; the message names the file or the problem."""


def gallery_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("item_id", pa.int64(), nullable=False),
            pa.field("label", pa.int64(), nullable=False),
            pa.field("generation", pa.int32(), nullable=False),
            # a stored uncertainty: the margin between the two top class probabilities
            pa.field("margin", pa.float32(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        ]
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class GalleryRows:
    """Column arrays of gallery rows (numpy)."""

    item_id: np.ndarray
    label: np.ndarray
    generation: np.ndarray
    margin: np.ndarray
    embedding: np.ndarray  # float32 (n, dim)

    def __len__(self) -> int:
        return len(self.item_id)

    def to_table(self, dim: int) -> pa.Table:
        emb = np.ascontiguousarray(self.embedding, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != dim:
            raise GalleryError(
                f"embedding dim mismatch: the gallery stores dim {dim}, got shape {emb.shape}"
            )
        if not np.isfinite(emb).all():
            raise GalleryError("embeddings contain NaN or inf; nothing was written")
        flat = pa.array(emb.reshape(-1), type=pa.float32())
        return pa.Table.from_arrays(
            [
                pa.array(self.item_id, pa.int64()),
                pa.array(self.label, pa.int64()),
                pa.array(self.generation, pa.int32()),
                pa.array(self.margin, pa.float32()),
                pa.FixedSizeListArray.from_arrays(flat, dim),
            ],
            schema=gallery_schema(dim),
        )

    @classmethod
    def from_table(cls, table: pa.Table) -> GalleryRows:
        emb = table.column("embedding").combine_chunks()
        dim = emb.type.list_size
        values = emb.values.to_numpy(zero_copy_only=False)
        # copies: Arrow buffers are read-only and backfill edits rows in place
        return cls(
            item_id=np.array(table.column("item_id").to_numpy()),
            label=np.array(table.column("label").to_numpy()),
            generation=np.array(table.column("generation").to_numpy()),
            margin=np.array(table.column("margin").to_numpy()),
            embedding=np.array(values, dtype=np.float32).reshape(-1, dim),
        )

    @classmethod
    def concat(cls, parts: list[GalleryRows]) -> GalleryRows:
        return cls(
            *(np.concatenate([getattr(p, c) for p in parts]) for c in COLUMNS)  # type: ignore[arg-type]
        )


class Gallery:
    """The Parquet gallery and its manifest in the lineage."""

    def __init__(self, lineage: Lineage, root: Path | None = None) -> None:
        self.lineage = lineage
        self._root = root

    @property
    def root(self) -> Path:
        if self._root is None:
            self._root = subdir("gallery")
        self._root.mkdir(parents=True, exist_ok=True)
        return self._root

    # -- metadata --------------------------------------------------------------------
    def info(self) -> GalleryInfo | None:
        return self.lineage.gallery_info()

    def exists(self) -> bool:
        return self.info() is not None

    def require(self) -> GalleryInfo:
        info = self.info()
        if info is None:
            raise GalleryError("the gallery is empty: run `graceful run` or `graceful cycle` first")
        return info

    def part_names(self) -> list[str]:
        return [p.name for p in self.lineage.gallery_parts()]

    # -- reading ---------------------------------------------------------------------
    def read_part(self, name: str, info: GalleryInfo | None = None) -> pa.Table:
        """Read and validate one part file against the gallery's schema."""
        info = info or self.require()
        path = self.root / name
        if not path.exists():
            raise GalleryError(f"gallery part {path} is missing")
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise GalleryError(f"corrupt Parquet file {path}: {exc}") from exc
        expected = gallery_schema(info.embed_dim)
        if not table.schema.remove_metadata().equals(expected):
            raise GalleryError(
                f"foreign Parquet file {path}: schema {table.schema.remove_metadata()} "
                f"is not the gallery's {expected}"
            )
        return table

    def iter_parts(self) -> Iterator[tuple[str, GalleryRows]]:
        for name in self.part_names():
            yield name, GalleryRows.from_table(self.read_part(name))

    def read_all(self) -> GalleryRows:
        """All rows, ordered by item id (for evaluation on small galleries)."""
        parts = [rows for _, rows in self.iter_parts()]
        if not parts:
            raise GalleryError("the gallery has no parts")
        rows = GalleryRows.concat(parts)
        order = np.argsort(rows.item_id, kind="stable")
        return GalleryRows(*(getattr(rows, c)[order] for c in COLUMNS))

    def counts(self) -> dict[int, int]:
        return self.lineage.gallery_counts()

    # -- writing ---------------------------------------------------------------------
    def _stage(self, name: str, rows: GalleryRows, dim: int) -> _Staged:
        """Write ``rows`` under a temporary name next to part ``name``."""
        table = rows.to_table(dim)
        final = self.root / name
        tmp = final.with_name(f".{name}.tmp-{os.getpid()}")
        pq.write_table(table, tmp, row_group_size=8192)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        return _Staged(name, tmp, final, file_sha256(tmp), len(rows), _counts(rows.generation))

    @staticmethod
    def _commit(session: Session, staged: list[_Staged]) -> None:
        """Record the staged parts in the manifest and rename them into place."""
        for st in staged:
            part = session.get(GalleryPart, st.name) or GalleryPart(name=st.name, rows=0, sha256="")
            part.rows, part.sha256, part.counts = st.rows, st.sha256, st.counts
            session.add(part)
        session.flush()
        # rename inside the transaction: if the commit then fails, reconcile() repairs
        for st in staged:
            os.replace(st.tmp, st.final)

    def write_part(
        self,
        name: str,
        rows: GalleryRows,
        also: Callable[[Session], None] | None = None,
    ) -> None:
        """Atomically replace part ``name`` and its manifest row (plus ``also``'s changes)."""
        info = self.require()
        staged = self._stage(name, rows, info.embed_dim)
        try:
            with self.lineage.session() as s:
                if also is not None:
                    also(s)
                self._commit(s, [staged])
        finally:
            staged.tmp.unlink(missing_ok=True)

    def create(self, dataset: str, rows: GalleryRows, part_rows: int = 4096) -> None:
        """Build a new gallery from ``rows`` (the first full indexing), all or nothing."""
        if self.exists():
            raise GalleryError("the gallery already exists; backfill it instead")
        if len(np.unique(rows.item_id)) != len(rows):
            raise GalleryError("duplicate item ids in the new gallery")
        dim = int(rows.embedding.shape[1])
        order = np.argsort(rows.item_id, kind="stable")
        staged: list[_Staged] = []
        try:
            for i, start in enumerate(range(0, len(rows), part_rows)):
                sel = order[start : start + part_rows]
                part = GalleryRows(*(getattr(rows, c)[sel] for c in COLUMNS))
                staged.append(self._stage(f"part-{i:05d}.parquet", part, dim))
            with self.lineage.session() as s:
                s.add(GalleryInfo(dataset=dataset, embed_dim=dim, items=len(rows)))
                self._commit(s, staged)
        finally:
            for st in staged:
                st.tmp.unlink(missing_ok=True)

    def reconcile(self) -> list[str]:
        """Make the manifest agree with the part files; returns the parts repaired."""
        repaired = []
        for part in self.lineage.gallery_parts():
            path = self.root / part.name
            if path.exists() and file_sha256(path) != part.sha256:
                rows = GalleryRows.from_table(self.read_part(part.name))
                with self.lineage.session() as s:
                    row = s.get(GalleryPart, part.name)
                    assert row is not None
                    row.rows, row.sha256 = len(rows), file_sha256(path)
                    row.counts = _counts(rows.generation)
                    s.add(row)
                repaired.append(part.name)
        for leftover in self.root.glob(".part-*.tmp-*"):
            leftover.unlink(missing_ok=True)
        return repaired


@dataclass
class _Staged:
    name: str
    tmp: Path
    final: Path
    sha256: str
    rows: int
    counts: dict[str, int]


def _counts(generation: np.ndarray) -> dict[str, int]:
    gens, n = np.unique(np.asarray(generation), return_counts=True)
    return {str(int(g)): int(c) for g, c in zip(gens, n, strict=True)}

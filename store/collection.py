"""The collection (gallery): every indexed item with exactly one current embedding, in Parquet.

Each row is one item: ``item_id`` (assigned by the collection, never reused: the faiss
id), ``key`` (the item's stable identity in its source: a relative path, an ``item_id``
of a Parquet source, or an evaluation item's key in a ``reference:`` collection: the
scenario's, its position in the evaluation split), ``label`` (the class's head row,
``UNLABELLED`` = -1 when the source has none), the ``generation`` that embedded it, its
``margin``, a content ``fingerprint`` (a changed item is re-embedded) and the
``embedding``. Parts written before keys existed read back with ``key`` = the
item id and an empty fingerprint.

Layout: ``GRACEFUL_HOME/gallery/part-NNNNN[.vV].parquet``. Slot ``NNNNN`` holds a fixed,
sorted range of item ids for the gallery's whole life; ``V`` counts its rewrites (the
first version has no suffix). Part files are immutable: a rewrite writes the next
version under a temporary name, fsyncs it, renames it to its (new, unreferenced) final
name, and then switches the manifest row (lineage ``CollectionPart``) from the old file to
the new one in one SQL transaction, together with any caller changes (a backfill job's
progress). The commit is the only switch point:

- a crash before it leaves an unreferenced file that :meth:`Collection.reconcile` deletes;
  the manifest still names the old, whole version. Every writer first leaves an intent
  marker ``.NAME.pending`` beside the file it is about to put in place (or take out) and
  removes it once the commit settled; so reconcile also clears a file in a slot the
  manifest never knew (a killed append) or no longer knows (a killed drop), and only
  such files: a file without a marker in an unknown slot stays foreign;
- a crash after it leaves the superseded file, also deleted by ``reconcile``;
- a reader takes the manifest in one query (a consistent snapshot of committed parts)
  and reads those files; it never sees a half-written or uncommitted part. A file it
  listed can vanish (superseded and deleted) before it opens it: readers then retry with
  a fresh snapshot (:class:`PartGone`).

:meth:`Collection.verify` checks every part (present, a Parquet file, the gallery's schema,
the row count and sha256 recorded in the manifest) and that no foreign Parquet file sits
in the directory; errors name the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import delete, insert
from sqlmodel import Session

from store.failpoints import failpoint
from store.files import file_sha256
from store.lineage import CollectionInfo, CollectionPart, Lineage, set_row
from store.locks import _now
from store.settings import StoreError, graceful_home, subdir

COLUMNS = ("item_id", "key", "label", "generation", "margin", "fingerprint", "embedding")
LEGACY_COLUMNS = ("item_id", "label", "generation", "margin", "embedding")  # before keys
SMALL_COLUMNS = COLUMNS[:-1]  # every column but the embedding
UNLABELLED = -1  # the label of an item whose source has none
ROW_GROUP_ROWS = 8192
_PART_RE = re.compile(r"^part-(\d{5,})(?:\.v(\d+))?\.parquet$")
PENDING = ".pending"  # the suffix of a writer's intent marker: ``.NAME.pending``


class CollectionStoreError(StoreError):
    """A bad collection file or a mismatched write; the message names the file or the problem."""


class PartGone(CollectionStoreError):
    """A part listed by a manifest snapshot was superseded and deleted before it was read."""


def gallery_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("item_id", pa.int64(), nullable=False),
            pa.field("key", pa.string(), nullable=False),
            pa.field("label", pa.int64(), nullable=False),
            pa.field("generation", pa.int32(), nullable=False),
            # a stored uncertainty: the margin between the two top class probabilities
            pa.field("margin", pa.float32(), nullable=False),
            pa.field("fingerprint", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        ]
    )


_FIELDS = gallery_schema(1)  # every column's type but the embedding's (dim 1 here)


def _adapt(table: pa.Table | pa.RecordBatch, columns: Sequence[str]) -> pa.Table | pa.RecordBatch:
    """``columns`` of a legacy part's table: ``key`` is the item id, no fingerprint; typed
    as a current part's (not null), so the two concatenate."""
    arrays, fields = [], []
    for c in columns:
        if c == "key":
            arrays.append(table.column("item_id").cast(pa.string()))
        elif c == "fingerprint":
            arrays.append(pa.array([""] * table.num_rows, pa.string()))
        else:
            arrays.append(table.column(c))
        fields.append(table.schema.field(c) if c == "embedding" else _FIELDS.field(c))
    return type(table).from_arrays(arrays, schema=pa.schema(fields))


def _legacy_read(columns: Sequence[str]) -> list[str]:
    """The columns of a legacy part to read for ``columns`` (:func:`_adapt` makes the rest)."""
    return sorted({c for c in columns if c in LEGACY_COLUMNS} | {"item_id"})


def part_name(slot: int, version: int = 0) -> str:
    """The file name of version ``version`` of slot ``slot``."""
    return f"part-{slot:05d}.parquet" if version == 0 else f"part-{slot:05d}.v{version}.parquet"


def parse_part_name(name: str) -> tuple[int, int] | None:
    """(slot, version) of a part file name, or None for any other name."""
    m = _PART_RE.match(name)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2) or 0)


def slot_of(name: str) -> int:
    parsed = parse_part_name(name)
    if parsed is None:
        raise CollectionStoreError(f"{name!r} is not a collection part name")
    return parsed[0]


@dataclass
class CollectionRows:
    """Column arrays of collection rows (numpy; keys and fingerprints as object arrays)."""

    item_id: np.ndarray
    label: np.ndarray
    generation: np.ndarray
    margin: np.ndarray
    embedding: np.ndarray  # float32 (n, dim)
    key: np.ndarray | None = None  # str; None: the item ids (the scenario's keys)
    fingerprint: np.ndarray | None = None  # str; None: no fingerprint ("")

    def __post_init__(self) -> None:
        if self.key is None:
            self.key = np.asarray([str(int(i)) for i in self.item_id], dtype=object)
        if self.fingerprint is None:
            self.fingerprint = np.full(len(self.item_id), "", dtype=object)

    def __len__(self) -> int:
        return len(self.item_id)

    def to_table(self, dim: int) -> pa.Table:
        emb = np.ascontiguousarray(self.embedding, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != dim:
            raise CollectionStoreError(
                f"embedding dim mismatch: the collection stores dim {dim}, got shape {emb.shape}"
            )
        n = len(self.item_id)
        for col in ("key", "label", "generation", "margin", "fingerprint"):
            if len(getattr(self, col)) != n or len(emb) != n:
                raise CollectionStoreError(f"column lengths differ: {n} item ids but {col} differs")
        if not np.isfinite(emb).all():
            raise CollectionStoreError("embeddings contain NaN or inf; nothing was written")
        flat = pa.array(emb.reshape(-1), type=pa.float32())
        return pa.Table.from_arrays(
            [
                pa.array(self.item_id, pa.int64()),
                pa.array(list(self.key), pa.string()),  # type: ignore[arg-type]
                pa.array(self.label, pa.int64()),
                pa.array(self.generation, pa.int32()),
                pa.array(self.margin, pa.float32()),
                pa.array(list(self.fingerprint), pa.string()),  # type: ignore[arg-type]
                pa.FixedSizeListArray.from_arrays(flat, dim),
            ],
            schema=gallery_schema(dim),
        )

    @classmethod
    def from_table(cls, table: pa.Table | pa.RecordBatch) -> CollectionRows:
        """Rows of a part's table (a legacy part's is adapted by :meth:`Collection.read_part`)."""
        emb = table.column("embedding")
        if isinstance(emb, pa.ChunkedArray):
            emb = emb.combine_chunks()
        dim = emb.type.list_size
        values = emb.flatten().to_numpy(zero_copy_only=False)
        # copies: Arrow buffers are read-only and backfill edits rows in place
        return cls(
            item_id=np.array(table.column("item_id").to_numpy(), dtype=np.int64),
            label=np.array(table.column("label").to_numpy(), dtype=np.int64),
            generation=np.array(table.column("generation").to_numpy(), dtype=np.int32),
            margin=np.array(table.column("margin").to_numpy(), dtype=np.float32),
            embedding=np.array(values, dtype=np.float32).reshape(-1, dim),
            key=np.asarray(table.column("key").to_pylist(), dtype=object),
            fingerprint=np.asarray(table.column("fingerprint").to_pylist(), dtype=object),
        )

    @classmethod
    def concat(cls, parts: list[CollectionRows]) -> CollectionRows:
        return cls(
            **{c: np.concatenate([getattr(p, c) for p in parts]) for c in COLUMNS}  # type: ignore[arg-type]
        )

    def take(self, idx: np.ndarray) -> CollectionRows:
        return CollectionRows(**{c: getattr(self, c)[idx] for c in COLUMNS})


class Collection:
    """The Parquet collection and its manifest in the lineage."""

    def __init__(self, lineage: Lineage, root: Path | None = None) -> None:
        self.lineage = lineage
        self._root = root
        self._lock_fd: int | None = None

    @property
    def root(self) -> Path:
        if self._root is None:
            self._root = subdir("gallery")
        self._root.mkdir(parents=True, exist_ok=True)
        return self._root

    def _lock_path(self) -> Path:
        """``.gallery.lock`` beside the gallery directory (found without creating it)."""
        root = self._root if self._root is not None else graceful_home(create=False) / "gallery"
        return root.parent / f".{root.name}.lock"

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the gallery's single-writer lock (re-entrant in this object).

        A second writer (another backfill, in this or another process) fails at once
        instead of racing; the lock dies with its process, so a killed job resumes.
        """
        if self._lock_fd is not None:
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._lock_path()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CollectionStoreError(
                f"another backfill is writing the collection ({path} is locked); "
                "wait for it to finish or stop it, then start again"
            ) from None
        self._lock_fd = fd
        try:
            yield
        finally:
            self._lock_fd = None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def writer_active(self) -> bool:
        """Whether a writer (a backfill, in any process on this host) holds the lock now."""
        if self._lock_fd is not None:
            return True
        path = self._lock_path()
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing also drops a lock this probe took
        return False

    # -- metadata --------------------------------------------------------------------
    def info(self) -> CollectionInfo | None:
        return self.lineage.gallery_info()

    def exists(self) -> bool:
        return self.info() is not None

    def require(self) -> CollectionInfo:
        info = self.info()
        if info is None:
            raise CollectionStoreError(
                "the collection is empty: run `graceful run` or `graceful cycle` first"
            )
        return info

    def manifest(self) -> list[CollectionPart]:
        """The committed parts, in slot order: one consistent snapshot (a single query)."""
        return self.lineage.gallery_parts()

    def part_names(self) -> list[str]:
        return [p.name for p in self.manifest()]

    def counts(self) -> dict[int, int]:
        return self.lineage.gallery_counts()

    # -- reading ---------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        return self.root / name

    @contextmanager
    def _reading(self, name: str, info: CollectionInfo) -> Iterator[pq.ParquetFile]:
        """Part ``name``, opened and its schema checked (reads the footer only); a read
        that fails names the corrupt file."""
        path = self._path(name)
        try:
            f = pq.ParquetFile(path)
        except FileNotFoundError as exc:
            raise PartGone(f"collection part {path} is missing") from exc
        except (pa.ArrowInvalid, OSError) as exc:
            raise CollectionStoreError(f"corrupt Parquet file {path}: {exc}") from exc
        expected = gallery_schema(info.embed_dim)
        legacy = pa.schema([expected.field(c) for c in LEGACY_COLUMNS])  # parts before keys
        schema = f.schema_arrow.remove_metadata()
        if not schema.equals(expected) and not schema.equals(legacy):
            f.close()
            if _dims_only_differ(schema, expected):
                raise CollectionStoreError(
                    f"embedding dim mismatch in {path}: it stores "
                    f"{schema.field('embedding').type}, the collection's dim is {info.embed_dim}"
                )
            raise CollectionStoreError(
                f"foreign Parquet file {path}: schema ({_short(schema)}) is not the "
                f"gallery's ({_short(expected)})"
            )
        try:
            yield f
        except (pa.ArrowInvalid, OSError) as exc:
            raise CollectionStoreError(f"corrupt Parquet file {path}: {exc}") from exc
        finally:
            f.close()

    def read_part(
        self, name: str, info: CollectionInfo | None = None, columns: Sequence[str] | None = None
    ) -> pa.Table:
        """Read (``columns`` of) one part file, validated against the gallery's schema."""
        with self._reading(name, info or self.require()) as f:
            if "key" in f.schema_arrow.names:
                return f.read(columns=list(columns) if columns is not None else None)
            want = list(columns) if columns is not None else list(COLUMNS)
            return _adapt(f.read(columns=_legacy_read(want)), want)

    def read_rows(self, name: str, info: CollectionInfo | None = None) -> CollectionRows:
        return CollectionRows.from_table(self.read_part(name, info))

    def iter_batches(
        self,
        columns: Sequence[str] = COLUMNS,
        names: Sequence[str] | None = None,
        batch_rows: int = ROW_GROUP_ROWS,
    ) -> Iterator[tuple[str, pa.RecordBatch]]:
        """Stream ``columns`` of the committed parts (or of ``names``) in row batches.

        Memory is one batch, whatever the gallery's size.
        """
        info = self.require()
        for name in names if names is not None else self.part_names():
            with self._reading(name, info) as f:
                legacy = "key" not in f.schema_arrow.names
                read = _legacy_read(columns) if legacy else list(columns)
                for batch in f.iter_batches(batch_size=batch_rows, columns=read):
                    yield name, _adapt(batch, columns) if legacy else batch

    def read_all(self) -> CollectionRows:
        """All rows, ordered by item id (for evaluation on small galleries)."""
        parts = [self.read_rows(name) for name in self.part_names()]
        if not parts:
            raise CollectionStoreError("the gallery has no parts")
        rows = CollectionRows.concat(parts)
        return rows.take(np.argsort(rows.item_id, kind="stable"))

    # -- checking --------------------------------------------------------------------
    def verify(self, check_hash: bool = True) -> list[CollectionPart]:
        """Check every committed part and the directory; returns the manifest checked.

        Raises :class:`CollectionStoreError` naming the file: a missing part, a corrupt or
        foreign Parquet file, a row count or sha256 that differs from the manifest, or a
        Parquet file in the gallery directory that is not one of the gallery's parts.
        Reads each file once (streaming); changes nothing.
        """
        info = self.require()
        manifest = self.manifest()
        for part in manifest:
            self.check_part(part, info, check_hash)
        slots = {slot_of(part.name) for part in manifest}
        for path in sorted(self.root.glob("*.parquet")):
            parsed = parse_part_name(path.name)
            if self._pending(path.name).exists():
                continue  # a write in progress, or one a kill cut short: reconcile()'s
            if parsed is None or parsed[0] not in slots:
                raise CollectionStoreError(
                    f"foreign file {path} in the gallery directory: it is not one of the "
                    "gallery's parts; move it out of the gallery directory"
                )
        return manifest

    def check_part(
        self, part: CollectionPart, info: CollectionInfo | None = None, check_hash: bool = True
    ) -> None:
        """Check one committed part against its manifest row: present (else
        :class:`PartGone`), a Parquet file of the collection's schema, its row count and
        (with ``check_hash``) its sha256. Raises :class:`CollectionStoreError` naming the
        file and the fix.
        """
        info = info or self.require()
        path = self._path(part.name)
        if not path.exists():
            raise PartGone(f"collection part {path} is missing (listed in the manifest)")
        with self._reading(part.name, info) as f:
            rows = f.metadata.num_rows
        if rows != part.rows:
            raise CollectionStoreError(
                f"gallery part {path} has {rows} rows, the manifest records {part.rows}"
            )
        try:
            digest = file_sha256(path) if check_hash else part.sha256
        except FileNotFoundError as exc:  # superseded and deleted between the checks
            raise PartGone(f"collection part {path} is missing (superseded)") from exc
        if digest != part.sha256:
            raise CollectionStoreError(
                f"gallery part {path} was modified outside graceful: its sha256 differs from "
                "the manifest's; nothing was read from it. Restore the file from a backup of "
                "GRACEFUL_HOME, or index the collection afresh in a new GRACEFUL_HOME"
            )

    def reconcile(self) -> list[str]:
        """Delete files the manifest does not reference: temporary files of interrupted
        writes, versions never committed and versions already superseded. Returns them.

        Only files named like versions of the gallery's own slots are touched, and files
        an interrupted writer marked as its own (``.NAME.pending``: an append's new slot,
        a dropped part), whatever their slot.
        """
        with self.writing():
            current = {slot_of(p.name): p.name for p in self.manifest()}
            committed = set(current.values())
            removed = []
            for marker in sorted(self.root.glob(f".part-*{PENDING}")):
                name = marker.name[1 : -len(PENDING)]
                if name not in committed and (self.root / name).exists():
                    (self.root / name).unlink(missing_ok=True)  # its writer died before its commit
                    removed.append(name)
                marker.unlink(missing_ok=True)
            for path in sorted(self.root.iterdir()):
                name, parsed = path.name, parse_part_name(path.name)
                temporary = name.startswith(".part-") and ".tmp-" in name
                if temporary or (parsed is not None and current.get(parsed[0], name) != name):
                    path.unlink(missing_ok=True)
                    removed.append(name)
            return removed

    # -- writing ---------------------------------------------------------------------
    def _stage(self, name: str, rows: CollectionRows, dim: int) -> _Staged:
        """Write ``rows`` under a temporary name, fsync, and rename it to ``name``.

        ``name`` is a new version no manifest references yet, so nothing reads it
        before the commit that switches the manifest to it.
        """
        table = rows.to_table(dim)
        final = self._path(name)
        tmp = final.with_name(f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        sink = pa.BufferOutputStream()
        # no dictionary for ids and float vectors: it never pays and costs 6x the write
        pq.write_table(
            table,
            sink,
            row_group_size=ROW_GROUP_ROWS,
            use_dictionary=["label", "generation"],
            # floats of an embedding do not compress; statistics of them serve no reader
            compression={c: "snappy" for c in SMALL_COLUMNS} | {"embedding.list.element": "none"},
            write_statistics=["item_id", "label", "generation", "margin"],
        )
        data = sink.getvalue()
        sha = hashlib.sha256(memoryview(data)).hexdigest()
        try:
            with open(tmp, "wb") as f:
                f.write(memoryview(data))
                f.flush()
                os.fsync(f.fileno())
            # before the file has its name: a kill from here on is undone
            self._pending(name).touch()
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(self.root)  # the marker and the rename are durable together
        failpoint("gallery-staged")  # the kill tests stop here: in place, not committed
        return _Staged(name, final, sha, len(rows), _counts(rows.generation))

    def _pending(self, name: str) -> Path:
        """The intent marker of part file ``name``: the manifest decides that file's fate."""
        return self._path(f".{name}{PENDING}")

    def _settle(self, *names: str) -> None:
        """The commit that decides these files' fate happened (or failed): no marker."""
        for name in names:
            self._pending(name).unlink(missing_ok=True)

    @staticmethod
    def _record(session: Session, st: _Staged, replaces: str | None) -> None:
        # plain statements, not the ORM's load-modify-flush: this runs once a part
        table = CollectionPart.__table__
        if replaces is not None:
            gone = session.execute(delete(table).where(table.c.name == replaces))
            if gone.rowcount != 1:
                raise CollectionStoreError(
                    f"gallery part {replaces} is no longer in the manifest (another writer "
                    "changed the gallery); nothing was committed"
                )
        session.execute(
            insert(table).values(
                name=st.name, rows=st.rows, sha256=st.sha256, counts=st.counts, updated_at=_now()
            )
        )

    def rewrite_part(
        self,
        name: str,
        rows: CollectionRows,
        also: Callable[[Session], None] | None = None,
    ) -> str:
        """Replace committed part ``name`` by ``rows`` (same item ids): a new version
        file, then one transaction switching the manifest and applying ``also``.

        Returns the new part's name. On any failure the manifest still names ``name``.
        """
        info = self.require()
        slot, version = parse_part_name(name) or (slot_of(name), 0)  # slot_of raises
        before = next((int(p.rows) for p in self.manifest() if p.name == name), None)
        staged = self._stage(part_name(slot, version + 1), rows, info.embed_dim)

        def switch(s: Session) -> None:
            self._record(s, staged, replaces=name)
            if before is not None and before != len(rows):  # a prune took rows out
                _add_items(s, len(rows) - before)

        self._commit(staged, switch, also)
        self._path(name).unlink(missing_ok=True)  # superseded (reconcile() if we die first)
        return staged.name

    def _commit(
        self,
        staged: _Staged,
        write: Callable[[Session], None],
        also: Callable[[Session], None] | None,
    ) -> None:
        """One transaction: ``write`` (the part's records), then ``also``; on any failure
        the staged file goes unless the commit did happen."""
        try:
            with self.lineage.session() as s:
                write(s)
                if also is not None:
                    also(s)
        except BaseException:
            self._unlink_if_unreferenced(staged.name)
            raise
        self._settle(staged.name)

    def _unlink_if_unreferenced(self, *names: str) -> None:
        """Delete staged files after a failed commit, unless the commit did happen."""
        try:
            committed = set(self.part_names())
        except Exception:  # cannot tell: leave them to reconcile()
            return
        for name in names:
            if name not in committed:
                self._path(name).unlink(missing_ok=True)
        self._settle(*names)

    def _clear_leftovers(self) -> None:
        """Files of an interrupted first indexing (there is no manifest yet)."""
        for path in self.root.iterdir():
            if parse_part_name(path.name) is not None or (
                path.name.startswith(".part-")
                and (".tmp-" in path.name or path.name.endswith(PENDING))
            ):
                path.unlink(missing_ok=True)

    def drop(self) -> int:
        """Remove the whole gallery (manifest and info in one transaction, then its files and
        the index); returns the items it held. For a gallery whose items no longer exist."""
        with self.writing():
            info = self.info()
            with Session(self.lineage.engine) as s, s.begin():
                s.execute(delete(CollectionPart))
                s.execute(delete(CollectionInfo))
            for path in self.root.iterdir():
                if path.is_file():
                    path.unlink(missing_ok=True)
            return info.items if info is not None else 0

    def create(self, dataset: str, rows: CollectionRows, part_rows: int = 4096) -> None:
        """Build a new gallery from ``rows`` (the first full indexing), all or nothing."""
        if len(np.unique(rows.item_id)) != len(rows):
            raise CollectionStoreError("duplicate item ids in the new gallery")
        order = np.argsort(rows.item_id, kind="stable")
        dim = int(np.asarray(rows.embedding).shape[1])
        self.create_from_batches(
            dataset,
            dim,
            (rows.take(order[i : i + part_rows]) for i in range(0, len(rows), part_rows)),
            part_rows=part_rows,
        )

    def create_from_batches(
        self, dataset: str, dim: int, batches: Iterable[CollectionRows], part_rows: int = 4096
    ) -> int:
        """Build a new gallery from batches in strictly increasing item-id order, holding
        one part in memory at a time; all parts commit in one transaction. Returns items.
        """
        with self.writing():
            if self.exists():
                raise CollectionStoreError("the gallery already exists; backfill it instead")
            if part_rows < 1:
                raise CollectionStoreError(f"part_rows must be >= 1, got {part_rows}")
            self._clear_leftovers()
            staged: list[_Staged] = []
            pending: list[CollectionRows] = []
            n_pending = 0
            last = None
            total = 0

            def flush(final: bool) -> None:
                """Stage the pending rows as whole parts (the rest too when ``final``)."""
                nonlocal pending, n_pending
                if n_pending < part_rows and not (final and n_pending):
                    return
                rows = CollectionRows.concat(pending)
                full = n_pending if final else n_pending - n_pending % part_rows
                for start in range(0, full, part_rows):
                    chunk = rows.take(np.arange(start, min(start + part_rows, full)))
                    staged.append(self._stage(part_name(len(staged)), chunk, dim))
                rest = rows.take(np.arange(full, n_pending))
                pending, n_pending = ([rest] if len(rest) else []), len(rest)

            try:
                for batch in batches:
                    if len(batch) == 0:
                        continue
                    ids = np.asarray(batch.item_id)
                    if np.any(np.diff(ids) <= 0) or (last is not None and ids[0] <= last):
                        raise CollectionStoreError(
                            "gallery items must come in strictly increasing id order"
                        )
                    last = int(ids[-1])
                    batch.to_table(dim)  # validates dim and values before anything is kept
                    pending.append(batch)
                    n_pending += len(batch)
                    total += len(batch)
                    flush(final=False)
                flush(final=True)
                if not staged:
                    raise CollectionStoreError("no items: the new gallery would be empty")
                info = CollectionInfo(dataset=dataset, embed_dim=dim, items=total, next_id=last + 1)
                with self.lineage.session() as s:
                    s.add(info)
                    for st in staged:
                        self._record(s, st, replaces=None)
            except BaseException:
                self._unlink_if_unreferenced(*(st.name for st in staged))
                raise
            self._settle(*(st.name for st in staged))
            return total

    # -- a growing collection ---------------------------------------------------------
    def next_item_id(self) -> int:
        """The id the next new item gets: above every id the collection ever assigned."""
        info = self.info()
        if info is None:
            return 0
        if info.next_id is not None:
            return int(info.next_id)
        top = -1  # a gallery made before next_id: its parts hold every id it assigned
        for _, batch in self.iter_batches(["item_id"]):
            if batch.num_rows:
                top = max(top, int(np.max(batch.column(0).to_numpy())))
        return top + 1

    def append(
        self,
        dataset: str,
        rows: CollectionRows,
        also: Callable[[Session], None] | None = None,
    ) -> str:
        """Add ``rows`` (new items, ids from :meth:`next_item_id` up) as a new part.

        One transaction records the part, the collection's size and id high-water mark
        (creating the collection if there is none) and applies ``also``: an indexing
        killed between two appends resumes with every committed item present once.
        """
        if len(rows) == 0:
            raise CollectionStoreError("no items to append")
        ids = np.asarray(rows.item_id, dtype=np.int64)
        if np.any(np.diff(ids) <= 0):
            raise CollectionStoreError("appended items must come in strictly increasing id order")
        with self.writing():
            info = self.info()
            dim = int(np.asarray(rows.embedding).shape[1])
            if info is not None and dim != int(info.embed_dim):
                raise CollectionStoreError(
                    f"embedding dim mismatch: the collection stores dim {info.embed_dim}, got {dim}"
                )
            start = self.next_item_id()
            if ids[0] < start:
                raise CollectionStoreError(
                    f"item id {int(ids[0])} was assigned before (next: {start})"
                )
            if info is None:
                self._clear_leftovers()
            slots = [slot_of(p.name) for p in self.manifest()]
            staged = self._stage(part_name(max(slots) + 1 if slots else 0), rows, dim)
            next_id = int(ids[-1]) + 1

            def add(s: Session) -> None:
                if info is None:
                    s.add(CollectionInfo(dataset=dataset, embed_dim=dim, items=0, next_id=next_id))
                    s.flush()
                else:
                    set_row(s, CollectionInfo, 1, next_id=next_id)
                self._record(s, staged, replaces=None)
                _add_items(s, len(rows))

            self._commit(staged, add, also)
            return staged.name

    def drop_part(self, name: str, also: Callable[[Session], None] | None = None) -> None:
        """Remove committed part ``name`` and its items (every one of them was pruned)."""
        with self.writing():
            rows = next((int(p.rows) for p in self.manifest() if p.name == name), None)
            if rows is None:
                raise CollectionStoreError(f"gallery part {name} is not in the manifest")
            self._pending(name).touch()  # a kill after the commit leaves the file to reconcile()
            with self.lineage.session() as s:
                table = CollectionPart.__table__
                s.execute(delete(table).where(table.c.name == name))
                _add_items(s, -rows)
                if also is not None:
                    also(s)
            self._path(name).unlink(missing_ok=True)
            self._settle(name)

    def set_dataset(self, dataset: str) -> None:
        """Record that the collection's items now come from ``dataset`` (same kind, moved)."""
        with self.lineage.session() as s:
            set_row(s, CollectionInfo, 1, dataset=dataset)

    def keys(self, columns: Sequence[str] = ("key", "item_id", "fingerprint")) -> pa.Table:
        """``columns`` of every committed item (no embeddings), streamed part by part."""
        batches = []
        if self.exists():
            batches = [pa.Table.from_batches([b]) for _, b in self.iter_batches(list(columns))]
        if not batches:
            return pa.table({c: pa.array([], _FIELDS.field(c).type) for c in columns})
        return pa.concat_tables(batches).combine_chunks()


def _add_items(session: Session, delta: int) -> None:
    set_row(session, CollectionInfo, 1, items=CollectionInfo.__table__.c["items"] + delta)


@dataclass
class _Staged:
    name: str
    path: Path
    sha256: str
    rows: int
    counts: dict[str, int]


def _counts(generation: np.ndarray) -> dict[str, int]:
    gens, n = np.unique(np.asarray(generation), return_counts=True)
    return {str(int(g)): int(c) for g, c in zip(gens, n, strict=True)}


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _short(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def _dims_only_differ(schema: pa.Schema, expected: pa.Schema) -> bool:
    if schema.names not in (expected.names, list(LEGACY_COLUMNS)):
        return False
    emb, exp = schema.field("embedding").type, expected.field("embedding").type
    return (
        pa.types.is_fixed_size_list(emb)
        and emb.value_type == exp.value_type
        and emb.list_size != exp.list_size
        and all(schema.field(n).type == expected.field(n).type for n in schema.names[:-1])
    )

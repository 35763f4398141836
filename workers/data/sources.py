"""Sources: a user's labelled training data, which grows, read by key and never whole.

- ``imagefolder:DIR``: class folders under ``DIR/train/`` (PNG/JPEG, files added over
  time, new classes may appear); the key is the path relative to DIR
  (``train/cat/0001.png``). The evaluation set is ``DIR/test/<class>/*``.
- ``parquet:PATH``: a file, a directory of Parquet files (hive partitions allowed) or a
  pyarrow-filesystem URI (``s3://bucket/prefix``); columns ``item_id`` (the key, unique,
  non-null), ``label`` (a class name, or an integer with an optional ``class_name``),
  a feature column (list of numbers) or ``image`` (PNG/JPEG bytes), and ``split``:
  rows with ``split == "test"`` are the evaluation set, every other row is training data.
  One schema for every use: a collection reads it too, and workers.data.datasets reads
  a file whole as a fixed data set (there ``split`` is required); the columns are
  detected and checked here (:func:`_parquet_columns`, :func:`data_set_columns`).

A *scan* lists a source's training items (key, class name, and what identifies their
content: size, mtime and a content hash for files; file, row group and statistics for
Parquet) without reading their pixels or features, and fingerprints the whole list. A
*reader* yields the items of a scan in contiguous position ranges ("units": blocks of
files, Parquet row groups), which workers.data.stream shuffles within a bounded window: memory
does not grow with the source. Every bad input raises :class:`SourceError`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from workers.data.datasets import (
    IMAGE_SUFFIXES,
    Dataset,
    DatasetError,
    _decode_images,
    _open_image,
    _parquet_features,
    _parquet_image_items,
    decode_images_as,
    image_size_of,
    parse_spec,
)
from workers.data.errors import SourceError
from workers.data.parquet_schema import (
    _class_names,
    _clean,
    _parquet_columns,
    redact,
    repeated_keys,
)

SOURCE_KINDS = ("imagefolder", "parquet")
BLOCK = 1024  # items per unit of a file-per-item source
SCAN_BATCH = 65_536  # Parquet rows per batch of a scan or a collection's listing


class SourceUnreachable(SourceError):
    """The source's store does not answer (an endpoint down, a network error): a failure
    to retry, not bad input (exit 1, not 2)."""


@dataclass(frozen=True)
class InputFormat:
    """What every item is decoded to: the model's input (fixed by the evaluation set)."""

    shape: tuple[int, ...]  # (C, H, W) for images, (D,) for features
    mode: str | None = None  # "L" or "RGB" for images

    def as_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "mode": self.mode}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputFormat:
        return cls(tuple(int(v) for v in d["shape"]), d.get("mode"))


def input_format(input_shape: tuple[int, ...]) -> InputFormat:
    """What a model with ``input_shape`` takes: images as (C, H, W), features as (D,)."""
    shape = tuple(int(v) for v in input_shape)
    if len(shape) == 3:
        return InputFormat(shape, "L" if shape[0] == 1 else "RGB")
    return InputFormat(shape)


@dataclass
class Scan:
    """A source's training items in training order, and their fingerprint.

    ``table`` has ``key`` and ``label`` (class name) and per-kind columns that locate and
    identify each item; positions (row numbers) are what readers and teachers index.
    """

    source: str
    table: pa.Table
    fingerprint: str
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def items(self) -> int:
        return self.table.num_rows

    def class_counts(self) -> dict[str, int]:
        import pyarrow.compute as pc

        counts = pc.value_counts(self.table.column("label")).to_pylist()
        rows = sorted(counts, key=lambda r: str(r["values"]))
        return {str(r["values"]): int(r["counts"]) for r in rows}


@dataclass(frozen=True)
class EvalSet:
    """The fixed labelled evaluation set, decoded (it is held out and modest in size)."""

    x: np.ndarray
    labels: list[str]  # class names
    fingerprint: str
    input_format: InputFormat
    keys: list[str] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)  # each item's content hash

    def items_table(self) -> pa.Table:
        """Key, class name and content hash per item: what a later change is told against."""
        return pa.table({"key": self.keys, "label": self.labels, "sha256": self.digests})

    def dataset(self, spec: str, vocabulary: dict[str, int]) -> Dataset:
        """As the in-memory evaluation ``Dataset`` the metrics and the gallery read."""
        names = sorted(vocabulary, key=vocabulary.__getitem__)
        y = np.asarray([vocabulary[n] for n in self.labels], dtype=np.int64)
        return Dataset(
            spec,
            self.x[:0],
            y[:0],
            self.x,
            y,
            tuple(names),
            test_keys=tuple(self.keys),
        )


# -- filesystem ------------------------------------------------------------------------
def _filesystem(path: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) for a local path or a URI (s3://, gs://, ...)."""
    import pyarrow.fs as pafs

    if "://" not in path:
        return pafs.LocalFileSystem(), path
    try:
        if path.startswith("s3://") and "endpoint_override" not in path:
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                return _s3_at(path, endpoint)
        return pafs.FileSystem.from_uri(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise SourceError(f"cannot open {redact(path)}: {_clean(exc)}") from None


def _s3_at(uri: str, endpoint: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    scheme, _, host = endpoint.partition("://")
    fs = pafs.S3FileSystem(
        endpoint_override=host or scheme,
        scheme=scheme if host else "https",
        connect_timeout=5,
        request_timeout=10,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2),
    )
    return fs, uri.removeprefix("s3://").split("?", 1)[0]


# -- image folders ---------------------------------------------------------------------
def file_entry(
    root: Path, path: Path, skipped: list[dict[str, str]] | None
) -> tuple[str, os.stat_result] | None:
    """(key, stat) of an image file under ``root``, or None when it cannot be an item: a
    name that is not UTF-8 (keys are text), or a file that cannot be stat'ed (a broken
    link, a symlink loop). Such a file is recorded in ``skipped`` (key shown with its
    undecodable bytes replaced); without ``skipped`` it is an error."""
    rel = path.relative_to(root).as_posix()
    try:
        rel.encode("utf-8")
        return rel, path.stat()
    except UnicodeEncodeError:
        why = "its name is not UTF-8: rename it (keys are text)"
    except OSError as exc:  # ELOOP, ENOENT of a dangling link, EACCES
        why = f"cannot stat it: {exc.strerror or exc}"
    shown = os.fsencode(rel).decode("utf-8", "replace")
    if skipped is None:
        raise SourceError(f"{shown}: {why}")
    skipped.append({"key": shown, "reason": why})
    return None


def image_files(
    root: Path, below: str | None = None, skipped: list[dict[str, str]] | None = None
) -> list[tuple[str, str | None, os.stat_result]]:
    """(key, class name, stat) of every image under ``root/below/<class>/``, or without
    ``below`` (key, None, stat) of every image under ``root``, in folder order. Linked
    folders inside are not followed (a class folder may be a link); files that cannot be
    items: :func:`file_entry`."""
    base = root / below if below else root
    tops: list[tuple[Path, str | None]] = [(base, None)]
    if below:
        classes = [c for c in sorted(base.iterdir()) if c.is_dir() and not c.name.startswith(".")]
        tops = [(c, c.name) for c in classes]
    out = []
    for top, label in tops:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."):
                    entry = file_entry(root, Path(dirpath) / name, skipped)
                    if entry is not None:
                        out.append((entry[0], label, entry[1]))
    return out


def hashed_files(
    root: Path,
    files: list[tuple[str, str | None, os.stat_result]],
    known: dict[str, tuple[int, int, str]],
    skipped: list[dict[str, str]],
) -> Iterator[tuple[str, str | None, os.stat_result, str]]:
    """``files`` with their content hashes: a file whose size and mtime match ``known``
    (key -> size, mtime, hash of an earlier listing) is neither decoded nor hashed again;
    one that does not decode is left out (recorded in ``skipped``)."""
    for key, label, st in files:
        seen = known.get(key)
        if seen is not None and tuple(seen[:2]) == (st.st_size, st.st_mtime_ns):
            yield key, label, st, seen[2]
        elif (why := _check_image(root / key)) is not None:
            skipped.append({"key": key, "reason": why})
        else:
            yield key, label, st, _file_sha(root / key)


def _check_image(path: Path) -> str | None:
    """None if the file decodes as an image of a size graceful takes, else why not."""
    try:
        with _open_image(path, str(path.name)) as img:
            if img.format == "JPEG":  # decoding at 1/8 scale still reads every block
                img.draft(img.mode, (img.width // 8 + 1, img.height // 8 + 1))
            img.load()
    except DatasetError as exc:
        return str(exc)[:300]
    except Exception as exc:  # PIL raises many kinds for a broken file
        return f"{type(exc).__name__}: {exc}"[:300]
    return None


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _items_digest(tag: bytes, keys: list, labels: list, shas: list) -> str:
    """The fingerprint of items listed as (key, class name, content hash)."""
    digest = hashlib.sha256(tag)
    for key, label, sha in zip(keys, labels, shas, strict=True):
        digest.update(f"{key}\0{label}\0{sha}\n".encode())
    return digest.hexdigest()


def _order_key(key: str) -> str:
    """Training order of file items: a hash of the key, so classes interleave in blocks."""
    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


def _scan_imagefolder(spec: str, root: Path, previous: pa.Table | None) -> Scan:
    train = root / "train"
    if not train.is_dir():
        raise SourceError(
            f"imagefolder {root}: no train/ directory; lay images out as "
            "DIR/train/<class>/*.png and DIR/test/<class>/*.png"
        )
    known: dict[str, tuple[int, int, str]] = {}
    if previous is not None and "sha256" in previous.column_names:
        old = (previous.column(c).to_pylist() for c in ("key", "size", "mtime_ns", "sha256"))
        known = {k: (s, m, h) for k, s, m, h in zip(*old, strict=True)}
    rows: dict[str, list] = {"key": [], "label": [], "size": [], "mtime_ns": [], "sha256": []}
    skipped: list[dict[str, str]] = []
    files = image_files(root, "train", skipped)
    for key, label, st, sha in hashed_files(root, files, known, skipped):
        for col, v in zip(rows, (key, label, st.st_size, st.st_mtime_ns, sha), strict=True):
            rows[col].append(v)
    if not rows["key"]:
        raise SourceError(f"imagefolder {root}: no readable PNG/JPEG images under train/<class>/")
    table = pa.table(rows)
    order = np.argsort(np.asarray([_order_key(k) for k in rows["key"]]), kind="stable")
    table = table.take(pa.array(order))
    columns = (table.column(c).to_pylist() for c in ("key", "label", "sha256"))
    return Scan(spec, table, _items_digest(b"graceful-imagefolder-v1", *columns), skipped)


def _eval_imagefolder(root: Path, size: tuple[int, int] | None = None) -> EvalSet:
    test = root / "test"
    if not test.is_dir():
        raise SourceError(
            f"imagefolder {root}: no test/ directory: the evaluation set is "
            "DIR/test/<class>/*.png (fixed, labelled)"
        )
    files = image_files(root, "test")
    if not files:
        raise SourceError(f"imagefolder {root}: no PNG/JPEG images under test/<class>/")
    keys, labels = [k for k, _, _ in files], [lab for _, lab, _ in files]
    shas = [_file_sha(root / k) for k in keys]
    x = _decode_images([(k, root / k) for k in keys], size)
    fingerprint = _items_digest(b"graceful-eval-imagefolder-v1", keys, labels, shas)
    return EvalSet(x, labels, fingerprint, input_format(x.shape[1:]), keys, shas)


def _decode(items: list[tuple[str, Any]], fmt: InputFormat) -> np.ndarray:
    """Decode images to ``fmt`` ((C, H, W) float32 in [0, 1])."""
    c, h, w = fmt.shape
    return decode_images_as(items, fmt.mode or ("L" if c == 1 else "RGB"), (h, w))


# -- Parquet ---------------------------------------------------------------------------
def _parquet_dataset(path: str) -> Any:
    import pyarrow.dataset as pads

    fs, where = _filesystem(path)
    try:
        info = fs.get_file_info(where)
    except (pa.ArrowException, OSError) as exc:
        raise SourceUnreachable(
            f"cannot reach {redact(path)}: {_clean(exc)}; check the address, the endpoint "
            "(AWS_ENDPOINT_URL) and the credentials"
        ) from None
    import pyarrow.fs as pafs

    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"Parquet source {redact(path)} does not exist")
    try:
        return pads.dataset(where, filesystem=fs, format="parquet", partitioning="hive")
    except (pa.ArrowException, OSError) as exc:
        raise SourceError(f"cannot read Parquet {redact(path)}: {_clean(exc)}") from None


def _units(ds: Any) -> list[Any]:
    """Row-group fragments in a fixed order (file path, then row group)."""
    frags = sorted(ds.get_fragments(), key=lambda f: f.path)
    return [rg for f in frags for rg in f.split_by_row_group()]


def _is_test(batch: pa.RecordBatch) -> np.ndarray:
    import pyarrow.compute as pc

    if "split" not in batch.schema.names:
        return np.zeros(batch.num_rows, dtype=bool)
    return pc.fill_null(pc.equal(batch.column("split"), "test"), False).to_numpy(
        zero_copy_only=False
    )


def label_indices(names: Any, vocabulary: dict[str, int]) -> np.ndarray:
    """Class names (an Arrow string column) -> head rows, without Python objects per row.

    Integer labels are head rows already (the scenario's keys files before its labels
    were names)."""
    import pyarrow.compute as pc

    if isinstance(names, pa.ChunkedArray):
        names = names.combine_chunks()
    if pa.types.is_integer(names.type):
        return np.asarray(names.to_numpy(zero_copy_only=False), dtype=np.int64)
    if pa.types.is_dictionary(names.type):  # map the few distinct names, then the indices
        per_name = label_indices(names.dictionary, vocabulary)
        return per_name[names.indices.to_numpy(zero_copy_only=False).astype(np.int64)]
    known = pa.array(list(vocabulary), type=pa.string())
    rows = np.asarray(list(vocabulary.values()), dtype=np.int64)
    at = pc.index_in(names, value_set=known)
    if at.null_count:
        missing = pc.filter(names, pc.is_null(at)).unique().to_pylist()[:5]
        raise SourceError(f"classes {missing} are not in the lineage's vocabulary")
    return rows[np.asarray(at.to_numpy(zero_copy_only=False), dtype=np.int64)]


def fragment_scanner(ds: Any, frag: Any, cols: list[str], **options: Any) -> Any:
    """A scanner of columns ``cols`` of Parquet fragment ``frag`` (of dataset ``ds``), in
    one thread."""
    import pyarrow.dataset as pads

    return pads.Scanner.from_fragment(
        frag, schema=ds.schema, columns=cols, use_threads=False, **options
    )


def keyed_rows(
    ds: Any, frag: Any, cols: list[str], path: str, noun: str = "source"
) -> Iterator[pa.RecordBatch]:
    """The non-test rows of one Parquet fragment in batches; every row must have a key."""
    for batch in fragment_scanner(ds, frag, cols, batch_size=SCAN_BATCH).to_batches():
        keep = ~_is_test(batch)
        if not keep.any():
            continue
        batch = batch.filter(pa.array(keep))
        if batch.column("item_id").null_count:
            raise SourceError(
                f"Parquet {noun} {redact(path)}: column 'item_id' has null rows in "
                f"{redact(frag.path)}; every row needs its own key"
            )
        yield batch


def _scan_columns(ds: Any, name_col: str | None) -> list[str]:
    return ["item_id", "label"] + [c for c in ("split", name_col) if c and c in ds.schema.names]


def _scan_parquet(spec: str, path: str) -> Scan:
    import pyarrow.compute as pc

    ds = _parquet_dataset(path)
    _, name_col = _parquet_columns(ds, path)
    cols = _scan_columns(ds, name_col)
    digest = hashlib.sha256(b"graceful-parquet-v1")
    keys, labels, units, places = [], [], [], []
    try:
        for u, frag in enumerate(_units(ds)):
            rg = frag.row_groups[0]
            stats = {k: {s: str(v) for s, v in d.items()} for k, d in (rg.statistics or {}).items()}
            digest.update(
                f"{frag.path}\0{rg.id}\0{rg.num_rows}\0{sorted(stats.items())}\n".encode()
            )
            for batch in keyed_rows(ds, frag, cols, path):
                ids = pc.cast(batch.column("item_id"), pa.string())
                names = _class_names(batch, name_col, path)
                for arr in (ids, names):  # the values and their offsets: exact, no copies
                    for buf in arr.buffers():
                        if buf is not None:
                            digest.update(buf)
                keys.append(ids)
                labels.append(names)
                units.append(np.full(batch.num_rows, u, dtype=np.int32))
            places.append((frag.path, rg.id))
    except (pa.ArrowException, OSError) as exc:
        raise SourceError(f"cannot read Parquet {redact(path)}: {_clean(exc)}") from None
    if not keys:
        raise SourceError(f"Parquet source {redact(path)}: no training rows (split != 'test')")
    key_col = pa.chunked_array(keys).combine_chunks()
    keys.clear()
    n_repeat, shown = repeated_keys(key_col)
    if n_repeat:
        raise SourceError(
            f"Parquet source {redact(path)}: {n_repeat} item_id value(s) repeat ({shown}); "
            "keys must be unique"
        )
    unit = np.concatenate(units)
    units.clear()
    # file and row group of each row, as small integers into the list of places (the
    # units go by file path: the files' dictionary is in path order)
    files = pa.array([f for f, _ in places], pa.string()).dictionary_encode()
    group_of = np.asarray([g for _, g in places], dtype=np.int32)
    table = pa.table(
        {
            "key": key_col,
            "label": pa.chunked_array(labels).combine_chunks().dictionary_encode(),
            "file": files.take(pa.array(unit)),
            "row_group": group_of[unit],
        }
    )
    return Scan(spec, table, digest.hexdigest())


def _eval_parquet(path: str, size: tuple[int, int] | None = None) -> EvalSet:
    import pyarrow.dataset as pads

    ds = _parquet_dataset(path)
    column, name_col = _parquet_columns(ds, path)
    if "split" not in ds.schema.names:
        raise SourceError(
            f"Parquet source {redact(path)}: no 'split' column; rows with split == 'test' "
            "are the fixed evaluation set every generation is measured on"
        )
    cols = _scan_columns(ds, name_col) + [column]
    test = pads.field("split") == "test"
    try:  # in the order of the files (by path) and their rows, as workers.data.datasets reads
        parts = [
            pads.Scanner.from_fragment(f, schema=ds.schema, columns=cols, filter=test).to_table()
            for f in sorted(ds.get_fragments(), key=lambda f: f.path)
        ]
    except (pa.ArrowException, OSError) as exc:
        raise SourceError(f"cannot read Parquet {redact(path)}: {_clean(exc)}") from None
    table = pa.concat_tables(parts) if parts else None
    if table is None or table.num_rows == 0:
        raise SourceError(f"Parquet source {redact(path)}: no rows with split == 'test'")
    batch = table.combine_chunks().to_batches()[0]
    n_repeat, shown = repeated_keys(batch.column("item_id"))
    if n_repeat:  # the evaluation set is keyed too: a repeated key is an error there as well
        raise SourceError(
            f"Parquet source {redact(path)}: {n_repeat} item_id value(s) repeat in the test "
            f"split ({shown}); keys must be unique: give each evaluation row its own item_id"
        )
    labels = _class_names(batch, name_col, path).to_pylist()
    x, fmt = _parquet_inputs(batch.column(column), column, None, path, size)
    keys = [str(k) for k in batch.column("item_id").to_pylist()]
    shas = [hashlib.sha256(np.ascontiguousarray(row).tobytes()).hexdigest() for row in x]
    fingerprint = _items_digest(b"graceful-eval-parquet-v2", keys, labels, shas)
    return EvalSet(x, labels, fingerprint, fmt, keys, shas)


def _parquet_inputs(
    col: Any, name: str, fmt: InputFormat | None, path: str, size: tuple[int, int] | None = None
) -> tuple[np.ndarray, InputFormat]:
    """A Parquet input column as float32 inputs (features as they are, images decoded;
    without ``fmt``, to ``size`` or the automatic size)."""
    if name == "image":
        items = _parquet_image_items(col, Path(redact(path)))
        if fmt is None:
            x = _decode_images(items, size)
            return x, input_format(x.shape[1:])
        return _decode(items, fmt), fmt
    x = _parquet_features(pa.chunked_array([col]), name, Path(redact(path)))
    if fmt is not None and tuple(x.shape[1:]) != fmt.shape:
        raise SourceError(
            f"Parquet source {redact(path)}: rows of {name!r} have {x.shape[1]} values, the "
            f"evaluation set {fmt.shape[0]}"
        )
    return x, fmt or input_format(x.shape[1:])


# -- public ----------------------------------------------------------------------------
def _local(spec: str) -> tuple[str, str]:
    kind, path = parse_spec(spec)
    if kind not in SOURCE_KINDS or path is None:
        raise SourceError(f"{spec!r} is not a source; use imagefolder:DIR or parquet:PATH")
    return kind, path  # a URI as it is (workers.data.datasets.parse_spec)


def _image_folder(path: str) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise SourceError(f"image folder {root} does not exist; pass imagefolder:DIR")
    return root


def check_readable(spec: str) -> None:
    """Cheap checks of a spec before anything starts (no Prefect, no Ray): an image folder
    exists; a Parquet path exists and its footers read as Parquet. A SourceError (bad
    input) or SourceUnreachable names the problem."""
    if not spec or parse_spec(spec)[0] not in SOURCE_KINDS:
        return
    kind, path = _local(spec)
    if kind == "imagefolder":
        _image_folder(path)
    else:
        _parquet_dataset(path).schema  # noqa: B018 - reading the schema reads every footer


def scan_source(spec: str, previous: pa.Table | None = None) -> Scan:
    """List the source's training items (keys, classes, content) without decoding them.

    ``previous`` (an earlier scan's table) spares re-hashing files whose size and mtime
    did not change. Unreadable images are left out and listed in ``Scan.skipped``.
    """
    kind, path = _local(spec)
    if kind == "imagefolder":
        return _scan_imagefolder(spec, _image_folder(path), previous)
    return _scan_parquet(spec, path)


def load_eval(spec: str, image_size: int | None = None) -> EvalSet:
    """The source's evaluation set, decoded, with its fingerprint. Images are decoded to
    squares of ``image_size`` (None: workers.data.datasets.auto_size of the first one); its
    shape is the input format of every training item."""
    kind, path = _local(spec)
    size = image_size_of(image_size)
    if kind == "imagefolder":
        return _eval_imagefolder(_image_folder(path), size)
    return _eval_parquet(path, size)


def describe_change(old: pa.Table, new: pa.Table) -> str:
    """What changed between two evaluation sets' items tables, in a few words."""

    def by_key(items: pa.Table) -> dict[str, tuple[str, str]]:
        columns = (items.column(c).to_pylist() for c in ("key", "label", "sha256"))
        return {key: (label, sha) for key, label, sha in zip(*columns, strict=True)}

    before, after = by_key(old), by_key(new)
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    parts = []
    for what, keys in (("added", added), ("removed", removed), ("changed", changed)):
        if keys:
            shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            parts.append(f"{len(keys)} {what} ({shown})")
    return "; ".join(parts) or "the same items in another order"

"""The one Parquet schema, checked in one place.

Every use of ``parquet:PATH`` (a user's source, a collection, a fixed data set read
whole) reads the same columns: ``item_id`` (the key: non-null, unique, compared as
text), ``label`` (class names, or integers with an optional ``class_name``), a feature
column (a list of numbers) or ``image`` (encoded bytes), and ``split`` (``test`` rows
are the evaluation set; required for a fixed data set). See docs/data.md.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from workers.data.errors import CollectionError, SourceError


def redact(uri: str) -> str:
    """A URI fit for a message: credentials and query parameters dropped."""
    uri = re.sub(r"//[^/@]*@", "//", uri)
    return uri.split("?", 1)[0]


def _clean(exc: BaseException) -> str:
    """An exception's message without credentials a URI may carry."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return redact(text) if "://" in text else text


# What each required column is for: the fix a message names when it is missing.
_NEEDS = {
    "item_id": (
        "every row needs its own item_id (the key: non-null, unique, any type, compared as "
        'text); add one, e.g. the row number as text: see "Upgrading a scenario Parquet '
        'file" in docs/data.md'
    ),
    "label": "every row needs a label: a class name, or an integer (+ optional class_name)",
    "split": (
        "a fixed data set needs split == 'train' or 'test' on every row (its test rows "
        "are the evaluation set)"
    ),
}
DATA_SET = "data set"  # the noun of a Parquet file read whole (workers.data.datasets)


def _parquet_columns(
    ds: Any, path: str, noun: str = "source", required: tuple[str, ...] = ("item_id", "label")
) -> tuple[str, str | None]:
    """(input column, class-name column or None) of a Parquet source, collection or data
    set (``ds``: a pyarrow dataset or table); checks the ``required`` columns.

    The one place Parquet columns are detected: ``features`` (a list), else ``image``,
    else the first list column is the input; ``class_name`` names integer labels.
    A collection's problems are :class:`CollectionError` (bad input for ``graceful index``).
    """
    error = CollectionError if noun == "collection" else SourceError
    names = ds.schema.names
    for required_col in required:
        if required_col not in names:
            # "required column": the data set's wording since its first version
            what = "required column" if noun == DATA_SET else "column"
            raise error(
                f"Parquet {noun} {redact(path)}: missing {what} {required_col!r} (columns: "
                f"{names}); {_NEEDS[required_col]}"
            )
    lists = [f.name for f in ds.schema if _is_list(f.type)]
    if "features" in lists:
        column = "features"
    elif "image" in names:
        column = "image"
    elif lists:
        column = lists[0]
    else:
        raise error(
            f"Parquet {noun} {redact(path)}: no feature column (list of numbers) and no "
            f"'image' column; columns: {names}"
        )
    return column, "class_name" if "class_name" in names else None


def data_set_columns(
    table: pa.Table, path: str
) -> tuple[str, np.ndarray, np.ndarray, tuple[str, ...]]:
    """A Parquet table read whole as a fixed data set (workers.data.datasets), checked
    against the one Parquet schema: (input column, each row's split, each row's class
    index, the class names).

    As for a source: ``item_id`` is required (non-null, unique within its split, compared
    as text), ``label`` holds class names or integers (+ optional ``class_name``). Unlike
    a source, ``split`` is required and every row is ``train`` or ``test``. Class order:
    integer labels keep theirs (they must be 0..C-1: they are the classes' indices, and
    the lineages made before the one schema keep their labels and fingerprints); class
    names take their sorted order.
    """
    column, name_col = _parquet_columns(table, path, DATA_SET, ("item_id", "label", "split"))
    where = f"Parquet {DATA_SET} {redact(path)}"
    if table.num_rows == 0:
        raise SourceError(f"{where}: no rows")
    split_col = table.column("split")
    if not (pa.types.is_string(split_col.type) or pa.types.is_large_string(split_col.type)):
        raise SourceError(f"{where}: column 'split' must be strings")
    splits = np.asarray(split_col.to_pylist(), dtype=object)
    bad = sorted({str(s) for s in splits} - {"train", "test"})
    if bad:
        raise SourceError(f"{where}: column 'split' has values {bad}; expected train/test")
    _check_data_set_keys(table.column("item_id"), splits, where)
    labels, names = _data_set_classes(table, name_col, path, where)
    return column, splits, labels, names


def _check_data_set_keys(ids: Any, splits: np.ndarray, where: str) -> None:
    """Every row has an item_id, unique within its split (as a source's keys are)."""
    import pyarrow.compute as pc

    if ids.null_count:
        raise SourceError(f"{where}: column 'item_id' has null rows; {_NEEDS['item_id']}")
    try:
        text = pc.cast(ids, pa.string()).combine_chunks()
    except pa.ArrowException as exc:
        raise SourceError(
            f"{where}: column 'item_id' ({ids.type}) does not read as text: {_clean(exc)}; "
            "use strings or integers"
        ) from None
    for split in ("train", "test"):
        n_repeat, shown = repeated_keys(text.filter(pa.array(splits == split)))
        if n_repeat:
            raise SourceError(
                f"{where}: {n_repeat} item_id value(s) repeat in the {split} split ({shown}); "
                "keys must be unique: give each row its own item_id (e.g. its row number "
                "as text)"
            )


def _data_set_classes(
    table: pa.Table, name_col: str | None, path: str, where: str
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Each row's class index and the class names of a data set (see data_set_columns)."""
    import pyarrow.compute as pc

    names = _class_names(table, name_col, path, DATA_SET)  # non-null, names or integers
    label = table.column("label")
    if not pa.types.is_integer(label.type):  # class names: sorted
        classes = sorted(pc.unique(names).to_pylist())
        at = pc.index_in(names, value_set=pa.array(classes, pa.string()))
        return np.asarray(at.to_numpy(), dtype=np.int64), tuple(classes)
    labels = np.asarray(label.to_numpy(), dtype=np.int64)
    present = np.unique(labels)
    if not np.array_equal(present, np.arange(len(present))):
        raise SourceError(
            f"{where}: labels must be contiguous 0..C-1, got {present.tolist()[:20]}; "
            "integer labels are the classes' indices: renumber them, or give class names "
            "(strings) instead"
        )
    if name_col is None:
        return labels, tuple(str(i) for i in range(len(present)))
    by_label: dict[int, str] = {}  # a row without a class_name leaves its label's name open
    for lab, name in zip(labels.tolist(), table.column(name_col).to_pylist(), strict=True):
        if name is not None and by_label.setdefault(lab, str(name)) != str(name):
            raise SourceError(
                f"{where}: label {lab} has several class_name values "
                f"({by_label[lab]!r}, {str(name)!r})"
            )
    classes = tuple(by_label.get(i, str(i)) for i in range(len(present)))
    shared = sorted(n for n, k in Counter(classes).items() if k > 1)
    if shared:
        raise SourceError(
            f"{where}: labels {[i for i, n in enumerate(classes) if n == shared[0]]} share "
            f"the class_name {shared[0]!r}; each class needs a name of its own"
        )
    return labels, classes


def _is_list(t: Any) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _class_names(
    batch: pa.RecordBatch | pa.Table, name_col: str | None, path: str, noun: str = "source"
) -> pa.Array:
    """Each row's class name, as an Arrow string array (no Python object per row); the
    one check of a Parquet ``label`` column (non-null class names or integers)."""
    import pyarrow.compute as pc

    label = batch.column("label")
    if label.null_count:
        raise SourceError(f"Parquet {noun} {redact(path)}: column 'label' has null rows")
    if pa.types.is_string(label.type) or pa.types.is_large_string(label.type):
        return pc.cast(label, pa.string())
    if not pa.types.is_integer(label.type):
        raise SourceError(
            f"Parquet {noun} {redact(path)}: column 'label' must be class names (strings) "
            f"or integers, not {label.type}"
        )
    as_text = pc.cast(label, pa.string())
    if name_col is not None:
        names = pc.cast(batch.column(name_col), pa.string())
        return pc.if_else(pc.is_null(names), as_text, names)
    return as_text


def repeated_keys(keys: Any) -> tuple[int, str]:
    """(how many keys repeat, the first few of them quoted); (0, "") when none does."""
    import pyarrow.compute as pc

    if pc.count_distinct(keys).as_py() == len(keys):
        return 0, ""
    counts = pc.value_counts(keys)  # then find them, for the message
    dup = counts.filter(pc.greater(pc.struct_field(counts, "counts"), 1))
    shown = ", ".join(repr(v) for v in pc.struct_field(dup, "values").to_pylist()[:5])
    return len(dup), shown

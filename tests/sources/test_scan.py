"""Sources without Ray: scans, fingerprints, bad input, and the streaming pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import workers.data.sources as src
from sources.data import digits, parquet_rows, write_images
from workers.data.datasets import DatasetError
from workers.data.readers import ArrayItems, snapshot_reader
from workers.data.sources import (
    SourceError,
    describe_change,
    label_indices,
    load_eval,
    scan_source,
)
from workers.data.stream import ShuffledItems, TeacherStore, window_items


@pytest.fixture(scope="module")
def data():
    return digits()


def folder(tmp_path: Path, data, per_class: int = 3) -> Path:
    xtr, ytr, xte, yte = data
    root = tmp_path / "f"
    write_images(root, "train", xtr, ytr, 0, per_class, [0, 1])
    write_images(root, "test", xte, yte, 0, 2, [0, 1, 2])
    return root


def test_an_image_folder_scan_by_hand(tmp_path: Path, data) -> None:
    root = folder(tmp_path, data)
    scan = scan_source(f"imagefolder:{root}")
    keys = scan.table.column("key").to_pylist()
    assert sorted(keys) == sorted(
        f"train/digit-{c}/{p.name}" for c in (0, 1) for p in (root / f"train/digit-{c}").iterdir()
    )
    assert scan.class_counts() == {"digit-0": 3, "digit-1": 3}
    assert scan.items == 6 and scan.skipped == []
    # training order: by a hash of the key, not by class folder
    assert keys == sorted(keys, key=src._order_key)
    # the same files: the same fingerprint; one file's content changed: another
    assert scan_source(f"imagefolder:{root}").fingerprint == scan.fingerprint
    victim = root / keys[0]
    victim.write_bytes((root / keys[1]).read_bytes())
    assert scan_source(f"imagefolder:{root}").fingerprint != scan.fingerprint
    ev = load_eval(f"imagefolder:{root}")
    assert ev.labels == ["digit-0"] * 2 + ["digit-1"] * 2 + ["digit-2"] * 2
    assert ev.x.shape == (6, 1, 8, 8) and ev.input_format.shape == (1, 8, 8)


def test_unchanged_files_are_not_rehashed(tmp_path: Path, data, monkeypatch) -> None:
    root = folder(tmp_path, data)
    first = scan_source(f"imagefolder:{root}")
    calls = []
    real = src._file_sha
    monkeypatch.setattr(src, "_file_sha", lambda p: calls.append(p) or real(p))
    write_images(root, "train", *data[:2], 3, 4, [0])  # one new file
    again = scan_source(f"imagefolder:{root}", previous=first.table)
    assert [p.name for p in calls] == [f"train-{np.flatnonzero(data[1] == 0)[3]:04d}.png"]
    assert again.items == 7


def test_an_unreadable_image_is_skipped_and_recorded(tmp_path: Path, data) -> None:
    root = folder(tmp_path, data)
    (root / "train/digit-1/zz.png").write_bytes(b"\x89PNG not really")
    scan = scan_source(f"imagefolder:{root}")
    assert scan.items == 6
    assert [s["key"] for s in scan.skipped] == ["train/digit-1/zz.png"]
    assert scan.skipped[0]["reason"]


def test_bad_sources_are_named(tmp_path: Path, data) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        scan_source(f"imagefolder:{tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no train/ directory"):
        scan_source(f"imagefolder:{tmp_path / 'empty'}")
    xtr, ytr, *_ = data
    rows = parquet_rows(xtr, ytr, "train", 0, 3, [0, 1])
    for drop, what in (
        ("item_id", "missing column 'item_id'"),
        ("label", "missing column 'label'"),
    ):
        path = tmp_path / f"no-{drop}.parquet"
        pq.write_table(rows.drop_columns([drop]), path)
        with pytest.raises(SourceError, match=what):
            scan_source(f"parquet:{path}")
    nulls = rows.set_column(0, "item_id", pa.array([None] + rows["item_id"].to_pylist()[1:]))
    pq.write_table(nulls, tmp_path / "nulls.parquet")
    with pytest.raises(SourceError, match="'item_id' has null rows"):
        scan_source(f"parquet:{tmp_path / 'nulls.parquet'}")
    d = tmp_path / "dups"
    d.mkdir()
    pq.write_table(rows, d / "a.parquet")
    pq.write_table(rows.slice(0, 2), d / "b.parquet")
    with pytest.raises(SourceError, match=r"2 item_id value\(s\) repeat .*keys must be unique"):
        scan_source(f"parquet:{d}")
    with pytest.raises(SourceError, match="no rows with split == 'test'"):
        load_eval(f"parquet:{d / 'a.parquet'}")
    pq.write_table(rows.drop_columns(["split"]), tmp_path / "nosplit.parquet")
    with pytest.raises(SourceError, match="no 'split' column"):
        load_eval(f"parquet:{tmp_path / 'nosplit.parquet'}")
    with pytest.raises(DatasetError, match="does not exist"):
        scan_source(f"parquet:{tmp_path / 'none.parquet'}")


def test_parquet_scan_and_reader_by_hand(tmp_path: Path, data) -> None:
    xtr, ytr, xte, yte = data
    d = tmp_path / "p"
    d.mkdir()
    train = parquet_rows(xtr, ytr, "train", 0, 5, [3, 7])
    test = parquet_rows(xte, yte, "test", 0, 2, [3, 7])
    pq.write_table(pa.concat_tables([train.slice(0, 4), test]), d / "a.parquet", row_group_size=3)
    pq.write_table(train.slice(4), d / "b.parquet", row_group_size=4)
    scan = scan_source(f"parquet:{d}")
    assert scan.items == 10 and scan.class_counts() == {"digit-3": 5, "digit-7": 5}
    assert scan.table.column("key").to_pylist() == train.column("item_id").to_pylist()
    vocab = {"digit-7": 0, "digit-3": 1}
    labels = label_indices(scan.table.column("label"), vocab)
    assert labels.tolist() == [1 if n == "digit-3" else 0 for n in train["label"].to_pylist()]
    ev = load_eval(f"parquet:{d}")
    assert ev.keys == test.column("item_id").to_pylist() and ev.x.shape == (4, 64)
    reader = snapshot_reader(f"parquet:{d}", scan.table, labels, ev.input_format)
    got = {}
    for unit in reader.units():
        for start, x, y in reader.read(unit):
            for i in range(len(y)):
                got[start + i] = (x[i], y[i])
    assert sorted(got) == list(range(10))
    feats = np.stack(train.column("features").to_numpy(zero_copy_only=False))
    for pos, (x, y) in got.items():
        np.testing.assert_allclose(x, feats[pos])
        assert y == labels[pos]
    with pytest.raises(SourceError, match=r"not in the lineage's vocabulary"):
        label_indices(scan.table.column("label"), {"digit-3": 0})


def test_describe_change_by_hand() -> None:
    old = pa.table({"key": ["a", "b", "c"], "label": ["x", "x", "y"], "sha256": ["1", "2", "3"]})
    new = pa.table({"key": ["a", "c", "d"], "label": ["x", "z", "y"], "sha256": ["1", "3", "4"]})
    assert describe_change(old, new) == "1 added (d); 1 removed (b); 1 changed (c)"
    assert describe_change(old, old) == "the same items in another order"


def test_shuffled_items_visit_every_item_once_per_epoch(tmp_path: Path) -> None:
    n, d = 5000, 3
    x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    y = np.arange(n) % 7
    store = TeacherStore(tmp_path / "t.f32", n, 1, d)
    store.create()
    store.write(0, np.repeat(np.arange(n, dtype=np.float32)[:, None, None], d, axis=2))
    reader = ArrayItems(x, y, block=512)
    epochs = []
    for epoch in (0, 1):
        batches = list(ShuffledItems(reader, 64, window=1024, seed=5, epoch=epoch, store=store))
        pos = np.concatenate([b["pos"].numpy() for b in batches])
        assert sorted(pos.tolist()) == list(range(n))  # every item once
        for b in batches:  # inputs, labels and teacher rows travel together
            p = b["pos"].numpy()
            np.testing.assert_array_equal(b["x"].numpy(), x[p])
            np.testing.assert_array_equal(b["y"].numpy(), y[p])
            np.testing.assert_array_equal(b["teacher"].numpy()[0, :, 0], p.astype(np.float32))
        assert all(len(b["y"]) == 64 for b in batches[:-1])
        epochs.append(pos)
    assert not np.array_equal(epochs[0], epochs[1])  # another order each epoch
    again = np.concatenate(
        [b["pos"].numpy() for b in ShuffledItems(reader, 64, 1024, seed=5, epoch=1, store=store)]
    )
    np.testing.assert_array_equal(again, epochs[1])  # ... and the same one on a resume
    # window: 32 MiB of inputs and teacher rows, at least 8 batches
    assert window_items((1, 28, 28), 128) == (32 << 20) // (4 * 784)
    assert window_items((49,), 128, extra_bytes=256) == (32 << 20) // (196 + 256)
    assert window_items((3, 1024, 1024), 128) == 8 * 128


def test_a_collection_listing_keeps_the_fingerprints_of_unchanged_content(
    tmp_path: Path, data, monkeypatch
) -> None:
    """The collection's listing hashes only what may have changed: a file whose size and
    mtime match keeps its recorded fingerprint unread; one touched with the same content
    keeps it too (nothing to re-embed); a rewritten one gets a new fingerprint."""
    import os

    from workers.collection.items import list_items

    root = folder(tmp_path, data)
    spec = f"imagefolder:{root}"
    first = list_items(spec)
    known = _prints(first)
    keys = sorted(known)
    touched, rewritten = root / keys[0], root / keys[1]
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    rewritten.write_bytes((root / keys[2]).read_bytes())  # another image's content
    calls = []
    real = src._file_sha
    monkeypatch.setattr(src, "_file_sha", lambda p: calls.append(p) or real(p))
    again = list_items(spec, known)
    now = _prints(again)
    assert sorted(p.name for p in calls) == sorted([touched.name, rewritten.name])
    assert now[keys[0]] == known[keys[0]]  # touched, same content
    assert now[keys[1]] != known[keys[1]]  # rewritten
    assert now[keys[1]].endswith(known[keys[2]].rsplit(":", 1)[1])  # the content it now has
    assert {k: now[k] for k in keys[2:]} == {k: known[k] for k in keys[2:]}
    assert list(now) == keys  # in key order


def _prints(listing) -> dict[str, str]:
    t = listing.table
    return dict(zip(t.column("key").to_pylist(), t.column("fingerprint").to_pylist(), strict=True))

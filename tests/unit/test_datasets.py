"""Tests for workers.data.datasets using real files written into tmp_path."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from workers.data import datasets
from workers.data.datasets import Dataset, DatasetError, load_dataset, parse_spec

U8 = np.uint8


def scaled(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32) / np.float32(255.0)


def check_common(ds: Dataset) -> None:
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert x.flags.c_contiguous and not x.flags.writeable
        assert x.shape[1:] == ds.input_shape and len(x) == len(y)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert int(y.min()) >= 0 and int(y.max()) < ds.num_classes


# --------------------------------------------------------------------------- digits


def test_digits_split_and_shapes() -> None:
    ds = load_dataset(" digits ")
    check_common(ds)
    assert ds.spec == "digits"
    assert ds.x_train.shape == (1257, 1, 8, 8) and ds.x_test.shape == (540, 1, 8, 8)
    assert ds.num_classes == 10 and ds.class_names == tuple(str(i) for i in range(10))
    assert ds.input_shape == (1, 8, 8) and float(ds.x_train.max()) == 1.0
    # stratified: every class appears in test with its share
    assert np.bincount(ds.y_test).min() >= 50
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    xtr, _, ytr, _ = train_test_split(
        raw.data, raw.target, test_size=0.3, random_state=0, stratify=raw.target
    )
    np.testing.assert_array_equal(ds.x_train[0].ravel(), (xtr[0] / 16.0).astype(np.float32))
    np.testing.assert_array_equal(ds.y_train, ytr)
    assert load_dataset("digits") is ds  # cached


# --------------------------------------------------------------------------- fashion-mnist


def write_idx(path: Path, arr: np.ndarray, *, magic: bytes | None = None) -> None:
    header = magic or bytes([0, 0, 0x08, arr.ndim])
    raw = header + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(U8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def make_fashion(root: Path, *, gz: bool) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    arrays = (
        rng.integers(0, 256, (5, 28, 28)).astype(U8),
        np.array([0, 9, 3, 3, 1], dtype=U8),
        rng.integers(0, 256, (2, 28, 28)).astype(U8),
        np.array([9, 2], dtype=U8),
    )
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    names += ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    for name, arr in zip(names, arrays, strict=True):
        write_idx(root / f"{name}{ext}", arr)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx(tmp_path: Path, gz: bool) -> None:
    tr_x, tr_y, te_x, te_y = make_fashion(tmp_path / "fm", gz=gz)
    ds = load_dataset(f"fashion-mnist:{tmp_path / 'fm'}")
    check_common(ds)
    assert ds.spec == f"fashion-mnist:{tmp_path / 'fm'}"
    assert ds.x_train.shape == (5, 1, 28, 28) and ds.x_test.shape == (2, 1, 28, 28)
    np.testing.assert_array_equal(ds.x_train[:, 0], scaled(tr_x))
    np.testing.assert_array_equal(ds.x_test[1, 0], scaled(te_x[1]))
    assert ds.y_train.tolist() == tr_y.tolist() and ds.y_test.tolist() == te_y.tolist()
    assert ds.num_classes == 10
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"


def test_fashion_mnist_bad_magic_names_file(tmp_path: Path) -> None:
    make_fashion(tmp_path, gz=True)
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(bad, np.zeros(5, U8), magic=b"\x12\x34\x08\x01")
    with pytest.raises(DatasetError, match="magic number") as err:
        load_dataset(f"fashion-mnist:{tmp_path}")
    assert str(bad) in str(err.value)


def test_fashion_mnist_truncated_and_missing(tmp_path: Path) -> None:
    make_fashion(tmp_path, gz=False)
    img = tmp_path / "t10k-images-idx3-ubyte"
    img.write_bytes(img.read_bytes()[:-10])
    with pytest.raises(DatasetError, match="truncated") as err:
        load_dataset(f"fashion-mnist:{tmp_path}")
    assert str(img) in str(err.value)
    img.unlink()
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte"):
        load_dataset(f"fashion-mnist:{tmp_path}")


def test_real_fashion_mnist_default_dir() -> None:
    if not os.path.isdir(datasets.DEFAULT_FASHION_MNIST_DIR):
        with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
            parse_spec("fashion-mnist")
        return
    assert parse_spec("fashion-mnist") == ("fashion-mnist", datasets.DEFAULT_FASHION_MNIST_DIR)
    ds = load_dataset("fashion-mnist")
    check_common(ds)
    assert ds.spec == f"fashion-mnist:{datasets.DEFAULT_FASHION_MNIST_DIR}"
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
    assert float(ds.x_train.max()) == 1.0 and float(ds.x_train.min()) == 0.0


def test_fashion_mnist_default_dir_missing_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datasets, "DEFAULT_FASHION_MNIST_DIR", str(tmp_path / "nope"))
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist") as err:
        parse_spec("fashion-mnist")
    assert str(tmp_path / "nope") in str(err.value)


# --------------------------------------------------------------------------- imagefolder


def save(path: Path, arr: np.ndarray, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


def gray(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w)).astype(U8)


def make_imagefolder(root: Path, *, rgb: bool) -> dict[str, np.ndarray]:
    arrs = {
        "train/cat/a.png": gray(3, 4, 0),
        "train/cat/b.jpg": np.full((3, 4), 77, U8),
        "train/dog/c.png": gray(3, 4, 2),
        "test/dog/d.png": gray(6, 8, 3),  # other size -> resized
        "test/bird/e.png": gray(3, 4, 4),  # the first evaluation image fixes the format
    }
    if rgb:
        rng = np.random.default_rng(5)
        arrs["train/dog/c.png"] = rng.integers(0, 256, (3, 4, 3)).astype(U8)
        arrs["test/bird/e.png"] = rng.integers(0, 256, (3, 4, 3)).astype(U8)
    for rel, arr in arrs.items():
        save(root / rel, arr)
    (root / "train" / "cat" / "notes.txt").write_text("ignored")
    return arrs


def test_imagefolder_grayscale(tmp_path: Path) -> None:
    arrs = make_imagefolder(tmp_path, rgb=False)
    ds = load_dataset(f"imagefolder:{tmp_path}")
    check_common(ds)
    assert ds.class_names == ("bird", "cat", "dog")
    assert ds.input_shape == (1, 3, 4)  # size of the first evaluation image (test/bird/e.png)
    assert ds.y_train.tolist() == [1, 1, 2] and ds.y_test.tolist() == [0, 2]
    np.testing.assert_array_equal(ds.x_train[0, 0], scaled(arrs["train/cat/a.png"]))
    np.testing.assert_array_equal(ds.x_train[2, 0], scaled(arrs["train/dog/c.png"]))
    with Image.open(tmp_path / "train/cat/b.jpg") as jpg:
        assert jpg.format == "JPEG"
        np.testing.assert_array_equal(ds.x_train[1, 0], scaled(np.asarray(jpg.convert("L"))))
    with Image.open(tmp_path / "test/dog/d.png") as big:
        small = np.asarray(big.resize((4, 3), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(ds.x_test[1, 0], scaled(small))
    np.testing.assert_array_equal(ds.x_test[0, 0], scaled(arrs["test/bird/e.png"]))


def test_imagefolder_rgb_and_explicit_size(tmp_path: Path) -> None:
    arrs = make_imagefolder(tmp_path, rgb=True)
    ds = load_dataset(f"imagefolder:{tmp_path}")
    check_common(ds)
    assert ds.input_shape == (3, 3, 4)
    np.testing.assert_array_equal(ds.x_train[2], scaled(arrs["train/dog/c.png"].transpose(2, 0, 1)))
    a = scaled(arrs["train/cat/a.png"])
    for c in range(3):  # grayscale image replicated into R, G, B
        np.testing.assert_array_equal(ds.x_train[0, c], a)
    x_tr, _, x_te, _, _ = datasets._load_imagefolder(tmp_path, size=(6, 8))
    assert x_tr.shape == (3, 3, 6, 8) and x_te.shape == (2, 3, 6, 8)


def test_imagefolder_errors(tmp_path: Path) -> None:
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetError, match="test"):
        load_dataset(f"imagefolder:{tmp_path}")
    (tmp_path / "test" / "cat").mkdir(parents=True)
    save(tmp_path / "test/cat/x.png", gray(2, 2, 0))
    with pytest.raises(DatasetError, match="train split has no PNG/JPEG"):
        load_dataset(f"imagefolder:{tmp_path}")
    (tmp_path / "train/cat/broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="broken.png"):
        load_dataset(f"imagefolder:{tmp_path}")


# --------------------------------------------------------------------------- CIFAR


def dump(path: Path, obj: object, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072)).astype(U8)


@pytest.mark.parametrize("subfolder", [False, True])
def test_cifar10(tmp_path: Path, subfolder: bool) -> None:
    base = tmp_path / "cifar-10-batches-py" if subfolder else tmp_path
    batches = [cifar_rows(2, i) for i in range(1, 6)]
    for i, data in enumerate(batches, start=1):
        # protocol 2 (like the real Python 2 files) and protocol 5 both load
        dump(base / f"data_batch_{i}", {b"data": data, b"labels": [i, 0]}, 2 if i % 2 else 5)
    test_data = cifar_rows(3, 9)
    dump(base / "test_batch", {b"data": test_data, b"labels": np.array([9, 8, 7])})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
    names += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    dump(base / "batches.meta", {b"label_names": names, b"num_vis": 3072}, 2)
    ds = load_dataset(f"cifar10:{tmp_path}")
    check_common(ds)
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    assert ds.y_train.tolist() == [1, 0, 2, 0, 3, 0, 4, 0, 5, 0]
    assert ds.y_test.tolist() == [9, 8, 7]
    assert ds.class_names[0] == "airplane" and ds.class_names[9] == "truck"
    row = batches[1][1]  # data_batch_2, second row -> x_train[3]
    np.testing.assert_array_equal(ds.x_train[3, 0], scaled(row[:1024].reshape(32, 32)))
    np.testing.assert_array_equal(ds.x_train[3, 2], scaled(row[2048:].reshape(32, 32)))
    np.testing.assert_array_equal(ds.x_test.reshape(3, -1), scaled(test_data))


def test_cifar100(tmp_path: Path) -> None:
    train = cifar_rows(4, 1)
    dump(
        tmp_path / "train",
        {b"data": train, b"fine_labels": [0, 2, 1, 2], b"coarse_labels": [0] * 4},
    )
    dump(tmp_path / "test", {b"data": cifar_rows(2, 2), b"fine_labels": [1, 0]})
    dump(tmp_path / "meta", {b"fine_label_names": [b"apple", b"bee", b"cup"]})
    ds = load_dataset(f"cifar100:{tmp_path}")
    check_common(ds)
    assert ds.class_names == ("apple", "bee", "cup") and ds.num_classes == 3
    assert ds.y_train.tolist() == [0, 2, 1, 2] and ds.y_test.tolist() == [1, 0]
    assert ds.input_shape == (3, 32, 32)
    np.testing.assert_array_equal(ds.x_train[2, 1], scaled(train[2, 1024:2048].reshape(32, 32)))


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (os.getcwd, ())


def test_cifar_restricted_unpickler(tmp_path: Path) -> None:
    dump(tmp_path / "train", {b"data": cifar_rows(1, 0), b"fine_labels": [0], b"x": _Evil()})
    dump(tmp_path / "test", {b"data": cifar_rows(1, 1), b"fine_labels": [0]})
    dump(tmp_path / "meta", {b"fine_label_names": [b"a"]})
    with pytest.raises(DatasetError, match=r"forbidden global \w+\.getcwd") as err:
        load_dataset(f"cifar100:{tmp_path}")
    assert str(tmp_path / "train") in str(err.value)


def test_cifar_missing_files_and_bad_labels(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="data_batch_1"):
        load_dataset(f"cifar10:{tmp_path}")
    dump(tmp_path / "train", {b"data": cifar_rows(1, 0), b"fine_labels": [5]})
    dump(tmp_path / "test", {b"data": cifar_rows(1, 1), b"fine_labels": [0]})
    dump(tmp_path / "meta", {b"fine_label_names": [b"a", b"b"]})
    with pytest.raises(DatasetError, match=r"labels must be in 0\.\.1"):
        load_dataset(f"cifar100:{tmp_path}")


# --------------------------------------------------------------------------- parquet


def test_parquet_features_file_and_directory(tmp_path: Path) -> None:
    table = pa.table(
        {
            "item_id": ["r0", "r1", "r2", "r3"],
            "label": pa.array([0, 1, 2, 1], pa.int32()),
            "split": ["train", "train", "test", "train"],
            "features": pa.array([[0.5, 1.0], [2.0, -3.0], [4.0, 5.0], [6.0, 7.5]]),
            "class_name": ["zero", "one", "two", "one"],
        }
    )
    pq.write_table(table, tmp_path / "one.parquet")
    ds = load_dataset(f"parquet:{tmp_path / 'one.parquet'}")
    assert ds.input_shape == (2,) and ds.class_names == ("zero", "one", "two")
    np.testing.assert_array_equal(ds.x_train, np.array([[0.5, 1], [2, -3], [6, 7.5]], np.float32))
    assert ds.y_train.tolist() == [0, 1, 1] and ds.y_test.tolist() == [2]
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64

    d = tmp_path / "dir"
    d.mkdir()
    fixed = pa.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], pa.list_(pa.float32(), 3))
    pq.write_table(
        pa.table({"item_id": [0, 1], "label": [0, 1], "split": ["train", "test"], "emb": fixed}),
        d / "a.parquet",
    )
    fixed2 = pa.array([[7.0, 8.0, 9.0]], pa.list_(pa.float32(), 3))
    pq.write_table(
        pa.table({"item_id": [2], "label": [1], "split": ["train"], "emb": fixed2}),
        d / "b.parquet",
    )
    ds = load_dataset(f"parquet:{d}")
    assert ds.class_names == ("0", "1") and ds.input_shape == (3,)
    np.testing.assert_array_equal(ds.x_train, np.array([[1, 2, 3], [7, 8, 9]], np.float32))
    np.testing.assert_array_equal(ds.x_test, np.array([[4, 5, 6]], np.float32))


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_parquet_png_images(tmp_path: Path) -> None:
    imgs = [gray(4, 5, i) for i in range(3)]
    table = pa.table(
        {
            "item_id": ["a", "b", "c"],
            "image": pa.array([png_bytes(a) for a in imgs], pa.binary()),
            "label": [1, 0, 1],
            "split": ["test", "train", "train"],
        }
    )
    pq.write_table(table, tmp_path / "img.parquet")
    ds = load_dataset(f"parquet:{tmp_path / 'img.parquet'}")
    check_common(ds)
    assert ds.input_shape == (1, 4, 5) and ds.num_classes == 2
    assert ds.y_train.tolist() == [0, 1] and ds.y_test.tolist() == [1]
    np.testing.assert_array_equal(ds.x_train[0, 0], scaled(imgs[1]))
    np.testing.assert_array_equal(ds.x_test[0, 0], scaled(imgs[0]))


@pytest.mark.parametrize("missing", ["label", "split"])
def test_parquet_missing_required_column(tmp_path: Path, missing: str) -> None:
    cols = {
        "item_id": ["a", "b"],
        "label": [0, 1],
        "split": ["train", "test"],
        "features": [[1.0], [2.0]],
    }
    del cols[missing]
    pq.write_table(pa.table(cols), tmp_path / "t.parquet")
    with pytest.raises(DatasetError, match=f"missing required column '{missing}'"):
        load_dataset(f"parquet:{tmp_path / 't.parquet'}")


def test_parquet_content_errors(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    cases = [
        ({"label": [0, 1], "split": ["train", "test"], "name": ["a", "b"]}, "no feature column"),
        ({"label": [0, 2], "split": ["train", "test"], "features": [[1.0], [2.0]]}, "contiguous"),
        ({"label": [0, 1], "split": ["train", "val"], "features": [[1.0], [2.0]]}, "'val'"),
        (
            {"label": [0, 1], "split": ["train", "train"], "features": [[1.0], [2.0]]},
            "test split is empty",
        ),
        ({"label": [0, 1], "split": ["train", "test"], "features": [[1.0], [2.0, 3.0]]}, "length"),
        ({"label": [0, 1], "split": ["train", "test"], "features": [[1.0], [float("nan")]]}, "NaN"),
    ]
    for cols, pattern in cases:
        pq.write_table(pa.table({"item_id": ["a", "b"], **cols}), path)
        datasets._load_cached.cache_clear()
        with pytest.raises(DatasetError, match=pattern):
            load_dataset(f"parquet:{path}")


def test_parquet_without_item_id_names_the_column_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "old.parquet"
    cols = {"label": [0, 1], "split": ["train", "test"], "features": [[1.0], [2.0]]}
    pq.write_table(pa.table(cols), path)
    with pytest.raises(DatasetError, match="missing required column 'item_id'") as err:
        load_dataset(f"parquet:{path}")
    msg = str(err.value)
    assert str(path) in msg and "row number as text" in msg and "docs/data.md" in msg
    assert "Upgrading a scenario Parquet file" in msg


def test_parquet_item_ids_are_keys(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    base = {"label": [0, 1, 0, 1, 1], "split": ["train"] * 3 + ["test"] * 2}
    base["features"] = [[float(i)] for i in range(5)]
    for ids, pattern in (
        (["a", "b", "a", "c", "d"], r"1 item_id value\(s\) repeat in the train split \('a'\)"),
        ([1, 2, 3, 7, 7], r"1 item_id value\(s\) repeat in the test split \('7'\)"),
        (["a", None, "c", "d", "e"], "'item_id' has null rows"),
    ):
        pq.write_table(pa.table({"item_id": ids, **base}), path)
        datasets._load_cached.cache_clear()
        with pytest.raises(DatasetError, match=pattern):
            load_dataset(f"parquet:{path}")
    # keys are unique within a split, as a source's are: a test row may share a train row's
    pq.write_table(pa.table({"item_id": [0, 1, 2, 0, 1], **base}), path)
    datasets._load_cached.cache_clear()
    assert load_dataset(f"parquet:{path}").y_test.tolist() == [1, 1]


def test_parquet_class_name_labels_take_sorted_order(tmp_path: Path) -> None:
    path = tmp_path / "names.parquet"
    table = pa.table(
        {
            "item_id": ["a", "b", "c", "d", "e", "f"],
            "label": ["zebra", "ant", "moth", "ant", "zebra", "moth"],
            "split": ["train", "train", "train", "test", "test", "test"],
            "features": [[i / 10, 1.0] for i in range(6)],
            "class_name": ["ignored"] * 6,  # names a label only when the label is an integer
        }
    )
    pq.write_table(table, path)
    ds = load_dataset(f"parquet:{path}")
    check_common(ds)
    assert ds.class_names == ("ant", "moth", "zebra")
    assert ds.y_train.tolist() == [2, 0, 1] and ds.y_test.tolist() == [0, 2, 1]
    np.testing.assert_array_equal(ds.x_train[:, 0], np.float32([0.0, 0.1, 0.2]))


def test_parquet_integer_labels_load_as_before_item_ids_added(tmp_path: Path) -> None:
    """A file of the scenario's old schema with item_id added: the same arrays and class
    names as before (integer order, not sorted names), so lineages keep their fingerprints."""
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    cols = {
        "label": pa.array([1, 0, 2, 0, 1, 2], pa.int64()),
        "split": ["train", "test", "train", "train", "test", "test"],
        "features": pa.array(list(x), pa.list_(pa.float32())),
        "class_name": ["ant", None, "moth", "zebra", "ant", None],
    }
    pq.write_table(pa.table({"item_id": [str(i) for i in range(6)], **cols}), tmp_path / "i.pq")
    ds = load_dataset(f"parquet:{tmp_path / 'i.pq'}")
    assert ds.class_names == ("zebra", "ant", "moth")  # label order; a null names nothing
    np.testing.assert_array_equal(ds.x_train, x[[0, 2, 3]])
    np.testing.assert_array_equal(ds.x_test, x[[1, 4, 5]])
    assert ds.y_train.tolist() == [1, 2, 0] and ds.y_test.tolist() == [0, 1, 2]
    # the same rows labelled by name: the same arrays where the names sort as the integers
    names = ["b", "a", "c", "a", "b", "c"]
    named = {**cols, "label": names, "class_name": [None] * 6}
    pq.write_table(pa.table({"item_id": [str(i) for i in range(6)], **named}), tmp_path / "n.pq")
    again = load_dataset(f"parquet:{tmp_path / 'n.pq'}")
    assert again.class_names == ("a", "b", "c")
    for split in ("train", "test"):
        np.testing.assert_array_equal(getattr(again, f"x_{split}"), getattr(ds, f"x_{split}"))
        np.testing.assert_array_equal(getattr(again, f"y_{split}"), getattr(ds, f"y_{split}"))


def test_parquet_label_errors(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    base = {"item_id": ["a", "b", "c"], "split": ["train", "test", "train"]}
    base["features"] = [[1.0], [2.0], [3.0]]
    cases = [
        ({"label": [0, 1, 0], "class_name": ["x", "y", "z"]}, "several class_name values"),
        ({"label": [0, 1, 2], "class_name": ["x", "y", "x"]}, r"labels \[0, 2\] share"),
        ({"label": [0, 3, 0]}, "contiguous 0..C-1.*class names"),
        ({"label": [0.0, 1.0, 0.0]}, "class names \\(strings\\) or integers"),
        ({"label": ["x", None, "y"]}, "'label' has null rows"),
        ({"label": [0, 1, 0], "split": ["train", None, "test"]}, "'None'"),
    ]
    for cols, pattern in cases:
        pq.write_table(pa.table({**base, **cols}), path)
        datasets._load_cached.cache_clear()
        with pytest.raises(DatasetError, match=pattern):
            load_dataset(f"parquet:{path}")


# --------------------------------------------------------------------------- specs & Dataset


def test_parse_spec(tmp_path: Path) -> None:
    assert parse_spec("digits") == ("digits", None)
    assert parse_spec(f"ImageFolder:{tmp_path}") == ("imagefolder", str(tmp_path))
    with pytest.raises(DatasetError, match="unknown data set kind 'mnist'") as err:
        parse_spec("mnist:/x")
    assert "fashion-mnist" in str(err.value) and "parquet" in str(err.value)
    with pytest.raises(DatasetError, match="needs a path"):
        parse_spec("cifar10")
    with pytest.raises(DatasetError, match="takes no path"):
        parse_spec("digits:/tmp")
    missing = tmp_path / "missing"
    for kind in ("imagefolder", "cifar10", "cifar100", "parquet", "fashion-mnist"):
        with pytest.raises(DatasetError, match="does not exist") as err:
            load_dataset(f"{kind}:{missing}")
        assert str(missing) in str(err.value)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a directory"):
        parse_spec(f"imagefolder:{tmp_path / 'f.txt'}")
    with pytest.raises(DatasetError, match="empty"):
        parse_spec("  ")


def test_dataset_validation_and_cache(tmp_path: Path) -> None:
    x = np.zeros((2, 3))
    ds = Dataset("s", x, np.array([0, 1]), x, np.array([1, 0]), ("a", "b"))
    assert ds.x_train.dtype == np.float32 and ds.input_shape == (3,) and ds.num_classes == 2
    with pytest.raises(ValueError, match="read-only"):
        ds.x_train[0, 0] = 1.0
    with pytest.raises(DatasetError, match="labels must be in"):
        Dataset("s", x, np.array([0, 2]), x, np.array([1, 0]), ("a", "b"))
    with pytest.raises(DatasetError, match="input shape"):
        Dataset("s", x, np.array([0, 1]), np.zeros((2, 4)), np.array([1, 0]), ("a", "b"))
    with pytest.raises(DatasetError, match="2 inputs but 1 labels"):
        Dataset("s", x, np.array([0]), x, np.array([1, 0]), ("a", "b"))
    make_fashion(tmp_path, gz=True)
    first = load_dataset(f"fashion-mnist:{tmp_path}")
    assert load_dataset(f"fashion-mnist:{tmp_path}/") is first
    assert first == first and first != load_dataset("digits")

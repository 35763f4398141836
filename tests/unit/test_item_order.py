"""Training sees every class in every batch, whatever order the source lists its items in.

Issue 16: an image folder read class by class trained to half the accuracy of a plain
loop, because each epoch shuffled units of one class and then items only inside a
window of a few units. These tests fail on that code: the label mix of the batches and
the accuracy on a class-sorted folder, each against a shuffled copy of the same items.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import workers.data.stream as stream_mod
from workers.data.datasets import load_dataset
from workers.data.readers import ArrayItems
from workers.data.stream import ItemStore, ShuffledItems
from workers.learning.spec import TrainSpec
from workers.learning.train import train_generation


def _classes_per_batch(batches: list[dict]) -> float:
    full = [b for b in batches if len(b["y"]) == 64]
    return float(np.mean([len(np.unique(b["y"].numpy())) for b in full]))


def test_batches_mix_classes_of_a_class_sorted_source(tmp_path: Path) -> None:
    # 10 classes of 400 items each, listed class by class (as an image folder's files)
    n_cls, per = 10, 400
    y = np.repeat(np.arange(n_cls), per)
    x = np.arange(len(y) * 4, dtype=np.float32).reshape(len(y), 4)
    shuffled = np.random.default_rng(0).permutation(len(y))
    store = ItemStore(tmp_path / "items.bin", y, (4,), u8=False)
    store.create()
    store.write(0, x)
    for items in (ArrayItems(x, y, block=512), store):  # in memory, and streamed from disk
        # a window of 256 items: far fewer than a class holds
        sorted_mix = _classes_per_batch(list(ShuffledItems(items, 64, 256, seed=1, epoch=0)))
        ref = ArrayItems(x[shuffled], y[shuffled], block=512)
        shuffled_mix = _classes_per_batch(list(ShuffledItems(ref, 64, 256, seed=1, epoch=0)))
        # 64 uniform draws from 10 classes cover 9.99 of them on average
        assert shuffled_mix > 9.5
        assert sorted_mix > 9.5, f"class-sorted batches hold {sorted_mix:.1f} classes"
    # the bytes store reads back exactly what was written
    pos = np.array([0, 1, 2, 3999])
    got_x, got_y = store.take(pos)
    np.testing.assert_array_equal(got_x, x[pos])
    np.testing.assert_array_equal(got_y, y[pos])


def _digits_folder(root: Path) -> None:
    """scikit-learn's digits as PNGs, one folder per class: read back class by class."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    test = rng.random(len(d.target)) < 0.25
    for i, (img, label) in enumerate(zip(d.images, d.target, strict=True)):
        split = "test" if test[i] else "train"
        out = root / split / f"digit-{label}"
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255 / 16).astype(np.uint8), "L").save(out / f"{i:04d}.png")


@pytest.mark.slow
def test_class_sorted_folder_trains_as_well_as_a_shuffled_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _digits_folder(tmp_path / "digits")
    ds = load_dataset(f"imagefolder:{tmp_path / 'digits'}")
    assert (np.diff(ds.y_train) >= 0).all()  # the folder is read class by class
    # a small memory budget: a window of 256 digits, a fraction of one class's items
    monkeypatch.setattr(stream_mod, "WINDOW_BYTES", 256 * 4 * 64)
    perm = np.random.default_rng(1).permutation(len(ds.y_train))
    accuracy = {}
    for order, idx in (("class-sorted", np.arange(len(perm))), ("shuffled", perm)):
        spec = TrainSpec(
            generation=1,
            x=ds.x_train[idx],
            y=ds.y_train[idx],
            num_classes=10,
            classes=list(range(10)),
            architecture={"kind": "mlp", "width": 128, "depth": 2},
            embed_dim=16,
            epochs=4,
            batch_size=32,
            seed=0,
            checkpoint_dir=str(tmp_path / order),
            threads=1,
        )
        from workers.learning.models import load_model

        model = load_model(train_generation(spec)["checkpoint"])
        import torch

        with torch.no_grad():
            _, logits = model(torch.from_numpy(np.asarray(ds.x_test)))
        accuracy[order] = float((logits.argmax(1).numpy() == ds.y_test).mean())
    assert accuracy["shuffled"] > 0.85, accuracy
    assert accuracy["class-sorted"] >= accuracy["shuffled"] - 0.03, accuracy


def test_channel_statistics_by_hand(tmp_path: Path) -> None:
    import torch

    from workers.data.stream import prepare

    # 2 images, 2 channels, 1 x 2 pixels; channel 0 holds 0, 1, 1, 0: mean 0.5, std 0.5;
    # channel 1 is constant (0.2): its std is left at 1 (nothing to scale)
    x = np.array([[[[0.0, 1.0]], [[0.2, 0.2]]], [[[1.0, 0.0]], [[0.2, 0.2]]]], np.float32)
    got = prepare(ArrayItems(x, np.array([0, 1])), [], None, 2, torch.device("cpu"))
    np.testing.assert_allclose(got.channel_mean, [0.5, 0.2], atol=1e-6)
    np.testing.assert_allclose(got.channel_std, [0.5, 1.0], atol=1e-6)
    assert got.counts.tolist() == [1.0, 1.0]
    # feature vectors get none
    flat = prepare(ArrayItems(x.reshape(2, -1), np.array([0, 1])), [], None, 2, torch.device("cpu"))
    assert flat.channel_mean is None and flat.channel_std is None

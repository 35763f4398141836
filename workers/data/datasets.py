"""Data set loading by spec string.

Specs (stable contract):

- ``digits`` -- scikit-learn's bundled 8x8 digits, stratified 70/30 split (random_state=0).
- ``fashion-mnist[:DIR]`` -- IDX files (gzipped or plain); default DIR is
  ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
- ``imagefolder:DIR`` -- ``DIR/{train,test}/<class>/*.{png,jpg,jpeg}``.
- ``cifar10:DIR`` / ``cifar100:DIR`` -- the python pickle batches of the official archives.
- ``parquet:PATH`` -- a Parquet file or directory in the one Parquet schema a source has
  too (workers.data.sources): ``item_id`` (the key), ``label``, a feature (list of
  numbers) or ``image`` (PNG/JPEG bytes) column, and ``split`` (required here:
  ``train``/``test``).

Every bad input raises :class:`DatasetError`. Nothing is read at import time.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import gzip
import importlib
import io
import os
import pickle
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workers.data.errors import DatasetError

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "KNOWN_KINDS",
    "Dataset",
    "DatasetError",
    "load_dataset",
    "parse_spec",
]

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
KNOWN_KINDS: tuple[str, ...] = (
    "digits",
    "fashion-mnist",
    "imagefolder",
    "cifar10",
    "cifar100",
    "parquet",
)
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_SPLITS = ("train", "test")


@dataclass(frozen=True, eq=False)
class Dataset:
    """An in-memory train/test data set.

    Arrays are validated, made C-contiguous (x float32, y int64) and read-only, because
    loaded data sets are cached and shared; copy before modifying in place.
    """

    spec: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    # the evaluation items' keys in their source (a source's evaluation set); empty when
    # the data set was loaded whole, not through a source
    test_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.class_names)
        if not names:
            raise DatasetError(f"{self.spec}: no classes")
        object.__setattr__(self, "class_names", names)
        shapes = []
        for split in _SPLITS:
            x = np.ascontiguousarray(getattr(self, f"x_{split}"), dtype=np.float32)
            y_raw = np.asarray(getattr(self, f"y_{split}"))
            if y_raw.ndim != 1 or (y_raw.size and y_raw.dtype.kind not in "iu"):
                raise DatasetError(f"{self.spec}: {split} labels must be a 1-D integer array")
            y = np.ascontiguousarray(y_raw, dtype=np.int64)
            # an evaluation set alone (EvalSet.dataset) has no train split: its training
            # items stream from the source
            if x.ndim < 2 or (len(x) == 0 and split == "test"):
                raise DatasetError(f"{self.spec}: {split} split is empty")
            if len(x) != len(y):
                raise DatasetError(f"{self.spec}: {split} has {len(x)} inputs but {len(y)} labels")
            if not np.isfinite(x).all():
                raise DatasetError(f"{self.spec}: {split} inputs contain NaN or infinite values")
            if len(y) and (y.min() < 0 or y.max() >= len(names)):
                raise DatasetError(
                    f"{self.spec}: {split} labels must be in 0..{len(names) - 1}, "
                    f"got {int(y.min())}..{int(y.max())}"
                )
            x.setflags(write=False)
            y.setflags(write=False)
            object.__setattr__(self, f"x_{split}", x)
            object.__setattr__(self, f"y_{split}", y)
            shapes.append(x.shape[1:])
        if shapes[0] != shapes[1]:
            raise DatasetError(
                f"{self.spec}: train input shape {shapes[0]} != test input shape {shapes[1]}"
            )

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(class_names)``)."""
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, e.g. ``(1, 28, 28)`` or ``(D,)``."""
        return tuple(int(d) for d in self.x_train.shape[1:])


# --------------------------------------------------------------------------- specs


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Validate ``spec`` without reading data; return ``(kind, absolute path or None)``."""
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError(f"empty or non-string data set spec: {spec!r}")
    head, sep, tail = spec.strip().partition(":")
    kind = head.strip().lower()
    raw_path = tail.strip() if sep else ""
    if kind not in KNOWN_KINDS:
        raise DatasetError(
            f"unknown data set kind {head.strip()!r} in spec {spec!r}; "
            f"known kinds: {', '.join(KNOWN_KINDS)}"
        )
    if kind == "digits":
        if raw_path:
            raise DatasetError(f"spec {spec!r}: 'digits' takes no path")
        return kind, None
    hint = ""
    if not raw_path:
        if kind != "fashion-mnist":
            raise DatasetError(f"spec {spec!r}: '{kind}' needs a path, e.g. '{kind}:/data/dir'")
        raw_path = DEFAULT_FASHION_MNIST_DIR
        hint = " (install it with `apt-get install dataset-fashion-mnist`)"
    if "://" in raw_path:
        if kind != "parquet":
            raise DatasetError(f"spec {spec!r}: only parquet: reads from a URI (s3://...)")
        return kind, raw_path  # reached when read (workers.data.sources), not here
    path = os.path.abspath(os.path.expanduser(raw_path))
    if not os.path.exists(path):
        raise DatasetError(f"spec {spec!r}: path {path} does not exist{hint}")
    if kind != "parquet" and not os.path.isdir(path):
        raise DatasetError(f"spec {spec!r}: path {path} is not a directory")
    return kind, path


def load_dataset(spec: str, image_size: int | None = None) -> Dataset:
    """Load a data set by spec; results are cached in-process per normalized spec.

    ``image_size``: the side of the square the images of image files (``imagefolder:``,
    Parquet ``image`` columns) are decoded to (shorter side scaled to it, centre crop);
    None: :func:`auto_size` of the first evaluation image. Data sets stored as arrays
    (digits, Fashion-MNIST, CIFAR) have their own size and take no other.
    """
    kind, path = parse_spec(spec)
    return _load_cached(kind, path, image_size)


def load_dataset_as(spec: str, input_shape: tuple[int, ...] | None) -> Dataset:
    """The data set as a model of ``input_shape`` takes it: its own size, or its images
    decoded to the model's squares when the lineage chose an image size."""
    ds = load_dataset(spec)
    if input_shape is not None and tuple(ds.x_test.shape[1:]) != tuple(input_shape):
        ds = load_dataset(spec, image_size=int(input_shape[-1]))
    return ds


def image_size_of(image_size: int | None) -> tuple[int, int] | None:
    """``image_size`` as a (height, width) size, or None (the automatic one)."""
    if image_size is None:
        return None
    if not 2 <= int(image_size) <= 1024:
        raise DatasetError(f"image_size must be 2 to 1024 pixels, got {image_size}")
    return int(image_size), int(image_size)


@functools.lru_cache(maxsize=8)
def _load_cached(kind: str, path: str | None, image_size: int | None = None) -> Dataset:
    norm = kind if path is None else f"{kind}:{path}"
    size = image_size_of(image_size)
    if kind == "digits":
        parts = _load_digits()
    elif kind == "fashion-mnist":
        parts = _load_fashion_mnist(Path(path or DEFAULT_FASHION_MNIST_DIR))
    elif kind == "imagefolder":
        parts = _load_imagefolder(Path(str(path)), size)
    elif kind in ("cifar10", "cifar100"):
        parts = _load_cifar(Path(str(path)), fine=kind == "cifar100")
    else:
        parts = _load_parquet(Path(str(path)), size)
    if size is not None and parts[0].ndim == 4 and tuple(parts[0].shape[2:]) != size:
        raise DatasetError(
            f"{norm} is stored as {parts[0].shape[2]} x {parts[0].shape[3]} arrays; "
            "image_size applies to image files (imagefolder:, Parquet image columns)"
        )
    if len(parts[0]) == 0:  # a data set read whole trains on its train split
        raise DatasetError(f"{norm}: train split is empty")
    return Dataset(norm, *parts)


_Parts = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]


# --------------------------------------------------------------------------- digits


def _load_digits() -> _Parts:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    return x_tr, y_tr, x_te, y_te, tuple(str(n) for n in bunch.target_names)


# --------------------------------------------------------------------------- IDX

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) into an array; errors name the file."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4:
        raise DatasetError(f"IDX file {path} is truncated (no header)")
    zero0, zero1, code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 or zero1 or code not in _IDX_DTYPES or ndim == 0:
        raise DatasetError(f"IDX file {path} has a bad magic number 0x{raw[:4].hex()}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"IDX file {path} is truncated (incomplete header)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetError(
            f"IDX file {path} has {len(raw) - header} data bytes, expected {expected} "
            f"for dims {dims} ({'truncated' if len(raw) - header < expected else 'trailing data'})"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find_file(directory: Path, name: str) -> Path:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"missing file {directory / name}[.gz]")


def _load_fashion_mnist(directory: Path) -> _Parts:
    out: list[np.ndarray] = []
    for prefix in ("train", "t10k"):
        img_path = _find_file(directory, f"{prefix}-images-idx3-ubyte")
        lbl_path = _find_file(directory, f"{prefix}-labels-idx1-ubyte")
        images, labels = _read_idx(img_path), _read_idx(lbl_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DatasetError(f"IDX file {img_path}: expected 3-D uint8 images")
        if labels.ndim != 1 or labels.dtype != np.uint8:
            raise DatasetError(f"IDX file {lbl_path}: expected 1-D uint8 labels")
        if len(images) != len(labels):
            raise DatasetError(
                f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels"
            )
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise DatasetError(f"IDX file {lbl_path}: label {int(labels.max())} out of range")
        out += [_scale_u8(images[:, None]), labels.astype(np.int64)]
    return out[0], out[1], out[2], out[3], FASHION_MNIST_CLASSES


def _scale_u8(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32) / np.float32(255.0)


# --------------------------------------------------------------------------- images


# Photos larger than this are refused (recorded as unreadable items, or one error): the
# pixel count at which Pillow's own decompression-bomb guard warns (about 89 MP, e.g.
# 9,459 x 9,459), read from the header before anything is decoded.
MAX_IMAGE_PIXELS = 89_478_485
# and narrower than this carry nothing to learn from (a single pixel, a line)
MIN_IMAGE_SIDE = 2
# the input side chosen when the data does not say (``image_size`` unset): the evaluation
# images' median shorter side, at most this: on 2 CPU cores a generation of 10,000
# photos at 32 x 32 trains in a few minutes (bench/results/models.md); set image_size
# higher where a GPU trains
AUTO_IMAGE_SIDE = 32


def _open_image(source: Path | bytes, name: str) -> Any:
    """An image opened lazily (header only), refused when it is too large or too small."""
    from PIL import Image, UnidentifiedImageError

    too_large = f"above graceful's limit of {MAX_IMAGE_PIXELS:,} pixels (Pillow's "
    too_large += "decompression-bomb threshold); scale it down"
    # Pillow warns at this same limit (a second, multi-line message on stderr next to the
    # one error line): the check below refuses such an image and says so itself
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Image.DecompressionBombError as exc:  # Pillow's own guard, at twice the limit
        raise DatasetError(f"image {name} is {too_large} ({exc})") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"cannot decode image {name}: {exc}") from exc
    if img.width * img.height > MAX_IMAGE_PIXELS:
        img.close()
        raise DatasetError(f"image {name} is {img.width} x {img.height} pixels, {too_large}")
    if min(img.width, img.height) < MIN_IMAGE_SIDE:
        img.close()
        raise DatasetError(
            f"image {name} is {img.width} x {img.height} pixels, below {MIN_IMAGE_SIDE} "
            "pixels a side: nothing to learn from"
        )
    return img


def _image_mode(img: Any) -> str:
    """'L' for a grey image (8- or 16-bit, with or without alpha), else 'RGB'."""
    return "L" if img.mode in ("1", "L", "LA") or img.mode.startswith("I") else "RGB"


def auto_size(height: int, width: int, cap: int = AUTO_IMAGE_SIDE) -> tuple[int, int]:
    """The model's input size for a data set whose first evaluation image is ``height`` x
    ``width``: that size, scaled down (aspect kept) so its shorter side is at most ``cap``.

    Data sets of small images keep their size (28 x 28, 8 x 8, 32 x 32), so lineages made
    before the cap decode as they did; photos of a few hundred pixels train at 32 a side.
    """
    scale = min(1.0, cap / min(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _decode_images(
    items: Sequence[tuple[str, Path | bytes]], size: tuple[int, int] | None = None
) -> np.ndarray:
    """Decode images to (N, C, H, W) float32 in [0, 1].

    Mode is 'L' if every image is grayscale, else 'RGB'. The size is ``size`` =
    (height, width), by default :func:`auto_size` of the first item's.
    """
    modes: set[str] = set()
    for name, source in items:
        with _open_image(source, name) as img:
            modes.add(_image_mode(img))
            size = size or auto_size(img.height, img.width)
    # no items: (0, 1, 0, 0) unless ``size`` is given
    return decode_images_as(items, "RGB" if "RGB" in modes else "L", size or (0, 0))


def _load_imagefolder(root: Path, size: tuple[int, int] | None = None) -> _Parts:
    split_dirs = {s: root / s for s in _SPLITS}
    for split, d in split_dirs.items():
        if not d.is_dir():
            raise DatasetError(f"imagefolder {root}: missing {split} directory {d}")
    classes = sorted(
        {
            c.name
            for d in split_dirs.values()
            for c in d.iterdir()
            if c.is_dir() and not c.name.startswith(".")
        }
    )
    if not classes:
        raise DatasetError(f"imagefolder {root}: no class folders under train/ or test/")
    found: dict[str, list[tuple[Path, int]]] = {}  # per split: (file, class index)
    for split, d in split_dirs.items():
        found[split] = [
            (f, idx)
            for idx, cls in enumerate(classes)
            if (d / cls).is_dir()
            for f in sorted((d / cls).iterdir())
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not found[split]:
            raise DatasetError(f"imagefolder {root}: {split} split has no PNG/JPEG images")
    empty = sorted(set(range(len(classes))) - {i for fs in found.values() for _, i in fs})
    if empty:
        raise DatasetError(
            f"imagefolder {root}: class folder(s) without images: "
            f"{', '.join(classes[i] for i in empty)}"
        )
    tr, te = ([(str(f), f) for f, _ in found[s]] for s in _SPLITS)
    x_tr, x_te = _decode_split_images(tr, te, size)
    y_tr, y_te = (np.asarray([i for _, i in found[s]], dtype=np.int64) for s in _SPLITS)
    return x_tr, y_tr, x_te, y_te, tuple(classes)


def _decode_split_images(
    train: Sequence[tuple[str, Path | bytes]],
    test: Sequence[tuple[str, Path | bytes]],
    size: tuple[int, int] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode the evaluation split, then the training split to its mode and size.

    The evaluation split alone fixes the input format, so it decodes the same whether a
    data set is loaded whole or streamed as a source (workers.data.sources).
    """
    x_te = _decode_images(test, size)
    mode = "L" if x_te.shape[1] == 1 else "RGB"
    return decode_images_as(train, mode, (x_te.shape[2], x_te.shape[3])), x_te


def decode_images_as(
    items: Sequence[tuple[str, Path | bytes]], mode: str, size: tuple[int, int]
) -> np.ndarray:
    """Decode images to ``mode`` ("L" or "RGB") and ``size`` = (height, width), as
    (N, C, H, W) float32 in [0, 1]; one image in memory at a time, at most.

    The policy for photos of any size and kind: EXIF orientation applied; scaled so it
    covers ``size`` with its aspect ratio kept (the shorter side to the model's input),
    then cropped to ``size`` around the centre; a JPEG is decoded at a reduced scale
    when it is much larger (Pillow's draft mode: a 4000-pixel photo never reaches memory
    whole); 16-bit grey scaled to 8 bits, CMYK and palettes converted, transparent pixels
    white (as a page shows them).
    """
    height, width = size
    channels = 1 if mode == "L" else 3
    out = np.empty((len(items), height, width, channels), dtype=np.uint8)
    for i, (name, source) in enumerate(items):
        with _open_image(source, name) as img:
            try:
                out[i] = _fit(img, mode, height, width).reshape(height, width, channels)
            except (OSError, ValueError, SyntaxError) as exc:
                raise DatasetError(f"cannot decode image {name}: {exc}") from exc
    return _scale_u8(out.transpose(0, 3, 1, 2))


def thumbnail_png(source: Path | bytes, name: str, side: int = 160) -> bytes:
    """A PNG of an image at most ``side`` pixels a side, EXIF orientation applied (the
    same pixel limits as decoding, read from the header)."""
    from PIL import ImageOps

    with _open_image(source, name) as img:
        try:
            if img.format == "JPEG":
                img.draft("RGB", (side, side))
            small = ImageOps.exif_transpose(img)
            small.thumbnail((side, side))
            small = small.convert(_image_mode(small))
        except (OSError, ValueError, SyntaxError) as exc:
            raise DatasetError(f"cannot decode image {name}: {exc}") from exc
    return _png(small)


def array_png(x: np.ndarray, side: int = 96) -> bytes:
    """A PNG of one model input (C, H, W) in [0, 1], scaled up to about ``side`` pixels."""
    from PIL import Image

    a = np.clip(np.asarray(x, dtype=np.float32) * 255.0, 0, 255).round().astype(np.uint8)
    img = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
    scale = max(1, side // max(img.width, img.height))
    return _png(img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST))


def _png(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _fit(img: Any, mode: str, height: int, width: int) -> np.ndarray:
    """One opened image as a (height, width[, C]) uint8 array (see decode_images_as)."""
    from PIL import Image, ImageOps

    scale = max(height / img.height, width / img.width)
    if img.format == "JPEG" and scale < 0.5:  # decode at 1/2, 1/4 or 1/8 of the size
        img.draft(img.mode, (int(img.width * scale) + 1, int(img.height * scale) + 1))
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I") or img.mode == "F":  # 16/32-bit grey: scale to 8 bits
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):  # transparent pixels: white, as a page shows them
        base = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(base, img.convert("RGBA"))
    img = img.convert(mode)
    if img.size != (width, height):
        scale = max(height / img.height, width / img.width)
        w, h = max(width, round(img.width * scale)), max(height, round(img.height * scale))
        left, top = (w - width) // 2, (h - height) // 2
        img = img.resize(
            (width, height),
            Image.Resampling.BILINEAR,
            box=(left / scale, top / scale, (left + width) / scale, (top + height) / scale),
            reducing_gap=2.0 if scale < 0.25 else None,  # a large PNG: faster, as good
        )
    return np.asarray(img)


# --------------------------------------------------------------------------- CIFAR


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves numpy array reconstruction and harmless builtins."""

    _BUILTINS = frozenset(
        {"list", "dict", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int"}
        | {"float", "complex", "bool"}
    )

    def find_class(self, module: str, name: str) -> Any:
        # numpy's array reconstruction, under its 1.x and 2.x module names (_frombuffer:
        # written by numpy for pickle protocol 5; it only builds an array from a buffer)
        submodule = {"_reconstruct": "multiarray", "_frombuffer": "numeric"}.get(name)
        if submodule and module in (f"numpy.core.{submodule}", f"numpy._core.{submodule}"):
            for mod in (f"numpy._core.{submodule}", module):  # numpy 2.x's name first
                with contextlib.suppress(ImportError, AttributeError):
                    return getattr(importlib.import_module(mod), name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module in ("builtins", "__builtin__") and name in self._BUILTINS:
            return getattr(builtins, name)
        if (module, name) == ("_codecs", "encode"):  # bytes pickled with protocol < 3
            import codecs

            return codecs.encode
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


def _read_pickle(path: Path) -> dict[bytes, Any]:
    """Load a CIFAR pickle batch with a restricted unpickler; errors name the file."""
    # The CIFAR archives ship python pickles (written by Python 2, hence encoding="bytes");
    # that is the data set's own format, so we restrict what the pickle may construct.
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise DatasetError(f"refusing or unable to unpickle {path}: {exc}") from exc
    except (OSError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise DatasetError(f"cannot read pickle {path}: {exc}") from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"pickle {path} does not hold a dict")
    return obj


def _cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_pickle(path)
    for key in (b"data", label_key):
        if key not in batch:
            raise DatasetError(f"pickle {path} lacks key {key!r}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise DatasetError(
            f"pickle {path}: data must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}"
        )
    if labels.shape != (len(data),) or (labels.size and labels.dtype.kind not in "iu"):
        raise DatasetError(f"pickle {path}: {label_key!r} must hold {len(data)} integer labels")
    return _scale_u8(data.reshape(-1, 3, 32, 32)), labels.astype(np.int64)


def _load_cifar(root: Path, *, fine: bool) -> _Parts:
    sub = root / ("cifar-100-python" if fine else "cifar-10-batches-py")
    meta_name = "meta" if fine else "batches.meta"
    base = root if (root / meta_name).is_file() or not sub.is_dir() else sub
    if fine:
        train_files, test_files = [base / "train"], [base / "test"]
        label_key, names_key = b"fine_labels", b"fine_label_names"
    else:
        train_files = [base / f"data_batch_{i}" for i in range(1, 6)]
        test_files = [base / "test_batch"]
        label_key, names_key = b"labels", b"label_names"
    for f in [*train_files, *test_files, base / meta_name]:
        if not f.is_file():
            raise DatasetError(f"missing CIFAR file {f}")
    meta = _read_pickle(base / meta_name)
    if names_key not in meta:
        raise DatasetError(f"pickle {base / meta_name} lacks key {names_key!r}")
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key])
    splits = []
    for files in (train_files, test_files):
        xs, ys = zip(*(_cifar_batch(f, label_key) for f in files), strict=True)
        splits += [np.concatenate(xs), np.concatenate(ys)]
    return splits[0], splits[1], splits[2], splits[3], names


# --------------------------------------------------------------------------- parquet


def _load_parquet(path: Path, size: tuple[int, int] | None = None) -> _Parts:
    """A Parquet file or directory read whole as a fixed data set.

    Its columns are the one Parquet schema (``item_id``, ``label``, a feature or
    ``image`` column, ``split``), detected and checked where a source's are:
    :func:`workers.data.sources.data_set_columns`.
    """
    import pyarrow as pa

    from workers.data.parquet_schema import data_set_columns

    try:
        if path.is_dir():
            import pyarrow.dataset as pads

            table = pads.dataset(str(path), format="parquet").to_table()
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(str(path))
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(f"cannot read Parquet {path}: {exc}") from exc
    column, splits, labels, names = data_set_columns(table, str(path))
    train, test = splits == "train", splits == "test"
    if column == "image":
        items = _parquet_image_items(table.column("image"), path)
        x_tr, x_te = _decode_split_images(
            [items[i] for i in np.flatnonzero(train)],
            [items[i] for i in np.flatnonzero(test)],
            size,
        )
    else:
        x = _parquet_features(table.column(column), column, path)
        x_tr, x_te = x[train], x[test]
    return x_tr, labels[train], x_te, labels[test], names


def _parquet_features(col: Any, name: str, path: Path) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    col = col.combine_chunks()
    if col.null_count:
        raise DatasetError(f"Parquet {path}: column {name!r} has null rows")
    lengths = np.asarray(pc.list_value_length(col), dtype=np.int64)
    if len(lengths) == 0 or lengths.min() != lengths.max() or lengths[0] == 0:
        raise DatasetError(f"Parquet {path}: column {name!r} rows must share one non-zero length")
    values = col.flatten()
    numeric = pa.types.is_floating(values.type) or pa.types.is_integer(values.type)
    if values.null_count or not numeric:
        raise DatasetError(f"Parquet {path}: column {name!r} must hold non-null numbers")
    return np.asarray(values.to_numpy(), dtype=np.float32).reshape(len(lengths), -1)


def _parquet_image_items(col: Any, path: Path) -> list[tuple[str, Path | bytes]]:
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_struct(col.type) and col.type.get_field_index("bytes") >= 0:
        col = pc.struct_field(col, "bytes")  # Hugging Face style {bytes, path} image structs
    if not (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):
        raise DatasetError(f"Parquet {path}: column 'image' must be binary PNG/JPEG bytes")
    if col.null_count:
        raise DatasetError(f"Parquet {path}: column 'image' has null rows")
    return [(f"{path} row {i}", b) for i, b in enumerate(col.to_pylist())]

"""Photos as users have them: any mode, orientation and size (workers.data.datasets decoding)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from workers.data.datasets import MAX_IMAGE_PIXELS, DatasetError, auto_size, decode_images_as
from workers.data.sources import scan_source


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width`` x ``height`` (no pixel data: never decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # stored 8 wide x 4 high, left half red, right half blue; EXIF orientation 6 says
    # "rotate 90 degrees clockwise to view": seen 4 wide x 8 high, red on top
    a = np.zeros((4, 8, 3), np.uint8)
    a[:, :4, 0] = 255
    a[:, 4:, 2] = 255
    img = Image.fromarray(a, "RGB")
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "r.png", exif=exif)
    x = decode_images_as([("r", tmp_path / "r.png")], "RGB", (8, 4))[0]
    assert (x[0, :4] == 1).all() and (x[2, :4] == 0).all()  # top: red
    assert (x[2, 4:] == 1).all() and (x[0, 4:] == 0).all()  # bottom: blue


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    a = np.array([[0, 16384, 32768, 65535]] * 2, dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as img:
        assert img.mode.startswith("I")
    x = decode_images_as([("g", tmp_path / "g16.png")], "L", (2, 4))[0, 0]
    # v * 255 / 65535, truncated: 0, 63, 127, 255 (a plain convert("L") clips all to 255)
    np.testing.assert_array_equal(np.rint(x[0] * 255), [0, 63, 127, 255])


def test_palette_transparency_becomes_white_and_cmyk_converts(tmp_path: Path) -> None:
    p = Image.new("P", (4, 4), 0)
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # 0: red, 1: blue
    p.putpixel((0, 0), 1)
    p.info["transparency"] = 0  # red is the transparent index
    p.save(tmp_path / "p.png", transparency=0)
    x = decode_images_as([("p", tmp_path / "p.png")], "RGB", (4, 4))[0]
    np.testing.assert_array_equal(x[:, 0, 0], [0, 0, 1])  # the one opaque blue pixel
    np.testing.assert_array_equal(x[:, 3, 3], [1, 1, 1])  # transparent: white
    Image.new("CMYK", (6, 6), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # red in CMYK
    red = decode_images_as([("c", tmp_path / "c.jpg")], "RGB", (6, 6))[0]
    assert red[0].mean() > 0.9 and red[1].mean() < 0.1 and red[2].mean() < 0.1


def test_large_photo_covers_and_crops_the_centre(tmp_path: Path) -> None:
    # 300 x 200 (landscape): shorter side to 8 (12 x 8), the centre 8 x 8 kept: source
    # columns 50 to 250, whose middle half is the white third
    a = np.zeros((200, 300), np.uint8)
    a[:, 100:200] = 255
    Image.fromarray(a, "L").save(tmp_path / "wide.jpg", quality=95)
    x = decode_images_as([("w", tmp_path / "wide.jpg")], "L", (8, 8))[0, 0]
    assert x.shape == (8, 8) and x[:, 3:5].min() > 0.95
    assert x[:, 0].max() < 0.1 and x[:, 7].max() < 0.1
    assert auto_size(200, 300) == (32, 48) and auto_size(28, 28) == (28, 28)


def test_oversized_and_single_pixel_photos_are_recorded_skips(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    for split in ("train", "test"):
        d = root / split / "cat"
        d.mkdir(parents=True)
        Image.new("RGB", (16, 16), (10, 20, 30)).save(d / "ok.png")
    _png_header_only(root / "train" / "cat" / "bomb.png", 20_000, 20_000)
    Image.new("RGB", (1, 1)).save(root / "train" / "cat" / "dot.png")
    scan = scan_source(f"imagefolder:{root}")
    assert scan.table.column("key").to_pylist() == ["train/cat/ok.png"]
    why = {s["key"]: s["reason"] for s in scan.skipped}
    assert f"above graceful's limit of {MAX_IMAGE_PIXELS:,} pixels" in why["train/cat/bomb.png"]
    # 100 megapixels: refused from the header by graceful's own check, before decoding
    _png_header_only(root / "train" / "cat" / "big.png", 10_000, 10_000)
    again = {s["key"]: s["reason"] for s in scan_source(f"imagefolder:{root}").skipped}
    assert "10000 x 10000 pixels, above graceful's limit" in again["train/cat/big.png"]
    assert "below 2 pixels a side" in why["train/cat/dot.png"]
    with pytest.raises(DatasetError, match="above graceful's limit"):
        decode_images_as([("b", root / "train" / "cat" / "bomb.png")], "RGB", (8, 8))


def test_symlink_loop_and_non_utf8_names_are_recorded_skips(tmp_path: Path) -> None:
    import os

    from workers.collection.items import list_items

    root = tmp_path / "photos"
    for split in ("train", "test"):
        d = root / split / "cat"
        d.mkdir(parents=True)
        Image.new("RGB", (16, 16), (10, 20, 30)).save(d / "ok.png")
    cat = root / "train" / "cat"
    os.symlink("loop.png", cat / "loop.png")  # a link to itself: stat fails (ELOOP)
    os.symlink(cat, cat / "again")  # a folder linking back: not followed
    bad = os.fsencode(str(cat)) + b"/caf\xe9.png"  # Latin-1 bytes: not UTF-8
    with open(bad, "wb") as f:
        Image.new("RGB", (16, 16)).save(f, format="PNG")
    scan = scan_source(f"imagefolder:{root}")
    assert scan.table.column("key").to_pylist() == ["train/cat/ok.png"]
    why = {s["key"]: s["reason"] for s in scan.skipped}
    assert why["train/cat/caf\ufffd.png"] == "its name is not UTF-8: rename it (keys are text)"
    assert why["train/cat/loop.png"].startswith("cannot stat it:")
    # the collection's listing of the same folder skips and records them the same way
    listing = list_items(f"images:{root}")
    assert listing.table.column("key").to_pylist() == ["test/cat/ok.png", "train/cat/ok.png"]
    assert {s["key"] for s in listing.skipped} == {"train/cat/caf\ufffd.png", "train/cat/loop.png"}

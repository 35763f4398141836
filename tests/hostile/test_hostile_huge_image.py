"""`graceful search --file` on an image whose header claims more pixels than graceful
decodes (workers.data.datasets.MAX_IMAGE_PIXELS, about 89 MP): refused from the header, before a
pixel is decoded and without reading the file into memory; one `error:` line, exit 2."""

from __future__ import annotations

import struct
import tracemalloc
import warnings
import zlib
from pathlib import Path

import pytest
from hostile_helpers import collection, error_line
from sources.data import champion
from typer.testing import CliRunner

from flows import cli as graceful
from flows.query import BadQuery, Searcher
from store.collection import Collection
from store.lineage import Lineage
from workers.data.datasets import MAX_IMAGE_PIXELS


def png_header(width: int, height: int) -> bytes:
    """A PNG's signature and IHDR chunk (8-bit grey) claiming ``width`` x ``height``, an
    empty IDAT and IEND: what a decompression bomb's first bytes say."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))


def bmp_header(width: int, height: int) -> bytes:
    """A 24-bit BMP's file and info headers claiming ``width`` x ``height``, no pixels."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


@pytest.fixture
def searchable(home: Path) -> Path:
    """A champion (grey 8 x 8 inputs) and a collection to search."""
    champion(Lineage(), 0)
    collection(Collection(Lineage()), "images:/album", parts=1, per_part=5, generation=1)
    return home


def _refused(path: Path) -> str:
    result = CliRunner().invoke(graceful.app, ["search", "--file", str(path), "--json"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stdout == ""  # no answer
    return error_line(result.stderr)


@pytest.mark.parametrize(
    ("name", "header", "said"),
    [
        # above Pillow's own guard (twice the limit): refused by Pillow, said by graceful
        ("bomb.png", png_header(20_000, 20_000), "above graceful's limit of 89,478,485 pixels"),
        # between the limit and Pillow's guard: graceful's own check, from the header
        ("big.png", png_header(10_000, 10_000), "is 10000 x 10000 pixels, above graceful's"),
        ("big.bmp", bmp_header(12_000, 9_000), "is 12000 x 9000 pixels, above graceful's"),
    ],
    ids=["20000x20000.png", "10000x10000.png", "12000x9000.bmp"],
)
def test_an_image_above_the_pixel_limit_is_refused_from_its_header(
    searchable: Path, tmp_path: Path, name: str, header: bytes, said: str
) -> None:
    path = tmp_path / name
    path.write_bytes(header)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        line = _refused(path)
    assert str(path) in line and said in line and "scale it down" in line, line
    assert f"{MAX_IMAGE_PIXELS:,}" in line
    # and no second message: Pillow's DecompressionBombWarning would print two more lines
    assert [str(w.message) for w in warned if "decompression bomb" in str(w.message)] == []


def test_a_huge_file_is_refused_without_reading_it_into_memory(
    searchable: Path, tmp_path: Path
) -> None:
    """A 256 MiB file (sparse: a header, then a hole) whose header claims 20,000 x 20,000
    pixels: refused with a few MiB of memory, not a read of the whole file."""
    path = tmp_path / "bomb.png"
    with open(path, "wb") as f:
        f.write(png_header(20_000, 20_000))
        f.truncate(256 << 20)
    tracemalloc.start()
    try:
        line = _refused(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "above graceful's limit" in line, line
    assert peak < 32 << 20, f"{peak / 2**20:.0f} MiB traced while refusing a 256 MiB file"


def test_the_search_service_refuses_the_same_upload(searchable: Path) -> None:
    """The service's upload path (bytes) is refused by the same check (a 400)."""
    searcher = Searcher.open(Lineage())
    with pytest.raises(BadQuery, match=r"upload is 10000 x 10000 pixels, above graceful's"):
        searcher.image_query(png_header(10_000, 10_000), "upload")

"""A collection part changed behind the manifest (bytes overwritten on disk) never reaches
the search index: every reader that builds it checks each part's sha256 first and
refuses with one `error:` line naming the part and the fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hostile_helpers import collection, error_line
from sources.data import champion

from store.collection import Collection, CollectionStoreError
from store.index import INDEX_FILE, CollectionIndex
from store.lineage import Lineage

ROOT = Path(__file__).resolve().parents[2]


def _overwrite(path: Path, n: int = 200) -> None:
    """``n`` bytes in the middle of the file (the embedding column's values) set to 0xFF:
    the file still reads as Parquet, its floats are NaN."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + n] = b"\xff" * n
    path.write_bytes(bytes(data))


def _corrupt_collection(home: Path) -> Collection:
    champion(Lineage(), 0)
    gallery = Collection(Lineage())
    collection(gallery, "images:/album", parts=3, per_part=200, generation=1)
    CollectionIndex.open(gallery)  # the index as a search leaves it
    _overwrite(gallery.root / "part-00001.parquet")
    (gallery.root / INDEX_FILE).unlink()
    return gallery


def test_the_index_is_never_built_from_a_part_whose_sha256_differs(home: Path) -> None:
    gallery = _corrupt_collection(home)
    # the damage is invisible to a plain read: the part still parses
    assert np.isnan(gallery.read_rows("part-00001.parquet").embedding).any()
    with pytest.raises(
        CollectionStoreError, match=r"part-00001\.parquet was modified outside graceful"
    ):
        CollectionIndex.open(gallery)
    assert not (gallery.root / INDEX_FILE).exists()  # nothing was saved from it


def _search(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, GRACEFUL_HOME=str(home), COLUMNS="200")
    env.pop("GRACEFUL_DB_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "search", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_graceful_search_refuses_a_corrupt_part_with_one_error_line(
    home: Path, tmp_path: Path
) -> None:
    _corrupt_collection(home)
    query = tmp_path / "q.npy"
    np.save(query, np.random.default_rng(0).random((1, 8, 8)).astype(np.float32))
    result = _search(home, "--file", str(query), "--json")
    line = error_line(result.stderr)
    assert result.returncode == 1, result.stderr  # a failure of the store, not bad input
    assert "part-00001.parquet" in line and "Restore the file from a backup" in line
    assert result.stdout == ""  # no answer with NaN scores or a missing item

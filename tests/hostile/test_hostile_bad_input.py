"""Bad input found by a hostile run: each is one `error:` line, exit 2, nothing stored
changed (bad Parquet sources, a repeated key in the evaluation split, an index of the
wrong kind, a query "file" that is a directory or a device)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hostile_helpers import collection, error_line
from sources.data import champion, write_pngs
from typer.testing import CliRunner

from flows import cli as graceful
from store.collection import Collection, CollectionRows
from store.lineage import Lineage
from workers.data.sources import SourceError, load_eval


def _parquet(path: Path, test_ids: list[str]) -> Path:
    n_train = 40
    ids = [f"t{i}" for i in range(n_train)] + test_ids
    rng = np.random.default_rng(0)
    pq.write_table(
        pa.table(
            {
                "item_id": ids,
                "label": [i % 3 for i in range(len(ids))],
                "features": [list(map(float, rng.random(4))) for _ in ids],
                "split": ["train"] * n_train + ["test"] * len(test_ids),
            }
        ),
        path,
    )
    return path


def test_a_repeated_key_in_the_test_split_is_an_error(tmp_path: Path) -> None:
    path = _parquet(tmp_path / "src.parquet", ["e0", "e1", "e1", "e2"])
    with pytest.raises(
        SourceError, match=r"1 item_id value\(s\) repeat in the test split \('e1'\)"
    ):
        load_eval(f"parquet:{path}")


def _refused(c, *args: str) -> str:
    proc = c.start(*args)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, err[-3000:]
    return error_line(err)


@pytest.mark.slow  # the session's Prefect server (cli), three `graceful cycle` runs
def test_bad_parquet_sources_are_bad_input(tmp_path: Path, cli) -> None:
    c = cli(tmp_path / "home")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 not a Parquet file at all PAR1")
    nolabel = tmp_path / "nolabel.parquet"
    pq.write_table(pa.table({"item_id": ["a", "b"], "features": [[0.0], [1.0]]}), nolabel)
    repeated = _parquet(tmp_path / "repeated.parquet", ["e0", "e1", "e1"])
    for spec, what in (
        (garbage, "cannot read Parquet"),
        (nolabel, "missing column 'label'"),
        (repeated, "repeat in the test split"),
    ):
        line = _refused(c, "cycle", "--dataset", f"parquet:{spec}", "--epochs", "1")
        assert what in line and spec.name in line, line
    assert Lineage(c.db_url).generations() == []  # nothing recorded


@pytest.mark.slow  # the session's Prefect server (cli)
def test_an_index_of_the_wrong_kind_is_bad_input(home: Path, tmp_path: Path, cli) -> None:
    champion(Lineage(), 0)
    album = tmp_path / "album"
    write_pngs(album, 0, 4)
    c = cli(home)
    gallery = Collection(Lineage())
    # the scenario's collection (its evaluation gallery) is no user collection
    rows = CollectionRows(
        item_id=np.arange(4),
        label=np.zeros(4, np.int64),
        generation=np.ones(4, np.int32),
        margin=np.zeros(4, np.float32),
        embedding=np.eye(4, 8, dtype=np.float32),
    )
    gallery.create("reference:scenario:digits", rows)
    before = sorted(p.name for p in gallery.root.iterdir())
    line = _refused(c, "index", f"images:{album}")
    assert "scenario's evaluation reference half" in line and "another GRACEFUL_HOME" in line
    line = _refused(c, "index")
    assert "pass its spec" in line
    assert sorted(p.name for p in gallery.root.iterdir()) == before
    assert gallery.require().items == 4


@pytest.mark.slow  # the session's Prefect server (cli)
def test_an_images_collection_indexed_from_parquet_is_bad_input(
    home: Path, tmp_path: Path, cli
) -> None:
    champion(Lineage(), 0)
    gallery = Collection(Lineage())
    write_pngs(tmp_path / "album", 0, 5)
    collection(gallery, f"images:{tmp_path / 'album'}", parts=1, per_part=5, generation=1)
    src = _parquet(tmp_path / "items.parquet", ["e0"])
    line = _refused(cli(home), "index", f"parquet:{src}")
    assert "holds images items" in line and "another kind" in line
    assert gallery.require().items == 5


@pytest.mark.parametrize("query", ["directory", "/dev/zero"])
def test_search_says_what_a_query_file_is(home: Path, tmp_path: Path, query: str) -> None:
    champion(Lineage(), 0)
    collection(Collection(Lineage()), "images:/album", parts=1, per_part=5, generation=1)
    path = tmp_path if query == "directory" else Path(query)
    result = CliRunner().invoke(graceful.app, ["search", "--file", str(path)])
    assert result.exit_code == 2, result.output
    line = error_line(result.stderr)
    assert "does not exist" not in line
    what = "is a directory" if query == "directory" else "is not a regular file"
    assert f"{path} {what}" in line and "image file" in line

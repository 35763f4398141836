"""`graceful index` and `graceful search` as a user runs them (subprocesses on a real
Prefect server): a SIGKILL mid-way and a rerun, search answers in JSON by key, and bad
input as one `error:` line."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import faiss
import numpy as np
import pytest
from prefect_kit import call
from sources.data import champion, write_pngs

from store.collection import Collection
from store.index import CollectionIndex
from store.lineage import Lineage


def run(c, *args: str, failpoint: str | None = None):
    proc = c.start(*args, failpoint=failpoint)
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


@pytest.mark.slow
def test_index_killed_mid_way_resumes_and_search_answers_by_key(
    home: Path, tmp_path: Path, cli
) -> None:
    lin = Lineage()
    gen = champion(lin, 0)
    root = tmp_path / "album"
    write_pngs(root, 0, 160)
    c = cli(home)
    spec = f"images:{root}"
    code, _, _ = run(c, "index", spec, "--part-rows", "32", failpoint="index-part")
    assert code == -signal.SIGKILL
    held = Collection(Lineage()).keys(["key"]).num_rows
    assert held == 32  # the first part committed, nothing after it
    code, out, err = run(c, "index", spec, "--part-rows", "32")
    assert code == 0, err
    assert "128 added" in out and "160 items" in out
    # the Prefect runs are named for what they index (the killed one and the rerun)
    named = call(
        "POST",
        f"{c.env['PREFECT_API_URL']}/flow_runs/filter",
        json={"flow_runs": {"name": {"any_": [f"index {spec}"]}}},
    )
    assert "COMPLETED" in {r["state_type"] for r in named}, named
    gallery = Collection(Lineage())
    keys = gallery.keys(["key", "item_id"])
    assert keys.num_rows == len(set(keys.column("key").to_pylist())) == 160
    index = CollectionIndex.open(gallery)  # held: id_map is a view into its memory
    ids = faiss.vector_to_array(index.index.id_map)
    assert sorted(ids.tolist()) == sorted(keys.column("item_id").to_pylist())

    probe = "shelf-2/0005.png"
    code, out, err = run(c, "search", "--file", str(root / probe), "--k", "3", "--json")
    assert code == 0, err
    hits = json.loads(out)
    assert len(hits) == 3 and hits[0]["key"] == probe
    assert hits[0]["generation"] == gen.id and set(hits[0]) >= {"key", "score", "generation"}
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    code, out, err = run(c, "search", "--item", probe, "--k", "2", "--json")
    assert code == 0 and json.loads(out)[0]["key"] == probe

    # bad input: one error line each, exit 2, the collection unchanged
    cases = [
        (("search", "--item", "nope.png"), "unknown key 'nope.png'"),
        (("index", f"images:{tmp_path / 'gone'}"), "does not exist"),
        (("index", f"parquet:{tmp_path / 'gone.parquet'}"), "does not exist"),
    ]
    for args, what in cases:
        code, _, err = run(c, *args)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and lines[-1].startswith("error:") and what in lines[-1], err
        assert "Traceback" not in err
    assert Collection(Lineage()).require().items == 160
    emb = np.zeros((1, 8), np.float32)
    assert CollectionIndex.open(Collection(Lineage())).search(emb + 1, k=1)[1].shape == (1, 1)

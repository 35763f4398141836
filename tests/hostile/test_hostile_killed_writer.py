"""A writer killed after a new part file is in place and before the manifest commits
(failpoint ``gallery-staged``) must not wedge the collection: the next writer cleans what
it left, under the writer lock, and ``verify`` never calls it foreign."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hostile_helpers import collection, files
from sources.data import champion, write_pngs

from store.collection import Collection
from store.lineage import Lineage

ROOT = Path(__file__).resolve().parents[2]

APPEND = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    from hostile_helpers import rows
    from store.collection import Collection
    from store.lineage import Lineage
    g = Collection(Lineage())
    g.append("images:/album", rows(g.next_item_id(), 20, generation=1))
    """
)


def _append(home: Path, failpoint: str | None = None) -> int:
    env = dict(os.environ, GRACEFUL_HOME=str(home))
    env.pop("GRACEFUL_DB_URL", None)
    if failpoint:
        env["GRACEFUL_FAILPOINT"] = failpoint
    here = str(Path(__file__).parent)
    proc = subprocess.run(
        [sys.executable, "-c", APPEND, here], cwd=ROOT, env=env, capture_output=True, text=True
    )
    return proc.returncode


@pytest.mark.slow  # a writer process killed at a failpoint
def test_an_append_killed_before_its_commit_is_cleaned_by_the_next_writer(home: Path) -> None:
    gallery = Collection(Lineage())
    collection(gallery, "images:/album", parts=2, per_part=20, generation=1)
    assert _append(home, failpoint="gallery-staged") == -signal.SIGKILL  # a real kill -9
    left = gallery.root / "part-00002.parquet"
    assert left.exists() and "part-00002.parquet" not in gallery.part_names()

    gallery.verify()  # the interrupted write is not a foreign file
    assert gallery.reconcile() == ["part-00002.parquet"]
    assert files(gallery.root) == ["part-00000.parquet", "part-00001.parquet"]
    assert _append(home) == 0  # and the collection goes on
    gallery.verify()
    assert gallery.require().items == 60 and len(gallery.part_names()) == 3


def test_a_drop_killed_after_its_commit_is_cleaned(home: Path) -> None:
    gallery = Collection(Lineage())
    collection(gallery, "images:/album", parts=3, per_part=20, generation=1)
    data = (gallery.root / "part-00001.parquet").read_bytes()
    gallery.drop_part("part-00001.parquet")
    # as a kill between the commit and the unlink leaves it: the file and its marker
    (gallery.root / "part-00001.parquet").write_bytes(data)
    (gallery.root / ".part-00001.parquet.pending").touch()
    gallery.verify()
    assert gallery.reconcile() == ["part-00001.parquet"]
    assert files(gallery.root) == ["part-00000.parquet", "part-00002.parquet"]


def test_a_file_nobody_wrote_in_an_unknown_slot_stays_foreign(home: Path) -> None:
    gallery = Collection(Lineage())
    collection(gallery, "images:/album", parts=1, per_part=20, generation=1)
    stray = gallery.root / "part-00007.parquet"
    stray.write_bytes((gallery.root / "part-00000.parquet").read_bytes())
    with pytest.raises(Exception, match="foreign file .*part-00007"):
        gallery.verify()
    assert gallery.reconcile() == [] and stray.exists()


@pytest.mark.slow
def test_graceful_index_killed_after_a_part_is_renamed_reruns_without_a_person(
    home: Path, tmp_path: Path, cli
) -> None:
    champion(Lineage(), 0)
    album = tmp_path / "album"
    write_pngs(album, 0, 60)
    c = cli(home)
    spec = f"images:{album}"

    def run(*args: str, failpoint: str | None = None):
        proc = c.start(*args, failpoint=failpoint)
        out, err = proc.communicate(timeout=600)
        return proc.returncode, out, err

    code, out, err = run("index", spec, "--part-rows", "20")
    assert code == 0, err
    write_pngs(album, 60, 100)
    code, _, _ = run("index", spec, "--part-rows", "20", failpoint="gallery-staged")
    assert code == -signal.SIGKILL
    gallery = Collection(Lineage())
    assert (gallery.root / "part-00003.parquet").exists()  # in place, never committed
    assert gallery.require().items == 60

    code, out, err = run("index", spec, "--part-rows", "20")
    assert code == 0, err
    assert "40 added" in out and "100 items" in out
    gallery.verify()
    keys = gallery.keys(["key"]).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 100
    assert not [p for p in gallery.root.iterdir() if p.name.endswith(".pending")]

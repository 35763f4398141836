"""`graceful cycle --image-size` and `--architecture` on an image folder of photos."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FAST = ["--epochs", "1", "--no-gate", "--backfill-budget", "0"]


def _photos(root: Path) -> None:
    """Colour photos of two kinds and varying sizes (reddish or bluish noise)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("test", 8)):
        for c, name in enumerate(("red", "blue")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(40, 90, 2)
                a = rng.integers(0, 120, (h, w, 3)).astype(np.uint8)
                a[..., 0 if c == 0 else 2] += 120
                Image.fromarray(a).save(d / f"{i}.jpg")


def _run(c, *args: str) -> subprocess.CompletedProcess:
    proc = c.start(*args)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_image_size_is_kept_by_the_lineage_and_a_bad_factory_refused(tmp_path: Path, cli) -> None:
    _photos(tmp_path / "photos")
    spec = f"imagefolder:{tmp_path / 'photos'}"
    bad = cli(tmp_path / "bad")
    r = _run(
        bad,
        "cycle",
        "--dataset",
        spec,
        "--architecture",
        '{"kind": "import", "factory": "no_such_pkg.nets:build"}',
        *FAST,
    )
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and "'no_such_pkg.nets:build' does not import" in line
    rep = _run(bad, "report", "--json")  # nothing recorded: not even a lineage
    assert rep.returncode == 2 and "no lineage at GRACEFUL_HOME" in rep.stderr, rep.stderr

    c = cli(tmp_path / "home")
    r = _run(c, "cycle", "--dataset", spec, "--image-size", "20", *FAST)
    assert r.returncode == 0, r.stderr[-2000:]
    gens = json.loads(_run(c, "report", "--json").stdout)["generations"]
    assert gens[0]["architecture"]["image_size"] == 20
    from workers.learning.models import load_model

    home = tmp_path / "home"
    ckpt = next((home / "checkpoints").glob("gen-1.pt"))
    assert load_model(ckpt).config["input_shape"] == [3, 20, 20]
    r = _run(c, "cycle", "--dataset", spec, "--image-size", "24", "--force", *FAST)
    assert r.returncode == 2
    assert "image_size 24 differs from this lineage's 20" in r.stderr


@pytest.mark.slow
def test_a_rejected_snapshot_is_skipped_until_something_changes(tmp_path: Path, cli) -> None:
    from sources.data import digits, write_images

    xtr, ytr, xte, yte = digits()
    root = tmp_path / "digits"
    write_images(root, "test", xte, yte, 0, 30, range(5))
    write_images(root, "train", xtr, ytr, 0, 80, range(5))
    spec = f"imagefolder:{root}"
    c = cli(tmp_path / "home")
    r = _run(c, "cycle", "--dataset", spec, "--epochs", "15", "--backfill-budget", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    first = json.loads(_run(c, "report", "--json").stdout)["generations"][0]
    assert first["accuracy"] > 0.4  # it learned: an update can flip what it got right
    write_images(root, "train", xtr, ytr, 80, 120, range(5))  # new training photos
    # a gate that allows no negative flip: the update flips something, so it is rejected
    strict = ["--epochs", "2", "--backfill-budget", "0", "--max-nfr", "0", "--no-require-ecc"]
    strict += ["--accuracy-tolerance", "1", "--method", "none"]
    r = _run(c, "cycle", *strict)
    assert r.returncode == 0, r.stderr[-2000:]
    gens = json.loads(_run(c, "report", "--json").stdout)["generations"]
    assert [g["status"] for g in gens] == ["promoted", "rejected"]
    # the same snapshot under the same configuration and ancestors: nothing to train again
    r = _run(c, "cycle", *strict)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipped: generation 2 was trained on this snapshot and rejected (NFR" in r.stdout
    assert len(json.loads(_run(c, "report", "--json").stdout)["generations"]) == 2
    # another configuration trains again, and so does --force
    r = _run(c, "cycle", *strict, "--force")
    assert r.returncode == 0 and "skipped" not in r.stdout
    assert len(json.loads(_run(c, "report", "--json").stdout)["generations"]) == 3

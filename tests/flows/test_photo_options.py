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
    rep = json.loads(_run(bad, "report", "--json").stdout)
    assert rep["generations"] == []  # nothing recorded

    c = cli(tmp_path / "home")
    r = _run(c, "cycle", "--dataset", spec, "--image-size", "20", *FAST)
    assert r.returncode == 0, r.stderr[-2000:]
    gens = json.loads(_run(c, "report", "--json").stdout)["generations"]
    assert gens[0]["architecture"]["image_size"] == 20
    from workers.models import load_model

    home = tmp_path / "home"
    ckpt = next((home / "checkpoints").glob("gen-1.pt"))
    assert load_model(ckpt).config["input_shape"] == [3, 20, 20]
    r = _run(c, "cycle", "--dataset", spec, "--image-size", "24", "--force", *FAST)
    assert r.returncode == 2
    assert "image_size 24 differs from this lineage's 20" in r.stderr


def _noise(root: Path) -> None:
    """Two classes of pure noise: nothing to learn, so accuracy stays at chance."""
    rng = np.random.default_rng(1)
    for split, n in (("train", 30), ("test", 20)):
        for name in ("a", "b"):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(d / f"{i}.png")


@pytest.mark.slow
def test_chance_first_generation_rejected_and_its_snapshot_skipped(tmp_path: Path, cli) -> None:
    _noise(tmp_path / "noise")
    spec = f"imagefolder:{tmp_path / 'noise'}"
    c = cli(tmp_path / "home")
    args = ["cycle", "--dataset", spec, "--epochs", "1", "--backfill-budget", "0"]
    r = _run(c, *args)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(_run(c, "report", "--json").stdout)
    assert rep["champion"] is None  # a chance-level first generation is not promoted
    gen = rep["generations"][0]
    assert gen["status"] == "rejected"
    assert any("not above chance" in why for why in gen["gate"]["reasons"])
    # the same snapshot under the same configuration: nothing to train again
    r = _run(c, *args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipped: generation 1 was trained on this snapshot and rejected" in r.stdout
    assert "not above chance" in r.stdout
    assert len(json.loads(_run(c, "report", "--json").stdout)["generations"]) == 1
    # another configuration, or --force, trains again
    r = _run(c, *args, "--force")
    assert r.returncode == 0 and "skipped" not in r.stdout
    assert len(json.loads(_run(c, "report", "--json").stdout)["generations"]) == 2

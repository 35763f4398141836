"""Bad training data is refused before Prefect or Ray start: one ``error:`` line about the
data, exit 2, nothing created, even when the Prefect API cannot be reached (it used to
answer "Failed to reach API" after seconds)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _cycle(home: Path, spec: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, GRACEFUL_HOME=str(home), PREFECT_API_URL="http://127.0.0.1:9/api")
    cmd = [sys.executable, "-m", "flows.cli", "cycle", "--dataset", spec]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize(
    ("name", "content", "said"),
    [
        ("garbage.parquet", b"PAR1 not a Parquet file at all PAR1", "cannot read Parquet"),
        ("missing.parquet", None, "does not exist"),
    ],
)
def test_a_bad_parquet_source_is_refused_before_anything_starts(
    tmp_path: Path, name: str, content: bytes | None, said: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    home = tmp_path / "home"
    done = _cycle(home, f"parquet:{path}")
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error:") and said in line and "API" not in line
    assert not home.exists()


def test_a_missing_image_folder_is_refused_before_anything_starts(tmp_path: Path) -> None:
    home = tmp_path / "home"
    done = _cycle(home, f"imagefolder:{tmp_path / 'nowhere'}")
    assert done.returncode == 2 and done.stderr.startswith("error:"), done.stderr
    assert "does not exist" in done.stderr and not home.exists()

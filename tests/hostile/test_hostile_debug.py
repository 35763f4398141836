"""The contract's error line: one ``error:`` line and no traceback, unless ``--debug``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _graceful(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, GRACEFUL_HOME=str(home))
    env.pop("GRACEFUL_DEBUG", None)
    cmd = [sys.executable, "-m", "flows.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_debug_shows_the_traceback_behind_the_error_line(tmp_path: Path) -> None:
    plain = _graceful(tmp_path, "cycle", "--dataset", "nope:x")
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == [
        next(line for line in plain.stderr.splitlines() if line.startswith("error:"))
    ]
    assert "Traceback" not in plain.stderr and "unknown data set kind 'nope'" in plain.stderr

    debug = _graceful(tmp_path, "--debug", "cycle", "--dataset", "nope:x")
    assert debug.returncode == 2
    assert "Traceback (most recent call last)" in debug.stderr
    assert "parse_spec" in debug.stderr  # the frames, down to where it was raised
    assert debug.stderr.strip().splitlines()[-1] == plain.stderr.strip()  # the same line last
    assert not (tmp_path / "lineage.db").exists()  # bad input stores nothing

"""The `graceful` CLI as subprocesses, pointed at the session's Prefect server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


class Cli:
    """Starts `graceful` on one GRACEFUL_HOME (and lineage URL) against a Prefect API."""

    def __init__(self, home: Path, api: str, db_url: str | None = None) -> None:
        self.home = home
        self.env = dict(os.environ, GRACEFUL_HOME=str(home), PREFECT_API_URL=api, COLUMNS="200")
        self.env.pop("GRACEFUL_DB_URL", None)
        self.env.pop("GRACEFUL_FAILPOINT", None)
        if db_url:
            self.env["GRACEFUL_DB_URL"] = db_url
        self.db_url = db_url or f"sqlite:///{home / 'lineage.db'}"

    def start(self, *args: str, failpoint: str | None = None) -> subprocess.Popen:
        """`graceful ARGS` in its own process group (a kill takes its Ray processes too)."""
        env = dict(self.env, GRACEFUL_FAILPOINT=failpoint) if failpoint else self.env
        return subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )


@pytest.fixture
def cli(prefect_api: str):
    """``cli(home, db_url=None)`` -> a :class:`Cli` on the session's Prefect server."""
    return lambda home, db_url=None: Cli(home, prefect_api, db_url)

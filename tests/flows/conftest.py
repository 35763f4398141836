"""The `graceful` CLI as subprocesses, pointed at the session's Prefect server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import search_kit

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


# -- the search service (tests/flows/search_kit.py) ---------------------------------------
@pytest.fixture
def album(home: Path, tmp_path: Path):
    """A champion (generation 1) and an `images:` collection of 96 PNGs: (lineage, root,
    generation)."""
    from sources.data import champion

    from store.lineage import Lineage

    lin = Lineage()
    gen = champion(lin, 0)
    root = tmp_path / "album"
    search_kit.build_album(lin, root, gen, 0, 96)
    return lin, root, gen


@pytest.fixture
def search_server():
    """``search_server(home, *args, env=None)`` -> a started :class:`SearchServer`."""
    started: list = []

    def start(home: Path, *args: str, env: dict | None = None) -> search_kit.SearchServer:
        started.append(search_kit.SearchServer(home, *args, env=env))
        return started[-1]

    yield start
    for s in started:
        s.stop()

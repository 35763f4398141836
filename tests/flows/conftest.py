"""Fixtures of the search-service tests (the shared ones live in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import search_kit


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

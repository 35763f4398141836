"""Where graceful keeps its state: ``GRACEFUL_HOME`` and ``GRACEFUL_DB_URL``.

Nothing here touches the disk at import time; directories are made on first use.
"""

from __future__ import annotations

import os
from pathlib import Path


class StoreError(RuntimeError):
    """A problem with the store's location or contents; the message names it."""


def graceful_home(create: bool = True) -> Path:
    """The state directory (``GRACEFUL_HOME``, default ``./.graceful``)."""
    home = Path(os.environ.get("GRACEFUL_HOME", ".graceful")).expanduser().resolve()
    if home.exists() and not home.is_dir():
        raise StoreError(f"GRACEFUL_HOME={home} exists and is not a directory")
    if create:
        try:
            home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # e.g. a parent is a file, or no permission
            raise StoreError(f"cannot create GRACEFUL_HOME={home}: {exc}") from exc
    return home


def subdir(name: str) -> Path:
    """A subdirectory of the home (checkpoints, gallery, reports, ...), created lazily."""
    path = graceful_home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def db_url() -> str:
    """The lineage database: ``GRACEFUL_DB_URL`` or SQLite under the home."""
    url = os.environ.get("GRACEFUL_DB_URL")
    if url:
        return url
    return f"sqlite:///{graceful_home() / 'lineage.db'}"

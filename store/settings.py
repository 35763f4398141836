"""Where graceful keeps its state: ``GRACEFUL_HOME`` and ``GRACEFUL_DB_URL``.

Nothing here touches the disk at import time; directories are made on first use.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import quote_plus

LINEAGE_FILE = "lineage.db"  # the SQLite lineage under the home (without GRACEFUL_DB_URL)


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


class NoLineage(StoreError):
    """A reading command pointed at a GRACEFUL_HOME that holds no lineage."""


def require_lineage() -> None:
    """Refuse (:class:`NoLineage`) when the lineage is the SQLite file under the home and
    that file does not exist: a command that only reads (``report``, ``search``, ...) must
    not create the home or an empty database where a mistyped GRACEFUL_HOME points.
    A server database (``GRACEFUL_DB_URL``) is the user's own: it is opened as it is."""
    if os.environ.get("GRACEFUL_DB_URL"):
        return
    home = graceful_home(create=False)
    if not (home / LINEAGE_FILE).is_file():
        what = "does not exist" if not home.exists() else f"holds no {LINEAGE_FILE}"
        raise NoLineage(
            f"no lineage at GRACEFUL_HOME={home}: the directory {what}; point "
            "GRACEFUL_HOME at the directory `graceful run` or `graceful cycle` made, or run "
            "one of them to start a lineage there"
        )


# -- paths the lineage records, relative to the home -----------------------------------------
def home_relative(path: str | None) -> str | None:
    """``path`` as the lineage stores it: relative to GRACEFUL_HOME when it lies under the
    home (so a home moved or copied elsewhere keeps working), else as given (absolute)."""
    if not path:
        return path
    p = Path(path) if Path(path).is_absolute() else Path(os.path.abspath(path))  # cwd's
    home = _home_or_none()
    if home is not None and p.is_relative_to(home):
        return p.relative_to(home).as_posix()
    return str(p)  # outside the home: absolute, as it is


def home_resolved(stored: str | None) -> str | None:
    """A path the lineage stored, as a path to open: a relative one resolved against the
    GRACEFUL_HOME of this process, an absolute one (outside the home) as it is."""
    if not stored or Path(stored).is_absolute():
        return stored
    home = _home_or_none()
    return stored if home is None else str(home / stored)


def _home_or_none() -> Path | None:
    try:
        return graceful_home(create=False)
    except StoreError:  # GRACEFUL_HOME is a file: every command says so on its own
        return None


def subdir(name: str) -> Path:
    """A subdirectory of the home (checkpoints, gallery, reports, ...), created lazily."""
    path = graceful_home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def redact_url(url: str, text: str | None = None) -> str:
    """``url`` fit for a message, its password as ``***``; with ``text``: that text with
    the URL's password masked wherever it appears (an error a driver raised about it).

    The one redaction of the lineage URL: every message, log line or Prefect state that
    names ``GRACEFUL_DB_URL`` formats it through here (the password never leaves the
    process: not in an ``error:`` line, not in Prefect's database).
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
        safe, password = parsed.render_as_string(hide_password=True), parsed.password
    except (ArgumentError, ValueError, TypeError):  # not a URL: mask what looks like one
        found = re.search(r"//[^/:@]*:([^/@]*)@", url)
        password = found.group(1) if found else None
        safe = url.replace(f":{password}@", ":***@") if password else url
    if text is None:
        return safe
    masked = text.replace(url, safe)
    if password:
        masked = masked.replace(str(password), "***")
        masked = masked.replace(quote_plus(str(password)), "***")
    return masked


def sqlalchemy_url(url: str) -> str:
    """A lineage URL as SQLAlchemy opens it. A plain ``postgresql://`` (or ``postgres://``)
    URL, as libpq, ``psql`` and hosted databases write it, uses psycopg (version 3), the
    driver graceful is tested with, not SQLAlchemy's default psycopg2; every other URL
    (``postgresql+psycopg://``, ``postgresql+psycopg2://``, ``sqlite:///``) is kept."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() in ("postgresql", "postgres"):
        return f"postgresql+psycopg://{rest}"
    return url


def db_url() -> str:
    """The lineage database: ``GRACEFUL_DB_URL`` or SQLite under the home."""
    if url := os.environ.get("GRACEFUL_DB_URL"):
        return sqlalchemy_url(url)
    return f"sqlite:///{graceful_home() / LINEAGE_FILE}"

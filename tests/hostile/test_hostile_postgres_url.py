"""A plain ``postgresql://`` lineage URL, as psql, libpq and hosted databases write it, opens
with psycopg (the driver graceful installs), not SQLAlchemy's default psycopg2 ("No module
named 'psycopg2'" before); its password is never printed (store.settings.redact_url)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from hostile_helpers import error_line
from sources.data import champion
from typer.testing import CliRunner

from flows import cli as graceful
from store.lineage import Lineage
from store.settings import db_url, sqlalchemy_url

SECRET = "Plain-Url-Pw-41d7"


def test_the_one_rewrite_of_a_plain_postgresql_url() -> None:
    rest = "alice:pw@db.example:5432/graceful?sslmode=require"
    assert sqlalchemy_url(f"postgresql://{rest}") == f"postgresql+psycopg://{rest}"
    assert sqlalchemy_url(f"postgres://{rest}") == f"postgresql+psycopg://{rest}"
    for kept in (
        f"postgresql+psycopg://{rest}",
        f"postgresql+psycopg2://{rest}",  # a driver named on purpose stays
        "sqlite:////tmp/lineage.db",
        "not a url",
    ):
        assert sqlalchemy_url(kept) == kept


def _plain(pg_url: str, scheme: str = "postgresql") -> str:
    """``pg_url`` (postgresql+psycopg://postgres@host:port/db) as a user writes it, with a
    password (the test server trusts every connection, so any password opens it)."""
    base = pg_url.removeprefix("postgresql+psycopg://").replace("postgres@", "", 1)
    return f"{scheme}://postgres:{SECRET}@{base}"


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_a_plain_postgresql_url_opens_the_lineage(
    scheme: str, pg_url: str, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRACEFUL_DB_URL", _plain(pg_url, scheme))
    assert db_url().startswith("postgresql+psycopg://postgres:")
    gen = champion(Lineage(), 0)  # a lineage recorded through the plain URL
    result = CliRunner().invoke(graceful.app, ["report", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [g["id"] for g in report["generations"]] == [gen.id]
    assert report["generations"][0]["status"] == "promoted"
    # the same database as the driver-qualified URL names
    assert [g.id for g in Lineage(pg_url).generations()] == [gen.id]
    assert SECRET not in result.output


def test_a_plain_url_that_cannot_connect_is_one_line_without_its_password(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("GRACEFUL_DB_URL", f"postgresql://postgres:{SECRET}@127.0.0.1:{port}/x")
    result = CliRunner().invoke(graceful.app, ["report", "--json"])
    assert result.exit_code == 2, result.output
    line = error_line(result.stderr)
    assert "cannot open the lineage database postgresql+psycopg://postgres:***@" in line, line
    assert "psycopg2" not in line and SECRET not in result.output

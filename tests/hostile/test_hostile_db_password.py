"""The lineage database's password never leaves the process: not in an `error:` line, not
in Prefect's own database (logs, states, events, parameters: what the UI shows), and a
wrong one is not echoed back. One redaction (store.settings.redact_url) formats the URL."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from hostile_helpers import error_line

SECRET = "Hostile-Pw-7c1e9"


def test_the_one_redaction_masks_the_password_of_a_url_and_of_a_text() -> None:
    from store.settings import redact_url

    url = f"postgresql+psycopg://alice:{SECRET}@db.example:5432/graceful"
    assert redact_url(url) == "postgresql+psycopg://alice:***@db.example:5432/graceful"
    said = f"could not connect to {url}: password {SECRET!r} rejected"
    masked = redact_url(url, said)
    assert SECRET not in masked and "alice:***@db.example" in masked
    assert redact_url("sqlite:////tmp/lineage.db") == "sqlite:////tmp/lineage.db"


def _prefect_rows(db: Path) -> list[str]:
    """Every row of every table of Prefect's database, as text."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return [
            f"{table}: {row!r}"
            for table in tables
            for row in conn.execute(f'SELECT * FROM "{table}"')
        ]
    finally:
        conn.close()


@pytest.mark.slow  # the session's Prefect server and flow runs
def test_a_wrong_password_is_masked_in_errors_and_in_prefects_database(
    tmp_path: Path, cli, pg_password_server, prefect_server
) -> None:
    base, right = pg_password_server
    _, prefect_db = prefect_server
    wrong = base.replace("postgres@", f"postgres:{SECRET}@") + "/postgres"
    c = cli(tmp_path / "home", db_url=wrong)

    def run(*args: str):
        proc = c.start(*args)
        out, err = proc.communicate(timeout=600)
        return proc.returncode, out, err

    for args in (("cycle", "--dataset", "digits", "--epochs", "1"), ("backfill",), ("report",)):
        code, out, err = run(*args)
        assert code in (1, 2), err[-3000:]  # report: bad input (2); a run's failure (1)
        line = error_line(err)
        assert "cannot open the lineage database" in line and "postgres:***@" in line, line
        assert "password authentication failed" in line
        assert SECRET not in out + err

    # the runs reached Prefect's database (their failure is recorded) without the password
    deadline = time.monotonic() + 60
    while True:
        rows = _prefect_rows(prefect_db)
        recorded = [r for r in rows if "cannot open the lineage database" in r]
        if len(recorded) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert recorded, "the failed runs never reached Prefect's database"
    assert any("postgres:***@" in r for r in recorded)
    assert not [r for r in rows if SECRET in r]
    for path in prefect_db.parent.glob(prefect_db.name + "*"):  # the file, its WAL
        assert SECRET.encode() not in path.read_bytes(), path

    # the right password works: the lineage opens (so the failures were the password's)
    ok = cli(
        tmp_path / "home2", db_url=base.replace("postgres@", f"postgres:{right}@") + "/postgres"
    )
    proc = ok.start("report", "--json")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]

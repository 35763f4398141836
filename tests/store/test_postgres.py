"""The lineage on a real PostgreSQL 15 server that the test starts (127.0.0.1 only) and stops."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.report import build_report
from store.lineage import Lineage


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    if not found[-1]:
        raise RuntimeError(f"PostgreSQL's {name} is not installed (apt-get install postgresql)")
    return found[-1]


def _as_postgres(cmd: list[str]) -> list[str]:
    # initdb refuses to run as root; CI runs as root, a developer maybe not
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    data = Path(tempfile.mkdtemp(prefix="graceful-pg-"))
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    port = _free_port()
    subprocess.run(
        _as_postgres([_pg_bin("initdb"), "-D", str(data / "db"), "-U", "postgres", "-A", "trust"]),
        check=True,
        capture_output=True,
    )
    ctl = _pg_bin("pg_ctl")
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {data}"
    subprocess.run(
        _as_postgres(
            [ctl, "-D", str(data / "db"), "-o", opts, "-w", "-l", str(data / "log"), "start"]
        ),
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            _as_postgres([ctl, "-D", str(data / "db"), "-m", "fast", "stop"]), check=False
        )
        shutil.rmtree(data, ignore_errors=True)


def test_lineage_on_postgres(pg_url: str, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("GRACEFUL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GRACEFUL_DB_URL", pg_url)
    lin = Lineage()
    assert lin.url == pg_url
    base = dict(dataset="digits", stage=0, architecture={"kind": "mlp", "width": 8}, embed_dim=4)
    g1 = lin.add_generation(**base, status="trained", classes=[0, 1])
    lin.promote(g1.id)
    g2 = lin.start_generation([(g1.id, "influence", 1.0)], **base, status="trained")
    lin.record_metrics(
        [
            (g2.id, g1.id, "nfr", 0.1),
            (g1.id, g1.id, "compat_top1", 0.8),
            (g2.id, g1.id, "compat_top1", 0.85),
            (g2.id, g2.id, "compat_top1", 0.9),
        ]
    )
    lin.record_metrics([(g2.id, g1.id, "nfr", 0.05)])  # upsert, not a second row
    lin.promote(g2.id)
    lin.retire(g1.id, "backfilled away")

    rep = build_report(Lineage(pg_url))
    assert rep["champion"] == g2.id
    assert rep["nfr"] == [[g2.id, g1.id, 0.05]]
    assert rep["ac"] == 1.0
    assert rep["generations"][0]["architecture"] == {"kind": "mlp", "width": 8}
    assert rep["generations"][1]["constraints"][0]["status"] == "retired"
    # nothing was written to SQLite under the home
    assert not (tmp_path / "home" / "lineage.db").exists()

"""Cycles are exclusive across processes, on SQLite and on PostgreSQL: two `graceful cycle`
started together end serialised, the second constrained and gated against the first."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from store.lineage import Lineage


@pytest.mark.slow
@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_two_concurrent_cycles_end_serialised(db: str, tmp_path: Path, cli, request) -> None:
    db_url = request.getfixturevalue("pg_url") if db == "postgresql" else None
    home = cli(tmp_path / "home", db_url)
    args = ("cycle", "--dataset", "digits", "--epochs", "3", "--max-nfr", "1.0")
    procs = [home.start(*args), home.start(*args)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, stderr) in zip(procs, outs, strict=True):
        assert p.returncode == 0, stderr[-3000:]
    waited = [e for _, e in outs if "waiting for the update cycle" in e]
    assert len(waited) == 1, [e[-2000:] for _, e in outs]  # the second said whom it waits for

    lin = Lineage(home.db_url)
    g1, g2 = lin.generations()
    assert (g1.id, g2.id) == (1, 2) and g1.status == "promoted"
    # the second trained against the first: one constraint per kind of the default method
    cons = lin.constraints(g2.id)
    assert {(c.target_id, c.kind) for c in cons} == {
        (1, "influence"),
        (1, "focal"),
        (1, "embedding"),
    }
    # ... and was gated against it
    assert any("champion" in r for r in g2.gate_reasons)
    assert any("NFR against 1" in r for r in g2.gate_reasons)
    champions = [g.id for g in lin.generations() if g.is_champion]
    assert champions == ([2] if g2.gate_passed else [1])


@pytest.mark.slow
def test_no_wait_refuses_while_a_cycle_holds_the_lock(tmp_path: Path, cli) -> None:
    home = cli(tmp_path / "home")
    home.home.mkdir()
    lin = Lineage(home.db_url)
    lock = lin.lock()
    lock.acquire()
    try:
        proc = home.start("cycle", "--dataset", "digits", "--no-wait")
        _, stderr = proc.communicate(timeout=600)
    finally:
        lock.release()
    assert proc.returncode == 1
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr[-2000:]
    assert f"another update-cycle is running (pid {os.getpid()}" in lines[0]
    assert lin.generations() == []  # nothing started
    out, _ = home.start("report", "--json").communicate(timeout=120)
    assert json.loads(out)["generations"] == []

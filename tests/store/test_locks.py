"""The lineage-database lock: exclusive across processes, freed when its holder dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import Session

from store.lineage import Lineage
from store.locks import LockHeld, LockLease


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'lineage.db'}"
    return request.getfixturevalue("pg_url")


def _holder_process(url: str, name: str) -> subprocess.Popen:
    """Another process that takes the lock, says so on stdout, and sleeps holding it."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from store.lineage import Lineage
        lock = Lineage({url!r}).lock({name!r})
        lock.acquire(wait=False)
        print("held", flush=True)
        time.sleep(120)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_holder_waits_or_refuses_naming_the_first(url: str) -> None:
    lin = Lineage(url)
    first, second = lin.lock("update-cycle"), lin.lock("update-cycle")
    first.acquire()
    try:
        with pytest.raises(LockHeld, match=rf"another update-cycle is running \(pid {os.getpid()}"):
            second.acquire(wait=False)
        told = []
        t0 = time.monotonic()
        with pytest.raises(LockHeld):
            second.acquire(timeout=1.0, on_wait=told.append)
        assert time.monotonic() - t0 >= 1.0
        assert len(told) == 1 and told[0].pid == os.getpid()
        assert second.holder() is not None and second.holder().pid == os.getpid()
        # another name is another lock
        with lin.lock("partial-backfill"):
            pass
    finally:
        first.release()
    assert second.holder() is None
    second.acquire(wait=False)  # free now
    second.release()


@pytest.mark.slow  # a SIGKILL of the holder process
def test_a_killed_holder_frees_the_lock(url: str) -> None:
    lin = Lineage(url)
    proc = _holder_process(url, "update-cycle")
    lock = lin.lock("update-cycle")
    try:
        with pytest.raises(LockHeld, match=f"pid {proc.pid}"):
            lock.acquire(wait=False)
        assert lock.holder().pid == proc.pid
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        # PostgreSQL drops the dead connection's lock; SQLite sees the holder's pid is gone
        lock.acquire(timeout=30)
        assert lock.holder().pid == os.getpid()
    finally:
        lock.release()
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow  # a kill -9 of the holder process
def test_a_waiter_takes_the_lock_when_the_holder_dies(url: str) -> None:
    lin = Lineage(url)
    proc = _holder_process(url, "update-cycle")
    lock = lin.lock("update-cycle")
    told = []
    try:
        killer = subprocess.Popen(["sh", "-c", f"sleep 1.5; kill -9 {proc.pid}"])
        t0 = time.monotonic()
        lock.acquire(timeout=60, on_wait=told.append)
        waited = time.monotonic() - t0
        # it really waited, and took over on the death (a zombie counts as dead), not on
        # the lease's 30 s expiry
        assert 1.0 <= waited < 15
        assert told and told[0].pid == proc.pid
        killer.wait()
    finally:
        lock.release()
        if proc.poll() is None:
            proc.kill()


def test_sqlite_lease_of_another_host_expires_with_its_heartbeat(tmp_path) -> None:
    lin = Lineage(f"sqlite:///{tmp_path / 'lineage.db'}")
    lin.generations()  # creates the schema
    fresh = datetime.now(UTC)
    with Session(lin.engine) as s, s.begin():
        s.add(
            LockLease(
                name="update-cycle",
                token="x",
                host="elsewhere",
                pid=1,
                acquired_at=fresh,
                heartbeat_at=fresh,
            )
        )
    lock = lin.lock("update-cycle", ttl=30)
    with pytest.raises(LockHeld, match="pid 1 on elsewhere"):
        lock.acquire(wait=False)
    with Session(lin.engine) as s, s.begin():
        row = s.get(LockLease, "update-cycle")
        row.heartbeat_at = fresh - timedelta(seconds=31)
        s.add(row)
    lock.acquire(wait=False)  # its holder stopped beating: taken over
    assert lock.holder().host != "elsewhere"
    lock.release()


def test_heartbeat_keeps_a_long_hold_alive(tmp_path) -> None:
    lin = Lineage(f"sqlite:///{tmp_path / 'lineage.db'}")
    lock = lin.lock("update-cycle", ttl=0.6)
    lock.acquire()
    try:
        with Session(lin.engine) as s:
            before = s.get(LockLease, "update-cycle").heartbeat_at
        time.sleep(1.0)
        with Session(lin.engine) as s:
            after = s.get(LockLease, "update-cycle").heartbeat_at
        assert after > before
        other = lin.lock("update-cycle", ttl=0.6)
        with pytest.raises(LockHeld):
            other.acquire(wait=False)
    finally:
        lock.release()


def test_schema_allows_one_champion_and_promotion_rechecks_it(url: str) -> None:
    from sqlalchemy.exc import IntegrityError

    from store.lineage import ChampionChanged, Generation

    lin = Lineage(url)
    base = dict(dataset="digits", stage=0, architecture={"kind": "mlp"}, embed_dim=4)
    g1 = lin.add_generation(**base, status="trained")
    g2 = lin.add_generation(**base, status="trained")
    g3 = lin.add_generation(**base, status="trained")
    lin.promote(g1.id, expected_champion=None)
    # g2 and g3 were both gated against g1; g2 promotes first, g3 must not
    lin.promote(g2.id, expected_champion=g1.id)
    with pytest.raises(ChampionChanged, match=f"generation {g2.id} is champion now"):
        lin.promote(g3.id, expected_champion=g1.id)
    assert lin.champion().id == g2.id and lin.generation(g3.id).status == "trained"
    # and the database itself refuses a second champion
    with pytest.raises(IntegrityError), Session(lin.engine) as s, s.begin():
        row = s.get(Generation, g3.id)
        row.is_champion = True
        s.add(row)
    assert [g.id for g in lin.generations() if g.is_champion] == [g2.id]

"""Named locks that live in the lineage database, so they hold across processes and hosts.

- PostgreSQL: a session-level advisory lock on a connection held for the lock's life;
  the server drops it when that connection dies (a killed process frees it at once).
- SQLite (one file, so one host or a shared file system): a lease row. The holder
  refreshes its heartbeat from a background thread; a row whose holder process is gone
  (same host) or whose heartbeat is older than ``ttl`` is stale and is taken over.

On both, a row in ``lock_lease`` names the holder (host, pid, since), so a waiter can say
whom it waits for and the report can tell a run in progress from one that was killed.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import and_, delete, text, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Field, Session, SQLModel

from store.settings import StoreError

CYCLE_LOCK = "update-cycle"  # one update cycle at a time per lineage


class LockHeld(StoreError):
    """The lock is held by another process and the caller would not wait."""


class LockLease(SQLModel, table=True):
    """Who holds a named lock (on SQLite the row *is* the lock)."""

    __tablename__ = "lock_lease"

    name: str = Field(primary_key=True)
    token: str
    host: str
    pid: int
    acquired_at: datetime
    heartbeat_at: datetime


@dataclass(frozen=True)
class Holder:
    """The process that holds a lock."""

    host: str
    pid: int
    since: datetime
    stale: bool = False  # its process is gone, or its heartbeat too old (SQLite)

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since:%Y-%m-%d %H:%M:%S} UTC"


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)  # SQLite drops the zone


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie, killed but not reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    try:  # Linux: the state is the field after the parenthesised command name
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _advisory(conn: Connection, function: str, name: str) -> bool:
    """Call ``function`` (``pg_try_advisory_lock``, ``pg_advisory_unlock``) on ``name``'s
    advisory key: a stable signed 64-bit key, the first 8 bytes of the name's sha256."""
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    return bool(conn.execute(text(f"SELECT {function}(:k)"), {"k": key}).scalar())


class DatabaseLock:
    """A named lock in the lineage database; a context manager, not re-entrant."""

    def __init__(self, engine: Engine, name: str, ttl: float = 30.0) -> None:
        self.engine = engine
        self.name = name
        self.ttl = ttl
        self.token = uuid.uuid4().hex
        self._conn: Connection | None = None  # PostgreSQL: the connection holding the lock
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.held = False

    @property
    def postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    # -- acquiring -------------------------------------------------------------------
    def acquire(
        self,
        wait: bool = True,
        timeout: float | None = None,
        on_wait: Callable[[Holder | None], None] | None = None,
    ) -> None:
        """Take the lock; wait for it (telling ``on_wait`` once whom for) or raise LockHeld."""
        if self.held:
            raise StoreError(f"lock {self.name!r} is already held by this object")
        deadline = None if timeout is None else time.monotonic() + timeout
        told = False
        attempt = self._try_postgres if self.postgres else self._try_lease
        while not attempt():
            # the attempt just failed, so someone holds it: the lease row says who
            if not wait or (deadline is not None and time.monotonic() >= deadline):
                holder = self._row_holder()
                who = f" ({holder})" if holder else ""
                raise LockHeld(
                    f"another {self.name} is running{who}; wait for it to finish, "
                    "or run again without --no-wait to wait for it"
                )
            if on_wait is not None and not told:
                on_wait(self._row_holder())
                told = True
            time.sleep(0.5)
        self.held = True
        if not self.postgres:
            self._beat = threading.Thread(target=self._heartbeat, daemon=True, name=self.name)
            self._beat.start()

    def _try_postgres(self) -> bool:
        if self._conn is None:
            self._conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        got = _advisory(self._conn, "pg_try_advisory_lock", self.name)
        if got:
            self._write_lease(replace=True)
        return got

    def _try_lease(self) -> bool:
        with Session(self.engine) as s, s.begin():
            row = s.get(LockLease, self.name)
            if row is not None and not self._stale(row):
                return False
            if row is not None:  # its holder died: take it over, if nobody else did first
                s.exec(delete(LockLease).where(self._lease(row.token)))
        try:
            self._write_lease(replace=False)
        except IntegrityError:  # another process inserted first
            return False
        return True

    def _lease(self, token: str) -> ColumnElement[bool]:
        """Where-clause: this lock's lease row, as taken under ``token``."""
        return and_(LockLease.name == self.name, LockLease.token == token)

    def _stale(self, row: LockLease) -> bool:
        if row.host == socket.gethostname() and not _pid_alive(row.pid):
            return True
        return _now() - _aware(row.heartbeat_at) > timedelta(seconds=self.ttl)

    def _write_lease(self, replace: bool) -> None:
        now = _now()
        with Session(self.engine) as s, s.begin():
            if replace:
                s.exec(delete(LockLease).where(LockLease.name == self.name))
            s.add(
                LockLease(
                    name=self.name,
                    token=self.token,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    acquired_at=now,
                    heartbeat_at=now,
                )
            )

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                with Session(self.engine) as s, s.begin():
                    s.exec(
                        update(LockLease).where(self._lease(self.token)).values(heartbeat_at=_now())
                    )
            except Exception:  # a busy database: the next beat tries again
                continue

    # -- releasing -------------------------------------------------------------------
    def release(self) -> None:
        """Give the lock back (idempotent)."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        if self.held:
            with Session(self.engine) as s, s.begin():
                s.exec(delete(LockLease).where(self._lease(self.token)))
        if self._conn is not None:
            if self.held:
                _advisory(self._conn, "pg_advisory_unlock", self.name)
            self._conn.close()
            self._conn = None
        self.held = False
        self._stop = threading.Event()

    def __enter__(self) -> DatabaseLock:
        if not self.held:
            self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- looking -----------------------------------------------------------------------
    def holder(self) -> Holder | None:
        """Who holds the lock now, or None when nobody does (a dead holder is nobody)."""
        if self.postgres:
            if not self.held:
                with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                    if _advisory(c, "pg_try_advisory_lock", self.name):
                        _advisory(c, "pg_advisory_unlock", self.name)
                        return None
            # locked: the row may not be written yet
            return self._row_holder() or Holder("unknown host", 0, _now())
        holder = self._row_holder()
        return None if holder is None or holder.stale else holder

    def _row_holder(self) -> Holder | None:
        """The holder the lease row names, if there is a row."""
        with Session(self.engine) as s:
            row = s.get(LockLease, self.name)
        if row is None:
            return None
        return Holder(row.host, row.pid, _aware(row.acquired_at), self._stale(row))

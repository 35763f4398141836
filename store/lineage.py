"""The lineage: generations, the constraint chain, evaluations and backfill jobs (SQLModel).

SQLite under ``GRACEFUL_HOME`` by default, any SQLAlchemy URL (PostgreSQL) via
``GRACEFUL_DB_URL``. Every change runs in one transaction; engines are made lazily.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, UniqueConstraint, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, Session, SQLModel, create_engine, select
from sqlmodel.sql.sqltypes import AutoString

from store.locks import CYCLE_LOCK, DatabaseLock, _now
from store.migrate import upgrade
from store.settings import (
    StoreError,
    db_url,
    home_relative,
    home_resolved,
    redact_url,
    sqlalchemy_url,
)


class GenerationStatus(StrEnum):
    """Where a generation stands in its cycle."""

    TRAINING = "training"
    TRAINED = "trained"  # gate_passed None: not gated yet; True: awaiting promotion
    PROMOTED = "promoted"
    REJECTED = "rejected"
    FAILED = "failed"


class JobStatus(StrEnum):
    """Where a backfill job stands."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # an error, or ``interrupted`` (killed, then superseded); resumable


UNFINISHED_JOBS = (JobStatus.RUNNING, JobStatus.FAILED)
INTERRUPTED = "interrupted"  # the report's status for a run whose process is gone


class HomePath(TypeDecorator):
    """A file path the lineage records (a checkpoint, a snapshot's keys): stored relative
    to GRACEFUL_HOME when the file lies under it, read back as an absolute path under the
    reading process's home, so a home moved or copied elsewhere keeps working (migration
    0007 rewrote the rows recorded before). A path outside the home stays absolute. The
    column is a plain string: the schema is unchanged."""

    impl = AutoString
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        return home_relative(value)

    def process_result_value(self, value: str | None, dialect: Any) -> str | None:
        return home_resolved(value)


class Generation(SQLModel, table=True):
    """One trained model: backbone -> normalised embedding -> classifier head."""

    # the schema itself allows at most one champion (a partial unique index)
    __table_args__ = (
        Index(
            "one_champion",
            "is_champion",
            unique=True,
            sqlite_where=text("is_champion"),
            postgresql_where=text("is_champion"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    dataset: str
    stage: int
    architecture: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    embed_dim: int
    classes: list[int] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    train_samples: int = 0
    epochs: int = 0
    seed: int = 0
    method: str = "none"
    status: str = GenerationStatus.TRAINING
    is_champion: bool = False
    pinned: bool = False
    retired: bool = False
    retired_reason: str | None = None
    accuracy: float | None = None
    train_seconds: float | None = None
    checkpoint_path: str | None = Field(default=None, sa_type=HomePath)
    checkpoint_sha256: str | None = None
    gate_passed: bool | None = None
    gate_reasons: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # flows.gate.GateOutcome; the served state per class it judged (flows/targeted.py)
    gate_outcome: str | None = None
    gate_served: list[dict[str, Any]] | None = Field(default=None, sa_column=Column(JSON))
    error: str | None = None
    created_at: datetime = Field(default_factory=_now)


class SnapshotRecord(SQLModel, table=True):
    """What generation ``generation_id`` trained on (workers.data.snapshot), recorded with it."""

    __tablename__ = "snapshot"

    id: int | None = Field(default=None, primary_key=True)
    generation_id: int = Field(foreign_key="generation.id", unique=True)
    source: str
    stage: int | None = None
    stages: int | None = None
    items: int
    classes: dict[str, int] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    fingerprint: str = Field(index=True)
    eval_fingerprint: str
    keys_path: str | None = Field(default=None, sa_type=HomePath)
    # head rows every generation of the lineage reserves (set by the first snapshot)
    capacity: int | None = None
    # items of the source that could not be read: [{"key": ..., "reason": ...}], not trained on
    skipped: list[dict[str, str]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False, server_default="[]")
    )
    created_at: datetime = Field(default_factory=_now)


class ClassName(SQLModel, table=True):
    """The lineage's class vocabulary: a class keeps its head row for good."""

    __tablename__ = "class_name"

    idx: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    name: str = Field(unique=True)
    created_at: datetime = Field(default_factory=_now)


class Constraint(SQLModel, table=True):
    """Generation ``generation_id`` was trained to stay compatible with ``target_id``."""

    id: int | None = Field(default=None, primary_key=True)
    generation_id: int = Field(foreign_key="generation.id", index=True)
    target_id: int = Field(foreign_key="generation.id", index=True)
    kind: str  # influence | focal
    weight: float
    status: str = "active"  # active | retired
    retired_reason: str | None = None
    created_at: datetime = Field(default_factory=_now)
    retired_at: datetime | None = None


class Evaluation(SQLModel, table=True):
    """One metric for a pair of generations (a, b); single-generation metrics use b == a."""

    __table_args__ = (UniqueConstraint("generation_id", "other_id", "metric"),)

    id: int | None = Field(default=None, primary_key=True)
    generation_id: int = Field(foreign_key="generation.id", index=True)
    other_id: int = Field(foreign_key="generation.id")
    metric: str = Field(index=True)
    value: float | None = None
    created_at: datetime = Field(default_factory=_now)


class BackfillJob(SQLModel, table=True):
    """Re-embedding a chosen part of the gallery with one generation."""

    id: int | None = Field(default=None, primary_key=True)
    generation_id: int = Field(foreign_key="generation.id")
    policy: str
    budget: float
    total_items: int = 0
    items_done: int = 0
    status: str = JobStatus.RUNNING
    m_mix_before: float | None = None
    m_mix_after: float | None = None
    curve: list[list[float]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    error: str | None = None
    created_at: datetime = Field(default_factory=_now)
    finished_at: datetime | None = None


class CollectionPart(SQLModel, table=True):
    """The manifest of the Parquet collection: one row per committed part file."""

    __tablename__ = "gallerypart"  # the table's name since the first lineage

    name: str = Field(primary_key=True)
    rows: int
    sha256: str
    counts: dict[str, int] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    updated_at: datetime = Field(default_factory=_now)


class CollectionInfo(SQLModel, table=True):
    """What the collection indexes: the spec of its items' source, and its size."""

    __tablename__ = "galleryinfo"  # the table's name since the first lineage

    id: int = Field(default=1, primary_key=True)
    # the collection's spec: a source (imagefolder:, parquet:), images:DIR, or a source's
    # evaluation reference half (reference:<kind>:<source>: the scenario's collection)
    dataset: str
    embed_dim: int
    items: int
    # the next item id to assign (ids are never reused); None: read it off the parts
    next_id: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    created_at: datetime = Field(default_factory=_now)


def set_row(session: Session, model: type[SQLModel], key: int, **values: Any) -> None:
    """Set ``values`` on row ``key`` of ``model``'s table in ``session``'s transaction: a
    plain UPDATE, not the ORM's load-modify-flush (it runs once a part or a step)."""
    table = model.__table__  # type: ignore[attr-defined]
    session.execute(update(table).where(table.c.id == key).values(**values))


class UnknownGeneration(StoreError):
    """A generation id that the lineage does not hold."""


_ENGINES: dict[str, Engine] = {}


def engine_for(url: str) -> Engine:
    """One engine per URL, created (with the schema) on first use."""
    if url not in _ENGINES:
        # Prefect runs tasks in threads; SQLite waits for a writer instead of failing.
        sqlite: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": 30}}
        kwargs = sqlite if url.startswith("sqlite") else {"pool_pre_ping": True}
        try:
            engine = create_engine(url, **kwargs)
            upgrade(engine)  # the schema, created or upgraded in place (store.migrate)
        except StoreError:
            raise
        except Exception as exc:  # a wrong URL, an unreachable server, a failed migration
            why = " ".join(str(getattr(exc, "orig", None) or exc).split())  # the driver's own
            if isinstance(exc, ModuleNotFoundError):  # a driver this install does not have
                why = (
                    f"its driver {exc.name} is not installed: write the URL as "
                    "postgresql://... (graceful opens it with psycopg) or install the driver"
                )
            raise StoreError(
                f"cannot open the lineage database {redact_url(url)}: {redact_url(url, why)}"
            ) from None  # the driver's exception may quote the URL: not chained
        _ENGINES[url] = engine
    return _ENGINES[url]


class ChampionChanged(StoreError):
    """Promotion found another champion than the one the gate compared against."""


class Lineage:
    """Typed access to the lineage; every method is one transaction."""

    def __init__(self, url: str | None = None) -> None:
        self.url = sqlalchemy_url(url) if url else db_url()

    @property
    def engine(self) -> Engine:
        return engine_for(self.url)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose changes commit together or not at all."""
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    def _all(self, query: Any) -> list[Any]:
        """Every row ``query`` selects, read in one transaction."""
        with self.session() as s:
            return list(s.exec(query))

    # -- generations -------------------------------------------------------------------
    def add_generation(self, **fields: Any) -> Generation:
        """Record a generation with no constraints and no snapshot."""
        return self.start_generation((), **fields)

    def start_generation(
        self,
        constraints: Iterable[tuple[int, str, float]],
        snapshot: dict[str, Any] | None = None,
        **fields: Any,
    ) -> Generation:
        """Record a new generation, its constraints and its snapshot in one transaction."""
        with self.session() as s:
            gen = Generation(**fields)
            s.add(gen)
            s.flush()
            for target, kind, weight in constraints:
                s.add(Constraint(generation_id=gen.id, target_id=target, kind=kind, weight=weight))
            if snapshot is not None:
                s.add(SnapshotRecord(generation_id=gen.id, **snapshot))
            s.flush()
            s.refresh(gen)
            return gen

    def generation(self, gen_id: int) -> Generation:
        with self.session() as s:
            gen = s.get(Generation, gen_id)
            if gen is None:
                known = list(s.exec(select(Generation.id).order_by(Generation.id)))
                raise UnknownGeneration(f"unknown generation {gen_id}; the lineage holds {known}")
            return gen

    def generations(self) -> list[Generation]:
        return self._all(select(Generation).order_by(Generation.id))

    def _update(self, model: type[SQLModel], key: int, error: type[Exception], fields: dict):
        """Set ``fields`` on one row in one transaction; an unknown id raises ``error``."""
        with self.session() as s:
            row = s.get(model, key)
            if row is None:
                raise error(f"unknown {model.__tablename__.replace('job', ' job')} {key}")
            for name, value in fields.items():
                setattr(row, name, value)
            return row

    def update_generation(self, gen_id: int, **fields: Any) -> Generation:
        return self._update(Generation, gen_id, UnknownGeneration, fields)

    def champion(self) -> Generation | None:
        with self.session() as s:
            return s.exec(select(Generation).where(Generation.is_champion)).first()

    def promote(self, gen_id: int, expected_champion: int | None | bool = True) -> None:
        """Move the champion alias to ``gen_id`` (one transaction).

        ``expected_champion`` is the champion the gate compared against (None: there was
        none); if another generation is champion by now, nothing changes and
        ``ChampionChanged`` says so. ``True`` skips the check (a manual promotion).
        """
        with self.session() as s:
            gen = s.get(Generation, gen_id)
            if gen is None:
                raise UnknownGeneration(f"unknown generation {gen_id}")
            if gen.status not in (GenerationStatus.TRAINED, GenerationStatus.PROMOTED):
                raise StoreError(
                    f"generation {gen_id} is {gen.status}; only a trained one is promoted"
                )
            olds = list(s.exec(select(Generation).where(Generation.is_champion)))
            current = olds[0].id if olds else None
            if expected_champion is not True and current not in (expected_champion, gen_id):
                raise ChampionChanged(
                    f"generation {gen_id} was gated against champion {expected_champion}, "
                    f"but generation {current} is champion now; it was not promoted"
                )
            for old in olds:
                old.is_champion = False
            s.flush()  # the old champion steps down before the unique index sees the new one
            gen.is_champion = True
            gen.status = GenerationStatus.PROMOTED

    def snapshots(self) -> dict[int, SnapshotRecord]:
        """Each generation's snapshot, by generation id (generations made before have none)."""
        return {r.generation_id: r for r in self._all(select(SnapshotRecord))}

    def set_eval_fingerprint(self, fingerprint: str) -> None:
        """Every snapshot is measured on this evaluation set now (after a re-evaluation)."""
        with self.session() as s:
            s.execute(update(SnapshotRecord).values(eval_fingerprint=fingerprint))

    def vocabulary(self) -> dict[str, int]:
        """Class name -> head row, in row order."""
        return {r.name: r.idx for r in self._all(select(ClassName).order_by(ClassName.idx))}

    def extend_vocabulary(
        self, names: Iterable[str], capacity: int | None = None
    ) -> dict[str, int]:
        """Give each name not yet known the next free head row (earlier rows never move).

        Refuses (StoreError) to grow past ``capacity`` rows; returns the whole vocabulary.
        """
        with self.session() as s:
            known = {r.name: r.idx for r in s.exec(select(ClassName).order_by(ClassName.idx))}
            new = [n for n in dict.fromkeys(names) if n not in known]
            if capacity is not None and len(known) + len(new) > capacity:
                raise StoreError(
                    f"{len(known) + len(new)} classes do not fit the {capacity} head rows this "
                    f"lineage reserved (new: {', '.join(new[:5])}); start a new GRACEFUL_HOME "
                    "with a larger --class-capacity"
                )
            for i, name in enumerate(new, start=len(known)):
                s.add(ClassName(idx=i, name=name))
                known[name] = i
            return known

    def lock(self, name: str = CYCLE_LOCK, ttl: float = 30.0) -> DatabaseLock:
        """A named lock in this lineage's database (not yet acquired)."""
        return DatabaseLock(self.engine, name, ttl=ttl)

    def set_pinned(self, gen_id: int, pinned: bool) -> None:
        self.update_generation(gen_id, pinned=pinned)

    # -- constraints -------------------------------------------------------------------
    def constraints(self, gen_id: int | None = None) -> list[Constraint]:
        q = select(Constraint).order_by(Constraint.generation_id, Constraint.target_id)
        if gen_id is not None:
            q = q.where(Constraint.generation_id == gen_id)
        return self._all(q)

    def retire(self, target_id: int, reason: str) -> int:
        """Retire generation ``target_id`` from the chain; returns constraints retired."""
        with self.session() as s:
            gen = s.get(Generation, target_id)
            if gen is None:
                raise UnknownGeneration(f"unknown generation {target_id}")
            gen.retired, gen.retired_reason = True, reason
            active = s.execute(
                update(Constraint)
                .where(Constraint.target_id == target_id, Constraint.status == "active")
                .values(status="retired", retired_reason=reason, retired_at=_now())
            )
            return active.rowcount

    # -- evaluations -------------------------------------------------------------------
    def record_metrics(self, rows: Iterable[tuple[int, int, str, float | None]]) -> None:
        """Upsert (a, b, metric, value) rows in one transaction."""
        with self.session() as s:
            for a, b, metric, value in rows:
                q = select(Evaluation).where(
                    Evaluation.generation_id == a,
                    Evaluation.other_id == b,
                    Evaluation.metric == metric,
                )
                row = s.exec(q).first() or Evaluation(generation_id=a, other_id=b, metric=metric)
                row.value = None if value is None else float(value)
                row.created_at = _now()
                s.add(row)

    def metric(self, metric: str) -> list[tuple[int, int, float | None]]:
        q = (
            select(Evaluation)
            .where(Evaluation.metric == metric)
            .order_by(Evaluation.generation_id, Evaluation.other_id)
        )
        return [(e.generation_id, e.other_id, e.value) for e in self._all(q)]

    # -- backfill jobs -----------------------------------------------------------------
    def add_backfill_job(self, **fields: Any) -> BackfillJob:
        with self.session() as s:
            job = BackfillJob(**fields)
            s.add(job)
            s.flush()
            s.refresh(job)
            return job

    def update_backfill_job(self, job_id: int, **fields: Any) -> BackfillJob:
        return self._update(BackfillJob, job_id, StoreError, fields)

    def backfill_jobs(self) -> list[BackfillJob]:
        return self._all(select(BackfillJob).order_by(BackfillJob.id))

    # -- gallery manifest --------------------------------------------------------------
    def gallery_info(self) -> CollectionInfo | None:
        with self.session() as s:
            return s.get(CollectionInfo, 1)

    def gallery_parts(self) -> list[CollectionPart]:
        return self._all(select(CollectionPart).order_by(CollectionPart.name))

    def gallery_counts(self) -> dict[int, int]:
        """Items per generation over the committed gallery (from the manifest)."""
        counts: dict[int, int] = {}
        for part in self.gallery_parts():
            for gen, n in part.counts.items():
                counts[int(gen)] = counts.get(int(gen), 0) + int(n)
        return {g: n for g, n in sorted(counts.items()) if n > 0}

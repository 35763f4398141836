"""A backfill job's bookkeeping: its SQL record, its saved selection, and which job a
backfill resumes. The re-embedding itself is workers.collection.backfill's; the job's
steps are run by flows.backfill_job."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session

from store.lineage import UNFINISHED_JOBS, BackfillJob, JobStatus, Lineage, set_row
from store.locks import _now
from store.settings import subdir


def selection_path(job_id: int) -> Path:
    """The job's chosen item ids (policy order, within budget), fixed when it began."""
    return subdir("backfills") / f"job-{job_id}.npy"


def save_selection(job_id: int, ids: np.ndarray) -> None:
    path = selection_path(job_id)
    tmp = path.with_name(path.stem + ".tmp.npy")
    np.save(tmp, ids)
    tmp.replace(path)


def load_selection(job_id: int) -> np.ndarray | None:
    path = selection_path(job_id)
    return np.load(path) if path.exists() else None


def resumable_job(
    lineage: Lineage, champion: int, policy: str, budget: float
) -> BackfillJob | None:
    """An unfinished job (killed or failed) with the same champion, policy and budget."""
    wanted = (champion, policy, budget)
    for job in reversed(lineage.backfill_jobs()):
        if job.status in UNFINISHED_JOBS and (job.generation_id, job.policy, job.budget) == wanted:
            return job
    return None


def close_interrupted_jobs(lineage: Lineage, keep: int | None, why: str | None = None) -> None:
    """Mark every other job still running failed (``interrupted: why``).

    Call it with no backfill writing (the collection's writer lock held, or free): a job
    still marked running then was killed. By default it is superseded by job ``keep``.
    """
    why = why or f"superseded by backfill job {keep}"
    for job in lineage.backfill_jobs():
        if job.status == JobStatus.RUNNING and job.id != keep:
            before = f"{job.error}; " if job.error else ""
            lineage.update_backfill_job(
                job.id,
                status=JobStatus.FAILED,
                error=f"{before}interrupted: {why}",
                finished_at=_now(),
            )


def progress_recorder(job_id: int) -> Callable[[Session, int], None]:
    """What a rewritten part's commit also writes: the job's items done, in the same
    transaction, so progress never runs ahead of (or behind) the parts."""
    return lambda session, items_done: set_row(session, BackfillJob, job_id, items_done=items_done)

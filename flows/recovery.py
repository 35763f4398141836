"""Picking up after a kill: what the next cycle does with a cycle that did not finish.

It runs holding the lineage's cycle lock, so no other cycle is running: a generation
that is still mid-cycle (training, trained but not gated, gated but not promoted) was
interrupted. The newest one is continued from the step it reached, under the config it
was started with (training continues from its resume file); one that cannot be
continued (its snapshot or config is gone, an input changed) and any older one are
closed as ``failed`` with a reason that starts ``interrupted``. A backfill job still
marked running while nobody holds the gallery's writer lock was killed too: the
champion's is finished, another generation's is closed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from flows import chain
from flows.backfill import backfill_once
from flows.config import BackfillConfig, CycleConfig
from flows.cycle_steps import CycleState, save_snapshot, verify_inputs
from flows.data import evaluation_set, lineage_source, training_items, vocabulary
from flows.steps import Step, interrupted_step
from store.backfill_jobs import close_interrupted_jobs
from store.collection import Collection
from store.files import CheckpointError, verify_checkpoint
from store.lineage import Generation, GenerationStatus, JobStatus, Lineage
from store.locks import CYCLE_LOCK, LockHeld
from store.settings import StoreError, subdir
from store.snapshots import cycle_config_path
from workers.data.datasets import DatasetError
from workers.data.scenario import Stage
from workers.learning.train import abandoned_marker, resume_path

CANNOT_RESUME = (StoreError, DatasetError, CheckpointError, ValidationError, ValueError, OSError)


def close_generation(lineage: Lineage, gen_id: int, why: str, how: str = "interrupted") -> None:
    lineage.update_generation(gen_id, status=GenerationStatus.FAILED, error=f"{how}: {why}"[:2000])


def resume_file(gen_id: int) -> Path:
    """Generation ``gen_id``'s per-epoch resume file in this home's checkpoints."""
    return resume_path(subdir("checkpoints"), gen_id)


def take_epochs(
    lineage: Lineage, gen_id: int, step: Step, cfg: CycleConfig, requested: CycleConfig | None
) -> tuple[CycleConfig, str | None]:
    """The config an interrupted generation resumes under, and what became of a changed
    ``--epochs``: taken while no epoch of it finished (its config and lineage row are
    updated), else kept, saying why. Only an epoch budget the caller set counts (a field
    set on ``requested.train``), never a default."""
    if requested is None or "epochs" not in requested.train.model_fields_set:
        return cfg, None
    want, had = requested.train.epochs, cfg.train.epochs
    if want == had:
        return cfg, None
    if step > Step.TRAIN:
        return cfg, (
            f"generation {gen_id} had finished its {had} epochs before the interruption; "
            f"--epochs {want} applies to the next generation"
        )
    if resume_file(gen_id).exists():
        return cfg, (
            f"generation {gen_id} keeps its {had} epochs, not --epochs {want}: its training "
            f"resumes from an epoch checkpoint whose learning-rate schedule spans {had} "
            f"epochs; `graceful abandon {gen_id}` stops it instead, and the next cycle trains "
            f"a new generation with --epochs {want}"
        )
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": want})})
    save_snapshot(gen_id, cfg)  # the config file only: its snapshot stays as it was
    lineage.update_generation(gen_id, epochs=want)
    return (
        cfg,
        f"generation {gen_id} takes --epochs {want} (was {had}): no epoch of it had finished",
    )


def abandon_generation(lineage: Lineage, gen_id: int, reason: str) -> list[str]:
    """Close interrupted generation ``gen_id`` as ``failed`` (error ``abandoned: reason``)
    so the next cycle starts a new generation; returns the files it removed (its resume
    file and teachers' store). Takes the cycle lock (a killed holder's lease is taken over
    and released); refuses while a live cycle holds it, and for a generation whose cycle
    ended (promoted, rejected, failed)."""
    gen = lineage.generation(gen_id)  # an unknown id: UnknownGeneration, naming the known
    if interrupted_step(gen) is None:
        raise StoreError(
            f"generation {gen_id} is {gen.status}: only an interrupted generation (one whose "
            "cycle did not finish) can be abandoned"
        )
    lock = lineage.lock(CYCLE_LOCK)
    try:
        lock.acquire(wait=False)
    except LockHeld:
        holder = lock.holder()
        raise LockHeld(
            f"generation {gen_id}'s update cycle is running ({holder or 'another process'}); "
            "stop it first (a killed cycle leaves it interrupted), then abandon it"
        ) from None
    try:
        if interrupted_step(lineage.generation(gen_id)) is None:  # settled while we waited
            raise StoreError(f"generation {gen_id} is no longer interrupted; nothing to abandon")
        close_generation(lineage, gen_id, reason, how="abandoned")
        # first the marker: a training of it still running (a killed cycle's orphaned
        # worker) stops at its next epoch and removes the resume file it writes
        abandoned_marker(subdir("checkpoints"), gen_id).touch()
        removed = []
        for path in (resume_file(gen_id), subdir("checkpoints") / f"gen-{gen_id}.teachers.f32"):
            if path.exists():
                path.unlink()
                removed.append(str(path))
        return removed
    finally:
        lock.release()


def resume_state(
    lineage: Lineage, gen: Generation, step: Step, requested: CycleConfig | None = None
) -> CycleState:
    """The interrupted cycle's state, rebuilt from what it recorded before its first step
    (with ``requested``'s epoch budget where it can be taken: :func:`take_epochs`)."""
    gen_id = int(gen.id)  # type: ignore[arg-type]
    path = cycle_config_path(gen_id)
    if not path.exists():
        raise StoreError(f"its cycle config {path} is missing")
    cfg = CycleConfig.model_validate_json(path.read_text())
    cfg, epochs_note = take_epochs(lineage, gen_id, step, cfg, requested)
    gen = lineage.generation(gen_id)
    snap = lineage.snapshots().get(gen_id)
    if snap is None or not snap.keys_path or not Path(snap.keys_path).exists():
        raise StoreError("its snapshot's keys are missing")
    source = lineage_source(lineage, gen.dataset)
    ev = evaluation_set(lineage, source)
    vocab = vocabulary(lineage, source, ev)
    items = training_items(source, ev, vocab, snap.fingerprint, snap.keys_path)
    stage = Stage(int(gen.stage or 0), tuple(gen.classes), 1.0, dict(gen.architecture))
    champion = lineage.champion()
    active = chain.active_generations(lineage)
    targets = {c.target_id for c in lineage.constraints(gen_id)}
    verify_inputs(lineage, sorted(set(active) | targets))
    if step > Step.TRAIN:
        verify_checkpoint(gen.checkpoint_path, gen.checkpoint_sha256, f"generation {gen_id}")
    resumed = f"resumed generation {gen_id}, interrupted before {step.name.lower()}"
    return CycleState(
        ev.dataset(source.spec, vocab),
        stage,
        gen,
        items,
        snap.capacity or len(vocab),
        active,
        cfg,
        champion.id if champion else None,
        step=step,
        resumed=f"{resumed}; {epochs_note}" if epochs_note else resumed,
    )


def recover_generations(
    lineage: Lineage, requested: CycleConfig | None = None
) -> CycleState | None:
    """Continue the newest interrupted generation, close the others (cycle lock held)."""
    pending = [(g, s) for g in lineage.generations() if (s := interrupted_step(g)) is not None]
    if not pending:
        return None
    *older, (newest, step) = pending
    for gen, _ in older:
        close_generation(lineage, int(gen.id), f"superseded by generation {newest.id}")  # type: ignore[arg-type]
    try:
        return resume_state(lineage, newest, step, requested)
    except CANNOT_RESUME as exc:
        close_generation(lineage, int(newest.id), f"cannot resume: {exc}")  # type: ignore[arg-type]
        return None


def recover_backfill(lineage: Lineage, cfg: CycleConfig) -> dict[str, Any] | None:
    """Finish the champion's killed backfill job; close killed jobs of other generations."""
    running = [j for j in lineage.backfill_jobs() if j.status == JobStatus.RUNNING]
    if not running or Collection(lineage).writer_active():
        return None  # nothing was killed, or a backfill is writing right now
    champion = lineage.champion()
    mine = [j for j in running if champion is not None and j.generation_id == champion.id]
    if not mine:
        close_interrupted_jobs(lineage, keep=None, why="its generation is no longer the champion")
        return None
    job = mine[-1]  # run_backfill resumes it (same settings) and closes the others
    resumed = BackfillConfig(
        budget=job.budget,
        policy=job.policy,
        batch_rows=cfg.backfill.batch_rows,
        curve=cfg.backfill.curve,
    )
    return backfill_once(lineage, resumed)


def recover(lineage: Lineage, cfg: CycleConfig) -> tuple[CycleState | None, dict[str, Any] | None]:
    """Both of the above: (the cycle to continue or None, the finished backfill or None)."""
    state = recover_generations(lineage, cfg)
    backfill = recover_backfill(lineage, cfg)
    owes = bool(chain.owed_backfill(lineage)) or len(chain.owed_items(lineage)) > 0
    if backfill is None and owes and Collection(lineage).info():
        # a cycle was killed after promoting past an incompatible ancestor, before its
        # backfill began: pay that debt before anything new is trained against it
        backfill = backfill_once(lineage, cfg.backfill)
    return state, backfill

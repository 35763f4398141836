"""Streaming, resumable backfill of the Parquet gallery with the champion generation.

The chosen items (policy order, within the budget) are fixed when a job starts and saved
next to the job, so a killed job resumes with the same selection. Parts are processed
one at a time: the next part's items are embedded on a Ray worker while the current
part is written; each part is committed atomically together with the job's progress.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

import numpy as np

from store.gallery import Gallery, GalleryRows
from store.lineage import BackfillJob, Generation, Lineage
from store.settings import StoreError, subdir
from workers import metrics as M
from workers.datasets import Dataset
from workers.embed import forward
from workers.models import load_model
from workers.policies import backfill_order, budget_items
from workers.runtime import submit

BETAS = tuple(round(0.1 * i, 1) for i in range(11))
Progress = Callable[[int, int], None]


@lru_cache(maxsize=4)
def _model(path: str, sha: str | None):
    return load_model(path, sha)


def embed_items(checkpoint: str, sha: str | None, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ray task body: (embeddings, margins) of ``x`` under one generation."""
    out = forward(_model(checkpoint, sha), x)
    return out.embedding, out.margin


def m_mix(query_emb: np.ndarray, query_labels: np.ndarray, rows: GalleryRows) -> float:
    """Top-1 of champion queries against the real gallery (each item's current embedding)."""
    return M.retrieval_top1(query_emb, query_labels, rows.embedding, rows.label)


def backfill_curve(
    rows: GalleryRows,
    new_emb: np.ndarray,
    order: np.ndarray,
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    betas: tuple[float, ...] = BETAS,
) -> list[tuple[float, float]]:
    """M_mix after backfilling fraction beta of the old items in ``order``.

    ``new_emb`` holds the champion's embedding of every gallery item, aligned with ``rows``.
    """
    pos = {int(i): p for p, i in enumerate(rows.item_id)}
    order_pos = np.array([pos[int(i)] for i in order], dtype=np.int64)
    curve = []
    for beta in betas:
        emb = rows.embedding.copy()
        take = order_pos[: round(beta * len(order_pos))]
        emb[take] = new_emb[take]
        curve.append((float(beta), M.retrieval_top1(query_emb, query_labels, emb, rows.label)))
    return curve


def _selection_path(job_id: int) -> Path:
    return subdir("backfills") / f"job-{job_id}.npy"


def _save_selection(job_id: int, ids: np.ndarray) -> None:
    path = _selection_path(job_id)
    tmp = path.with_name(path.stem + ".tmp.npy")
    np.save(tmp, ids)
    tmp.replace(path)


def resumable_job(
    lineage: Lineage, champion: int, policy: str, budget: float
) -> BackfillJob | None:
    """An unfinished job with the same champion, policy and budget, if any."""
    for job in reversed(lineage.backfill_jobs()):
        if job.status == "running" and (job.generation_id, job.policy, job.budget) == (
            champion,
            policy,
            budget,
        ):
            return job
    return None


def run_backfill(
    lineage: Lineage,
    gallery: Gallery,
    ds: Dataset,
    champion: Generation,
    policy: str,
    budget: float,
    seed: int = 0,
    query_emb: np.ndarray | None = None,
    query_labels: np.ndarray | None = None,
    champion_gallery_emb: np.ndarray | None = None,
    progress: Progress | None = None,
    crash_after_parts: int | None = None,
) -> BackfillJob:
    """Re-embed ``budget`` of the gallery with ``champion`` in ``policy`` order; resumable.

    ``query_emb``/``query_labels`` give M_mix before and after; with
    ``champion_gallery_emb`` (aligned with the gallery's item ids) the curve is measured.
    ``crash_after_parts`` simulates a kill (tests): stop after committing that many parts.
    """
    info = gallery.require()
    if info.dataset != ds.spec:
        raise StoreError(f"the gallery indexes {info.dataset!r}, not {ds.spec!r}")
    gallery.reconcile()
    target = int(champion.id)  # type: ignore[arg-type]
    rows = gallery.read_all()
    measure = query_emb is not None and query_labels is not None
    before = m_mix(query_emb, query_labels, rows) if measure else None

    job = resumable_job(lineage, target, policy, budget)
    selection: np.ndarray | None = None
    if job is not None and _selection_path(job.id).exists():
        selection = np.load(_selection_path(job.id))
    else:
        order = backfill_order(rows.item_id, rows.generation, rows.margin, target, policy, seed)
        selection = order[: budget_items(budget, len(rows))]
        curve = []
        if measure and champion_gallery_emb is not None:
            curve = backfill_curve(rows, champion_gallery_emb, order, query_emb, query_labels)
        if job is None:
            job = lineage.add_backfill_job(
                generation_id=target,
                policy=policy,
                budget=budget,
                total_items=len(selection),
                m_mix_before=before,
                curve=[list(p) for p in curve],
            )
        _save_selection(job.id, selection)
    assert job is not None and job.id is not None

    chosen = set(selection.tolist())
    done = int(np.isin(selection, rows.item_id[rows.generation == target]).sum())
    lineage.update_backfill_job(job.id, items_done=done)
    if progress:
        progress(done, len(selection))

    # parts that still hold chosen items not yet embedded by the champion
    todo: list[tuple[str, GalleryRows, np.ndarray]] = []
    for name, part in gallery.iter_parts():
        mask = np.array([int(i) in chosen for i in part.item_id]) & (part.generation != target)
        if mask.any():
            todo.append((name, part, mask))

    import ray

    def _submit(i: int):
        name, part, mask = todo[i]
        x = ds.x_test[part.item_id[mask]]
        return submit(embed_items, champion.checkpoint_path, champion.checkpoint_sha256, x)

    pending = _submit(0) if todo else None
    for i, (name, part, mask) in enumerate(todo):
        emb, margin = ray.get(pending)
        pending = _submit(i + 1) if i + 1 < len(todo) else None  # overlap embed and write
        part.embedding[mask] = emb
        part.margin[mask] = margin
        part.generation[mask] = target
        done += int(mask.sum())

        def _progress(session, n=done):
            j = session.get(BackfillJob, job.id)
            j.items_done = n
            session.add(j)

        gallery.write_part(name, part, also=_progress)
        if progress:
            progress(done, len(selection))
        if crash_after_parts is not None and i + 1 >= crash_after_parts:
            raise KeyboardInterrupt(f"simulated kill after {i + 1} parts")

    after = m_mix(query_emb, query_labels, gallery.read_all()) if measure else None
    return lineage.update_backfill_job(
        job.id,
        status="done",
        items_done=done,
        m_mix_after=after,
        finished_at=datetime.now(UTC),
    )

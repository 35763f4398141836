"""A backfill job: check, select, re-embed, commit, with its SQL bookkeeping.

The steps (workers.collection.backfill computes each) are run here, and the job's record
is kept in store.backfill_jobs: a job killed at any point and started again resumes with
the same selection and finishes with every item present exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from store.backfill_jobs import (
    close_interrupted_jobs,
    load_selection,
    progress_recorder,
    resumable_job,
    save_selection,
)
from store.collection import Collection, CollectionStoreError
from store.files import verify_checkpoint
from store.lineage import BackfillJob, CollectionInfo, Generation, JobStatus, Lineage
from workers.collection.backfill import (
    LabelledQueries,
    Progress,
    backfill_curve,
    m_mix,
    m_mix_stream,
    peak_rss_bytes,
    policy_order,
    progress_scan,
    reembed_parts,
    rss_breakdown,
)
from workers.collection.items import parse_collection_spec
from workers.collection.policies import budget_items, check_policy


def _check_champion(champion: Generation, info: CollectionInfo) -> int:
    # the caller (flows.backfill.backfill_once) refuses a lineage with no champion; and
    # before any job is recorded or worker started: a swapped file fails here, not mid-way
    verify_checkpoint(
        champion.checkpoint_path, champion.checkpoint_sha256, f"champion generation {champion.id}"
    )
    if int(champion.embed_dim) != int(info.embed_dim):
        raise CollectionStoreError(
            f"embedding dim mismatch: generation {champion.id} embeds in dim "
            f"{champion.embed_dim} but the collection stores dim {info.embed_dim}; "
            "a collection cannot mix dimensions (index a new collection in a new GRACEFUL_HOME)"
        )
    return int(champion.id)


def run_backfill(
    lineage: Lineage,
    collection: Collection,
    champion: Generation,
    policy: str,
    budget: float,
    seed: int = 0,
    queries: LabelledQueries | None = None,
    progress: Progress | None = None,
    crash_after_parts: int | None = None,
    *,
    update_index: bool = True,
    stats: dict[str, Any] | None = None,
    retire_share: float = 0.0,
    complete: Sequence[int] = (),
    owed_items: np.ndarray | None = None,
) -> BackfillJob:
    """Re-embed ``budget`` of the gallery with ``champion`` in ``policy`` order; resumable.

    Every item of the generations in ``complete`` is re-embedded first, whatever the
    budget (the champion owes them a full backfill): the job re-embeds those items, or the
    budget's count of items in that order if the budget is larger. So are the items in
    ``owed_items`` (a promotion's targeted backfill, ``flows.chain.owed_items``), before
    everything else.

    The embedding actor reads the items' inputs by key from the collection's recorded
    spec (workers.collection.items.open_reader). ``queries`` give M_mix before and after;
    where their reference embeddings cover every item of the collection, the curve is
    measured.
    ``crash_after_parts`` simulates a kill (tests): stop after committing that many
    parts. ``stats`` receives timings. Only one backfill writes a gallery at a time.
    """
    with collection.writing():  # the writer lock dies with a killed job
        t0 = time.perf_counter()
        st: dict[str, Any] = stats if stats is not None else {}
        check_policy(policy)
        info = collection.require()
        target = _check_champion(champion, info)
        parse_collection_spec(info.dataset)  # a clear error for a source that went away
        collection.verify()  # raises, naming the file, before anything changes
        collection.reconcile()
        st["verify_seconds"] = time.perf_counter() - t0
        st["peak_rss_after_verify"] = peak_rss_bytes()

        t1 = time.perf_counter()
        job = resumable_job(lineage, target, policy, budget)
        selection = load_selection(job.id) if job is not None else None
        before = None
        if selection is None:
            num_classes = len(champion.classes) if champion.classes else None
            order, n_items = policy_order(
                collection,
                target,
                policy,
                seed,
                num_classes,
                retire_share=retire_share,
                complete=complete,
                first_items=owed_items,
            )
            held = lineage.gallery_counts()
            forced = sum(held.get(int(k), 0) for k in complete if int(k) != target)
            if owed_items is not None and len(owed_items):
                forced += int(np.isin(order, owed_items).sum())
            selection = order[: max(budget_items(budget, n_items), forced)].copy()
            curve: list[tuple[float, float]] = []
            if queries is not None:
                # the curve where the champion's reference embeddings cover the collection
                rows = collection.read_all() if queries.reference_emb is not None else None
                new_emb = None if rows is None else queries.reference_for(rows.key)
                if rows is not None and new_emb is not None:
                    before = m_mix(queries.emb, queries.labels, rows)
                    curve = backfill_curve(rows, new_emb, order, queries.emb, queries.labels)
                else:
                    before = m_mix_stream(collection, queries.emb, queries.labels)
                del rows, new_emb
            del order
            if job is None:
                job = lineage.add_backfill_job(
                    generation_id=target,
                    policy=policy,
                    budget=budget,
                    total_items=len(selection),
                    m_mix_before=before,
                    curve=[list(p) for p in curve],
                )
            save_selection(job.id, selection)
        assert job is not None and job.id is not None
        job_id = int(job.id)
        close_interrupted_jobs(lineage, keep=job_id)
        total = len(selection)
        chosen = np.sort(selection)
        del selection
        done, todo = progress_scan(collection, chosen, target)
        lineage.update_backfill_job(job_id, status=JobStatus.RUNNING, items_done=done, error=None)
        if progress:
            progress(done, total)
        st["select_seconds"] = time.perf_counter() - t1
        st["peak_rss_after_select"] = peak_rss_bytes()

        t2 = time.perf_counter()
        items = 0
        try:
            if todo:
                items = reembed_parts(
                    collection,
                    info,
                    todo,
                    chosen,
                    target,
                    champion,
                    done,
                    total,
                    progress,
                    crash_after_parts,
                    st,
                    progress_recorder(job_id),
                )
        except BaseException as exc:  # recorded; a later backfill with these settings resumes it
            lineage.update_backfill_job(
                job_id, status=JobStatus.FAILED, error=f"{type(exc).__name__}: {exc}"[:2000]
            )
            raise
        st["pipeline_seconds"] = time.perf_counter() - t2
        st["items"] = items
        st["parts"] = len(todo)

        t3 = time.perf_counter()
        after = m_mix_stream(collection, queries.emb, queries.labels) if queries else None
        job = lineage.update_backfill_job(
            job_id,
            status=JobStatus.DONE,
            items_done=done + items,
            m_mix_after=after,
            finished_at=datetime.now(UTC),
        )
        if update_index:
            from store.index import CollectionIndex

            CollectionIndex.open(collection)
        st["finish_seconds"] = time.perf_counter() - t3
        st["peak_rss"] = peak_rss_bytes()
        st.update({f"rss_{k}": v for k, v in rss_breakdown().items()})
        return job

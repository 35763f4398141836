"""A partial backfill as a Prefect flow (runnable on demand from the UI as a deployment)."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import chain, text
from flows.backfill_job import run_backfill
from flows.config import BackfillConfig, Policy
from flows.data import eval_dataset
from flows.naming import artifact_key, backfill_run_name, number, tag_run
from flows.progress import counter
from store.collection import Collection
from store.lineage import Generation, Lineage
from store.settings import StoreError, subdir
from workers.collection.backfill import LabelledQueries
from workers.collection.items import is_reference
from workers.measuring.evaluate import generation_outputs
from workers.measuring.metric_names import Metric
from workers.runtime import join_cluster


def backfill_once(
    lineage: Lineage, cfg: BackfillConfig, progress=None, crash_after_parts: int | None = None
) -> dict[str, Any]:
    """Re-embed ``cfg.budget`` of the collection with the champion, then retire what left.

    Generations the champion owes a full backfill (:func:`flows.chain.owed_backfill`) are
    re-embedded whole, first, whatever the budget; so are the items its promotion's
    targeted backfill owes (:func:`flows.chain.owed_items`), before everything else.

    Every collection is read by key from its spec. M_mix and the backfill curve are
    measured where the collection is the evaluation set's reference half (the scenario's):
    the query half beside it is the labelled queries; a user's collection has none.
    """
    collection = Collection(lineage)
    info = collection.require()
    champion = lineage.champion()
    if champion is None:
        raise StoreError("no champion generation to backfill with")
    before = lineage.gallery_counts()
    measure = labelled_queries(lineage, info.dataset, champion, cfg.curve)
    complete = chain.owed_backfill(lineage)
    job = run_backfill(
        lineage,
        collection,
        champion,
        cfg.policy,
        cfg.budget,
        seed=cfg.seed,
        progress=progress,
        crash_after_parts=crash_after_parts,
        retire_share=cfg.retire_share,
        complete=complete,
        owed_items=chain.owed_items(lineage),
        queries=measure,
    )
    if job.m_mix_after is not None:
        lineage.record_metrics([(champion.id, champion.id, Metric.M_MIX, job.m_mix_after)])
    retired = chain.retire_unused(lineage)
    return {
        "job": job.id,
        "generation": champion.id,
        "policy": job.policy,
        "budget": job.budget,
        "items_done": job.items_done,
        "items_total": job.total_items,
        "m_mix_before": job.m_mix_before,
        "m_mix_after": job.m_mix_after,
        "curve": job.curve,
        "completed": complete,
        "retired": retired,
        "by_generation_before": before,
        "by_generation": lineage.gallery_counts(),
    }


def labelled_queries(
    lineage: Lineage, spec: str, champion: Generation, curve: bool = True
) -> LabelledQueries | None:
    """What M_mix on collection ``spec`` is measured with: the evaluation set's query half
    embedded by the champion, and with ``curve`` its embeddings of the reference items by
    key; None where the collection is not the evaluation set's reference half."""
    ds = eval_dataset(lineage) if is_reference(spec) else None
    if ds is None:
        return None
    out = generation_outputs(champion, ds, subdir("cache"))
    keys = [ds.test_keys[i] for i in out.reference_idx] if ds.test_keys else []
    reference = curve and bool(keys)
    return LabelledQueries(
        out.query_emb,
        ds.y_test[out.query_idx],
        keys if reference else (),
        out.reference_emb if reference else None,
    )


def log_backfill(log: Any, result: dict[str, Any]) -> None:
    """What the backfill did, in the run's log: the items, the generations it moved them
    from and to, the curve's start and end, M_mix before and after, what retired."""
    before, after = result["by_generation_before"], result["by_generation"]
    moved = sorted(g for g in before if g != result["generation"] and after.get(g, 0) < before[g])
    log.info(
        "backfill job %s (%s, budget %s): generation %s re-embedded %s of the job's %s "
        "items%s; the collection holds %s",
        result["job"],
        result["policy"],
        number(result["budget"]),
        result["generation"],
        f"{result['items_done']:,}",
        f"{result['items_total']:,}",
        f" (from {text.generations(moved)})" if moved else "",
        f"{sum(after.values()):,}",
    )
    if result["m_mix_before"] is None and result["m_mix_after"] is None:
        log.info("M_mix not measured: a user's collection has no labelled queries")
    else:
        log.info(
            "M_mix %s before, %s after",
            text.num(result["m_mix_before"]),
            text.num(result["m_mix_after"]),
        )
    log.info("backfill curve: %s", text.curve(result["curve"]))
    log.info(
        "collection by generation: %s (before: %s)",
        text.by_generation(after),
        text.by_generation(before),
    )
    for gen_id, reason in result["retired"]:
        log.info("retired generation %s from the constraint chain: %s", gen_id, reason)


@task(name="backfill-gallery", cache_policy=NO_CACHE)
def backfill_task(cfg: BackfillConfig) -> dict[str, Any]:
    return backfill_once(
        Lineage(),
        cfg,
        progress=counter(artifact_key("backfill-progress"), "backfill: items re-embedded"),
    )


@task(name="publish", cache_policy=NO_CACHE)
def publish_task(result: dict[str, Any]) -> None:
    from flows.publish import publish_backfill

    publish_backfill(Lineage(), result)


DEFAULT = BackfillConfig()  # the flow's flat parameters take the model's defaults


def backfill_config(config: BackfillConfig | None = None, **flat: Any) -> BackfillConfig:
    """The backfill's config from the flow's parameters: the flat ones (``budget``,
    ``policy``, ...), under the fields a whole ``config`` sets (an older trigger's or a
    program's)."""
    given = config.model_dump(include=config.model_fields_set) if config else {}
    return BackfillConfig(**{**flat, **given})


@flow(name="partial-backfill", flow_run_name=backfill_run_name, log_prints=True)
def backfill_flow(
    budget: float = DEFAULT.budget,
    policy: Policy = DEFAULT.policy,
    retire_share: float = DEFAULT.retire_share,
    batch_rows: int = DEFAULT.batch_rows,
    seed: int = DEFAULT.seed,
    curve: bool = DEFAULT.curve,
    config: BackfillConfig | None = None,
) -> dict[str, Any]:
    """Re-embed part of the gallery with the champion, in policy order, within budget.

    ``budget`` (a fraction <= 1 or a count of items) and ``policy`` are top-level
    parameters: ``prefect deployment run 'partial-backfill/on-demand-backfill' --param
    budget=0.2``. A whole ``config`` (BackfillConfig) is still taken; the fields it sets
    win over the flat parameters. The run is named for them: ``backfill 0.2
    representative``; its log says what it did (:func:`log_backfill`).
    """
    cfg = backfill_config(
        config,
        budget=budget,
        policy=policy,
        retire_share=retire_share,
        batch_rows=batch_rows,
        seed=seed,
        curve=curve,
    )
    tag_run()
    join_cluster()  # a RAY_ADDRESS that refuses this client fails before a job is recorded
    result = backfill_task(cfg)
    log_backfill(get_run_logger(), result)
    publish_task(result)
    return result

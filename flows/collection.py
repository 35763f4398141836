"""Indexing a collection as a Prefect flow (runnable on demand from the UI as a deployment).

``graceful index SPEC`` runs it: the champion embeds the items of SPEC the collection
does not hold yet and those whose content changed (``--prune`` also removes the ones
gone), streamed through Ray Data and committed a part at a time (workers.collection.indexing).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.config import IndexConfig
from flows.data import class_vocabulary
from flows.naming import (
    artifact_key,
    index_run_name,
    index_run_name_for,
    name_run,
    safe_spec,
    tag_run,
)
from flows.progress import counter
from store.collection import Collection
from store.lineage import Generation, Lineage
from store.settings import StoreError
from workers.collection.indexing import IndexResult, run_index
from workers.collection.items import CollectionError, is_reference
from workers.data.source import reference_source
from workers.measuring.metric_names import Metric
from workers.runtime import join_cluster


def _index(lineage: Lineage, spec: str, champion: Generation, **options: Any) -> IndexResult:
    """run_index with the lineage's class vocabulary; the faiss index is brought up to
    date apart (the flow's next step, with memory of its own; or when first searched)."""
    return run_index(
        lineage,
        Collection(lineage),
        spec,
        champion,
        class_vocabulary(lineage),
        update_index=False,
        **options,
    )


def index_once(lineage: Lineage, cfg: IndexConfig, progress=None) -> dict[str, Any]:
    """Index ``cfg.spec`` (default: the collection's own spec) with the champion. A
    collection that is the evaluation set's reference half is the cycle's to keep."""
    collection = Collection(lineage)
    info = collection.info()
    reference = info is not None and is_reference(info.dataset)
    spec = cfg.spec
    if spec is None:
        if info is None or reference:
            raise CollectionError(
                "no collection to index: pass its spec (images:DIR, parquet:PATH)"
            )
        spec = info.dataset
    if info is not None and reference:  # bad input: a collection of another kind
        kind = reference_source(info.dataset).kind.value
        raise CollectionError(
            f"this GRACEFUL_HOME's collection is the {kind}'s evaluation reference half "
            f"({info.dataset}), which its cycles keep; index {spec!r} in another GRACEFUL_HOME"
        )
    champion = lineage.champion()
    if champion is None:
        raise StoreError("no champion generation to index with: run `graceful cycle` first")
    result = _index(
        lineage,
        spec,
        champion,
        prune=cfg.prune,
        strict=cfg.strict,
        part_rows=cfg.part_rows,
        progress=progress,
    )
    out = result.as_dict()
    out["by_generation"] = lineage.gallery_counts()
    return out


def index_reference(
    lineage: Lineage, spec: str, champion: Generation, part_rows: int
) -> dict[str, Any]:
    """Index a source's evaluation reference half (``spec``: reference_spec) as the
    collection, with the champion, through the ordinary indexing path; M_mix is measured
    on it with the query half."""
    from flows.backfill import labelled_queries
    from workers.collection.backfill import m_mix_stream

    collection = Collection(lineage)
    result = _index(lineage, spec, champion, part_rows=part_rows)
    out: dict[str, Any] = {"indexed": result.added, "m_mix": None}
    q = labelled_queries(lineage, spec, champion, curve=False)
    if q is not None and collection.exists():
        out["m_mix"] = m_mix_stream(collection, q.emb, q.labels)
        lineage.record_metrics([(champion.id, champion.id, Metric.M_MIX, out["m_mix"])])
    return out


@task(name="index-collection", cache_policy=NO_CACHE)
def index_task(cfg: IndexConfig) -> dict[str, Any]:
    return index_once(
        Lineage(), cfg, progress=counter(artifact_key("index-progress"), "index: items embedded")
    )


def update_search_index(lineage: Lineage) -> dict[str, Any]:
    """Bring the persisted faiss index up to the committed collection (flat or IVF)."""
    from store.index import CollectionIndex

    collection = Collection(lineage)
    if not collection.exists():
        return {"kind": None, "items": 0}
    idx = CollectionIndex.open(collection)
    return {"kind": idx.kind.value, "items": idx.ntotal, "recall": idx.recall}


@task(name="update-search-index", cache_policy=NO_CACHE)
def search_index_task() -> dict[str, Any]:
    return update_search_index(Lineage())


@task(name="publish", cache_policy=NO_CACHE)
def publish_task(result: dict[str, Any]) -> None:
    from flows.publish import publish_index

    publish_index(result)


@flow(name="index-collection", flow_run_name=index_run_name, log_prints=True)
def index_flow(config: IndexConfig | None = None) -> dict[str, Any]:
    """Embed the collection's new and changed items with the champion (and prune).

    The run is named ``index <spec>`` (a URL's password masked); without a spec, once the
    collection's own is known."""
    cfg = config or IndexConfig()
    log = get_run_logger()
    tag_run()
    join_cluster()  # a RAY_ADDRESS that refuses this client fails before anything is written
    result = index_task(cfg)
    if cfg.spec is None:
        name_run(index_run_name_for(result["spec"]))
    result["index"] = search_index_task()
    for item in result["skipped_items"]:
        log.warning("skipped unreadable item %s: %s", item["key"], item["reason"])
    log.info(
        "indexed %s: %d added, %d re-embedded, %d pruned, %d skipped; %d items",
        safe_spec(result["spec"]),
        result["added"],
        result["reembedded"],
        result["pruned"],
        result["skipped"],
        result["items"],
    )
    publish_task(result)
    return result

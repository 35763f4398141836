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
from flows.data import eval_dataset
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
from store.lineage import Lineage
from store.settings import StoreError
from workers.collection.indexing import run_index
from workers.collection.items import CollectionError
from workers.runtime import join_cluster


def class_vocabulary(lineage: Lineage) -> dict[str, int]:
    """Class name -> head row of the lineage (a source's vocabulary or the scenario's
    class names): how a labelled collection's labels are stored."""
    vocab = lineage.vocabulary()
    if vocab:
        return vocab
    ds = eval_dataset(lineage)
    return {} if ds is None else {str(n): i for i, n in enumerate(ds.class_names)}


def index_once(lineage: Lineage, cfg: IndexConfig, progress=None) -> dict[str, Any]:
    """Index ``cfg.spec`` (default: the collection's own spec) with the champion."""
    collection = Collection(lineage)
    spec = cfg.spec
    if spec is None:
        info = collection.info()
        if info is None or info.scenario:
            raise CollectionError(
                "no collection to index: pass its spec (images:DIR, parquet:PATH)"
            )
        spec = info.dataset
    info = collection.info()
    if info is not None and info.scenario:  # bad input: a collection of another kind
        raise CollectionError(
            f"this GRACEFUL_HOME's collection is the scenario's evaluation reference half "
            f"({info.dataset}); index {spec!r} in another GRACEFUL_HOME"
        )
    champion = lineage.champion()
    if champion is None:
        raise StoreError("no champion generation to index with: run `graceful cycle` first")
    result = run_index(
        lineage,
        collection,
        spec,
        champion,
        class_vocabulary(lineage),
        prune=cfg.prune,
        strict=cfg.strict,
        part_rows=cfg.part_rows,
        progress=progress,
        update_index=False,  # the flow's next step, with memory of its own
    )
    out = result.as_dict()
    out["by_generation"] = lineage.gallery_counts()
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

"""Deployments: a scheduled update cycle, an on-demand partial backfill, and an on-demand
indexing of the collection (its parameters: the collection's spec, prune, strict).

``graceful serve`` serves them from this process to the Prefect server at
``PREFECT_API_URL`` (start one with ``prefect server start``: UI on 127.0.0.1:4200).
``prefect.yaml`` at the repository root declares the same three for a process work pool
named ``graceful`` (``prefect deploy --all``, ``prefect worker start --pool graceful``);
both give the backfill ``budget`` and ``policy`` as top-level parameters.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flows.config import CycleConfig


def build_deployments(
    config: CycleConfig,
    interval_minutes: float,
    cron: str | None = None,
    name: str = "scheduled-update",
    collection: str | None = None,
) -> list:
    """The scheduled update cycle (its parameters: ``config``, the whole typed config), the
    on-demand backfill (flat parameters: ``config.backfill``'s budget, policy, ...) and the
    on-demand index.

    On a source, a firing trains only when the source's snapshot changed since the
    champion's; otherwise the run logs and summarises ``skipped: no new data ...``.
    """
    from flows.backfill import backfill_flow
    from flows.collection import index_flow
    from flows.config import IndexConfig
    from flows.cycle import update_cycle

    schedule = {"cron": cron} if cron else {"interval": timedelta(minutes=interval_minutes)}
    return [
        update_cycle.to_deployment(
            name=name,
            parameters={"config": config.model_dump(mode="json")},
            description="Train, evaluate, gate, promote and backfill the next generation.",
            tags=["graceful"],
            # one run at a time from this deployment; the lineage's cycle lock also
            # serialises cycles started any other way (the CLI, another deployment)
            concurrency_limit=1,
            **schedule,
        ),
        backfill_flow.to_deployment(
            name="on-demand-backfill",
            parameters=config.backfill.model_dump(mode="json"),
            description="Re-embed part of the gallery with the champion; set budget and policy.",
            tags=["graceful"],
        ),
        index_flow.to_deployment(
            name="on-demand-index",
            parameters={"config": IndexConfig(spec=collection).model_dump()},
            description="Embed the collection's new and changed items with the champion "
            "(prune: remove the ones gone).",
            tags=["graceful"],
        ),
    ]


def serve_all(
    config: CycleConfig,
    interval_minutes: float = 1440,
    cron: str | None = None,
    name: str = "scheduled-update",
    collection: str | None = None,
) -> None:
    from prefect import serve

    serve(*build_deployments(config, interval_minutes, cron, name, collection))

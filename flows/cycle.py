"""The update cycle: :func:`run_cycle` holds its steps in order, the Prefect flow
:func:`update_cycle` wraps it (each step a thin task, progress and summaries in the UI),
and benchmarks and tests call it as it is.

snapshot -> constraints -> train -> evaluate -> gate -> promote -> backfill -> retire.

A cycle holds the lineage's cycle lock from start to end (store.locks): a second cycle
waits for it, or refuses with ``wait_for_lock=False``. So when a cycle starts, any
generation still mid-cycle was interrupted (a kill, a crash): flows.recovery continues it
from the step it reached, or closes it as failed, before anything new is trained.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import chain, text
from flows.config import CycleConfig
from flows.cycle_steps import (
    backfill_step,
    evaluate_step,
    gate_step,
    plan_cycle,
    promote_step,
    reevaluate,
    rejected_before,
    start_cycle,
    train_step,
    unchanged_since,
)
from flows.naming import artifact_key, cycle_run_name, name_run, tag_run
from flows.progress import StepProgress
from flows.recovery import recover
from flows.steps import Step
from store.lineage import Lineage
from store.locks import CYCLE_LOCK
from workers.runtime import join_cluster, task_resources, train_resources


class CycleStep(StrEnum):
    """The cycle's steps, in order, by the names their Prefect tasks carry in the UI."""

    RECOVER = "recover-interrupted"
    PLAN = "snapshot"
    REEVALUATE = "reevaluate-on-new-evaluation-set"
    START = "record-generation-and-constraints"
    TRAIN = "train-on-ray"
    EVALUATE = "evaluate-against-ancestors"
    GATE = "gate"
    PROMOTE = "promote"
    BACKFILL = "backfill"
    RETIRE = "retire-constraints"


@dataclass(frozen=True)
class CycleEvent:
    """What :func:`run_cycle` tells ``on_step`` after a step: which, what it did, and the
    generation once there is one."""

    step: CycleStep
    message: str
    generation: int | None = None


RunStep = Callable[..., Any]  # (step, fn, *args) -> fn(*args), however the caller runs it


def plain(step: CycleStep, fn: Callable[..., Any], *args: Any) -> Any:
    """Run a step as a plain call (benchmarks, tests)."""
    return fn(*args)


def run_cycle(
    lineage: Lineage,
    config: CycleConfig,
    on_step: Callable[[CycleEvent], None] | None = None,
    *,
    run_step: RunStep = plain,
    log: logging.Logger | logging.LoggerAdapter | None = None,
) -> dict[str, Any]:
    """One update cycle of ``lineage`` under ``config``, from where an interrupted one
    stopped, holding the cycle lock. Returns what it did (the flow's result dict, plus
    ``active`` and the trainer's ``train`` figures); a cycle with no new data returns
    ``skipped`` and its message."""
    log = log or logging.getLogger("graceful.cycle")
    join_cluster()  # a RAY_ADDRESS that refuses this client fails here: nothing recorded
    lock = lineage.lock(CYCLE_LOCK)
    waiting = "waiting for the update cycle that is running (%s)"
    lock.acquire(wait=config.wait_for_lock, on_wait=lambda h: log.warning(waiting, h or "starting"))
    try:
        return _steps(lineage, config, on_step or (lambda event: None), run_step, log)
    finally:
        lock.release()


def _steps(
    lineage: Lineage,
    cfg: CycleConfig,
    on_step: Callable[[CycleEvent], None],
    run: RunStep,
    log: logging.Logger | logging.LoggerAdapter,
) -> dict[str, Any]:
    """The steps in order (lock held)."""
    state, resumed_backfill = run(CycleStep.RECOVER, recover, lineage, cfg)
    if resumed_backfill:
        from flows.backfill import log_backfill

        log.warning("finished the interrupted backfill job %s", resumed_backfill["job"])
        log_backfill(log, resumed_backfill)
    unreadable: list[dict[str, str]] = []
    if state is None:
        plan = run(CycleStep.PLAN, plan_cycle, lineage, cfg)
        if plan.eval_changed:
            measured = run(CycleStep.REEVALUATE, reevaluate, lineage, plan, cfg.backfill.batch_rows)
            log.warning(
                "the evaluation set changed: re-evaluated %s on it", text.generations(measured)
            )
        unreadable = plan.snapshot.skipped
        for item in unreadable[:20]:
            log.warning("skipped unreadable item %s: %s", item["key"], item["reason"])
        if unreadable:
            log.warning("%d unreadable item(s) skipped (--strict refuses them)", len(unreadable))
        skipped = _skip(lineage, plan, cfg)
        if skipped is not None:
            since, message = skipped
            log.info("%s (snapshot %s)", message, plan.snapshot.fingerprint[:12])
            on_step(CycleEvent(CycleStep.PLAN, message))
            return {
                "skipped": True,
                "message": message,
                "generation": since,
                "resumed_backfill": resumed_backfill,
            }
        # Ray is up (or joined) and a node can take the training, before anything is
        # recorded: a refused client or GRACEFUL_TRAIN_RESOURCES no node has leaves nothing
        task_resources(train_resources())
        state = run(CycleStep.START, start_cycle, lineage, cfg, plan)
    else:
        log.warning("%s", state.resumed)
    g = int(state.generation.id)  # type: ignore[arg-type]
    log.info(
        "generation %s: stage %s, %d training items, constraints against %s",
        g,
        state.stage.index,
        state.generation.train_samples or 0,
        text.generations(state.active),
    )
    on_step(
        CycleEvent(
            CycleStep.START,
            f"generation {g}: stage {state.stage.index}, {len(state.active)} active ancestors",
            g,
        )
    )
    if state.step <= Step.TRAIN:
        result = run(CycleStep.TRAIN, train_step, lineage, state)
        if result.get("resumed_from_epoch"):
            log.warning("training resumed from epoch %s", result["resumed_from_epoch"])
        if result.get("warm_start_note"):
            log.warning("%s", result["warm_start_note"])
        node = result.get("ray_node"), result.get("ray_node_ip")
        log.info("generation %s trained on Ray node %s (%s)", g, *node)
    on_step(CycleEvent(CycleStep.TRAIN, "trained", g))
    if state.step <= Step.EVALUATE:
        metrics = run(CycleStep.EVALUATE, evaluate_step, lineage, state)
        on_step(CycleEvent(CycleStep.EVALUATE, "evaluated", g))
        passed = run(CycleStep.GATE, gate_step, lineage, state, metrics, state.config)
    else:  # gated before the interruption
        on_step(CycleEvent(CycleStep.EVALUATE, "evaluated before", g))
        passed, state.reasons = True, list(state.generation.gate_reasons)
    log.info("gate %s: %s", "passed" if passed else "REJECTED", "; ".join(state.reasons))
    on_step(CycleEvent(CycleStep.GATE, "gate: " + ("passed" if passed else "rejected"), g))
    backfill: dict[str, Any] = {}
    if passed:
        run(CycleStep.PROMOTE, promote_step, lineage, state)
        on_step(CycleEvent(CycleStep.PROMOTE, "promoted", g))
        backfill = run(CycleStep.BACKFILL, backfill_step, lineage, state)
        on_step(CycleEvent(CycleStep.BACKFILL, "backfilled", g))
    else:
        on_step(CycleEvent(CycleStep.PROMOTE, "not promoted", g))
        on_step(CycleEvent(CycleStep.BACKFILL, "no backfill", g))
    if backfill:
        log.info("backfill: %s", text.cycle_backfill(backfill))
    # the backfill retires what it moved away from; the chain may retire more now
    retired = list(backfill.get("retired", [])) + run(
        CycleStep.RETIRE, chain.retire_unused, lineage
    )
    for gen_id, reason in retired:
        log.info("retired generation %s from the constraint chain: %s", gen_id, reason)
    on_step(CycleEvent(CycleStep.RETIRE, f"retired {len(retired)}", g))
    gen = state.generation
    log.info("generation %s: accuracy %.4f, %s", g, gen.accuracy or 0.0, "; ".join(state.reasons))
    return {
        "generation": g,
        "accuracy": gen.accuracy,
        "promoted": passed,
        "reasons": state.reasons,
        "backfill": backfill,
        "retired": retired,
        "active": list(state.active),
        "resumed": state.resumed,
        "resumed_backfill": resumed_backfill,
        "resumed_from_epoch": state.result.get("resumed_from_epoch"),
        "unreadable_skipped": len(unreadable),
        "ray_node": state.result.get("ray_node"),  # the Ray node that trained it (this run)
        "ray_node_ip": state.result.get("ray_node_ip"),
        "train": state.result,  # the trainer's figures (per-epoch seconds, losses, ...)
    }


def _skip(lineage: Lineage, plan: Any, cfg: CycleConfig) -> tuple[int, str] | None:
    """(the generation, why) when this snapshot needs no training: nothing new since a
    generation, or it was trained and rejected; never with ``force``."""
    if cfg.force:
        return None
    since = unchanged_since(lineage, plan)
    if since is not None:
        return since, f"skipped: no new data since generation {since}"
    rejected = rejected_before(lineage, plan, cfg)
    if rejected is not None:
        return rejected[0], (
            f"skipped: generation {rejected[0]} was trained on this snapshot and rejected "
            f"({rejected[1]}); --force trains it again"
        )
    return None


# -- Prefect -------------------------------------------------------------------------------
def as_task(step: CycleStep, fn: Callable[..., Any], *args: Any) -> Any:
    """Run a step as a thin Prefect task named for it (the flow's ``run_step``)."""
    return task(name=step.value, cache_policy=NO_CACHE)(fn)(*args)


@task(name="publish", cache_policy=NO_CACHE)
def publish_task(gen_id: int, backfill: dict[str, Any], retired: list) -> None:
    from flows.publish import publish_cycle

    publish_cycle(Lineage(), gen_id, backfill, retired)


@task(name="publish-skip", cache_policy=NO_CACHE)
def publish_skip_task(message: str) -> None:
    from flows.publish import publish_skip

    publish_skip(message)


def final_state(result: dict[str, Any]) -> Any:
    """How the flow run ends, as the UI shows it: a promoted generation ``Completed``; a
    rejected one a Completed state named ``Rejected`` with the gate's failing reasons as
    its message; a skipped cycle ``Skipped`` with why. The result dict stays the flow's
    return value (``update_cycle(cfg)`` returns it; ``return_state=True`` gives the state,
    whose ``result()`` is that dict)."""
    from prefect.states import Completed

    if result.get("skipped"):
        return Completed(name="Skipped", message=result["message"], data=result)
    if not result.get("promoted"):
        reasons = result.get("reasons") or []
        fails = [r.removeprefix("FAIL ") for r in reasons if r.startswith("FAIL ")]
        why = f"generation {result['generation']} rejected: " + ("; ".join(fails or reasons) or "?")
        return Completed(name="Rejected", message=why, data=result)
    return result


@flow(name="update-cycle", flow_run_name=cycle_run_name, log_prints=True)
def update_cycle(config: CycleConfig | None = None) -> dict[str, Any]:
    """Train the next generation under the accumulated constraints and roll it out:
    :func:`run_cycle` with each step a task, its progress an artifact, its summary
    published.

    The run is named ``generation g`` once its generation is recorded (``cycle on
    <lineage>`` before); it ends ``Completed``, or ``Rejected`` or ``Skipped``
    (:func:`final_state`), returning the cycle's result dict either way.
    """
    cfg = config or CycleConfig()
    tag_run()
    progress = StepProgress(
        artifact_key("update-cycle-progress"), total=8, description="update cycle: steps done"
    )

    def on_step(event: CycleEvent) -> None:
        if event.step == CycleStep.START:
            name_run(f"generation {event.generation}")
        progress.step(event.message)

    result = run_cycle(Lineage(), cfg, on_step, run_step=as_task, log=get_run_logger())
    if result.get("skipped"):
        message, since = result["message"], result["generation"]
        rejected = f"skipped: generation {since} rejected on this snapshot"
        name_run(rejected if "rejected" in message else message)  # else: no new data since
        publish_skip_task(message)
    else:
        publish_task(result["generation"], result["backfill"], result["retired"])
        progress.step("published")
    return final_state(result)

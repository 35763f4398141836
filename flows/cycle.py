"""One update cycle as a Prefect flow: snapshot -> constraints -> train -> evaluate -> gate
-> promote -> backfill -> retire -> publish. Tasks are thin wrappers over plain functions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import chain
from flows.config import CycleConfig
from flows.gate import decide
from flows.progress import StepProgress
from store.gallery import Gallery, GalleryRows
from store.lineage import Generation, Lineage
from store.settings import StoreError, subdir
from workers.backfill import run_backfill
from workers.datasets import Dataset, load_dataset, parse_spec
from workers.evaluate import evaluate_against_ancestors, generation_outputs
from workers.runtime import run_on_ray, task_resources
from workers.scenario import Stage, stage_indices, stage_plan
from workers.train import ConstraintSpec, TrainSpec, train_generation


@dataclass
class CycleState:
    """What one cycle carries from step to step."""

    dataset: Dataset
    stage: Stage
    generation: Generation
    train_idx: np.ndarray
    active: list[int]
    result: dict[str, Any] = field(default_factory=dict)
    promoted: bool = False
    reasons: list[str] = field(default_factory=list)


def resolve_dataset(lineage: Lineage, spec: str | None) -> Dataset:
    """The cycle's data set: the given spec, else the one the gallery indexes."""
    info = lineage.gallery_info()
    if spec is None:
        if info is None:
            raise StoreError("no data set: pass --dataset (the gallery is empty)")
        spec = info.dataset
    parse_spec(spec)  # a clear error before anything is loaded or stored
    ds = load_dataset(spec)
    if info is not None and info.dataset != ds.spec:
        raise StoreError(
            f"the gallery in this GRACEFUL_HOME indexes {info.dataset!r}; "
            f"use another GRACEFUL_HOME for {ds.spec!r}"
        )
    return ds


def start_cycle(lineage: Lineage, cfg: CycleConfig) -> CycleState:
    """Steps 1-2: snapshot this stage's training data, resolve the active constraints."""
    ds = resolve_dataset(lineage, cfg.dataset)
    existing = [g for g in lineage.generations() if g.status != "failed"]
    index = cfg.stage if cfg.stage is not None else len(existing)
    stage = stage_plan(ds.num_classes, cfg.stages, min(index, cfg.stages - 1))
    train_idx = stage_indices(ds.y_train, stage, seed=0)
    active = chain.active_generations(lineage)
    t = cfg.train
    planned = chain.plan_constraints(
        active, t.method, t.against, t.influence_weight, t.focal_weight
    )
    gen = lineage.start_generation(
        planned,
        dataset=ds.spec,
        stage=stage.index,
        architecture=t.architecture or stage.architecture,
        embed_dim=t.embed_dim,
        classes=list(stage.classes),
        train_samples=len(train_idx),
        epochs=t.epochs,
        seed=t.seed,
        method=t.method,
    )
    snap = subdir("snapshots") / f"gen-{gen.id}-train-idx.npy"
    np.save(snap, train_idx)
    return CycleState(ds, stage, gen, train_idx, active)


def train_step(lineage: Lineage, state: CycleState, cfg: CycleConfig) -> dict[str, Any]:
    """Step 3: train on a Ray worker; a failure marks the generation failed."""
    gen, t = state.generation, cfg.train
    by_id = {g.id: g for g in lineage.generations()}
    constraints = [
        ConstraintSpec(
            c.target_id,
            c.kind,
            c.weight,
            by_id[c.target_id].checkpoint_path,
            by_id[c.target_id].checkpoint_sha256,
            list(by_id[c.target_id].classes),
        )
        for c in lineage.constraints(gen.id)
    ]
    spec = TrainSpec(
        generation=int(gen.id),
        x=state.dataset.x_train[state.train_idx],
        y=state.dataset.y_train[state.train_idx],
        num_classes=state.dataset.num_classes,
        classes=list(state.stage.classes),
        architecture=gen.architecture,
        embed_dim=t.embed_dim,
        epochs=t.epochs,
        batch_size=t.batch_size,
        lr=t.lr,
        seed=t.seed,
        constraints=constraints,
        focal_alpha=t.focal_alpha,
        focal_beta=t.focal_beta,
        focal_temperature=t.focal_temperature,
        checkpoint_dir=str(subdir("checkpoints")),
        threads=int(task_resources().get("num_cpus", 1)),
    )
    try:
        result = run_on_ray(train_generation, spec)
    except Exception as exc:
        cause = getattr(exc, "cause", None) or exc  # Ray wraps the task's exception
        lineage.update_generation(gen.id, status="failed", error=str(cause)[:2000])
        raise RuntimeError(f"training generation {gen.id} failed: {cause}") from exc
    state.generation = lineage.update_generation(
        gen.id,
        status="trained",
        checkpoint_path=result["checkpoint"],
        checkpoint_sha256=result["sha256"],
        train_seconds=result["train_seconds"],
    )
    state.result = result
    return result


def evaluate_step(lineage: Lineage, state: CycleState) -> dict[tuple[int, int, str], float]:
    """Step 4: every metric against every earlier generation, stored in the lineage."""
    gen = state.generation
    rows = evaluate_against_ancestors(
        gen, chain.ancestors_of(lineage, gen.id), state.active, state.dataset, subdir("cache")
    )
    lineage.record_metrics(rows)
    acc = next(v for a, b, m, v in rows if m == "accuracy")
    state.generation = lineage.update_generation(gen.id, accuracy=acc)
    return {(a, b, m): v for a, b, m, v in rows}


def gate_step(
    lineage: Lineage,
    state: CycleState,
    metrics: dict[tuple[int, int, str], float],
    cfg: CycleConfig,
) -> bool:
    """Step 5: the promotion decision and its reasons, stored on the generation."""
    g = state.generation.id
    champion = lineage.champion()
    own = {(a, b): v for (a, b, m), v in lineage_pairs(lineage, "compat_top1").items()}
    compat = {k: (metrics[(g, k, "compat_top1")], own[(k, k)]) for k in state.active}
    nfr = {k: metrics[(g, k, "nfr")] for k in state.active}
    passed, reasons = decide(
        metrics[(g, g, "accuracy")], champion.accuracy if champion else None, compat, nfr, cfg.gate
    )
    state.reasons = reasons
    state.generation = lineage.update_generation(
        g, gate_passed=passed, gate_reasons=reasons, status="trained" if passed else "rejected"
    )
    return passed


def lineage_pairs(lineage: Lineage, metric: str) -> dict[tuple[int, int, str], float]:
    return {(a, b, metric): v for a, b, v in lineage.metric(metric)}


def backfill_step(lineage: Lineage, state: CycleState, cfg: CycleConfig) -> dict[str, Any]:
    """Step 7: the first generation indexes the gallery; later ones backfill within budget."""
    gallery = Gallery(lineage)
    champion = lineage.champion()
    assert champion is not None
    out = generation_outputs(champion, state.dataset, subdir("cache"))
    qy = state.dataset.y_test[out.query_idx]
    if not gallery.exists():
        rows = GalleryRows(
            item_id=out.gallery_idx.astype(np.int64),
            label=state.dataset.y_test[out.gallery_idx],
            generation=np.full(len(out.gallery_idx), champion.id, np.int32),
            margin=out.outputs.margin[out.gallery_idx],
            embedding=out.gallery_emb,
        )
        gallery.create(state.dataset.spec, rows, part_rows=cfg.backfill.batch_rows)
        from workers.backfill import m_mix

        value = m_mix(out.query_emb, qy, gallery.read_all())
        lineage.record_metrics([(champion.id, champion.id, "m_mix", value)])
        return {"indexed": len(rows), "m_mix": value}
    b = cfg.backfill
    job = run_backfill(
        lineage,
        gallery,
        state.dataset,
        champion,
        b.policy,
        b.budget,
        seed=b.seed,
        query_emb=out.query_emb,
        query_labels=qy,
        champion_gallery_emb=out.gallery_emb if b.curve else None,
    )
    lineage.record_metrics([(champion.id, champion.id, "m_mix", job.m_mix_after)])
    return {"job": job.id, "items": job.items_done, "m_mix": job.m_mix_after}


# -- Prefect -------------------------------------------------------------------------------
@task(name="snapshot-and-constraints", cache_policy=NO_CACHE)
def start_task(cfg: CycleConfig) -> CycleState:
    return start_cycle(Lineage(), cfg)


@task(name="train-on-ray", cache_policy=NO_CACHE)
def train_task(state: CycleState, cfg: CycleConfig) -> dict[str, Any]:
    return train_step(Lineage(), state, cfg)


@task(name="evaluate-against-ancestors", cache_policy=NO_CACHE)
def evaluate_task(state: CycleState) -> dict:
    return evaluate_step(Lineage(), state)


@task(name="gate", cache_policy=NO_CACHE)
def gate_task(state: CycleState, metrics: dict, cfg: CycleConfig) -> bool:
    return gate_step(Lineage(), state, metrics, cfg)


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(state: CycleState) -> None:
    Lineage().promote(state.generation.id)


@task(name="backfill", cache_policy=NO_CACHE)
def backfill_task(state: CycleState, cfg: CycleConfig) -> dict:
    return backfill_step(Lineage(), state, cfg)


@task(name="retire-constraints", cache_policy=NO_CACHE)
def retire_task() -> list:
    return chain.retire_unused(Lineage())


@task(name="publish", cache_policy=NO_CACHE)
def publish_task(state: CycleState) -> None:
    from flows.publish import publish_cycle

    publish_cycle(Lineage(), state.generation.id)


@flow(name="update-cycle", log_prints=True)
def update_cycle(config: CycleConfig | None = None) -> dict[str, Any]:
    """Train the next generation under the accumulated constraints and roll it out."""
    cfg = config or CycleConfig()
    log = get_run_logger()
    progress = StepProgress("update-cycle-progress", total=8)
    state = start_task(cfg)
    log.info(
        "generation %s: stage %s, %d training items, constraints against %s",
        state.generation.id,
        state.stage.index,
        len(state.train_idx),
        state.active or "nothing",
    )
    progress.step(
        f"generation {state.generation.id}: stage {state.stage.index}, "
        f"{len(state.active)} active ancestors"
    )
    train_task(state, cfg)
    progress.step("trained")
    metrics = evaluate_task(state)
    progress.step("evaluated")
    passed = gate_task(state, metrics, cfg)
    log.info("gate %s: %s", "passed" if passed else "REJECTED", "; ".join(state.reasons))
    progress.step("gate: " + ("passed" if passed else "rejected"))
    backfill: dict[str, Any] = {}
    if passed:
        promote_task(state)
        progress.step("promoted")
        backfill = backfill_task(state, cfg)
        progress.step("backfilled")
    else:
        progress.step("not promoted")
        progress.step("no backfill")
    if backfill:
        log.info("backfill: %s", backfill)
    retired = retire_task()
    for gen_id, reason in retired:
        log.info("retired generation %s from the constraint chain: %s", gen_id, reason)
    progress.step(f"retired {len(retired)}")
    publish_task(state)
    progress.step("published")
    g = state.generation
    log.info("generation %s: accuracy %.4f, %s", g.id, g.accuracy or 0.0, "; ".join(state.reasons))
    return {
        "generation": g.id,
        "accuracy": g.accuracy,
        "promoted": passed,
        "reasons": state.reasons,
        "backfill": backfill,
        "retired": retired,
    }

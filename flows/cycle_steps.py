"""The update cycle's steps as plain functions: plan (snapshot) -> start (generation and
its constraints) -> train (Ray) -> evaluate (against every ancestor) -> gate -> promote ->
backfill. :func:`flows.cycle.run_cycle` runs them in order; tests call them one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from flows import chain, targeted
from flows.backfill import backfill_once
from flows.collection import index_reference
from flows.config import CycleConfig
from flows.data import (
    class_vocabulary,
    evaluation_set,
    lineage_image_size,
    lineage_source,
    training_items,
)
from flows.gate import FirstEvidence, GateOutcome, decide, evidence_rows
from flows.steps import Step
from store.backfill_jobs import close_interrupted_jobs
from store.collection import Collection
from store.failpoints import failpoint
from store.files import verify_checkpoint
from store.lineage import Generation, GenerationStatus, Lineage, SnapshotRecord
from store.settings import StoreError, subdir
from store.snapshots import (
    cycle_config_path,
    eval_items_path,
    keys_path,
    save_generation_inputs,
    write_once,
)
from workers.collection.items import is_reference
from workers.data.datasets import Dataset
from workers.data.scenario import Stage
from workers.data.snapshot import Snapshot, take_snapshot
from workers.data.source import Position, open_source, reference_spec
from workers.data.sources import SourceError, describe_change
from workers.learning.models import EmbeddingNet
from workers.learning.spec import ConstraintSpec, SourceItems
from workers.learning.train import train_generation
from workers.measuring.evaluate import Evaluation, evaluate_against_ancestors
from workers.runtime import run_placed, task_resources, train_resources


@dataclass
class CycleState:
    """What one cycle carries from step to step."""

    dataset: Dataset  # the evaluation set
    stage: Stage
    generation: Generation
    source: SourceItems  # the snapshot, as the trainer streams it
    capacity: int  # head rows (the lineage reserves them up front)
    active: list[int]
    config: CycleConfig  # the one its generation trains under (a resumed one: its own)
    champion: int | None  # the champion when the cycle began: the gate compares against it
    step: Step = Step.TRAIN
    result: dict[str, Any] = field(default_factory=dict)
    promoted: bool = False
    reasons: list[str] = field(default_factory=list)
    resumed: str | None = None  # how an interrupted cycle was picked up, if it was


def verify_inputs(lineage: Lineage, generations: list[int]) -> None:
    """The checkpoints a cycle reads (champion, ancestors) match the lineage, before work."""
    by_id = {g.id: g for g in lineage.generations()}
    for gen_id in generations:
        gen = by_id[gen_id]
        verify_checkpoint(gen.checkpoint_path, gen.checkpoint_sha256, f"generation {gen_id}")


@dataclass
class CyclePlan:
    """Step 1: the next cycle's training data, before anything is recorded."""

    dataset: Dataset  # the evaluation set
    stage: Stage
    snapshot: Snapshot
    source: SourceItems
    capacity: int
    eval_changed: bool = False  # the evaluation set changed and is to be re-evaluated on


def plan_cycle(lineage: Lineage, cfg: CycleConfig) -> CyclePlan:
    """The next snapshot of the lineage's source (workers.data.source); new classes get
    the next free head rows. Refuses an evaluation set other than the one the lineage's
    first generation had, or with ``reevaluate`` marks it to be re-evaluated on."""
    plan = plan_snapshot(lineage, cfg)
    snap = plan.snapshot
    first = next((r for _, r in sorted(lineage.snapshots().items())), None)
    if first is None or first.eval_fingerprint == snap.eval_fingerprint:
        return plan
    if cfg.reevaluate:
        plan.eval_changed = True
        return plan
    what = f"fingerprint {first.eval_fingerprint[:12]} -> {snap.eval_fingerprint[:12]}"
    old = eval_items_path(first.eval_fingerprint)
    if snap.eval_items is not None and old.exists():
        what = describe_change(pq.read_table(old), snap.eval_items)
    raise StoreError(
        f"the evaluation set of {snap.source!r} changed since generation "
        f"{first.generation_id}: {what}; every generation here was measured on the old one: "
        "restore it, or pass --reevaluate to measure every kept generation on the new one"
    )


def reevaluate(lineage: Lineage, plan: CyclePlan, part_rows: int = 4096) -> list[int]:
    """Measure every kept generation again on the plan's (new) evaluation set.

    Every metric against every ancestor is recomputed and replaces the old value; the
    snapshots' evaluation fingerprint moves to the new set; a collection that is the
    evaluation set's reference half is indexed again by the champion (a user's own
    collection does not change). Returns the generations measured.
    """
    for stale in subdir("cache").glob("eval-*.npz"):  # outputs on the old set
        stale.unlink(missing_ok=True)
    kept = [g for g in lineage.generations() if g.status in chain.EVALUATED and g.checkpoint_path]
    for gen in kept:
        active = sorted({c.target_id for c in lineage.constraints(gen.id)})
        ancestors = chain.ancestors_of(lineage, int(gen.id))  # type: ignore[arg-type]
        ev = evaluate_against_ancestors(gen, ancestors, active, plan.dataset, subdir("cache"))
        lineage.record_metrics(ev.rows)
        lineage.update_generation(gen.id, accuracy=ev.accuracy)
    if plan.snapshot.eval_items is not None:
        write_once(eval_items_path(plan.snapshot.eval_fingerprint), plan.snapshot.eval_items)
    lineage.set_eval_fingerprint(plan.snapshot.eval_fingerprint)
    collection = Collection(lineage)
    champion = lineage.champion()
    info = collection.info()
    if info is not None and is_reference(info.dataset):
        close_interrupted_jobs(lineage, keep=None, why="the evaluation set changed")
        collection.drop()
        if champion is not None:
            index_reference(lineage, info.dataset, champion, part_rows)
    return [int(g.id) for g in kept]  # type: ignore[arg-type]


def previous_items(last: SnapshotRecord | None) -> pa.Table | None:
    """The last snapshot's items, whose files' sizes and times spare re-hashing them."""
    path = last.keys_path if last is not None else None
    if not path or not Path(path).exists():
        return None
    wanted = ["key", "size", "mtime_ns", "sha256"]
    return (
        pq.read_table(path, columns=wanted)
        if set(wanted) <= set(pq.read_schema(path).names)
        else None
    )


def plan_snapshot(lineage: Lineage, cfg: CycleConfig) -> CyclePlan:
    """The source's training items now, recorded nowhere yet."""
    source = lineage_source(lineage, cfg.dataset, cfg.stages)
    t = cfg.train
    size = lineage_image_size(lineage, t.image_size)
    ev = evaluation_set(lineage, source, size)
    snapshots = lineage.snapshots()
    last = snapshots[max(snapshots)] if snapshots else None
    existing = [g for g in lineage.generations() if g.status != GenerationStatus.FAILED]
    recorded = [r.stages for _, r in sorted(snapshots.items()) if r.stages]
    kinds = [g.architecture.get("kind") for g in existing if g.architecture]  # newest last
    at = Position(
        index=cfg.stage if cfg.stage is not None else len(existing),
        stages=cfg.stages or (recorded[-1] if recorded else None),
        # a new lineage asked for a kind (train.architecture) starts that kind's schedule
        backbone=(kinds or [None])[-1] or (t.architecture or {}).get("kind"),
        previous=previous_items(last),
        image_size=size,
    )
    draw = source.draw(at, ev.input_format.shape)
    if draw.scan.skipped and cfg.strict:
        first = draw.scan.skipped[0]
        raise SourceError(
            f"{len(draw.scan.skipped)} unreadable item(s) in {source.spec} (first: "
            f"{first['key']}: {first['reason']}); fix or remove them, or run without --strict "
            "to skip them"
        )
    counts = draw.scan.class_counts()
    names = set(counts) | set(ev.labels)
    capacity = (last.capacity if last is not None else None) or source.capacity(
        len(names), t.class_capacity, t.embed_dim
    )
    # earlier classes keep their rows; new ones take the next free rows, in source order
    vocab = lineage.extend_vocabulary(source.class_order(names), capacity)
    stage = Stage(draw.stage, tuple(sorted(vocab[n] for n in counts)), 1.0, draw.architecture)
    snap = take_snapshot(draw, ev, vocab)
    items = training_items(source, ev, vocab, snap.fingerprint)  # keys saved by start_cycle
    return CyclePlan(ev.dataset(source.spec, vocab), stage, snap, items, capacity)


def unchanged_since(lineage: Lineage, plan: CyclePlan) -> int | None:
    """The champion, if it trained on exactly this snapshot (then a cycle has nothing new)."""
    champion = lineage.champion()
    if champion is None:
        return None
    record = lineage.snapshots().get(int(champion.id))  # type: ignore[arg-type]
    if record is not None and record.fingerprint == plan.snapshot.fingerprint:
        return int(champion.id)  # type: ignore[arg-type]
    return None


def rejected_before(lineage: Lineage, plan: CyclePlan, cfg: CycleConfig) -> tuple[int, str] | None:
    """A generation already trained and rejected on exactly this snapshot, under the same
    training and gate configuration, against the same champion and (where it was
    constrained) the same ancestors, so a new one would repeat it; with the reason it
    failed. None when there is none."""
    active = sorted(chain.active_generations(lineage))
    snapshots = lineage.snapshots()
    champion = lineage.champion()
    for gen in reversed(lineage.generations()):
        if champion is not None and champion.id > gen.id:  # type: ignore[operator]
            break  # a newer champion since: the update would be judged against it
        record = snapshots.get(int(gen.id))  # type: ignore[arg-type]
        path = cycle_config_path(int(gen.id))  # type: ignore[arg-type]
        if (
            gen.status != GenerationStatus.REJECTED
            or record is None
            or record.fingerprint != plan.snapshot.fingerprint
            or not path.exists()
        ):
            continue
        old = CycleConfig.model_validate_json(path.read_text())
        targets = sorted({c.target_id for c in lineage.constraints(gen.id)})
        if old.train == cfg.train and old.gate == cfg.gate and (not targets or targets == active):
            fails = [r.removeprefix("FAIL ") for r in gen.gate_reasons or [] if "FAIL" in r]
            return int(gen.id), "; ".join(fails) or "rejected"  # type: ignore[arg-type]
    return None


def start_cycle(lineage: Lineage, cfg: CycleConfig, plan: CyclePlan | None = None) -> CycleState:
    """Steps 1-2: record the snapshot and the generation with its active constraints."""
    plan = plan or plan_cycle(lineage, cfg)
    ds, stage, snap = plan.dataset, plan.stage, plan.snapshot
    cfg = cfg.model_copy(update={"stages": snap.stages})  # what a resumed cycle must reuse
    champion = lineage.champion()
    active = chain.active_generations(lineage)
    verify_inputs(lineage, active)  # a swapped file fails here, before anything is recorded
    t = cfg.train
    planned = chain.plan_constraints(active, t.method, t.against, t.weights, t.ancestor_weights)
    keys_file = keys_path(snap.fingerprint)  # the snapshot's items, named by its fingerprint
    write_once(keys_file, snap.table)
    if snap.eval_items is not None:
        write_once(eval_items_path(snap.eval_fingerprint), snap.eval_items)
    plan.source.keys_path = str(keys_file)
    architecture = dict(stage.architecture) | (t.architecture or {})
    size = lineage_image_size(lineage, t.image_size)
    if size:
        architecture["image_size"] = size
    # a model that cannot be built (a factory that does not import or maps inputs to the
    # wrong shape) is refused here, before anything is recorded
    EmbeddingNet(ds.input_shape, plan.capacity, t.embed_dim, architecture)
    gen = lineage.start_generation(
        planned,
        snapshot={
            "source": snap.source,
            "stage": snap.stage,
            "stages": snap.stages,
            "items": snap.items,
            "classes": snap.classes,
            "fingerprint": snap.fingerprint,
            "eval_fingerprint": snap.eval_fingerprint,
            "keys_path": str(keys_file),
            "capacity": plan.capacity,
            "skipped": snap.skipped,
        },
        dataset=ds.spec,
        stage=stage.index,
        architecture=architecture,
        embed_dim=t.embed_dim,
        classes=list(stage.classes),
        train_samples=snap.items,
        epochs=t.epochs,
        seed=t.seed,
        method=t.method.value,
    )
    save_snapshot(int(gen.id), cfg)  # type: ignore[arg-type]
    champion_id = champion.id if champion else None
    return CycleState(ds, stage, gen, plan.source, plan.capacity, active, cfg, champion_id)


def save_snapshot(gen_id: int, cfg: CycleConfig) -> None:
    """The config the generation trains under (store.snapshots)."""
    save_generation_inputs(gen_id, cfg.model_dump_json(indent=1))


def train_step(
    lineage: Lineage, state: CycleState, cfg: CycleConfig | None = None
) -> dict[str, Any]:
    """Step 3: train on a Ray worker (``train.workers`` > 1: that many, with Ray Train); a
    failure marks the generation failed.

    An interrupted training of this generation continues from its resume file.
    """
    gen, t = state.generation, (cfg or state.config).train
    by_id = {g.id: g for g in lineage.generations()}
    constraints = [  # c.kind a name: check_spec turns it into the enum
        ConstraintSpec(
            c.target_id, c.kind, c.weight, a.checkpoint_path, a.checkpoint_sha256, list(a.classes)
        )
        for c in lineage.constraints(gen.id)
        for a in [by_id[c.target_id]]
    ]
    custom = train_resources()  # GRACEFUL_TRAIN_RESOURCES: the nodes it may train on
    spec = t.train_spec(
        int(gen.id),  # type: ignore[arg-type]
        x=None,
        y=None,
        source=state.source,
        num_classes=state.capacity,
        classes=list(state.stage.classes),
        architecture=gen.architecture,
        constraints=constraints,
        dataset=state.dataset.spec,
        checkpoint_dir=str(subdir("checkpoints")),
        threads=int(task_resources(custom).get("num_cpus", 1)),
    )
    failpoint("train")  # the kill tests stop here: recorded, no epoch trained yet
    try:
        if spec.workers > 1:  # Ray Train places the workers itself, from this driver
            from workers.learning.train import train_distributed

            placed = train_distributed(spec, custom)
        else:
            placed = run_placed(train_generation, (spec,), custom=custom)
    except Exception as exc:
        cause = getattr(exc, "cause", None) or exc  # Ray wraps the task's exception
        lineage.update_generation(gen.id, status=GenerationStatus.FAILED, error=str(cause)[:2000])
        raise RuntimeError(f"training generation {gen.id} failed: {cause}") from exc
    result = dict(placed.value, ray_node=placed.node_id, ray_node_ip=placed.node_ip)
    state.generation = lineage.update_generation(
        gen.id,
        status=GenerationStatus.TRAINED,
        checkpoint_path=result["checkpoint"],
        checkpoint_sha256=result["sha256"],
        train_seconds=result["train_seconds"],
    )
    state.result = result
    return result


def evaluate_step(lineage: Lineage, state: CycleState) -> Evaluation:
    """Step 4: every metric against every earlier generation, stored in the lineage; the
    typed evidence goes on to the gate."""
    gen = state.generation
    ev = evaluate_against_ancestors(
        gen, chain.ancestors_of(lineage, gen.id), state.active, state.dataset, subdir("cache")
    )
    lineage.record_metrics(ev.rows)
    failpoint("evaluate")  # the kill tests stop here: metrics stored, not yet gated
    state.generation = lineage.update_generation(gen.id, accuracy=ev.accuracy)
    return ev


def gate_step(lineage: Lineage, state: CycleState, ev: Evaluation, cfg: CycleConfig) -> bool:
    """Step 5: the promotion decision and its reasons, stored on the generation.

    The gate decides on the evaluation's paired evidence (counts per ancestor) and
    records the intervals it used, at its own confidence, as metric rows.
    """
    g = ev.generation
    champion = lineage.generation(state.champion) if state.champion is not None else None
    compat = {k: (ev.pairs[k].compat, ev.pairs[k].own) for k in state.active}
    nfr = {k: ev.pairs[k].nfr for k in state.active}
    ecc_counts = {k: p.queries for k, p in ev.pairs.items()}  # the paired per-case evidence
    flip_counts = {k: p.items for k, p in ev.pairs.items()}
    groups = {k: p.groups for k, p in ev.pairs.items() if p.groups is not None}
    pinned = {int(x.id) for x in lineage.generations() if x.pinned}  # type: ignore[arg-type]
    passed, reasons, owed = decide(
        ev.accuracy,
        champion.accuracy if champion else None,
        compat,
        nfr,
        cfg.gate,
        ecc_counts=ecc_counts,
        flip_counts=flip_counts,
        ecc_groups=groups,
        pinned=pinned,
        first=FirstEvidence(ev.hits, ev.items, ev.chance) if ev.items else None,
    )
    if cfg.gate.enabled:  # the intervals at the gate's level, as the reasons quote them
        lineage.record_metrics(evidence_rows(g, ecc_counts, flip_counts, cfg.gate))
    outcome = GateOutcome.PROMOTE if passed else GateOutcome.REJECT
    served = None
    if passed and cfg.gate.enabled and champion is not None:  # what users will meet
        names = {i: n for n, i in class_vocabulary(lineage, state.dataset).items()}
        judged = targeted.judge(
            lineage,
            state.dataset,
            state.generation,
            champion,
            cfg.gate,
            num_classes=state.capacity,
            cache_dir=subdir("cache"),
            pinned=pinned,
            owed_full=owed,
            names=names,
        )
        outcome, passed = judged.outcome, judged.outcome != GateOutcome.REJECT
        reasons = reasons + judged.reasons
        if not passed:  # a deferred ECC failure is a failure again
            reasons = [
                "FAIL " + r.removeprefix("TARGETED ") if r.startswith("TARGETED ") else r
                for r in reasons
            ]
        # recorded before promotion: a kill after it still leaves the debt on record
        lineage.record_metrics(targeted.record(g, judged))
        served = targeted.served_rows(judged.plan, names)
    if passed:
        lineage.record_metrics([(g, k, chain.OWED, 1.0) for k in owed])
    state.reasons = reasons
    state.generation = lineage.update_generation(
        g,
        gate_passed=passed,
        gate_reasons=reasons,
        gate_outcome=outcome.value,
        gate_served=served,
        status=GenerationStatus.TRAINED if passed else GenerationStatus.REJECTED,
    )
    return passed


def promote_step(lineage: Lineage, state: CycleState) -> None:
    """Step 6: move the champion alias, if it is still the one the gate compared against."""
    failpoint("promote")  # the kill tests stop here: gated, not yet promoted
    lineage.promote(int(state.generation.id), expected_champion=state.champion)  # type: ignore[arg-type]
    state.generation = lineage.generation(int(state.generation.id))  # type: ignore[arg-type]
    state.promoted = True


def backfill_step(
    lineage: Lineage, state: CycleState, cfg: CycleConfig | None = None
) -> dict[str, Any]:
    """Step 7: backfill the collection within budget (the backfill flow's own function,
    :func:`flows.backfill.backfill_once`).

    A source whose evaluation reference half is the lineage's collection (the
    scenario's) has it indexed by its first champion (:func:`flows.collection.index_reference`),
    and later ones backfill it with M_mix measured. A user's collection is their own
    (``graceful index``): a cycle before it exists backfills nothing.
    """
    cfg = cfg or state.config
    champion = lineage.champion()
    assert champion is not None
    if Collection(lineage).info() is None:
        source = open_source(state.source.spec, state.source.kind)
        if not source.reference_collection:
            return {"collection": None}  # nothing indexed yet: `graceful index SPEC`
        return index_reference(lineage, reference_spec(source), champion, cfg.backfill.batch_rows)
    return backfill_once(lineage, cfg.backfill)

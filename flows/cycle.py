"""One update cycle as a Prefect flow: snapshot -> constraints -> train -> evaluate -> gate
-> promote -> backfill -> retire -> publish. Tasks are thin wrappers over plain functions.

A cycle holds the lineage's cycle lock from start to end (store.locks): a second cycle
waits for it, or refuses with ``wait_for_lock=False``. So when a cycle starts, any
generation still mid-cycle was interrupted (a kill, a crash): flows.recovery continues it
from the step it reached, or closes it as failed, before anything new is trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import chain, targeted, text
from flows.config import CycleConfig
from flows.gate import (
    FirstEvidence,
    GateOutcome,
    backfill_owed,
    counts_from_metrics,
    decide,
    evidence_rows,
    groups_from_metrics,
)
from flows.naming import artifact_key, cycle_run_name, name_run
from flows.progress import StepProgress
from flows.steps import Step
from store.failpoints import failpoint
from store.files import verify_checkpoint
from store.gallery import Gallery, GalleryRows
from store.lineage import Generation, GenerationStatus, Lineage
from store.locks import CYCLE_LOCK
from store.settings import StoreError, subdir
from workers.backfill import close_interrupted_jobs, run_backfill
from workers.datasets import Dataset, load_dataset, parse_spec
from workers.evaluate import evaluate_against_ancestors, generation_outputs
from workers.models import EmbeddingNet
from workers.runtime import join_cluster, run_placed, task_resources, train_resources
from workers.scenario import Stage, default_architecture, stage_indices, stage_plan
from workers.snapshot import Snapshot, scenario_snapshot, source_snapshot
from workers.sources import SourceError, describe_change, is_source, load_eval, scan_source
from workers.train import ConstraintSpec, SourceItems, train_generation


@dataclass
class CycleState:
    """What one cycle carries from step to step."""

    dataset: Dataset  # the scenario's data set, or a source's evaluation set
    stage: Stage
    generation: Generation
    train_idx: np.ndarray | None  # the scenario's training rows; None for a source
    active: list[int]
    config: CycleConfig  # the one its generation trains under (a resumed one: its own)
    champion: int | None  # the champion when the cycle began: the gate compares against it
    step: Step = Step.TRAIN
    result: dict[str, Any] = field(default_factory=dict)
    promoted: bool = False
    reasons: list[str] = field(default_factory=list)
    resumed: str | None = None  # how an interrupted cycle was picked up, if it was
    source: SourceItems | None = None  # a source's snapshot, streamed by the trainer
    capacity: int | None = None  # head rows (a source's lineage reserves them up front)

    @property
    def train_items(self) -> int:
        return int(self.generation.train_samples or 0)


def last_snapshot(lineage: Lineage):
    """The newest generation's snapshot record, or None."""
    snapshots = lineage.snapshots()
    return snapshots[max(snapshots)] if snapshots else None


def source_mode(lineage: Lineage, spec: str | None, stages: int | None = None) -> bool:
    """Whether cycles here train on a source's snapshots (not the scenario's stages).

    A lineage keeps the mode it started with; a new one trains on a source when given an
    image folder or Parquet source and no scenario stage count.
    """
    last = last_snapshot(lineage)
    if last is not None:
        return last.stages is None and is_source(last.source)
    if lineage.generations():
        return False  # made before snapshots: the scenario
    return stages is None and is_source(spec)


def scenario_gallery(lineage: Lineage):
    """The collection's info when it is the scenario's evaluation gallery, else None."""
    info = lineage.gallery_info()
    return info if info is not None and info.scenario else None


def resolve_spec(lineage: Lineage, spec: str | None) -> str:
    """The cycle's data: the given spec, else the scenario gallery's, else the last
    snapshot's (a user's collection is not training data)."""
    info = scenario_gallery(lineage)
    if spec is None:
        last = last_snapshot(lineage)
        if info is not None:
            spec = info.dataset
        elif last is not None:
            spec = last.source
        else:
            raise StoreError("no data set: pass --dataset (this lineage has trained nothing)")
    parse_spec(spec)  # a clear error before anything is loaded or stored
    return spec


class LineageOptionError(StoreError):
    """An option that contradicts what the lineage recorded: bad input (exit 2)."""


def lineage_image_size(lineage: Lineage, asked: int | None = None) -> int | None:
    """The image size a lineage's generations take (recorded with the first generation
    that was given one), or ``asked`` for a lineage that has none yet; refuses another."""
    recorded = next(
        (
            int(g.architecture["image_size"])
            for g in lineage.generations()
            if g.architecture and g.architecture.get("image_size")
        ),
        None,
    )
    if recorded is not None and asked is not None and asked != recorded:
        raise LineageOptionError(
            f"image_size {asked} differs from this lineage's {recorded}: every generation "
            "here embeds images of that size; keep it, or start a new GRACEFUL_HOME"
        )
    if recorded is None and asked is not None and lineage.generations():
        raise LineageOptionError(
            f"image_size {asked}: this lineage's generations take the automatic size; keep "
            "it, or start a new GRACEFUL_HOME"
        )
    return recorded if recorded is not None else asked


def resolve_dataset(
    lineage: Lineage, spec: str | None, stages: int | None = None, image_size: int | None = None
) -> Dataset:
    """The data set a cycle evaluates on: the scenario's, or a source's evaluation set,
    its images at the lineage's size."""
    spec = resolve_spec(lineage, spec)
    size = lineage_image_size(lineage, image_size)
    if source_mode(lineage, spec, stages):
        vocab = lineage.vocabulary()
        ev = load_eval(spec, size)
        missing = sorted(set(ev.labels) - set(vocab))
        if missing:
            raise StoreError(
                f"the evaluation set of {spec!r} has classes this lineage never saw "
                f"({', '.join(missing[:5])}): it changed; restore it"
            )
        ds = ev.dataset(spec, vocab)
    else:
        ds = load_dataset(spec, size)
    info = scenario_gallery(lineage)
    if info is not None and info.dataset != ds.spec:
        raise StoreError(
            f"the gallery in this GRACEFUL_HOME indexes {info.dataset!r}; "
            f"use another GRACEFUL_HOME for {ds.spec!r}"
        )
    return ds


def eval_dataset(lineage: Lineage) -> Dataset | None:
    """The lineage's evaluation data (the scenario's data set or the source's evaluation
    set), or None before anything trained."""
    try:
        return resolve_dataset(lineage, None)
    except StoreError:
        return None


def cycle_config_path(gen_id: int) -> Path:
    """The config a generation trains under, kept so an interrupted cycle can resume."""
    return subdir("snapshots") / f"gen-{gen_id}-cycle.json"


def train_idx_path(gen_id: int) -> Path:
    return subdir("snapshots") / f"gen-{gen_id}-train-idx.npy"


def verify_inputs(lineage: Lineage, generations: list[int]) -> None:
    """The checkpoints a cycle reads (champion, ancestors) match the lineage, before work."""
    by_id = {g.id: g for g in lineage.generations()}
    for gen_id in generations:
        gen = by_id[gen_id]
        verify_checkpoint(gen.checkpoint_path, gen.checkpoint_sha256, f"generation {gen_id}")


DEFAULT_STAGES = 3  # the scenario's stage count when neither the config nor the lineage says


@dataclass
class CyclePlan:
    """Step 1: the next cycle's training data, before anything is recorded."""

    dataset: Dataset
    stage: Stage
    train_idx: np.ndarray | None
    snapshot: Snapshot
    source: SourceItems | None = None
    capacity: int | None = None
    eval_changed: bool = False  # the evaluation set changed and is to be re-evaluated on


def source_architecture(input_shape: tuple[int, ...]) -> dict:
    """A source's model: the scenario's last-stage one for its inputs (a residual CNN for
    images, the MLP for feature vectors; workers.scenario.default_architecture)."""
    return default_architecture(tuple(input_shape), grow=1.0)


def plan_cycle(lineage: Lineage, cfg: CycleConfig) -> CyclePlan:
    """The next snapshot (a source's, or the scenario's next stage); refuses an
    evaluation set that changed under the lineage."""
    spec = resolve_spec(lineage, cfg.dataset)
    if source_mode(lineage, spec, cfg.stages):
        plan = plan_source(lineage, cfg, spec)
    else:
        plan = plan_scenario(lineage, cfg, spec)
    if cfg.reevaluate:
        plan.eval_changed = eval_set_changed(lineage, plan.snapshot)
    else:
        check_eval_set(lineage, plan.snapshot)
    return plan


def eval_items_path(fingerprint: str) -> Path:
    return subdir("snapshots") / f"eval-{fingerprint[:24]}.parquet"


def eval_set_changed(lineage: Lineage, snap: Snapshot) -> bool:
    first = next((r for _, r in sorted(lineage.snapshots().items())), None)
    return first is not None and first.eval_fingerprint != snap.eval_fingerprint


def check_eval_set(lineage: Lineage, snap: Snapshot) -> None:
    """Refuse an evaluation set other than the one the lineage's first generation had."""
    first = next((r for _, r in sorted(lineage.snapshots().items())), None)
    if first is None or first.eval_fingerprint == snap.eval_fingerprint:
        return
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
    snapshots' evaluation fingerprint moves to the new set; the gallery, which indexes
    the evaluation set's gallery half, is built again by the champion. Returns the
    generations measured.
    """
    ds = plan.dataset
    for stale in subdir("cache").glob("eval-*.npz"):  # outputs on the old set
        stale.unlink(missing_ok=True)
    kept = [g for g in lineage.generations() if g.status in chain.EVALUATED and g.checkpoint_path]
    for gen in kept:
        active = sorted({c.target_id for c in lineage.constraints(gen.id)})
        ancestors = chain.ancestors_of(lineage, int(gen.id))  # type: ignore[arg-type]
        rows = evaluate_against_ancestors(gen, ancestors, active, ds, subdir("cache"))
        lineage.record_metrics(rows)
        acc = next(v for a, b, m, v in rows if m == "accuracy")
        lineage.update_generation(gen.id, accuracy=acc)
    if plan.snapshot.eval_items is not None:
        _write_once(eval_items_path(plan.snapshot.eval_fingerprint), plan.snapshot.eval_items)
    lineage.set_eval_fingerprint(plan.snapshot.eval_fingerprint)
    gallery = Gallery(lineage)
    champion = lineage.champion()
    if scenario_gallery(lineage) is not None:  # a user's collection does not change
        close_interrupted_jobs(lineage, keep=None, why="the evaluation set changed")
        gallery.drop()
        if champion is not None:
            index_gallery(lineage, ds, champion, part_rows)
    return [int(g.id) for g in kept]  # type: ignore[arg-type]


def lineage_kind(existing: list[Generation]) -> str | None:
    """The backbone kind of the newest of ``existing`` generations (None: there is none)."""
    kinds = [g.architecture.get("kind") for g in existing if g.architecture]
    return kinds[-1] if kinds else None


def plan_scenario(lineage: Lineage, cfg: CycleConfig, spec: str) -> CyclePlan:
    """The scenario's next stage over a data set loaded whole."""
    ds = resolve_dataset(lineage, spec, cfg.stages or DEFAULT_STAGES, cfg.train.image_size)
    snapshots = lineage.snapshots()
    known = [r.stages for _, r in sorted(snapshots.items()) if r.stages]
    stages = cfg.stages or (known[-1] if known else DEFAULT_STAGES)
    existing = [g for g in lineage.generations() if g.status != GenerationStatus.FAILED]
    index = cfg.stage if cfg.stage is not None else len(existing)
    # a lineage keeps its backbone kind (a warm start cannot cross kinds): one begun with
    # the MLP on images, before the residual CNN was the default, goes on with the MLP
    shape = ds.input_shape if lineage_kind(existing) in (None, "resnet") else None
    stage = stage_plan(ds.num_classes, stages, min(index, stages - 1), shape)
    train_idx = stage_indices(ds.y_train, stage, seed=0)
    return CyclePlan(ds, stage, train_idx, scenario_snapshot(ds, stage, stages, train_idx))


def class_capacity(lineage: Lineage, cfg: CycleConfig, n_classes: int) -> int:
    """Head rows of a source's lineage: fixed by its first snapshot, room to grow."""
    last = last_snapshot(lineage)
    if last is not None and last.capacity:
        return int(last.capacity)
    return cfg.train.class_capacity or max(cfg.train.embed_dim, 2 * n_classes)


def plan_source(lineage: Lineage, cfg: CycleConfig, spec: str) -> CyclePlan:
    """A snapshot of the source as it is now; new classes get the next free head rows."""
    last = last_snapshot(lineage)
    previous = None
    known_files = last.keys_path if last is not None and spec.startswith("imagefolder") else None
    if known_files and Path(known_files).exists():  # spares re-hashing unchanged files
        previous = pq.read_table(known_files, columns=["key", "size", "mtime_ns", "sha256"])
    scan = scan_source(spec, previous)
    if scan.skipped and cfg.strict:
        first = scan.skipped[0]
        raise SourceError(
            f"{len(scan.skipped)} unreadable item(s) in {spec} (first: {first['key']}: "
            f"{first['reason']}); fix or remove them, or run without --strict to skip them"
        )
    ev = load_eval(spec, lineage_image_size(lineage, cfg.train.image_size))
    counts = scan.class_counts()
    names = sorted(set(counts) | set(ev.labels))
    capacity = class_capacity(lineage, cfg, len(names))
    known = lineage.vocabulary()
    vocab = lineage.extend_vocabulary(
        sorted(set(names) - set(known)), capacity
    )  # earlier classes keep their rows
    existing = [g for g in lineage.generations() if g.status != GenerationStatus.FAILED]
    trained = tuple(sorted(vocab[n] for n in counts))
    architecture = source_architecture(ev.input_format.shape)
    if lineage_kind(existing) not in (None, architecture["kind"]):
        architecture = dict(existing[-1].architecture)  # the lineage keeps its backbone
    stage = Stage(len(existing), trained, 1.0, architecture)
    snap = source_snapshot(scan, ev, vocab)
    items = SourceItems(
        spec=spec,
        keys_path="",  # set when the snapshot's keys are saved (start_cycle)
        vocabulary=vocab,
        input_format=ev.input_format.as_dict(),
        fingerprint=snap.fingerprint,
    )
    return CyclePlan(ev.dataset(spec, vocab), stage, None, snap, items, capacity)


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
    ds, stage, train_idx, snap = plan.dataset, plan.stage, plan.train_idx, plan.snapshot
    cfg = cfg.model_copy(update={"stages": snap.stages})  # what a resumed cycle must reuse
    champion = lineage.champion()
    active = chain.active_generations(lineage)
    verify_inputs(lineage, active)  # a swapped file fails here, before anything is recorded
    t = cfg.train
    planned = chain.plan_constraints(active, t.method, t.against, t.weights, t.ancestor_weights)
    keys_path = save_keys(snap)
    if snap.eval_items is not None:
        _write_once(eval_items_path(snap.eval_fingerprint), snap.eval_items)
    source = plan.source
    if source is not None:
        source.keys_path = str(keys_path)
    architecture = dict(stage.architecture) | (t.architecture or {})
    size = lineage_image_size(lineage, t.image_size)
    if size:
        architecture["image_size"] = size
    # a model that cannot be built (a factory that does not import or maps inputs to the
    # wrong shape) is refused here, before anything is recorded
    EmbeddingNet(ds.input_shape, plan.capacity or ds.num_classes, t.embed_dim, architecture)
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
            "keys_path": str(keys_path),
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
    save_snapshot(int(gen.id), train_idx, cfg)  # type: ignore[arg-type]
    state = CycleState(ds, stage, gen, train_idx, active, cfg, champion.id if champion else None)
    state.source, state.capacity = source, plan.capacity
    return state


def save_keys(snap: Snapshot) -> Path:
    """The snapshot's items (keys, labels, what locates them) as Parquet, named by its
    fingerprint (written once, atomically)."""
    path = subdir("snapshots") / f"keys-{snap.fingerprint[:24]}.parquet"
    table = snap.table
    if table is None:
        table = pa.table({"key": snap.keys, "label": np.asarray(snap.labels, dtype=np.int64)})
    _write_once(path, table)
    return path


def _write_once(path: Path, table: pa.Table) -> None:
    """Write ``table`` to ``path`` atomically unless it exists (names are fingerprints)."""
    if not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)


def save_snapshot(gen_id: int, train_idx: np.ndarray | None, cfg: CycleConfig) -> None:
    """What the generation trains on and under which config, each written atomically."""
    if train_idx is not None:  # the scenario's rows (a source's are its keys file)
        idx_path = train_idx_path(gen_id)
        tmp = idx_path.with_name(idx_path.stem + ".tmp.npy")
        np.save(tmp, train_idx)
        tmp.replace(idx_path)
    cfg_path = cycle_config_path(gen_id)
    tmp = cfg_path.with_name(cfg_path.name + ".tmp")
    tmp.write_text(cfg.model_dump_json(indent=1))
    tmp.replace(cfg_path)


def train_step(
    lineage: Lineage, state: CycleState, cfg: CycleConfig | None = None
) -> dict[str, Any]:
    """Step 3: train on a Ray worker; a failure marks the generation failed.

    An interrupted training of this generation continues from its resume file.
    """
    gen, t = state.generation, (cfg or state.config).train
    by_id = {g.id: g for g in lineage.generations()}
    constraints = [
        ConstraintSpec(
            c.target_id,
            c.kind,  # check_spec turns the name into the enum
            c.weight,
            by_id[c.target_id].checkpoint_path,
            by_id[c.target_id].checkpoint_sha256,
            list(by_id[c.target_id].classes),
        )
        for c in lineage.constraints(gen.id)
    ]
    in_memory = state.source is None
    custom = train_resources()  # GRACEFUL_TRAIN_RESOURCES: the nodes it may train on
    spec = t.train_spec(
        int(gen.id),  # type: ignore[arg-type]
        x=state.dataset.x_train[state.train_idx] if in_memory else None,
        y=state.dataset.y_train[state.train_idx] if in_memory else None,
        source=state.source,
        num_classes=state.capacity or state.dataset.num_classes,
        classes=list(state.stage.classes),
        architecture=gen.architecture,
        constraints=constraints,
        dataset=state.dataset.spec,
        checkpoint_dir=str(subdir("checkpoints")),
        threads=int(task_resources(custom).get("num_cpus", 1)),
    )
    failpoint("train")  # the kill tests stop here: recorded, no epoch trained yet
    try:
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


def evaluate_step(lineage: Lineage, state: CycleState) -> dict[tuple[int, int, str], float]:
    """Step 4: every metric against every earlier generation, stored in the lineage."""
    gen = state.generation
    rows = evaluate_against_ancestors(
        gen, chain.ancestors_of(lineage, gen.id), state.active, state.dataset, subdir("cache")
    )
    lineage.record_metrics(rows)
    failpoint("evaluate")  # the kill tests stop here: metrics stored, not yet gated
    acc = next(v for a, b, m, v in rows if m == "accuracy")
    state.generation = lineage.update_generation(gen.id, accuracy=acc)
    return {(a, b, m): v for a, b, m, v in rows}


def gate_step(
    lineage: Lineage,
    state: CycleState,
    metrics: dict[tuple[int, int, str], float],
    cfg: CycleConfig,
) -> bool:
    """Step 5: the promotion decision and its reasons, stored on the generation.

    The gate decides on the paired evidence the evaluation stored (counts per ancestor)
    and records the intervals it used, at its own confidence, as metric rows.
    """
    g = state.generation.id
    champion = lineage.generation(state.champion) if state.champion is not None else None
    own = {(a, b): v for (a, b, m), v in lineage_pairs(lineage, "compat_top1").items()}
    compat = {k: (metrics[(g, k, "compat_top1")], own[(k, k)]) for k in state.active}
    nfr = {k: metrics[(g, k, "nfr")] for k in state.active}
    ecc_counts, flip_counts = counts_from_metrics(metrics, g)  # the paired per-case evidence
    pinned = {int(x.id) for x in lineage.generations() if x.pinned}  # type: ignore[arg-type]
    accuracy = metrics[(g, g, "accuracy")]
    y = np.asarray(state.dataset.y_test)
    first = FirstEvidence(
        round(accuracy * len(y)), len(y), float(np.bincount(y).max() / len(y)) if len(y) else 1
    )
    passed, reasons = decide(
        accuracy,
        champion.accuracy if champion else None,
        compat,
        nfr,
        cfg.gate,
        ecc_counts=ecc_counts,
        flip_counts=flip_counts,
        ecc_groups=groups_from_metrics(metrics, g),
        pinned=pinned,
        first=first if len(y) else None,
    )
    if cfg.gate.enabled:  # the intervals at the gate's level, as the reasons quote them
        lineage.record_metrics(evidence_rows(g, ecc_counts, flip_counts, cfg.gate))
    owed = backfill_owed(compat, cfg.gate, ecc_counts, pinned) if passed else []
    outcome = GateOutcome.PROMOTE if passed else GateOutcome.REJECT
    served = None
    if passed and cfg.gate.enabled and champion is not None:  # what users will meet
        names = class_names(lineage, state.dataset)
        judged = targeted.judge(
            lineage,
            state.dataset,
            state.generation,
            champion,
            cfg.gate,
            num_classes=state.capacity or state.dataset.num_classes,
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
        lineage.record_metrics(targeted.record(lineage, g, judged, names))
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


def class_names(lineage: Lineage, ds: Dataset) -> dict[int, str]:
    """Head row -> class name: the lineage's vocabulary, else the data set's names."""
    vocab = lineage.vocabulary()
    if vocab:
        return {i: n for n, i in vocab.items()}
    return {i: str(n) for i, n in enumerate(ds.class_names)}


def promote_step(lineage: Lineage, state: CycleState) -> None:
    """Step 6: move the champion alias, if it is still the one the gate compared against."""
    failpoint("promote")  # the kill tests stop here: gated, not yet promoted
    lineage.promote(int(state.generation.id), expected_champion=state.champion)  # type: ignore[arg-type]
    state.generation = lineage.generation(int(state.generation.id))  # type: ignore[arg-type]
    state.promoted = True


def lineage_pairs(lineage: Lineage, metric: str) -> dict[tuple[int, int, str], float]:
    return {(a, b, metric): v for a, b, v in lineage.metric(metric)}


def index_gallery(
    lineage: Lineage, ds: Dataset, champion: Generation, part_rows: int
) -> dict[str, Any]:
    """The first gallery: the evaluation set's gallery half, embedded by the champion."""
    from workers.backfill import m_mix

    gallery = Gallery(lineage)
    out = generation_outputs(champion, ds, subdir("cache"))
    rows = GalleryRows(
        item_id=out.gallery_idx.astype(np.int64),
        label=ds.y_test[out.gallery_idx],
        generation=np.full(len(out.gallery_idx), champion.id, np.int32),
        margin=out.outputs.margin[out.gallery_idx],
        embedding=out.gallery_emb,
    )
    gallery.create(ds.spec, rows, part_rows=part_rows)
    value = m_mix(out.query_emb, ds.y_test[out.query_idx], gallery.read_all())
    lineage.record_metrics([(champion.id, champion.id, "m_mix", value)])
    return {"indexed": len(rows), "m_mix": value}


def backfill_step(
    lineage: Lineage, state: CycleState, cfg: CycleConfig | None = None
) -> dict[str, Any]:
    """Step 7: backfill the collection within budget.

    The scenario's first generation indexes the evaluation set's gallery half as the
    collection (keyed by position) and every later one measures M_mix on it. On a user's
    source the collection is the user's own (``graceful index``): it is backfilled by
    key from its source when there is one, and a cycle without one backfills nothing.
    """
    cfg = cfg or state.config
    gallery = Gallery(lineage)
    champion = lineage.champion()
    assert champion is not None
    b = cfg.backfill
    info = gallery.info()
    if info is None:
        if state.source is not None:
            return {"collection": None}  # nothing indexed yet: `graceful index SPEC`
        return index_gallery(lineage, state.dataset, champion, b.batch_rows)
    measure: dict[str, Any] = {}  # M_mix needs labelled queries: the scenario's gallery
    if info.scenario:
        out = generation_outputs(champion, state.dataset, subdir("cache"))
        measure = {
            "query_emb": out.query_emb,
            "query_labels": state.dataset.y_test[out.query_idx],
            "champion_gallery_emb": out.gallery_emb if b.curve else None,
        }
    complete = chain.owed_backfill(lineage)  # incompatible ancestors leave the gallery first
    job = run_backfill(
        lineage,
        gallery,
        state.dataset if info.scenario else None,
        champion,
        b.policy,
        b.budget,
        seed=b.seed,
        retire_share=b.retire_share,
        complete=complete,
        owed_items=chain.owed_items(lineage),
        **measure,
    )
    if info.scenario:
        lineage.record_metrics([(champion.id, champion.id, "m_mix", job.m_mix_after)])
    return {
        "job": job.id,
        "items": job.items_done,
        "m_mix": job.m_mix_after,
        "completed": complete,
    }


# -- Prefect -------------------------------------------------------------------------------
@task(name="recover-interrupted", cache_policy=NO_CACHE)
def recover_task(cfg: CycleConfig) -> tuple[CycleState | None, dict[str, Any] | None]:
    from flows.recovery import recover  # recovery builds on this module's steps

    return recover(Lineage(), cfg)


@task(name="snapshot", cache_policy=NO_CACHE)
def plan_task(cfg: CycleConfig) -> CyclePlan:
    return plan_cycle(Lineage(), cfg)


@task(name="reevaluate-on-new-evaluation-set", cache_policy=NO_CACHE)
def reevaluate_task(plan: CyclePlan, part_rows: int) -> list[int]:
    return reevaluate(Lineage(), plan, part_rows)


@task(name="record-generation-and-constraints", cache_policy=NO_CACHE)
def start_task(cfg: CycleConfig, plan: CyclePlan) -> CycleState:
    return start_cycle(Lineage(), cfg, plan)


@task(name="publish-skip", cache_policy=NO_CACHE)
def publish_skip_task(message: str) -> None:
    from flows.publish import publish_skip

    publish_skip(message)


@task(name="train-on-ray", cache_policy=NO_CACHE)
def train_task(state: CycleState) -> dict[str, Any]:
    return train_step(Lineage(), state)


@task(name="evaluate-against-ancestors", cache_policy=NO_CACHE)
def evaluate_task(state: CycleState) -> dict:
    return evaluate_step(Lineage(), state)


@task(name="gate", cache_policy=NO_CACHE)
def gate_task(state: CycleState, metrics: dict) -> bool:
    return gate_step(Lineage(), state, metrics, state.config)


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(state: CycleState) -> None:
    promote_step(Lineage(), state)


@task(name="backfill", cache_policy=NO_CACHE)
def backfill_task(state: CycleState) -> dict:
    return backfill_step(Lineage(), state)


@task(name="retire-constraints", cache_policy=NO_CACHE)
def retire_task() -> list:
    return chain.retire_unused(Lineage())


@task(name="publish", cache_policy=NO_CACHE)
def publish_task(
    state: CycleState, backfill: dict[str, Any] | None = None, retired: list | None = None
) -> None:
    from flows.publish import publish_cycle

    publish_cycle(Lineage(), state.generation.id, backfill, retired)


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
        return Completed(name="Rejected", message=rejection(result), data=result)
    return result


def rejection(result: dict[str, Any]) -> str:
    """``generation 4 rejected: <the gate's failing reasons>``."""
    reasons = result.get("reasons") or []
    fails = [r.removeprefix("FAIL ") for r in reasons if r.startswith("FAIL ")]
    return f"generation {result['generation']} rejected: " + ("; ".join(fails or reasons) or "?")


@flow(name="update-cycle", flow_run_name=cycle_run_name, log_prints=True)
def update_cycle(config: CycleConfig | None = None) -> dict[str, Any]:
    """Train the next generation under the accumulated constraints and roll it out.

    Holds the lineage's cycle lock throughout; an interrupted cycle is resumed first.
    The run is named ``generation g`` once its generation is recorded (``cycle on
    <lineage>`` before); it ends ``Completed``, or ``Rejected`` or ``Skipped``
    (:func:`final_state`), returning the cycle's result dict either way.
    """
    cfg = config or CycleConfig()
    log = get_run_logger()
    join_cluster()  # a RAY_ADDRESS that refuses this client fails here: nothing recorded

    def waiting(holder: object) -> None:
        log.warning("waiting for the update cycle that is running (%s)", holder or "starting")

    lock = Lineage().lock(CYCLE_LOCK)
    lock.acquire(wait=cfg.wait_for_lock, on_wait=waiting)
    try:
        result = _run_cycle(cfg, log)
    finally:
        lock.release()
    return final_state(result)


def _run_cycle(cfg: CycleConfig, log: Any) -> dict[str, Any]:
    """The cycle's steps, in order, from where an interrupted one stopped (lock held)."""
    progress = StepProgress(
        artifact_key("update-cycle-progress"), total=8, description="update cycle: steps done"
    )
    state, resumed_backfill = recover_task(cfg)
    if resumed_backfill:
        from flows.backfill import log_backfill  # it builds on this module

        log.warning("finished the interrupted backfill job %s", resumed_backfill["job"])
        log_backfill(log, resumed_backfill)
    unreadable: list[dict[str, str]] = []
    if state is None:
        plan = plan_task(cfg)
        if plan.eval_changed:
            measured = reevaluate_task(plan, cfg.backfill.batch_rows)
            log.warning(
                "the evaluation set changed: re-evaluated %s on it", text.generations(measured)
            )
        unreadable = plan.snapshot.skipped
        for item in unreadable[:20]:
            log.warning("skipped unreadable item %s: %s", item["key"], item["reason"])
        if unreadable:
            log.warning("%d unreadable item(s) skipped (--strict refuses them)", len(unreadable))
        lin = Lineage()
        since = None if cfg.force else unchanged_since(lin, plan)
        rejected = None if cfg.force or since is not None else rejected_before(lin, plan, cfg)
        if rejected is not None:
            since = rejected[0]
            message = (
                f"skipped: generation {since} was trained on this snapshot and rejected "
                f"({rejected[1]}); --force trains it again"
            )
        elif since is not None:
            message = f"skipped: no new data since generation {since}"
        if since is not None:
            log.info("%s (snapshot %s)", message, plan.snapshot.fingerprint[:12])
            name_run(
                f"skipped: generation {since} rejected on this snapshot"
                if rejected is not None
                else f"skipped: no new data since generation {since}"
            )
            publish_skip_task(message)
            progress.step(message)
            return {
                "skipped": True,
                "message": message,
                "generation": since,
                "resumed_backfill": resumed_backfill,
            }
        # Ray is up (or joined) and a node can take the training, before anything is
        # recorded: a refused client or GRACEFUL_TRAIN_RESOURCES no node has leaves nothing
        task_resources(train_resources())
        state = start_task(cfg, plan)
    else:
        log.warning("%s", state.resumed)
    name_run(f"generation {state.generation.id}")
    log.info(
        "generation %s: stage %s, %d training items, constraints against %s",
        state.generation.id,
        state.stage.index,
        state.train_items,
        text.generations(state.active),
    )
    progress.step(
        f"generation {state.generation.id}: stage {state.stage.index}, "
        f"{len(state.active)} active ancestors"
    )
    if state.step <= Step.TRAIN:
        result = train_task(state)
        if result.get("resumed_from_epoch"):
            log.warning("training resumed from epoch %s", result["resumed_from_epoch"])
        if result.get("warm_start_note"):
            log.warning("%s", result["warm_start_note"])
        log.info(
            "generation %s trained on Ray node %s (%s)",
            state.generation.id,
            result.get("ray_node"),
            result.get("ray_node_ip"),
        )
    progress.step("trained")
    if state.step <= Step.EVALUATE:
        metrics = evaluate_task(state)
        progress.step("evaluated")
        passed = gate_task(state, metrics)
    else:  # gated before the interruption
        progress.step("evaluated before")
        passed, state.reasons = True, list(state.generation.gate_reasons)
    log.info("gate %s: %s", "passed" if passed else "REJECTED", "; ".join(state.reasons))
    progress.step("gate: " + ("passed" if passed else "rejected"))
    backfill: dict[str, Any] = {}
    if passed:
        promote_task(state)
        progress.step("promoted")
        backfill = backfill_task(state)
        progress.step("backfilled")
    else:
        progress.step("not promoted")
        progress.step("no backfill")
    if backfill:
        log.info("backfill: %s", text.cycle_backfill(backfill))
    retired = retire_task()
    for gen_id, reason in retired:
        log.info("retired generation %s from the constraint chain: %s", gen_id, reason)
    progress.step(f"retired {len(retired)}")
    publish_task(state, backfill, retired)
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
        "resumed": state.resumed,
        "resumed_backfill": resumed_backfill,
        "resumed_from_epoch": state.result.get("resumed_from_epoch"),
        "unreadable_skipped": len(unreadable),
        "ray_node": state.result.get("ray_node"),  # the Ray node that trained it (this run)
        "ray_node_ip": state.result.get("ray_node_ip"),
    }

"""Training one generation under the accumulated compatibility constraints.

The loop is literal: for each mini-batch,

    loss = CE(new head)                                       # the task itself
         + sum_k w_k * influence(old head k, new embedding)   # BCT, one per ancestor
         + sum_k v_k * focal(new logits, old logits k)        # PCT, one per ancestor
         + sum_k u_k * (1 - cos(new embedding, old emb. k))   # embedding distillation

Earlier generations are frozen and their outputs on the training items are computed
once, before the first epoch (``Teacher``), and stacked per constraint kind, so each
kind costs one batched operation per step however many ancestors it covers: a
constraint against ten ancestors costs little more per epoch than one. A checkpoint is
written after every epoch; a killed run resumes from it. A NaN or exploding loss stops
the run with ``TrainingDiverged``.

The defaults are the recipe that won bench/compat.py (bench/results/compat.md): the
influence loss uses a head of the ancestor's class centroids, and a constrained
generation starts from its newest ancestor's weights (a function-preserving expansion
when the architecture grew). With the scenario's stationary head and per-constraint
weights influence 1, focal 0.3, embedding 2 it halves NFR against every ancestor within
one point of the unconstrained accuracy.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from workers.constraints import (
    REGISTRY,
    ConstraintKind,
    StepInputs,
    constraint_losses,
    parse_kind,
    received_weights,
    stack_teachers,
)
from workers.models import EmbeddingNet, inherit_weights, load_model, save_model

EXPLODING_LOSS = 1e4
EMBEDDING_SCOPES = ("all", "known", "unknown")
INFLUENCE_HEADS = ("head", "centroids")


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf or exploded; the message names the epoch, step and terms."""


class TrainingInterrupted(RuntimeError):
    """Raised by the ``stop_after_epochs`` hook, after the resume file was written."""


@dataclass
class ConstraintSpec:
    """One constraint: stay compatible with generation ``target`` (a frozen checkpoint)."""

    target: int
    kind: ConstraintKind
    weight: float
    checkpoint: str
    sha256: str | None
    classes: list[int]  # the classes the target generation was trained on


@dataclass
class TrainSpec:
    generation: int
    x: np.ndarray
    y: np.ndarray
    num_classes: int
    classes: list[int]
    architecture: dict[str, Any]
    embed_dim: int = 64
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    constraints: list[ConstraintSpec] = field(default_factory=list)
    focal_alpha: float = 1.0
    focal_beta: float = 5.0
    focal_temperature: float = 2.0
    checkpoint_dir: str = "."
    threads: int | None = None
    # -- compatibility knobs (defaults: the recipe that won bench/compat.py) ------------
    # cosine scale of the influence loss; None = the heads' own scale (LOGIT_SCALE)
    influence_scale: float | None = None
    # BCT's treatment of classes an ancestor never saw: its head rows become the
    # normalised mean old embedding of that class. False: those items are masked out.
    bct_prototypes: bool = True
    # the head the influence loss applies: "head" (the ancestor's own head, with BCT
    # prototypes as above) or "centroids" (for every class with training items, the
    # normalised mean embedding the ancestor gives that class: new embeddings are pulled
    # to where the ancestor's gallery items of their class lie; better AC, same accuracy)
    influence_head: str = "centroids"
    # which items the embedding constraint pulls: "all", "known" (classes the ancestor
    # saw) or "unknown" (classes it never saw: where no head row says anything)
    embedding_scope: str = "all"
    # extra distillation inputs, as many per training item: fixed mixups of two random
    # training items (drawn once from the seed). Ancestors' embeddings of them are
    # precomputed like the rest; each step adds that share of them to the batch and the
    # embedding constraint pulls the new embeddings of them too. They reach the inputs
    # between the training classes, where classes no generation has seen yet may lie.
    # (Measured: a little more AC for 3-4 points of accuracy, so off by default.)
    distill_mix: float = 0.0
    # start from the newest constrained ancestor's weights, expanded to this architecture
    # without changing its function (workers.models.inherit_weights), when it allows that
    # (an mlp as wide and deep or more); otherwise, and without constraints, start fresh.
    # The largest single gain in AC: classes no generation has seen keep their place.
    warm_start: bool = True
    # test hook: raise TrainingInterrupted after this many epochs of this call, once the
    # resume file is written, as if the process had been killed there
    stop_after_epochs: int | None = None


def check_spec(spec: TrainSpec) -> None:
    """Refuse unknown constraint kinds and options before any work is done."""
    for c in spec.constraints:
        c.kind = parse_kind(c.kind)  # a plain name from a caller becomes the enum
        if not c.weight >= 0:
            raise ValueError(f"constraint weight must be >= 0, got {c.weight} ({c.kind})")
    for name, value, allowed in (
        ("embedding_scope", spec.embedding_scope, EMBEDDING_SCOPES),
        ("influence_head", spec.influence_head, INFLUENCE_HEADS),
    ):
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; use one of {', '.join(allowed)}")
    if not spec.distill_mix >= 0:
        raise ValueError(f"distill_mix must be >= 0, got {spec.distill_mix}")
    if spec.epochs < 1 or spec.batch_size < 2:
        raise ValueError(
            f"need epochs >= 1 and batch_size >= 2, got {spec.epochs}, {spec.batch_size}"
        )


@dataclass
class Teacher:
    """A frozen earlier generation's precomputed outputs on this stage's training items."""

    target: int
    head: torch.Tensor  # (C, d): its head, with BCT prototypes for classes it never saw
    logits: torch.Tensor  # (N, C)
    correct: torch.Tensor  # (N,) bool
    known: torch.Tensor  # (N,) bool: the item's class was in the old generation's training
    embedding: torch.Tensor | None = None  # (N, d): its L2-normalised embeddings
    extra_embedding: torch.Tensor | None = None  # (M, d): on the extra distillation inputs
    # summed weight per constraint kind against this ancestor (workers.constraints)
    weights: dict[ConstraintKind, float] = field(default_factory=dict)


@torch.no_grad()
def prepare_teacher(
    model: EmbeddingNet,
    x: torch.Tensor,
    y: torch.Tensor,
    classes: list[int],
    target: int,
    bct_prototypes: bool = True,
    centroids: bool = False,
    extra: torch.Tensor | None = None,
) -> Teacher:
    """Run the frozen model once over the training items.

    Classes the old generation never saw get BCT's treatment: their rows of the old
    head are replaced by the normalised mean old embedding of that class's items,
    scaled to the mean row norm of the old head. ``centroids=True`` does the same for
    every class that has items here (a head of old class centroids).
    """
    model.eval()
    emb, logit = _forward_all(model, x)
    head = model.head.weight.detach().clone()
    row_norm = head.norm(dim=1).mean()
    seen = set(classes)
    if bct_prototypes or centroids:
        for c in torch.unique(y).tolist():
            if centroids or c not in seen:
                head[c] = F.normalize(emb[y == c].mean(dim=0), dim=0) * row_norm
    known = torch.isin(y, torch.tensor(sorted(seen), dtype=y.dtype, device=y.device))
    teacher = Teacher(target, head, logit, logit.argmax(dim=1) == y, known, embedding=emb)
    if extra is not None and len(extra):
        teacher.extra_embedding = _forward_all(model, extra)[0]
    return teacher


def _forward_all(model: EmbeddingNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    embs, logits = [], []
    for start in range(0, len(x), 2048):
        e, z = model(x[start : start + 2048])
        embs.append(e)
        logits.append(z)
    if not embs:
        return x.new_zeros((0, model.config["embed_dim"])), x.new_zeros((0, 0))
    return torch.cat(embs), torch.cat(logits)


def mixup_inputs(x: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` fixed mixups ``lam * x_i + (1 - lam) * x_j`` of random training items."""
    g = torch.Generator().manual_seed(seed + 7919)
    i = torch.randint(len(x), (count,), generator=g)
    j = torch.randint(len(x), (count,), generator=g)
    lam = torch.rand((count,) + (1,) * (x.dim() - 1), generator=g).to(x.device)
    return lam * x[i.to(x.device)] + (1 - lam) * x[j.to(x.device)]


def build_teachers(
    spec: TrainSpec, x: torch.Tensor, y: torch.Tensor, extra: torch.Tensor | None = None
) -> list[Teacher]:
    """One Teacher per constrained ancestor, merging its per-kind weights."""
    check_spec(spec)
    teachers: dict[int, Teacher] = {}
    for c in spec.constraints:
        if c.target not in teachers:
            frozen = load_model(c.checkpoint, c.sha256).to(x.device)
            for p in frozen.parameters():
                p.requires_grad_(False)
            if frozen.config["embed_dim"] != spec.embed_dim:
                raise ValueError(
                    f"generation {c.target} embeds in {frozen.config['embed_dim']} dimensions, "
                    f"generation {spec.generation} in {spec.embed_dim}: compatibility needs one"
                )
            if frozen.config["num_classes"] != spec.num_classes:
                raise ValueError(
                    f"generation {c.target} has {frozen.config['num_classes']} classes, "
                    f"generation {spec.generation} {spec.num_classes}"
                )
            teachers[c.target] = prepare_teacher(
                frozen,
                x,
                y,
                c.classes,
                c.target,
                spec.bct_prototypes,
                centroids=spec.influence_head == "centroids",
                extra=extra,
            )
        weights = teachers[c.target].weights
        weights[c.kind] = weights.get(c.kind, 0.0) + c.weight
    return list(teachers.values())


def _resume_path(spec: TrainSpec) -> Path:
    return Path(spec.checkpoint_dir) / f"gen-{spec.generation}.resume.pt"


def train_generation(spec: TrainSpec) -> dict[str, Any]:
    """Train generation ``spec.generation``; returns its checkpoint, hash and history."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    started = time.perf_counter()
    check_spec(spec)
    torch.manual_seed(spec.seed)
    # the Ray task got a GPU only if the cluster has one; small data sets live on the device
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.tensor(spec.x, dtype=torch.float32, device=device)
    y = torch.tensor(spec.y, dtype=torch.int64, device=device)
    model = EmbeddingNet(tuple(x.shape[1:]), spec.num_classes, spec.embed_dim, spec.architecture)
    model.to(device)
    warm_from = _warm_start(spec, model, x) if spec.warm_start else None
    params = [p for p in model.parameters() if p.requires_grad]  # a fixed head stays put
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, spec.epochs))
    gen = torch.Generator().manual_seed(spec.seed)
    fingerprint = _fingerprint(spec)

    t0 = time.perf_counter()
    # the extra (mixup) inputs are precomputed only for kinds that read them
    uses_extra = spec.distill_mix > 0 and any(
        "extra_embedding" in REGISTRY[c.kind].teacher_tensors for c in spec.constraints
    )
    n_extra = round(spec.distill_mix * len(x)) if uses_extra else 0
    extra = mixup_inputs(x, n_extra, spec.seed) if n_extra else None
    per_batch_extra = max(1, round(spec.distill_mix * spec.batch_size)) if n_extra else 0
    teachers = build_teachers(spec, x, y, extra)
    stacks = stack_teachers(teachers, spec)
    teacher_seconds = time.perf_counter() - t0

    history: list[dict[str, float]] = []
    first_epoch = 0
    resume = _resume_path(spec)
    if resume.exists():
        state = torch.load(resume, map_location=device, weights_only=True)
        if state.get("fingerprint") != fingerprint:
            raise RuntimeError(
                f"{resume} belongs to a different training of generation {spec.generation} "
                "(seed, data, architecture, hyper-parameters or constraints differ); "
                "delete it to start over"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"].cpu())
        history = [dict(h) for h in state["history"]]
        first_epoch = int(state["epoch"]) + 1

    epoch_seconds: list[float] = []
    for epoch in range(first_epoch, spec.epochs):
        t_epoch = time.perf_counter()
        model.train()
        order = torch.randperm(len(x), generator=gen).to(x.device)
        extra_order = torch.randperm(n_extra, generator=gen).to(x.device) if n_extra else None
        sums = {"loss": 0.0, "ce": 0.0} | {kind.value: 0.0 for kind in REGISTRY}
        steps = 0
        for step, start in enumerate(range(0, len(x), spec.batch_size)):
            batch = order[start : start + spec.batch_size]
            if len(batch) < 2:  # BatchNorm needs two items
                continue
            xb, yb = x[batch], y[batch]
            extra_batch = extra_emb = None
            if extra_order is not None:
                at = (step * per_batch_extra) % n_extra
                extra_batch = extra_order[at : at + per_batch_extra]
                emb_all, logits_all = model(torch.cat([xb, extra[extra_batch]]))  # type: ignore[index]
                emb, logits, extra_emb = (
                    emb_all[: len(xb)],
                    logits_all[: len(xb)],
                    emb_all[len(xb) :],
                )
            else:
                emb, logits = model(xb)

            ce = F.cross_entropy(logits, yb)
            terms = constraint_losses(
                stacks, StepInputs(emb, logits, yb, batch, extra_emb, extra_batch), spec
            )
            loss = ce + sum(terms.values())

            value = loss.item()
            if not np.isfinite(value) or value > EXPLODING_LOSS:
                parts = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
                raise TrainingDiverged(
                    f"generation {spec.generation}: loss {value:.4g} at epoch {epoch} "
                    f"step {step} (ce={ce.item():.4g}, {parts}); "
                    "lower the learning rate or the constraint weights"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            sums["loss"] += value
            sums["ce"] += float(ce.detach())
            for kind, term in terms.items():
                sums[kind.value] += float(term.detach())
        sched.step()
        history.append({k: v / max(1, steps) for k, v in sums.items()} | {"epoch": epoch})
        epoch_seconds.append(time.perf_counter() - t_epoch)
        _write_resume(resume, model, opt, sched, gen, history, epoch, fingerprint)
        done = epoch - first_epoch + 1
        stop = spec.stop_after_epochs
        if stop is not None and done >= stop and epoch < spec.epochs - 1:
            raise TrainingInterrupted(
                f"generation {spec.generation}: stopped after epoch {epoch} "
                f"(stop_after_epochs={spec.stop_after_epochs}); {resume} resumes it"
            )

    path = Path(spec.checkpoint_dir) / f"gen-{spec.generation}.pt"
    sha = save_model(model.cpu(), path)
    resume.unlink(missing_ok=True)
    return {
        "checkpoint": str(path),
        "sha256": sha,
        "history": history,
        "train_seconds": time.perf_counter() - started,
        "teacher_seconds": teacher_seconds,
        "epoch_seconds": epoch_seconds,
        "resumed_from_epoch": first_epoch,
        "teachers": [t.target for t in teachers],
        # what the loop applied: {kind: {ancestor: weight}}, from the stacks themselves
        "constraint_weights": received_weights(stacks),
        "warm_start_from": warm_from,
    }


def _warm_start(spec: TrainSpec, model: EmbeddingNet, x: torch.Tensor) -> int | None:
    """Inherit the newest constrained ancestor's weights; its id, or None if impossible."""
    if not spec.constraints:
        return None
    newest = max(spec.constraints, key=lambda c: c.target)
    old = load_model(newest.checkpoint, newest.sha256).to(x.device)
    return newest.target if inherit_weights(model, old, x[:4096]) else None


def _fingerprint(spec: TrainSpec) -> str:
    """What must match for a resume file to continue this training (not another one)."""
    targets = sorted((c.target, str(c.kind), c.weight, c.sha256 or "") for c in spec.constraints)
    labels = hashlib.sha256(np.ascontiguousarray(spec.y, dtype=np.int64).tobytes()).hexdigest()
    return repr(
        (
            spec.seed,
            spec.epochs,
            sorted(spec.architecture.items()),
            spec.embed_dim,
            tuple(np.shape(spec.x)),
            labels[:16],
            spec.batch_size,
            spec.lr,
            spec.weight_decay,
            targets,
            (spec.focal_alpha, spec.focal_beta, spec.focal_temperature),
            (spec.influence_scale, spec.bct_prototypes, spec.influence_head),
            (spec.embedding_scope, spec.distill_mix, spec.warm_start),
        )
    )


def _write_resume(
    path: Path, model, opt, sched, gen, history, epoch: int, fingerprint: str
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "generator": gen.get_state(),
            "history": history,
            "epoch": epoch,
            "fingerprint": fingerprint,
        },
        tmp,
    )
    tmp.replace(path)  # atomic: a kill never leaves a half-written resume file

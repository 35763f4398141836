"""Training one generation under the accumulated compatibility constraints.

The loop is literal: for each mini-batch,

    loss = CE(new head)                                     # the task itself
         + sum_k w_k * influence(old head k, new embedding) # BCT, one per ancestor
         + sum_k v_k * focal(new logits, old logits k)      # PCT, one per ancestor

Earlier generations are frozen and their outputs on the training items are computed
once, before the first epoch (``Teacher``), so a constraint against ten ancestors costs
little more per epoch than one. A checkpoint is written after every epoch; a killed
run resumes from it. A NaN or exploding loss stops the run with ``TrainingDiverged``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from workers.losses import focal_distillation_loss, influence_loss
from workers.models import EmbeddingNet, load_model, save_model

EXPLODING_LOSS = 1e4


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf or exploded; the message names the epoch, step and terms."""


@dataclass
class ConstraintSpec:
    """One constraint: stay compatible with generation ``target`` (a frozen checkpoint)."""

    target: int
    kind: str  # "influence" | "focal"
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


@dataclass
class Teacher:
    """A frozen earlier generation's precomputed outputs on this stage's training items."""

    target: int
    head: torch.Tensor  # (C, d): its head, with BCT prototypes for classes it never saw
    logits: torch.Tensor  # (N, C)
    correct: torch.Tensor  # (N,) bool
    known: torch.Tensor  # (N,) bool: the item's class was in the old generation's training
    influence_weight: float = 0.0
    focal_weight: float = 0.0


@torch.no_grad()
def prepare_teacher(
    model: EmbeddingNet, x: torch.Tensor, y: torch.Tensor, classes: list[int], target: int
) -> Teacher:
    """Run the frozen model once over the training items.

    Classes the old generation never saw get BCT's treatment: their rows of the old
    head are replaced by the normalised mean old embedding of that class's items.
    """
    model.eval()
    embs, logits = [], []
    for start in range(0, len(x), 2048):
        e, z = model(x[start : start + 2048])
        embs.append(e)
        logits.append(z)
    emb, logit = torch.cat(embs), torch.cat(logits)
    head = model.head.weight.detach().clone()
    seen = set(classes)
    for c in torch.unique(y).tolist():
        if c not in seen:
            head[c] = F.normalize(emb[y == c].mean(dim=0), dim=0) * head.norm(dim=1).mean()
    known = torch.isin(y, torch.tensor(sorted(seen), device=y.device))
    return Teacher(target, head, logit, logit.argmax(dim=1) == y, known)


def build_teachers(spec: TrainSpec, x: torch.Tensor, y: torch.Tensor) -> list[Teacher]:
    """One Teacher per constrained ancestor, merging its influence and focal weights."""
    teachers: dict[int, Teacher] = {}
    for c in spec.constraints:
        if c.target not in teachers:
            frozen = load_model(c.checkpoint, c.sha256).to(x.device)
            for p in frozen.parameters():
                p.requires_grad_(False)
            teachers[c.target] = prepare_teacher(frozen, x, y, c.classes, c.target)
        if c.kind == "influence":
            teachers[c.target].influence_weight += c.weight
        elif c.kind == "focal":
            teachers[c.target].focal_weight += c.weight
        else:
            raise ValueError(f"unknown constraint kind {c.kind!r}; use influence or focal")
    return list(teachers.values())


def _resume_path(spec: TrainSpec) -> Path:
    return Path(spec.checkpoint_dir) / f"gen-{spec.generation}.resume.pt"


def train_generation(spec: TrainSpec) -> dict[str, Any]:
    """Train generation ``spec.generation``; returns its checkpoint, hash and history."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    started = time.perf_counter()
    torch.manual_seed(spec.seed)
    # the Ray task got a GPU only if the cluster has one; small data sets live on the device
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.tensor(spec.x, dtype=torch.float32, device=device)
    y = torch.tensor(spec.y, dtype=torch.int64, device=device)
    model = EmbeddingNet(tuple(x.shape[1:]), spec.num_classes, spec.embed_dim, spec.architecture)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, spec.epochs))
    gen = torch.Generator().manual_seed(spec.seed)

    t0 = time.perf_counter()
    teachers = build_teachers(spec, x, y)
    teacher_seconds = time.perf_counter() - t0

    history: list[dict[str, float]] = []
    first_epoch = 0
    resume = _resume_path(spec)
    if resume.exists():
        state = torch.load(resume, map_location=device, weights_only=True)
        if state.get("fingerprint") != _fingerprint(spec):
            raise RuntimeError(
                f"{resume} belongs to a different training of generation {spec.generation}; "
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
        sums = {"loss": 0.0, "ce": 0.0, "influence": 0.0, "focal": 0.0}
        steps = 0
        for step, start in enumerate(range(0, len(x), spec.batch_size)):
            batch = order[start : start + spec.batch_size]
            if len(batch) < 2:  # BatchNorm needs two items
                continue
            xb, yb = x[batch], y[batch]
            emb, logits = model(xb)

            ce = F.cross_entropy(logits, yb)
            influence = torch.zeros((), device=x.device)
            focal = torch.zeros((), device=x.device)
            for t in teachers:
                if t.influence_weight:
                    influence = influence + t.influence_weight * influence_loss(emb, t.head, yb)
                if t.focal_weight:
                    focal = focal + t.focal_weight * focal_distillation_loss(
                        logits,
                        t.logits[batch],
                        t.correct[batch],
                        spec.focal_alpha,
                        spec.focal_beta,
                        spec.focal_temperature,
                        t.known[batch],
                    )
            loss = ce + influence + focal

            if not torch.isfinite(loss) or loss.item() > EXPLODING_LOSS:
                raise TrainingDiverged(
                    f"generation {spec.generation}: loss {loss.item():.4g} at epoch {epoch} "
                    f"step {step} (ce={ce.item():.4g}, influence={influence.item():.4g}, "
                    f"focal={focal.item():.4g}); lower the learning rate or the weights"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            for key, value in (
                ("loss", loss),
                ("ce", ce),
                ("influence", influence),
                ("focal", focal),
            ):
                sums[key] += float(value.detach())
        sched.step()
        history.append({k: v / max(1, steps) for k, v in sums.items()} | {"epoch": epoch})
        epoch_seconds.append(time.perf_counter() - t_epoch)
        _write_resume(resume, model, opt, sched, gen, history, epoch, _fingerprint(spec))

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
    }


def _fingerprint(spec: TrainSpec) -> str:
    """What must match for a resume file to continue this training (not another one)."""
    targets = sorted((c.target, c.kind, c.weight) for c in spec.constraints)
    return repr((spec.seed, spec.epochs, spec.architecture, len(spec.y), spec.lr, targets))


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

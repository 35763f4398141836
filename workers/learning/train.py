"""Training one generation under the accumulated compatibility constraints.

The loop is literal: for each mini-batch,

    loss = CE(new head)                                       # the task itself
         + sum_k w_k * influence(old head k, new embedding)   # BCT, one per ancestor
         + sum_k v_k * focal(new logits, old logits k)        # PCT, one per ancestor
         + sum_k u_k * (1 - cos(new embedding, old emb. k))   # embedding distillation

The items stream (workers.data.stream): units of the snapshot in a random order, shuffled
within a bounded window, so memory does not grow with the source. Earlier generations
are frozen; their embeddings of every training item are computed once, before the first
epoch, kept on disk and read back with each window (their logits are their cosine heads
applied to those embeddings). Teachers are stacked per constraint kind, so each kind
costs one batched operation per step however many ancestors it covers. A checkpoint is
written after every epoch; a killed run resumes from it. A NaN or exploding loss stops
the run with ``TrainingDiverged``.

The defaults are the recipe that won bench/compat.py (bench/results/compat.md): the
influence loss uses a head of the ancestor's class centroids, and a constrained
generation starts from its newest ancestor's weights (a function-preserving expansion
when the architecture grew). With the scenario's stationary head and per-constraint
weights influence 1, focal 0.3, embedding 2 it cuts NFR to 0.43x of unconstrained training
on average (worst pair 0.51x) within one point of the unconstrained accuracy (the MLP on
Fashion-MNIST, ``make bench-compat``).

Images seen by a convolutional backbone are augmented on the device, per batch
(:func:`augment_batch`): a random crop with zero padding and, where the classes keep
under a mirror, a horizontal flip (:func:`resolve_augment` states the rule). A
generation distilled from its ancestors' per-item outputs (focal, embedding,
contrastive constraints) then gets those outputs for the augmented batch itself: the
frozen ancestors embed each augmented batch (PCT computes the old model's logits on the
same augmented input), as a precomputed output of the unaugmented item would pull a
shifted or mirrored image toward it. On a GPU the loop runs
under autocast (bfloat16, or float16 with a gradient scaler), convolutional models and
their inputs in channels-last layout, batches pinned and copied without blocking; on a
CPU none of that applies.

With ``workers`` > 1 the same loop runs in that many processes under Ray Train
(:func:`train_distributed`: ``TorchTrainer``, DDP over gloo on CPUs, NCCL on GPUs). Each
batch of the epoch's order is split across the ranks (:class:`workers.data.stream.ShuffledItems`),
so a step sees the items a single process would, with the gradient averaged over the ranks;
every rank prepares its own teachers from all items (the same heads, its own rows), and
rank 0 alone writes the resume file and the checkpoint. Ray Train's own run directory is
made under the checkpoint directory and removed; a worker's exception is raised as itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import resource
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from workers.data.readers import ArrayItems
from workers.data.source import open_source
from workers.data.sources import InputFormat, label_indices
from workers.data.stream import (
    Items,
    ItemStore,
    Prepared,
    Reader,
    ShuffledItems,
    TeacherStore,
    prepare,
    window_items,
)
from workers.learning.constraints import (
    REGISTRY,
    StepInputs,
    Teacher,
    constraint_losses,
    received_weights,
    stack_teachers,
)
from workers.learning.kinds import ConstraintKind, parse_kind
from workers.learning.models import (
    EmbeddingNet,
    inherit_weights,
    is_convolutional,
    load_model,
    save_model,
)
from workers.learning.spec import TrainSpec
from workers.runtime import Placed, ddp_resources, ensure_ray, train_resources

EXPLODING_LOSS = 1e4
EMBEDDING_SCOPES = ("all", "known", "unknown")
INFLUENCE_HEADS = ("head", "centroids")
AUGMENTS = ("auto", "none", "crop", "crop+flip")
# data-set kinds whose classes survive a left-right mirror (a mirrored shirt is a shirt,
# a mirrored truck a truck); digits, text and anything unknown (a user's image folder or
# Parquet images: a mirrored "b" is a "d") are not flipped unless asked for
MIRROR_SAFE = ("fashion-mnist", "cifar10", "cifar100")
# constraint kinds whose targets are an ancestor's outputs for each item (precomputed once
# on the item as it is, or, when the batch is augmented, computed on the augmented batch);
# influence compares with a head of class centroids, per class
PER_ITEM_KINDS = (ConstraintKind.FOCAL, ConstraintKind.EMBEDDING, ConstraintKind.CONTRASTIVE)


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf or exploded; the message names the epoch, step and terms."""


class TrainingInterrupted(RuntimeError):
    """Raised by the ``stop_after_epochs`` hook, after the resume file was written."""


@dataclass(frozen=True)
class Replica:
    """This process's place in a data-parallel training: rank 0 of 1 is the single process.

    ``device`` None picks CUDA when there is one; ``wrap`` turns the model into the one the
    steps call (``ray.train.torch.prepare_model``: DDP), the bare model is what is saved.
    With ``world_size`` > 1, ``torch.distributed`` is initialised (Ray Train does it).
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None


def check_spec(spec: TrainSpec) -> None:
    """Refuse unknown constraint kinds and options before any work is done."""
    for c in spec.constraints:
        c.kind = parse_kind(c.kind)  # a plain name from a caller becomes the enum
        if not c.weight >= 0:
            raise ValueError(f"constraint weight must be >= 0, got {c.weight} ({c.kind})")
    for name, value, allowed in (
        ("embedding_scope", spec.embedding_scope, EMBEDDING_SCOPES),
        ("influence_head", spec.influence_head, INFLUENCE_HEADS),
        ("augment", spec.augment, AUGMENTS),
    ):
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; use one of {', '.join(allowed)}")
    if spec.epochs < 1 or spec.batch_size < 2:
        raise ValueError(
            f"need epochs >= 1 and batch_size >= 2, got {spec.epochs}, {spec.batch_size}"
        )
    if spec.workers < 1 or spec.batch_size < 2 * spec.workers:
        raise ValueError(
            f"need workers >= 1 and batch_size >= 2 x workers (each takes its share of a "
            f"batch), got workers={spec.workers}, batch_size={spec.batch_size}"
        )
    if (spec.x is None) == (spec.source is None):
        raise ValueError("give the training items as x and y, or as a source, not both")


def teacher_head(
    own_head: torch.Tensor,
    class_sums: torch.Tensor,
    counts: torch.Tensor,
    classes: list[int],
    bct_prototypes: bool = True,
    centroids: bool = False,
) -> torch.Tensor:
    """The head an ancestor's influence loss applies, from its embeddings' class sums.

    Classes the ancestor never saw get BCT's treatment: their rows become the normalised
    mean old embedding of that class's items, scaled to the mean row norm of the old
    head. ``centroids=True`` does the same for every class that has items here.
    """
    head = own_head.detach().clone()
    row_norm = head.norm(dim=1).mean()
    if not (bct_prototypes or centroids):
        return head
    seen = set(classes)
    for c in torch.nonzero(counts > 0).flatten().tolist():
        if centroids or c not in seen:
            head[c] = F.normalize(class_sums[c], dim=0) * row_norm
    return head


def resolve_augment(
    mode: str,
    input_shape: tuple[int, ...],
    architecture: dict[str, Any],
    dataset: str | None,
) -> str:
    """The augmentation a training applies: "none", "crop" or "crop+flip".

    Only images, ``(C, H, W)`` inputs, are augmented; feature vectors never, whatever
    ``mode`` asks. ``crop`` and ``crop+flip`` are applied as asked. ``auto``:

    - a convolutional backbone (the residual CNN, a team's own) gets a random crop with
      padding, plus a horizontal flip for colour photographs and the data sets whose
      classes a mirror keeps (:data:`MIRROR_SAFE`: Fashion-MNIST, CIFAR); grey images
      of unknown kind (digits, scans of text: a mirrored "b" is a "d") are not flipped;
      pass ``crop`` where colour photos' classes are not mirror-symmetric;
    - the MLP (pixels as unrelated features) and the plain cnn (measured on digits: the
      crop costs it 6 points of accuracy in 6 epochs) train on the images as they are.
    """
    if mode not in AUGMENTS:
        raise ValueError(f"unknown augment {mode!r}; use one of {', '.join(AUGMENTS)}")
    if len(input_shape) != 3:
        return "none"
    if mode != "auto":
        return mode
    if architecture.get("kind", "mlp") not in ("resnet", "import"):
        return "none"
    kind = (dataset or "").strip().partition(":")[0].strip().lower()
    # colour photographs keep their class in a mirror (a mirrored cat is a cat)
    return "crop+flip" if kind in MIRROR_SAFE or input_shape[0] == 3 else "crop"


def crop_padding(height: int, width: int) -> int:
    """Pixels of padding for the random crop: an eighth of the side, 1 to 4 (8x8: 1,
    28x28: 3, 32x32: 4)."""
    return max(1, min(4, min(height, width) // 8))


def augment_batch(
    x: torch.Tensor,
    mode: str,
    generator: torch.Generator | None = None,
    pad: int | None = None,
) -> torch.Tensor:
    """A batch ``(N, C, H, W)`` randomly cropped and flipped, on its own device.

    ``crop``: each image is zero-padded by ``pad`` pixels on every side (default
    :func:`crop_padding`) and a random ``H x W`` window of it is kept: a shift by up to
    ``pad`` pixels each way. ``crop+flip``: then each image is mirrored left-right with
    probability 1/2. ``none``, or an input that is not a batch of images, is returned as
    it is. Random numbers come from ``generator`` (on ``x``'s device).
    """
    if mode == "none" or x.ndim != 4:
        return x
    if mode not in AUGMENTS[2:]:
        raise ValueError(f"unknown augment {mode!r}; use one of {', '.join(AUGMENTS[1:])}")
    n, c, h, w = x.shape
    p = crop_padding(h, w) if pad is None else int(pad)
    dev = x.device
    if p > 0:
        padded = F.pad(x, (p, p, p, p))  # (N, C, H + 2p, W + 2p)
        dy = torch.randint(0, 2 * p + 1, (n, 1, 1, 1), generator=generator, device=dev)
        dx = torch.randint(0, 2 * p + 1, (n, 1, 1, 1), generator=generator, device=dev)
        rows = dy + torch.arange(h, device=dev)[None, None, :, None]
        cols = dx + torch.arange(w, device=dev)[None, None, None, :]
        batch = torch.arange(n, device=dev)[:, None, None, None]
        chan = torch.arange(c, device=dev)[None, :, None, None]
        # indexed in (N, C, H, W) order, the result has the standard strides: a permuted
        # one-channel batch passes as contiguous with a channel stride of 1, and oneDNN's
        # multithreaded convolution backward corrupted memory on it (torch 2.13, CPU)
        x = padded[batch, chan, rows, cols]
    if mode == "crop+flip":
        mirror = torch.rand(n, generator=generator, device=dev) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x


def _epoch_generator(seed: int, epoch: int, device: torch.device, rank: int = 0) -> torch.Generator:
    """The augmentation's random numbers for one epoch: a resumed epoch redraws them.
    Each rank of a data-parallel training draws its own (rank 0 those of a single one)."""
    entropy = [seed, epoch, 0xA06] + ([rank] if rank else [])
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)
    return torch.Generator(device=device).manual_seed(int(state[0]) >> 1)


def _reader(spec: TrainSpec) -> tuple[Reader, tuple[int, ...]]:
    """The training items as a stream reader, and one item's shape."""
    if spec.source is None:
        x, y = np.asarray(spec.x, dtype=np.float32), np.asarray(spec.y, dtype=np.int64)
        return ArrayItems(x, y), tuple(x.shape[1:])
    import pyarrow.parquet as pq

    src = spec.source
    names = pq.read_schema(src.keys_path).names
    # a Parquet source's rows are found by file and row group: its keys stay on disk
    table = pq.read_table(
        src.keys_path, columns=[c for c in names if c != "key" or "file" not in names]
    )
    labels = label_indices(table.column("label"), src.vocabulary)
    fmt = InputFormat.from_dict(src.input_format)
    return open_source(src.spec, src.kind).training_reader(table, labels, fmt), fmt.shape


def build_teachers(
    spec: TrainSpec,
    reader: Reader,
    store_path: Path,
    device: torch.device,
    keep_models: bool,
    items_path: Path,
) -> tuple[list[Teacher], TeacherStore | None, np.ndarray, Items, Prepared, list[EmbeddingNet]]:
    """Load each constrained ancestor once; one pass over the snapshot decodes every item
    into an on-disk store (unless the items are in memory already) and embeds it with
    every ancestor (workers.data.stream.prepare).

    Returns the teachers, the store of their embeddings, up to 4096 training inputs (for
    the warm start's BatchNorm statistics), the items as an epoch reads them, what the
    pass measured (channel statistics for the input normalisation) and, with
    ``keep_models``, the frozen ancestors in teacher-slot order (the loop embeds each
    augmented batch with them; no embedding is stored then). ``items_path``: where a
    streamed snapshot's decoded items go.
    """
    models: dict[int, EmbeddingNet] = {}
    for c in spec.constraints:
        if c.target in models:
            continue
        frozen = load_model(c.checkpoint, c.sha256).to(device).requires_grad_(False)
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
        models[c.target] = frozen.eval()
    sample: list[np.ndarray] = []

    def keep(x: np.ndarray) -> None:
        if sum(len(s) for s in sample) < 4096:
            sample.append(x[:4096])

    items: Items = reader
    if not isinstance(reader, ArrayItems):  # a streamed source (spec.source)
        fmt = InputFormat.from_dict(spec.source.input_format)
        # decoded images are v / 255 of 8-bit pixels: kept as bytes, a quarter of the disk
        items = ItemStore(items_path, reader.y, fmt.shape, u8=fmt.mode is not None)
    store = None
    if models and not keep_models:
        store = TeacherStore(store_path, len(reader), len(models), spec.embed_dim)
    prepared = prepare(
        reader,
        list(models.values()),
        store,
        spec.num_classes,
        device,
        items=items if isinstance(items, ItemStore) else None,
        on_chunk=keep,
    )
    classes = {c.target: c.classes for c in spec.constraints}
    teachers: dict[int, Teacher] = {}
    for slot, (target, m) in enumerate(models.items()):
        own = m.head.weight.detach()
        head = teacher_head(
            own,
            prepared.class_sums[slot],
            prepared.counts,
            classes[target],
            spec.bct_prototypes,
            centroids=spec.influence_head == "centroids",
        )
        known = torch.zeros(spec.num_classes, dtype=torch.bool, device=device)
        known[torch.as_tensor(classes[target], dtype=torch.long, device=device)] = True
        teachers[target] = Teacher(target, slot, head, own.clone(), known)
    for c in spec.constraints:
        weights = teachers[c.target].weights
        weights[c.kind] = weights.get(c.kind, 0.0) + c.weight
    frozen = list(models.values()) if keep_models else []
    return list(teachers.values()), store, np.concatenate(sample)[:4096], items, prepared, frozen


def resume_path(checkpoint_dir: str | Path, generation: int) -> Path:
    """Generation ``generation``'s per-epoch resume file."""
    return Path(checkpoint_dir) / f"gen-{generation}.resume.pt"


def abandoned_marker(checkpoint_dir: str | Path, generation: int) -> Path:
    """The file ``graceful abandon`` leaves for generation ``generation``: a training of it
    still running (a killed cycle's orphaned Ray worker) stops at its next epoch and takes
    back the resume file it wrote, so an abandoned generation leaves none behind."""
    return Path(checkpoint_dir) / f"gen-{generation}.abandoned"


def _scratch(spec: TrainSpec, name: str, replica: Replica) -> Path:
    """A file the training keeps until it ends; one per rank of a data-parallel training
    (the ranks of one node, or of a shared GRACEFUL_HOME, must not write each other's)."""
    rank = f"rank-{replica.rank}." if replica.world_size > 1 else ""
    return Path(spec.checkpoint_dir) / f"gen-{spec.generation}.{rank}{name}"


def train_generation(spec: TrainSpec) -> dict[str, Any]:
    """Train generation ``spec.generation``; returns its checkpoint, hash and history.

    ``spec.workers`` > 1: the same loop on that many Ray Train workers, started from here
    (:func:`train_distributed`; Ray is joined or started first).
    """
    if spec.workers > 1:
        return train_distributed(spec).value
    return train_replica(spec)


def train_replica(spec: TrainSpec, replica: Replica = Replica()) -> dict[str, Any]:
    """The training loop, in one process of ``replica.world_size`` (the only one: 1).

    Rank 0 writes the resume file and the checkpoint; every rank returns the result,
    the others with ``checkpoint`` and ``sha256`` None.
    """
    if spec.threads:
        torch.set_num_threads(spec.threads)
    started = time.perf_counter()
    check_spec(spec)
    torch.manual_seed(spec.seed)
    # the Ray task got a GPU only if the cluster has one (a Ray Train worker: its own)
    device = replica.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    lead, parallel = replica.rank == 0, replica.world_size > 1
    reader, input_shape = _reader(spec)
    dataset = spec.dataset if spec.dataset is not None else getattr(spec.source, "spec", None)
    augment = resolve_augment(spec.augment, input_shape, spec.architecture, dataset)
    # distilled from per-item outputs while augmenting: the ancestors embed each batch
    per_item = any(c.kind in PER_ITEM_KINDS and c.weight > 0 for c in spec.constraints)
    on_the_fly = per_item and augment != "none"
    model = EmbeddingNet(input_shape, spec.num_classes, spec.embed_dim, spec.architecture)
    model.to(device)
    fingerprint = _fingerprint(spec, len(reader), augment)

    t0 = time.perf_counter()
    store_path = _scratch(spec, "teachers.f32", replica)
    teachers, store, sample, items, prepared, frozen = build_teachers(
        spec,
        reader,
        store_path,
        device,
        keep_models=on_the_fly,
        items_path=_scratch(spec, "items.bin", replica),
    )
    stacks = stack_teachers(teachers, spec)
    if prepared.channel_mean is not None:  # a warm start replaces them with its ancestor's
        model.set_input_stats(prepared.channel_mean, prepared.channel_std)
    teacher_seconds = time.perf_counter() - t0
    # inherit the newest constrained ancestor's weights where the architecture allows it
    warm_from = warm_note = None
    if spec.warm_start and spec.constraints:
        newest = max(spec.constraints, key=lambda c: c.target)
        old = load_model(newest.checkpoint, newest.sha256).to(device)
        if inherit_weights(model, old, torch.as_tensor(sample, device=device)):
            warm_from = newest.target
        else:
            warm_note = (
                f"generation {spec.generation} trains from scratch: generation {newest.target}'s "
                f"weights cannot start {_arch_name(spec.architecture)} as its function (another "
                "kind, fewer stages or narrower; a team's own backbone needs the same factory "
                "and options, or grow_from)"
            )
        del old  # not held through the training
    # on a GPU: channels-last convolutions, mixed precision (bfloat16 where the device
    # has it, else float16 with a gradient scaler)
    channels_last = cuda and is_convolutional(spec.architecture) and len(input_shape) == 3
    amp_dtype = scaler = None
    if cuda:
        torch.backends.cudnn.benchmark = True
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if amp_dtype == torch.float16:
            scaler = torch.amp.GradScaler("cuda")
    if channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]  # a fixed head stays put
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, spec.epochs))

    history: list[dict[str, float]] = []
    first_epoch = 0
    resume = resume_path(spec.checkpoint_dir, spec.generation)
    # every rank reads rank 0's resume file: each holds the optimizer's state itself
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
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        history = [dict(h) for h in state["history"]]
        first_epoch = int(state["epoch"]) + 1
    if parallel:
        _same_on_every_rank(first_epoch, "the epoch to resume from", resume, device)
    # the steps call the wrapped model (DDP all-reduces its gradients); ``model`` is saved
    net = replica.wrap(model) if replica.wrap is not None else model

    window = window_items(input_shape, spec.batch_size, store.row_bytes if store else 0)
    epoch_seconds: list[float] = []
    items_seen = 0
    for epoch in range(first_epoch, spec.epochs):
        t_epoch = time.perf_counter()
        model.train()
        # the order depends on (seed, epoch) only: a resumed epoch sees what it would have
        epoch_items = ShuffledItems(
            items,
            spec.batch_size,
            window,
            spec.seed,
            epoch,
            store,
            rank=replica.rank,
            world_size=replica.world_size,
        )
        loader = DataLoader(
            epoch_items, batch_size=None, num_workers=spec.loader_workers, pin_memory=cuda
        )
        sums = {"loss": 0.0, "ce": 0.0} | {kind.value: 0.0 for kind in REGISTRY}
        steps = 0
        gen = (
            _epoch_generator(spec.seed, epoch, device, replica.rank) if augment != "none" else None
        )
        for step, batch in enumerate(loader):
            xb = batch["x"].to(device, non_blocking=True)
            yb = batch["y"].to(device, non_blocking=True)
            teacher_emb = batch["teacher"].to(device, non_blocking=True) if store else None
            xb = augment_batch(xb, augment, gen)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            if frozen:  # the ancestors' view of this very (augmented) batch
                with torch.no_grad(), torch.autocast(device.type, amp_dtype, enabled=cuda):
                    teacher_emb = torch.stack([m.embed(xb).float() for m in frozen])
            with torch.autocast(device.type, amp_dtype, enabled=cuda):
                emb, logits = net(xb)
            emb, logits = emb.float(), logits.float()  # the losses in float32

            ce = F.cross_entropy(logits, yb)
            terms = constraint_losses(stacks, StepInputs(emb, logits, yb, teacher_emb), spec)
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
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            steps += 1
            items_seen += len(yb)
            sums["loss"] += value
            sums["ce"] += float(ce.detach())
            for kind, term in terms.items():
                sums[kind.value] += float(term.detach())
        sched.step()
        if parallel:  # the epoch's means over every rank's steps
            sums, steps = _sum_over_ranks(sums, steps, device)
        history.append({k: v / max(1, steps) for k, v in sums.items()} | {"epoch": epoch})
        epoch_seconds.append(time.perf_counter() - t_epoch)
        if lead:
            state = {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "history": history,
                "epoch": epoch,
                "fingerprint": fingerprint,
            }
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            resume.parent.mkdir(parents=True, exist_ok=True)
            tmp = resume.with_name(resume.name + ".tmp")
            torch.save(state, tmp)
            tmp.replace(resume)  # atomic: a kill never leaves a half-written resume file
            # checked after the write: whichever of abandon's delete and this write comes
            # last, no resume file of an abandoned generation survives
            if abandoned_marker(spec.checkpoint_dir, spec.generation).exists():
                resume.unlink(missing_ok=True)
                raise TrainingInterrupted(f"generation {spec.generation} was abandoned")
        if parallel:  # no rank stops (or is stopped) before rank 0's resume file is whole
            torch.distributed.barrier()
        stop = spec.stop_after_epochs
        if stop is not None and epoch - first_epoch + 1 >= stop and epoch < spec.epochs - 1:
            raise TrainingInterrupted(
                f"generation {spec.generation}: stopped after epoch {epoch} "
                f"(stop_after_epochs={stop}); {resume} resumes it"
            )

    path = Path(spec.checkpoint_dir) / f"gen-{spec.generation}.pt"
    sha = None
    if lead:
        sha = save_model(model.cpu().to(memory_format=torch.contiguous_format), path)
        resume.unlink(missing_ok=True)
    store_path.unlink(missing_ok=True)
    if isinstance(items, ItemStore):
        items.path.unlink(missing_ok=True)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    if parallel:  # every rank's items; the largest process
        items_seen = int(_reduce(float(items_seen), device, "sum"))
        peak_rss = int(_reduce(float(peak_rss), device, "max"))
    return {
        "checkpoint": str(path) if lead else None,
        "sha256": sha,
        "history": history,
        "train_seconds": time.perf_counter() - started,
        "teacher_seconds": teacher_seconds,
        "epoch_seconds": epoch_seconds,
        "items": len(reader),
        "items_seen": items_seen,
        "peak_rss_bytes": peak_rss,
        "resumed_from_epoch": first_epoch,
        "teachers": [t.target for t in teachers],
        # what the loop applied: {kind: {ancestor: weight}}, from the stacks themselves
        "constraint_weights": received_weights(stacks),
        "warm_start_from": warm_from,
        "warm_start_note": warm_note,
        "augment": augment,
        # the ancestors embedded each augmented batch (else: their outputs precomputed)
        "teachers_per_batch": bool(frozen),
        "device": device.type,
        "amp": str(amp_dtype).removeprefix("torch.") if amp_dtype is not None else None,
        "workers": replica.world_size,
    }


def train_distributed(
    spec: TrainSpec, custom: Mapping[str, float] | None = None
) -> Placed[dict[str, Any]]:
    """Train ``spec`` on ``spec.workers`` Ray Train workers; rank 0's result and node.

    ``custom``: the Ray resources the training needs (default ``GRACEFUL_TRAIN_RESOURCES``),
    shared among the workers. The result has every key of the single process's;
    ``train_seconds`` is measured here (it includes starting the workers).
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = time.perf_counter()
    ensure_ray()  # before the trainer, which would otherwise start a Ray of its own
    scaling = ddp_resources(spec.workers, train_resources() if custom is None else custom)
    threads = int(scaling["resources_per_worker"]["CPU"])
    storage = (Path(spec.checkpoint_dir) / f"gen-{spec.generation}.ray-train").resolve()
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"spec": dataclasses.replace(spec, threads=threads)},
        scaling_config=ScalingConfig(num_workers=spec.workers, **scaling),
        run_config=RunConfig(
            name="run",
            storage_path=str(storage),
            # a failed worker fails the training, as a failed task does; a retry is a resume
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    try:
        outcome = trainer.fit()
    except Exception as exc:
        cause = _worker_error(exc)
        if cause is exc:
            raise
        raise cause from exc
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    done = outcome.return_value
    result = dict(done["result"], train_seconds=time.perf_counter() - started)
    return Placed(result, done["node_id"], done["node_ip"])


def _worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """One Ray Train worker: the loop with its rank; rank 0 returns the result."""
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model, move_to_device=False)

    replica = Replica(ctx.get_world_rank(), ctx.get_world_size(), device, wrap)
    result = train_replica(config["spec"], replica)
    if replica.rank != 0:
        return None
    node = ray.get_runtime_context().get_node_id()
    return {"result": result, "node_id": node, "node_ip": ray.util.get_node_ip_address()}


def _worker_error(exc: Exception) -> Exception:
    """The exception a worker raised (the lowest rank's), or ``exc`` itself."""
    failures: dict[int, BaseException] = getattr(exc, "worker_failures", None) or {}
    for _, error in sorted(failures.items()):
        # a rank stopped because another failed shows Ray's error, not the cause
        if isinstance(error, Exception) and not type(error).__module__.startswith("ray."):
            return error
    return exc


def _reduce(value: float, device: torch.device, op: str) -> float:
    """``value`` summed (``sum``) or maximised (``max``) over the ranks."""
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return float(t.item())


def _sum_over_ranks(
    sums: dict[str, float], steps: int, device: torch.device
) -> tuple[dict[str, float], int]:
    """One epoch's loss sums and step count, added up over the ranks (one all-reduce)."""
    import torch.distributed as dist

    t = torch.tensor([*sums.values(), float(steps)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    values = t.tolist()
    return dict(zip(sums, values[:-1], strict=True)), int(values[-1])


def _same_on_every_rank(value: int, what: str, resume: Path, device: torch.device) -> None:
    """Refuse to train when the ranks disagree (they would wait on each other forever)."""
    low = -_reduce(-float(value), device, "max")
    high = _reduce(float(value), device, "max")
    if low != high:
        raise RuntimeError(
            f"the training workers disagree on {what} ({low:.0f} to {high:.0f}): some "
            f"cannot read {resume}; put GRACEFUL_HOME on storage every node mounts "
            "(deploy/CLUSTER.md)"
        )


def _arch_name(architecture: dict[str, Any]) -> str:
    if architecture.get("kind") == "import":
        return f"the backbone of {architecture.get('factory')}"
    return f"a {architecture.get('kind', 'mlp')} of width {architecture.get('width')}"


def _fingerprint(spec: TrainSpec, n_items: int, augment: str) -> str:
    """What must match for a resume file to continue this training (not another one)."""
    targets = sorted((c.target, str(c.kind), c.weight, c.sha256 or "") for c in spec.constraints)
    if spec.source is not None:
        data = spec.source.fingerprint
    else:
        y = np.ascontiguousarray(spec.y, dtype=np.int64)
        data = hashlib.sha256(y.tobytes()).hexdigest() + repr(tuple(np.shape(spec.x)))
    return repr(
        (
            spec.seed,
            spec.epochs,
            sorted(spec.architecture.items()),
            spec.embed_dim,
            spec.num_classes,
            n_items,
            data[:16],
            spec.batch_size,
            spec.lr,
            spec.weight_decay,
            targets,
            (spec.focal_alpha, spec.focal_beta, spec.focal_temperature),
            (spec.influence_scale, spec.bct_prototypes, spec.influence_head),
            (spec.embedding_scope, spec.warm_start, spec.contrastive_temperature),
            augment,
        )
    )

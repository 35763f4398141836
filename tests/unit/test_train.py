"""Training one generation: reproducibility, resume after a kill, divergence, teachers,
constraints across architecture changes. Synthetic data, a few epochs, CPU."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import workers.learning.train as train_mod
from workers.data.datasets import load_dataset
from workers.data.readers import ArrayItems
from workers.data.scenario import eval_split
from workers.data.stream import TeacherStore, prepare
from workers.learning.embed import forward
from workers.learning.models import EmbeddingNet, cosine_logits, load_model
from workers.learning.spec import ConstraintSpec, TrainSpec
from workers.learning.train import (
    TrainingDiverged,
    TrainingInterrupted,
    abandoned_marker,
    teacher_head,
    train_generation,
)
from workers.measuring.metrics import retrieval_top1

ROOT = Path(__file__).resolve().parents[2]
MLP = {"kind": "mlp", "width": 16, "depth": 1}


def blobs(n_per_class: int = 40, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Separable Gaussian blobs shaped as 1x4x4 images (so both mlp and cnn apply)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2.0, size=(classes, 16))
    y = np.repeat(np.arange(classes), n_per_class)
    x = centres[y] + rng.normal(0, 1.0, size=(len(y), 16))
    return x.reshape(-1, 1, 4, 4).astype(np.float32), y.astype(np.int64)


X, Y = blobs()


def spec(tmp: Path, **kw) -> TrainSpec:
    base = dict(
        generation=1,
        x=X,
        y=Y,
        num_classes=4,
        classes=[0, 1, 2, 3],
        architecture=dict(MLP),
        embed_dim=8,
        epochs=4,
        batch_size=32,
        lr=1e-2,
        seed=3,
        checkpoint_dir=str(tmp),
        threads=1,
    )
    return TrainSpec(**(base | kw))


def state_of(result: dict) -> dict[str, torch.Tensor]:
    return load_model(result["checkpoint"], result["sha256"]).state_dict()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path) -> None:
    r1 = train_generation(spec(tmp_path / "a"))
    r2 = train_generation(spec(tmp_path / "b"))
    assert_same_weights(state_of(r1), state_of(r2))
    assert r1["sha256"] == r2["sha256"]
    r3 = train_generation(spec(tmp_path / "c", seed=4))
    w1, w3 = state_of(r1), state_of(r3)
    assert not torch.equal(w1["project.weight"], w3["project.weight"])
    assert len(r1["history"]) == 4 and r1["history"][-1]["ce"] < r1["history"][0]["ce"]


def test_an_abandoned_generation_still_training_stops_and_leaves_no_resume_file(
    tmp_path: Path,
) -> None:
    """A killed cycle's orphaned worker may still train a generation that `graceful
    abandon` closed: at its next epoch it sees the marker, removes the resume file it
    just wrote and stops (CI once found the file back after abandon had removed it)."""
    abandoned_marker(tmp_path, 1).touch()
    with pytest.raises(TrainingInterrupted, match="generation 1 was abandoned"):
        train_generation(spec(tmp_path, epochs=5))
    assert not (tmp_path / "gen-1.resume.pt").exists()
    assert not (tmp_path / "gen-1.pt").exists()


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path: Path) -> None:
    full = train_generation(spec(tmp_path / "full", epochs=5))
    assert full["resumed_from_epoch"] == 0

    killed = spec(tmp_path / "killed", epochs=5, stop_after_epochs=2)
    with pytest.raises(TrainingInterrupted, match="after epoch 1"):
        train_generation(killed)
    resume = tmp_path / "killed" / "gen-1.resume.pt"
    assert resume.exists() and not (tmp_path / "killed" / "gen-1.pt").exists()

    resumed = train_generation(spec(tmp_path / "killed", epochs=5))
    assert resumed["resumed_from_epoch"] == 2
    assert len(resumed["epoch_seconds"]) == 3  # only epochs 2, 3, 4 ran again
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2, 3, 4]
    assert_same_weights(state_of(full), state_of(resumed))
    assert resumed["history"] == full["history"]
    assert not resume.exists()  # a finished training leaves only its checkpoint


KILL_SCRIPT = """
import sys, numpy as np
sys.path.insert(0, {root!r})
from workers.learning.train import TrainSpec, train_generation
z = np.load({data!r})
train_generation(TrainSpec(generation=1, x=z["x"], y=z["y"], num_classes=4,
    classes=[0, 1, 2, 3], architecture={arch!r}, embed_dim=8, epochs={epochs},
    batch_size=32, lr=1e-2, seed=3, checkpoint_dir={ckpt!r}, threads=1))
"""


@pytest.mark.slow  # a SIGKILL of a training process, then two 400-epoch trainings
def test_resume_after_sigkill(tmp_path: Path) -> None:
    """A real kill: SIGKILL the training process once a resume file exists, resume here."""
    epochs = 400  # long enough that the kill lands mid-training
    np.savez(tmp_path / "data.npz", x=X, y=Y)
    ckpt = tmp_path / "killed"
    code = KILL_SCRIPT.format(
        root=str(ROOT), data=str(tmp_path / "data.npz"), arch=MLP, epochs=epochs, ckpt=str(ckpt)
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    resume = ckpt / "gen-1.resume.pt"
    deadline = time.monotonic() + 120
    while not resume.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, (
        proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    )
    assert resume.exists() and not (ckpt / "gen-1.pt").exists()

    resumed = train_generation(spec(ckpt, epochs=epochs))
    assert 0 < resumed["resumed_from_epoch"] < epochs
    full = train_generation(spec(tmp_path / "full", epochs=epochs))
    assert_same_weights(state_of(full), state_of(resumed))


def test_resume_file_of_another_training_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TrainingInterrupted):
        train_generation(spec(tmp_path, stop_after_epochs=1))
    with pytest.raises(RuntimeError, match="belongs to a different training of generation 1"):
        train_generation(spec(tmp_path, lr=2e-2))
    with pytest.raises(RuntimeError, match="belongs to a different training"):
        train_generation(spec(tmp_path, y=Y[::-1].copy()))
    # the same training resumes
    assert train_generation(spec(tmp_path))["resumed_from_epoch"] == 1


def test_nan_loss_stops_with_epoch_and_step(tmp_path: Path) -> None:
    # the first layer overflows (feature vectors: images would be normalised first)
    huge = np.where(X > 0, 3e38, -3e38).astype(np.float32).reshape(len(X), -1)
    with pytest.raises(TrainingDiverged, match=r"generation 1: loss nan at epoch 0 step 0"):
        train_generation(spec(tmp_path, x=huge))
    assert not (tmp_path / "gen-1.pt").exists()


def test_exploding_learning_rate_stops(tmp_path: Path) -> None:
    with pytest.raises(TrainingDiverged, match=r"at epoch \d+ step \d+ \(ce="):
        train_generation(spec(tmp_path, lr=1e30, epochs=3))
    assert not (tmp_path / "gen-1.pt").exists()


def test_exploding_loss_threshold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a finite loss above the bound stops the run too (the bound lowered to hit it)
    monkeypatch.setattr(train_mod, "EXPLODING_LOSS", 1e-3)
    with pytest.raises(TrainingDiverged, match="at epoch 0 step 0"):
        train_generation(spec(tmp_path))


def _prototype_model() -> EmbeddingNet:
    """depth 0 and an identity projection: the embedding is the normalised input."""
    model = EmbeddingNet((2,), 3, 2, {"kind": "mlp", "width": 2, "depth": 0})
    with torch.no_grad():
        model.project.weight.copy_(torch.eye(2))
        model.project.bias.zero_()
        model.head.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 2.0], [5.0, 5.0]]))
    return model


def test_teacher_heads_and_logits_by_hand(tmp_path: Path) -> None:
    model = _prototype_model()
    x = np.array([[3.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    y = np.array([0, 2, 2])
    store = TeacherStore(tmp_path / "t.f32", n=3, k=1, d=2)
    prepared = prepare(ArrayItems(x, y), [model], store, num_classes=3, device=torch.device("cpu"))
    sums, counts = prepared.class_sums, prepared.counts
    # embeddings (1,0), (1,0), (0,1), written once to disk and read back by position
    emb = torch.from_numpy(store.take(np.arange(3)).copy())[:, 0]
    assert torch.allclose(emb, torch.tensor([[1.0, 0], [1, 0], [0, 1]]))
    assert torch.allclose(torch.from_numpy(store.take([2]).copy())[0, 0], torch.tensor([0.0, 1]))
    assert counts.tolist() == [1.0, 0.0, 2.0]
    assert torch.allclose(sums[0, 2], torch.tensor([1.0, 1.0]))
    own = model.head.weight.detach()
    head = teacher_head(own, sums[0], counts, classes=[0, 1])
    # class 2 was never seen: its row = normalised mean embedding of its items, (1,0) and
    # (0,1) -> mean (0.5, 0.5) -> (0.7071, 0.7071), times the mean row norm of the old
    # head (2 + 2 + sqrt(50)) / 3 = 3.6904
    norm = (4 + math.sqrt(50)) / 3
    expected = torch.tensor([norm / math.sqrt(2)] * 2)
    assert torch.allclose(head[2], expected, atol=1e-5)
    # rows of classes it saw are its own head's
    assert torch.equal(head[:2], torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
    # its logits are 16 * cos with the *original* head: item (1, 0) -> (16, 0, 16/sqrt2)
    logits = cosine_logits(emb[None], own[None])[0]
    assert torch.allclose(logits[1], torch.tensor([16.0, 0.0, 16 / math.sqrt(2)]), atol=1e-4)
    assert torch.allclose(logits[2], torch.tensor([0.0, 16.0, 16 / math.sqrt(2)]), atol=1e-4)
    assert torch.allclose(logits, model(torch.from_numpy(x))[1], atol=1e-5)  # as its forward
    # without BCT prototypes the head is left as it was
    plain = teacher_head(own, sums[0], counts, classes=[0, 1], bct_prototypes=False)
    assert torch.equal(plain, own)
    # a head of centroids: every class with items gets its normalised mean old embedding
    # (class 0: (1, 0) * 3.6904); class 1 has no items and keeps its own row
    cent = teacher_head(own, sums[0], counts, classes=[0, 1], centroids=True)
    assert torch.allclose(cent[0], torch.tensor([norm, 0.0]), atol=1e-5)
    assert torch.equal(cent[1], torch.tensor([0.0, 2.0]))
    assert torch.allclose(cent[2], expected, atol=1e-5)


def test_teachers_are_run_once_not_per_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = train_generation(spec(tmp_path / "old", epochs=1))
    calls = {"n": 0}
    real_load = train_mod.load_model

    def counting_load(path, sha=None):
        model = real_load(path, sha)
        inner = model.embed

        def embed(x):
            calls["n"] += 1
            return inner(x)

        model.embed = embed  # type: ignore[method-assign]
        return model

    monkeypatch.setattr(train_mod, "load_model", counting_load)
    constraints = [
        ConstraintSpec(1, kind, 1.0, old["checkpoint"], old["sha256"], [0, 1, 2, 3])
        for kind in ("influence", "focal", "embedding")
    ]
    r = train_generation(spec(tmp_path / "new", generation=2, epochs=3, constraints=constraints))
    # 160 items: one batched pass of the frozen model, once for all three epochs
    assert calls["n"] == 1
    assert not list((tmp_path / "new").glob("*.teachers.f32"))  # its store is removed after
    assert r["teachers"] == [1]
    last = r["history"][-1]
    assert last["influence"] > 0 and last["focal"] > 0 and last["embedding"] > 0
    assert last["loss"] == pytest.approx(
        last["ce"] + last["influence"] + last["focal"] + last["embedding"], rel=1e-5
    )


def test_unknown_constraint_kind(tmp_path: Path) -> None:
    old = train_generation(spec(tmp_path / "old", epochs=1))
    bad = [ConstraintSpec(1, "magic", 1.0, old["checkpoint"], old["sha256"], [0, 1])]
    with pytest.raises(ValueError, match="unknown constraint kind 'magic'"):
        train_generation(spec(tmp_path, generation=2, constraints=bad))


@pytest.mark.slow  # four trainings of 6 epochs on digits
def test_constraints_across_architecture_changes(tmp_path: Path) -> None:
    """digits: mlp w32 d1 (classes 0-5) -> mlp w64 d2 -> cnn; embed_dim stays 16 and the
    constraints bind across the changes: the cnn's queries retrieve from the first mlp's
    gallery far better than an unconstrained cnn's."""
    ds = load_dataset("digits")

    def train(gen, arch, classes, constraints=(), sub="chain"):
        idx = np.isin(ds.y_train, classes)
        return train_generation(
            TrainSpec(
                generation=gen,
                x=ds.x_train[idx],
                y=ds.y_train[idx],
                num_classes=10,
                classes=list(classes),
                architecture=arch,
                embed_dim=16,
                epochs=6,
                batch_size=64,
                lr=5e-3,
                seed=0,
                constraints=list(constraints),
                checkpoint_dir=str(tmp_path / sub),
                threads=1,
            )
        )

    kinds = ("influence", "focal", "embedding")
    g1 = train(1, {"kind": "mlp", "width": 32, "depth": 1}, range(6))
    c1 = [ConstraintSpec(1, k, 1.0, g1["checkpoint"], g1["sha256"], list(range(6))) for k in kinds]
    g2 = train(2, {"kind": "mlp", "width": 64, "depth": 2}, range(10), c1)
    c2 = c1 + [
        ConstraintSpec(2, k, 1.0, g2["checkpoint"], g2["sha256"], list(range(10))) for k in kinds
    ]
    cnn = {"kind": "cnn", "width": 16, "depth": 2}
    g3 = train(3, cnn, range(10), c2)
    free = train(3, cnn, range(10), (), sub="free")

    models = [load_model(r["checkpoint"], r["sha256"]) for r in (g1, g2, g3, free)]
    archs = [m.config["architecture"] for m in models]
    assert [(a["kind"], a["width"], a["depth"]) for a in archs[:3]] == [
        ("mlp", 32, 1),
        ("mlp", 64, 2),
        ("cnn", 16, 2),
    ]
    assert {m.config["embed_dim"] for m in models} == {16}
    assert g2["teachers"] == [1] and g3["teachers"] == [1, 2]
    hist = g3["history"]
    for kind in kinds:
        assert hist[-1][kind] < hist[0][kind], kind

    out = [forward(m, ds.x_test) for m in models]
    y = ds.y_test
    gal, qry = eval_split(len(y))

    def c(a: int, b: int) -> float:
        return retrieval_top1(out[a].embedding[qry], y[qry], out[b].embedding[gal], y[gal])

    # queries by the constrained cnn against the galleries of both mlps, vs the free cnn
    # (measured: 0.46 vs 0.13 against generation 1, 0.63 vs 0.13 against generation 2)
    assert c(2, 0) > c(3, 0) + 0.2, (c(2, 0), c(3, 0))
    assert c(2, 1) > c(3, 1) + 0.3, (c(2, 1), c(3, 1))
    assert min(c(0, 0), c(1, 1), c(2, 2)) > 0.85

    # an ancestor with another embedding dimension cannot constrain
    with pytest.raises(ValueError, match="compatibility needs one"):
        train_generation(spec(tmp_path / "d8", generation=4, constraints=c1))


def test_warm_start_inherits_the_newest_constrained_ancestor(tmp_path: Path) -> None:
    g1 = train_generation(spec(tmp_path / "a", epochs=3))
    g2 = train_generation(spec(tmp_path / "b", generation=2, epochs=3))
    cons = [
        ConstraintSpec(g, "influence", 1.0, r["checkpoint"], r["sha256"], [0, 1, 2, 3])
        for g, r in ((2, g2), (1, g1))
    ]
    wider = {"kind": "mlp", "width": 24, "depth": 2}
    # a negligible learning rate: the new generation is still its ancestor's function
    g3 = train_generation(
        spec(
            tmp_path / "c",
            generation=3,
            architecture=wider,
            constraints=cons,
            warm_start=True,
            lr=1e-12,
            epochs=1,
        )
    )
    assert g3["warm_start_from"] == 2  # the newest ancestor, not the first listed
    x = torch.tensor(X)
    with torch.no_grad():
        e2 = load_model(g2["checkpoint"]).embed(x)
        e3 = load_model(g3["checkpoint"]).embed(x)
    assert torch.nn.functional.cosine_similarity(e2, e3).min() > 0.98
    # a cnn cannot inherit an mlp: it starts fresh
    cnn = train_generation(
        spec(
            tmp_path / "d",
            generation=3,
            architecture={"kind": "cnn", "width": 4, "depth": 1},
            constraints=cons,
            warm_start=True,
            epochs=1,
        )
    )
    assert cnn["warm_start_from"] is None
    # without warm_start nothing is inherited
    fresh = spec(tmp_path / "e", constraints=cons, warm_start=False)
    assert train_generation(fresh)["warm_start_from"] is None


RESNET = {"kind": "resnet", "width": 4, "depth": 3}


def test_resnet_resume_with_augmentation_equals_uninterrupted_run(tmp_path: Path) -> None:
    """The crop and flip draws depend on (seed, epoch) only: a resumed epoch redraws them."""
    kw = dict(architecture=dict(RESNET), augment="crop+flip", epochs=3)
    full = train_generation(spec(tmp_path / "full", **kw))
    assert full["augment"] == "crop+flip" and full["device"] == "cpu" and full["amp"] is None
    with pytest.raises(TrainingInterrupted):
        train_generation(spec(tmp_path / "killed", stop_after_epochs=1, **kw))
    resumed = train_generation(spec(tmp_path / "killed", **kw))
    assert resumed["resumed_from_epoch"] == 1
    assert_same_weights(state_of(full), state_of(resumed))
    # the augmentation is part of the training: another mode trains other weights, and a
    # resume file of one is refused by the other
    plain = train_generation(spec(tmp_path / "plain", **(kw | {"augment": "none"})))
    assert plain["augment"] == "none"
    assert not torch.equal(state_of(full)["project.weight"], state_of(plain)["project.weight"])
    with pytest.raises(TrainingInterrupted):
        train_generation(spec(tmp_path / "other", stop_after_epochs=1, **kw))
    with pytest.raises(RuntimeError, match="belongs to a different training"):
        train_generation(spec(tmp_path / "other", **(kw | {"augment": "crop"})))


def test_augmentation_follows_the_data_set_rule(tmp_path: Path) -> None:
    """auto: a resnet on digits is cropped, not flipped; on Fashion-MNIST also flipped; an
    MLP on the same images and feature vectors are not augmented. A resnet distilled from
    an ancestor's per-item outputs is augmented too, its ancestors embedding each
    augmented batch (no precomputed output of the unaugmented item)."""
    kw = dict(architecture=dict(RESNET), epochs=1)
    g1 = train_generation(spec(tmp_path / "a", dataset="digits", **kw))
    assert g1["augment"] == "crop"
    fashion = spec(tmp_path / "b", dataset="fashion-mnist", **kw)
    assert train_generation(fashion)["augment"] == "crop+flip"
    assert train_generation(spec(tmp_path / "c", dataset="fashion-mnist"))["augment"] == "none"
    for kind, per_batch in (("influence", False), ("embedding", True), ("focal", True)):
        cons = [ConstraintSpec(1, kind, 1.0, g1["checkpoint"], g1["sha256"], [0, 1, 2, 3])]
        run = spec(tmp_path / kind, generation=2, dataset="digits", constraints=cons, **kw)
        result = train_generation(run)
        assert result["augment"] == "crop", kind
        assert result["teachers_per_batch"] is per_batch, kind
    flat = spec(tmp_path / "d", x=X.reshape(len(X), 16), augment="crop+flip")
    assert train_generation(flat)["augment"] == "none"
    with pytest.raises(ValueError, match="unknown augment 'rotate'"):
        train_generation(spec(tmp_path / "e", augment="rotate"))


def test_warm_start_across_resnet_growth(tmp_path: Path) -> None:
    """resnet w4 d3 -> w6 d4 (wider, a block more): the new generation starts as its
    ancestor's function (a negligible learning rate keeps it there)."""
    # enough steps for the BatchNorm running statistics to settle, on the items as they are
    g1 = train_generation(
        spec(tmp_path / "a", architecture=dict(RESNET), augment="none", epochs=12)
    )
    cons = [ConstraintSpec(1, "influence", 1.0, g1["checkpoint"], g1["sha256"], [0, 1, 2, 3])]
    grown = {"kind": "resnet", "width": 6, "depth": 4}
    g2 = train_generation(
        spec(
            tmp_path / "b",
            generation=2,
            architecture=grown,
            constraints=cons,
            augment="none",
            lr=1e-12,
            epochs=1,
        )
    )
    assert g2["warm_start_from"] == 1
    x = torch.tensor(X)
    with torch.no_grad():
        e1 = load_model(g1["checkpoint"]).embed(x)
        e2 = load_model(g2["checkpoint"]).embed(x)
    # equal but for the BatchNorm running statistics, which one epoch moved a little
    assert torch.nn.functional.cosine_similarity(e1, e2).min() > 0.98
    # a fresh start is far from it
    cold = train_generation(
        spec(
            tmp_path / "c",
            generation=2,
            architecture=grown,
            constraints=cons,
            lr=1e-12,
            epochs=1,
            warm_start=False,
        )
    )
    assert cold["warm_start_from"] is None
    with torch.no_grad():
        e3 = load_model(cold["checkpoint"]).embed(x)
    assert torch.nn.functional.cosine_similarity(e1, e3).mean() < 0.9


def test_fixed_head_does_not_move_in_training(tmp_path: Path) -> None:
    arch = dict(MLP, head="fixed")
    r = train_generation(spec(tmp_path, architecture=arch))
    model = load_model(r["checkpoint"])
    assert torch.equal(model.head.weight, EmbeddingNet((1, 4, 4), 4, 8, arch).head.weight)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"embedding_scope": "some"}, "unknown embedding_scope 'some'"),
        ({"influence_head": "tail"}, "unknown influence_head 'tail'"),
        ({"x": None}, "give the training items as x and y, or as a source"),
        ({"epochs": 0}, "need epochs >= 1"),
    ],
)
def test_bad_options_are_refused_before_training(
    tmp_path: Path, options: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        train_generation(spec(tmp_path, **options))
    assert not list(tmp_path.glob("*.pt"))

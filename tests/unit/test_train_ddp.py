"""Training beyond one process: ``train.workers`` = N runs the one training loop on N Ray
Train workers (DDP, gloo on this CPU machine). The item order's split across ranks is
checked by hand; the slow tests start Ray and compare 2 workers with 1 on digits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from flows.config import TrainConfig
from workers.data.readers import ArrayItems
from workers.data.stream import ShuffledItems
from workers.learning.spec import ConstraintSpec, TrainSpec
from workers.learning.train import (
    TrainingDiverged,
    TrainingInterrupted,
    check_spec,
)

MLP = {"kind": "mlp", "width": 64, "depth": 1}
# accuracy on digits' 540 test items: a binomial standard error of about 0.009 at 0.95,
# so two independent runs differ by 0.013 (one sigma); 2 workers and 1 start from the
# same weights and see the same items per step (only BatchNorm's statistics, float sums
# and the step's split differ), so 0.03 is generous for noise and tight for a bug (a
# rank training on half the items, or gradients never averaged, costs more)
TOLERANCE = 0.03
FLOOR = 0.85  # chance is 0.1


def _batches(items: ArrayItems, rank: int, world: int, batch: int = 10, window: int = 40):
    return list(ShuffledItems(items, batch, window, 7, 0, rank=rank, world_size=world))


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_each_batch_of_the_single_process_order(world: int) -> None:
    n = 103  # 10 batches of 10 and a last one of 3
    y = np.arange(n) % 5
    items = ArrayItems(np.arange(n, dtype=np.float32)[:, None], y)
    single = [b["pos"].tolist() for b in _batches(items, 0, 1)]
    ranks = [[b["pos"].tolist() for b in _batches(items, r, world)] for r in range(world)]
    # every rank takes as many steps (the gradients' all-reduce waits for each of them)
    assert len({len(r) for r in ranks}) == 1
    # the last batch (3 items) leaves a rank fewer than 2 when split: dropped by all
    assert len(ranks[0]) == 10 and len(single) == 11
    for step, whole in enumerate(single[:10]):
        shares = [ranks[r][step] for r in range(world)]
        assert sorted(sum(shares, [])) == sorted(whole)  # the step is the single batch
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    seen = sum((p for r in ranks for p in r), [])
    assert len(seen) == len(set(seen)) == 100  # disjoint; the epoch's whole batches
    # the items' rows come with their positions
    b = _batches(items, 1, world)[0]
    assert b["x"][:, 0].long().tolist() == b["pos"].tolist()
    assert b["y"].tolist() == (b["pos"] % 5).tolist()


def test_one_rank_of_one_is_the_single_process_order() -> None:
    y = np.arange(57) % 3
    items = ArrayItems(np.arange(57, dtype=np.float32)[:, None], y)
    plain = list(ShuffledItems(items, 8, 16, 3, 2))
    ranked = list(ShuffledItems(items, 8, 16, 3, 2, rank=0, world_size=1))
    assert [b["pos"].tolist() for b in plain] == [b["pos"].tolist() for b in ranked]
    with pytest.raises(ValueError, match="rank 2"):
        ShuffledItems(items, 8, 16, 3, 2, rank=2, world_size=2)


def test_workers_need_two_items_each_of_a_batch() -> None:
    assert TrainConfig().workers == 1
    assert (
        TrainConfig(workers=4, batch_size=8)
        .train_spec(1, x=None, y=None, num_classes=2, classes=[0], architecture={})
        .workers
        == 4
    )
    with pytest.raises(ValidationError, match="fewer than 2 items"):
        TrainConfig(workers=4, batch_size=6)
    with pytest.raises(ValidationError):
        TrainConfig(workers=0)
    x, y = np.zeros((4, 2), np.float32), np.zeros(4, np.int64)
    spec = TrainSpec(1, x, y, 2, [0], MLP, batch_size=6, workers=4)
    with pytest.raises(ValueError, match="batch_size >= 2 x workers"):
        check_spec(spec)


# -- Ray Train: 2 gloo workers on this machine's CPUs -------------------------------------
@pytest.fixture(scope="module")
def digits():
    from workers.data.datasets import load_dataset

    return load_dataset("digits")


def _spec(ds, tmp: Path, **kw) -> TrainSpec:
    """Digits' MLP training; ``ds`` None: the items come as ``source=`` in ``kw``."""
    base = dict(
        generation=1,
        x=ds.x_train if ds is not None else None,
        y=ds.y_train if ds is not None else None,
        num_classes=10,
        classes=list(range(10)),
        architecture=dict(MLP),
        embed_dim=16,
        epochs=6,
        batch_size=64,
        lr=5e-3,
        seed=0,
        checkpoint_dir=str(tmp),
        threads=1,
    )
    return TrainSpec(**(base | kw))


def _accuracy(result: dict, ds) -> float:
    from workers.learning.embed import forward
    from workers.learning.models import load_model
    from workers.measuring.metrics import accuracy

    # load_model checks the recorded sha256 and loads with weights_only=True
    model = load_model(result["checkpoint"], result["sha256"])
    return accuracy(forward(model, ds.x_test).prediction, ds.y_test)


def _train(spec: TrainSpec) -> dict:
    from workers.learning.train import train_generation

    return train_generation(spec)


@pytest.mark.slow  # starts Ray and a 2-worker Ray Train run
def test_two_workers_reach_the_single_workers_accuracy(digits, tmp_path: Path) -> None:
    one = _train(_spec(digits, tmp_path / "one"))
    two = _train(_spec(digits, tmp_path / "two", workers=2))
    acc1, acc2 = _accuracy(one, digits), _accuracy(two, digits)
    assert acc1 > FLOOR and acc2 > FLOOR, (acc1, acc2)
    assert abs(acc1 - acc2) <= TOLERANCE, (acc1, acc2)
    assert set(two) == set(one)  # every key the single process reports
    assert (one["workers"], two["workers"]) == (1, 2)
    # the ranks' steps together are the epoch: every item of every whole batch once
    assert two["items_seen"] == one["items_seen"] == 6 * len(digits.y_train)
    assert len(two["history"]) == len(two["epoch_seconds"]) == 6
    assert two["history"][-1]["loss"] < two["history"][0]["loss"]
    assert two["checkpoint"] == str(tmp_path / "two" / "gen-1.pt")
    # nothing else is left where it trained: no resume file, no rank's scratch files, no
    # Ray Train run directory
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["gen-1.pt"]


@pytest.mark.slow  # starts Ray and two 2-worker Ray Train runs
def test_two_workers_apply_the_same_constraints(digits, tmp_path: Path) -> None:
    first = _train(_spec(digits, tmp_path / "g1", epochs=2, classes=list(range(6))))
    constraints = [
        ConstraintSpec(1, kind, w, first["checkpoint"], first["sha256"], list(range(6)))
        for kind, w in (("influence", 1.0), ("focal", 0.3), ("embedding", 2.0))
    ]
    spec = _spec(digits, tmp_path / "g2", generation=2, epochs=3, constraints=constraints)
    one = _train(spec)
    two = _train(dataclasses.replace(spec, checkpoint_dir=str(tmp_path / "g2w"), workers=2))
    assert two["constraint_weights"] == one["constraint_weights"]
    assert two["constraint_weights"] == {
        "influence": {"1": 1.0},
        "focal": {"1": pytest.approx(0.3)},
        "embedding": {"1": 2.0},
    }
    assert two["teachers"] == [1] and two["warm_start_from"] == 1
    last = two["history"][-1]
    assert last["influence"] > 0 and last["focal"] > 0 and last["embedding"] > 0
    assert abs(_accuracy(one, digits) - _accuracy(two, digits)) <= TOLERANCE
    assert sorted(p.name for p in (tmp_path / "g2w").iterdir()) == ["gen-2.pt"]


@pytest.mark.slow  # starts Ray and three 2-worker Ray Train runs
def test_an_interrupted_two_worker_training_resumes_from_rank_0s_file(
    digits, tmp_path: Path
) -> None:
    spec = _spec(digits, tmp_path, epochs=3, workers=2)
    with pytest.raises(TrainingInterrupted, match="stopped after epoch 0"):
        _train(dataclasses.replace(spec, stop_after_epochs=1))  # raised as itself
    assert (tmp_path / "gen-1.resume.pt").exists()
    assert not (tmp_path / "gen-1.pt").exists()
    resumed = _train(spec)
    assert resumed["resumed_from_epoch"] == 1
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2]
    assert len(resumed["epoch_seconds"]) == 2
    assert _accuracy(resumed, digits) > FLOOR
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen-1.pt"]
    # a diverging loss stops the workers with the single process's error
    with pytest.raises(TrainingDiverged, match="epoch 0"):
        _train(_spec(digits, tmp_path / "nan", lr=1e30, epochs=2, workers=2))


def _digits_folder(root: Path) -> None:
    """scikit-learn's digits as PNGs, one folder per class (train/ and test/)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    test = np.random.default_rng(0).random(len(d.target)) < 0.25
    for i, (img, label) in enumerate(zip(d.images, d.target, strict=True)):
        out = root / ("test" if test[i] else "train") / f"digit-{label}"
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255 / 16).astype(np.uint8), "L").save(out / f"{i:04d}.png")


@pytest.mark.slow  # starts Ray and a 2-worker Ray Train run on a streamed image folder
def test_two_workers_stream_a_source_as_one_does(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from workers.data.sources import load_eval, scan_source
    from workers.learning.spec import SourceItems

    _digits_folder(tmp_path / "digits")
    source = f"imagefolder:{tmp_path / 'digits'}"
    scan, ev = scan_source(source), load_eval(source)
    names = sorted(set(scan.class_counts()) | set(ev.labels))
    vocab = {n: i for i, n in enumerate(names)}
    pq.write_table(scan.table, tmp_path / "keys.parquet")
    items = SourceItems(
        source, str(tmp_path / "keys.parquet"), vocab, ev.input_format.as_dict(), scan.fingerprint
    )
    y_test = np.asarray([vocab[n] for n in ev.labels])
    acc = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        spec = _spec(None, out, source=items, workers=workers)
        result = _train(spec)
        assert result["items"] == scan.items and result["workers"] == workers
        from workers.learning.embed import forward
        from workers.learning.models import load_model
        from workers.measuring.metrics import accuracy

        model = load_model(result["checkpoint"], result["sha256"])
        acc[workers] = accuracy(forward(model, ev.x).prediction, y_test)
        # each rank's decoded items (gen-1.rank-R.items.bin) are gone with the training
        assert sorted(p.name for p in out.iterdir()) == ["gen-1.pt"]
    assert acc[1] > FLOOR and acc[2] > FLOOR, acc
    assert abs(acc[1] - acc[2]) <= TOLERANCE, acc


@pytest.mark.slow  # a whole cycle: Ray, a 2-worker training, evaluation, gate, backfill
def test_a_cycle_trains_with_two_workers(home: Path) -> None:
    from flows.config import CycleConfig, GateConfig
    from flows.cycle import run_cycle
    from store.files import verify_checkpoint
    from store.lineage import Lineage

    lin = Lineage()
    # the scenario's first stage is 270 items (2 batches): 20 epochs are 40 steps
    train = TrainConfig(method="none", epochs=20, workers=2)
    out = run_cycle(lin, CycleConfig(dataset="digits", stages=3, train=train, gate=GateConfig()))
    gen = lin.generation(out["generation"])
    assert out["promoted"] and gen.is_champion
    assert out["train"]["workers"] == 2 and out["train"]["ray_node"]
    # stage 1 holds 6 of the 10 classes: at most 0.6 (one worker: 0.596)
    assert gen.accuracy > 0.5
    verify_checkpoint(gen.checkpoint_path, gen.checkpoint_sha256)
    assert Path(gen.checkpoint_path).parent == home / "checkpoints"
    assert sorted(p.name for p in (home / "checkpoints").iterdir()) == [f"gen-{gen.id}.pt"]


def _nodes(monkeypatch: pytest.MonkeyPatch, *resources: dict) -> None:
    import ray

    import workers.runtime as runtime

    monkeypatch.setattr(runtime, "ensure_ray", lambda: None)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": r} for r in resources])


def test_workers_take_a_gpu_each_or_a_share_of_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.runtime import RayUnavailable, ddp_resources

    _nodes(monkeypatch, {"CPU": 2.0})  # this machine: one CPU each
    assert ddp_resources(2) == {"use_gpu": False, "resources_per_worker": {"CPU": 1.0}}
    _nodes(monkeypatch, {"CPU": 16.0})  # at most 4 each, as a single training task
    assert ddp_resources(2)["resources_per_worker"] == {"CPU": 4.0}
    _nodes(monkeypatch, {"CPU": 3.0}, {"CPU": 3.0})  # 2 each would place only 2 of 3
    assert ddp_resources(3)["resources_per_worker"] == {"CPU": 1.0}
    # a GPU per worker where the nodes hold as many; the training's own resources shared
    gpu = {"CPU": 8.0, "GPU": 1.0, "graceful_worker": 1.0}
    _nodes(monkeypatch, {"CPU": 4.0}, gpu, gpu)
    assert ddp_resources(2, {"graceful_worker": 1}) == {
        "use_gpu": True,
        "resources_per_worker": {"CPU": 1.0, "GPU": 1.0, "graceful_worker": 0.5},
    }
    assert not ddp_resources(3)["use_gpu"]  # 2 GPUs for 3 workers: CPUs
    _nodes(monkeypatch, {"CPU": 1.0})
    with pytest.raises(RayUnavailable, match="2 training workers need a CPU each"):
        ddp_resources(2)

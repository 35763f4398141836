"""A user's source grows over cycles: snapshots with growing counts, a skipped cycle when
nothing changed, a class that appears later and is learnt without renumbering any other.
Real image folders and Parquet directories, the cycle's own steps, local Ray."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.config import CycleConfig, GateConfig, TrainConfig
from flows.cycle import run_cycle
from flows.cycle_steps import plan_cycle, start_cycle, train_step
from flows.report import build_report
from sources.data import digits, parquet_rows, write_images, write_parquet
from store.lineage import Lineage
from store.settings import StoreError
from workers.data.sources import SourceError
from workers.learning.embed import forward
from workers.learning.models import load_model

OLD, NEW = [0, 1, 2, 3], 4
CFG = dict(train=TrainConfig(epochs=8, batch_size=32), gate=GateConfig(enabled=False))


def cycle(lin: Lineage, spec: str | None, **kw) -> int | None:
    """One update cycle (the flow's own sequence); None when it was skipped."""
    result = run_cycle(lin, CycleConfig(dataset=spec, **(CFG | kw)))
    return None if result.get("skipped") else int(result["generation"])


def class_accuracy(lin: Lineage, gen_id: int, name: str) -> float:
    """Generation gen_id's accuracy on the evaluation items of class ``name``."""
    from flows.data import resolve_dataset

    ds = resolve_dataset(lin, None)
    gen = lin.generation(gen_id)
    mask = ds.y_test == lin.vocabulary()[name]
    out = forward(load_model(gen.checkpoint_path, gen.checkpoint_sha256), ds.x_test[mask])
    return float((out.prediction == ds.y_test[mask]).mean())


def check_growth(lin: Lineage, grow_1, grow_2, spec: str) -> None:
    g1 = cycle(lin, spec)
    assert g1 == 1
    assert cycle(lin, None) is None  # nothing new: skipped, no generation added
    assert [g.id for g in lin.generations()] == [1]
    grow_1()
    g2 = cycle(lin, None)  # the lineage knows its source: no --dataset
    vocab_before = lin.vocabulary()
    grow_2()
    g3 = cycle(lin, None)
    assert (g2, g3) == (2, 3)
    assert lin.vocabulary() == vocab_before  # nobody renumbered
    assert list(vocab_before)[:5] == [f"digit-{c}" for c in range(5)]

    snaps = {g["id"]: g["snapshot"] for g in build_report(lin)["generations"]}
    items = [snaps[g]["items"] for g in (1, 2, 3)]
    assert items[0] < items[1] < items[2]
    assert set(snaps[1]["classes"]) == set(snaps[2]["classes"]) == {f"digit-{c}" for c in OLD}
    assert set(snaps[3]["classes"]) == {f"digit-{c}" for c in [*OLD, NEW]}
    assert snaps[2]["classes"]["digit-0"] == 20 and snaps[3]["classes"]["digit-4"] == 20
    assert sum(snaps[3]["classes"].values()) == snaps[3]["items"]
    assert len({s["fingerprint"] for s in snaps.values()}) == 3
    assert lin.generation(3).classes == sorted(vocab_before[f"digit-{c}"] for c in [*OLD, NEW])
    # the new class: unknown to generation 1, learnt by generation 3
    assert class_accuracy(lin, 1, f"digit-{NEW}") == 0.0
    assert class_accuracy(lin, 3, f"digit-{NEW}") >= 0.7
    # every generation is measured on the same evaluation set, against every earlier one
    rep = build_report(lin)
    assert {(a, b) for a, b, _ in rep["compat_top1"]} >= {(3, 1), (3, 2), (2, 1)}
    # the keys file lists exactly the snapshot's items, keyed by relative path or item_id
    keys = pq.read_table(lin.snapshots()[3].keys_path)
    assert keys.num_rows == snaps[3]["items"] == len(set(keys.column("key").to_pylist()))


@pytest.mark.slow
def test_an_image_folder_grows_over_three_cycles(home: Path, tmp_path: Path) -> None:
    xtr, ytr, xte, yte = digits()
    root = tmp_path / "photos"
    write_images(root, "train", xtr, ytr, 0, 12, OLD)
    write_images(root, "test", xte, yte, 0, 15, [*OLD, NEW])  # the fixed evaluation set
    spec = f"imagefolder:{root}"
    lin = Lineage()

    def more():
        write_images(root, "train", xtr, ytr, 12, 20, OLD)
        (root / "train" / "digit-0" / "broken.png").write_bytes(b"not a png")

    def new_class():
        write_images(root, "train", xtr, ytr, 0, 20, [NEW])

    check_growth(lin, more, new_class, spec)
    keys = pq.read_table(lin.snapshots()[3].keys_path).column("key").to_pylist()
    assert "train/digit-4/train-0004.png" in keys or any(
        k.startswith("train/digit-4/") for k in keys
    )
    # the unreadable file is recorded with its key, not trained on
    snap2 = lin.snapshots()[2]
    assert [s["key"] for s in snap2.skipped] == ["train/digit-0/broken.png"]
    assert build_report(lin)["generations"][1]["snapshot"]["skipped"] == 1
    with pytest.raises(SourceError, match=r"1 unreadable item\(s\).*broken.png.*--strict"):
        plan_cycle(lin, CycleConfig(strict=True, **CFG))
    # the evaluation set is fixed: a change is refused, naming what changed
    write_images(root, "test", xte, yte, 15, 16, [0])
    (root / "test" / "digit-1" / "test-extra.png").write_bytes(
        (root / "test" / "digit-2").iterdir().__next__().read_bytes()
    )
    with pytest.raises(StoreError, match=r"changed since generation 1: 2 added \(test/digit-0/"):
        plan_cycle(lin, CycleConfig(**CFG))
    assert len(lin.generations()) == 3
    # ... unless told to measure every kept generation on the new one
    before = {(a, b): v for a, b, v in lin.metric("compat_top1")}
    assert cycle(lin, None, reevaluate=True) is None  # re-evaluated; no new training data
    after = {(a, b): v for a, b, v in lin.metric("compat_top1")}
    assert set(after) == set(before) and after != before
    # a source's cycles index no evaluation gallery: the collection is the user's own
    assert build_report(lin)["gallery"] == {
        "items": 0,
        "by_generation": {},
        "spec": None,
        "kind": None,
    }
    assert {r.eval_fingerprint for r in lin.snapshots().values()} == {
        plan_cycle(lin, CycleConfig(**CFG)).snapshot.eval_fingerprint
    }


@pytest.mark.slow
def test_a_parquet_directory_grows_over_three_cycles(home: Path, tmp_path: Path) -> None:
    xtr, ytr, xte, yte = digits()
    root = tmp_path / "table"
    (root / "split=test").mkdir(parents=True)
    (root / "split=train").mkdir()
    test = parquet_rows(xte, yte, "test", 0, 15, [*OLD, NEW]).drop_columns(["split"])
    write_parquet(test, root / "split=test" / "eval.parquet")  # a hive partition
    first = parquet_rows(xtr, ytr, "train", 0, 12, OLD).drop_columns(["split"])
    write_parquet(first, root / "split=train" / "part-0.parquet")
    lin = Lineage()

    def more():
        rows = parquet_rows(xtr, ytr, "train", 12, 20, OLD).drop_columns(["split"])
        write_parquet(rows, root / "split=train" / "part-1.parquet")

    def new_class():
        rows = parquet_rows(xtr, ytr, "train", 0, 20, [NEW]).drop_columns(["split"])
        write_parquet(rows, root / "split=train" / "part-2.parquet")

    check_growth(lin, more, new_class, f"parquet:{root}")
    # a file that repeats a key is refused before anything is recorded
    again = parquet_rows(xtr, ytr, "train", 0, 1, [NEW]).drop_columns(["split"])
    write_parquet(again, root / "split=train" / "part-3.parquet")
    with pytest.raises(SourceError, match="item_id value.*repeat"):
        plan_cycle(lin, CycleConfig(**CFG))
    assert len(lin.generations()) == 3


@pytest.mark.slow
def test_an_interrupted_cycle_on_a_source_resumes_from_its_snapshot(
    home: Path, tmp_path: Path
) -> None:
    from flows.recovery import recover_generations
    from flows.steps import Step

    xtr, ytr, xte, yte = digits()
    root = tmp_path / "photos"
    write_images(root, "train", xtr, ytr, 0, 6, OLD)
    write_images(root, "test", xte, yte, 0, 5, OLD)
    lin = Lineage()
    cfg = CycleConfig(dataset=f"imagefolder:{root}", **CFG)
    state = start_cycle(lin, cfg, plan_cycle(lin, cfg))  # recorded, then "killed"
    write_images(root, "train", xtr, ytr, 6, 9, OLD)  # the source grows meanwhile
    resumed = recover_generations(lin)
    assert resumed is not None and resumed.step == Step.TRAIN
    assert resumed.generation.id == state.generation.id
    # it trains on the snapshot it recorded, not on the source as it is now
    assert resumed.source is not None and resumed.source.keys_path == state.source.keys_path
    result = train_step(lin, resumed)
    assert result["items"] == 24 == lin.snapshots()[1].items

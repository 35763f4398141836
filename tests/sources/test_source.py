"""One Source: the scenario and a user's source answer the same questions."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workers.data.datasets import load_dataset
from workers.data.scenario import stage_indices, stage_plan
from workers.data.source import (
    ItemSource,
    Position,
    ScenarioSource,
    SourceKind,
    eval_fingerprint,
    open_source,
)
from workers.data.sources import SourceError, label_indices


def _features(tmp_path) -> str:
    path = tmp_path / "f.parquet"
    pq.write_table(
        pa.table(
            {
                "item_id": ["a", "b", "c", "d", "e"],
                "label": ["dog", "cat", "dog", "cat", "bird"],
                "features": [[float(i)] * 4 for i in range(5)],
                "split": ["train", "train", "train", "test", "test"],
            }
        ),
        path,
    )
    return f"parquet:{path}"


def test_open_source_picks_the_kind_by_spec_or_record(tmp_path) -> None:
    spec = _features(tmp_path)
    assert open_source("digits").kind == SourceKind.SCENARIO
    assert open_source(" Digits ").spec == "digits"  # named as the data set loader names it
    assert open_source(spec).kind == SourceKind.ITEMS
    # a lineage that recorded the scenario over a Parquet data set keeps it
    assert open_source(spec, SourceKind.SCENARIO).kind == SourceKind.SCENARIO
    with pytest.raises(SourceError, match="not a source"):
        open_source("digits", SourceKind.ITEMS)


def test_the_scenarios_snapshot_is_its_stage_with_the_fingerprint_lineages_recorded() -> None:
    source = ScenarioSource("digits")
    ds = load_dataset("digits")
    draw = source.draw(Position(index=1, stages=3), ds.input_shape)
    stage = stage_plan(ds.num_classes, 3, 1, ds.input_shape)
    rows = stage_indices(ds.y_train, stage, seed=0)
    # the digest snapshots carried before the Source existed, written out by hand
    digest = hashlib.sha256(b"graceful-snapshot-v1")
    digest.update(b"digits")
    digest.update(rows.astype(np.int64).tobytes())
    digest.update(ds.y_train[rows].astype(np.int64).tobytes())
    digest.update(np.ascontiguousarray(ds.x_train[rows]).tobytes())
    assert draw.scan.fingerprint == digest.hexdigest()
    assert draw.stage == 1 and draw.stages == 3
    assert draw.architecture == stage.architecture
    assert draw.scan.table.column("key").to_pylist()[:2] == [f"train/{r}" for r in rows[:2]]
    vocab = {n: i for i, n in enumerate(ds.class_names)}
    labels = label_indices(draw.scan.table.column("label"), vocab)
    np.testing.assert_array_equal(labels, ds.y_train[rows])
    assert set(draw.scan.class_counts()) == {ds.class_names[c] for c in stage.classes}
    # a stage past the last is the last; no stage count: the default three
    assert source.draw(Position(index=7, stages=3), ds.input_shape).stage == 2
    assert source.draw(Position(index=0), ds.input_shape).stages == 3


def test_the_scenarios_trainer_reads_exactly_its_stages_rows() -> None:
    source = ScenarioSource("digits")
    ds = load_dataset("digits")
    draw = source.draw(Position(index=0, stages=2), ds.input_shape)
    ev = source.evaluation()
    labels = label_indices(
        draw.scan.table.column("label"), {n: i for i, n in enumerate(ds.class_names)}
    )
    reader = source.training_reader(draw.scan.table, labels, ev.input_format)
    rows = stage_indices(ds.y_train, stage_plan(10, 2, 0, ds.input_shape), seed=0)
    x, y = reader.take(np.arange(len(rows)))
    np.testing.assert_array_equal(x, ds.x_train[rows])
    np.testing.assert_array_equal(y, ds.y_train[rows])
    # keys files written before labels were names hold head rows: they read as they are
    old = pa.table({"key": draw.scan.table.column("key"), "label": pa.array(ds.y_train[rows])})
    np.testing.assert_array_equal(label_indices(old.column("label"), {}), ds.y_train[rows])


def test_the_scenarios_evaluation_set_keeps_its_fingerprint_and_names_its_items() -> None:
    ds = load_dataset("digits")
    ev = ScenarioSource("digits").evaluation()
    assert ev.fingerprint == eval_fingerprint(ds)
    assert ev.keys[:2] == ["0", "1"] and len(set(ev.digests)) > 1
    assert ev.labels[:3] == [ds.class_names[int(y)] for y in ds.y_test[:3]]
    again = ev.dataset("digits", {n: i for i, n in enumerate(ds.class_names)})
    np.testing.assert_array_equal(again.y_test, ds.y_test)
    assert eval_fingerprint(again) == ev.fingerprint


def test_class_order_and_capacity_per_kind(tmp_path) -> None:
    scenario, items = ScenarioSource("digits"), ItemSource(_features(tmp_path))
    assert scenario.class_order({"9", "1", "0"}) == ["0", "1", "9"]  # the data set's order
    assert items.class_order({"dog", "bird", "cat"}) == ["bird", "cat", "dog"]
    assert scenario.capacity(3, None, 64) == 10  # every class known from the start
    assert items.capacity(3, None, 64) == 64 and items.capacity(40, None, 64) == 80
    assert items.capacity(3, 12, 64) == 12  # asked for
    assert scenario.reference_collection and not items.reference_collection


def test_a_users_source_draws_its_scan_and_reads_its_items(tmp_path) -> None:
    source = ItemSource(_features(tmp_path))
    ev = source.evaluation()
    assert ev.labels == ["cat", "bird"]
    draw = source.draw(Position(index=4), ev.input_format.shape)
    assert draw.stage == 4 and draw.stages is None
    assert draw.scan.table.column("key").to_pylist() == ["a", "b", "c"]
    vocab = {"bird": 0, "cat": 1, "dog": 2}
    labels = label_indices(draw.scan.table.column("label"), vocab)
    reader = source.training_reader(draw.scan.table, labels, ev.input_format)
    got = [
        (int(p), x[:, 0].tolist(), y.tolist()) for u in reader.units() for p, x, y in reader.read(u)
    ]
    assert got == [(0, [0.0, 1.0, 2.0], [2, 1, 2])]

"""What the Prefect UI shows, without a server: run names, the lineage's label in artifact
keys (no password in it), the final states of a rejected or skipped cycle, and summaries
and tables said without Python reprs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flows import text
from flows.naming import (
    artifact_key,
    backfill_run_name_for,
    index_run_name_for,
    lineage_label,
)

SECRET = "Pw-Never-Shown-42"
KEY = re.compile(r"^[a-z0-9-]+$")  # what Prefect allows in an artifact key


def test_each_lineage_has_its_own_label_and_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GRACEFUL_DB_URL", raising=False)
    monkeypatch.setenv("GRACEFUL_HOME", str(tmp_path / "My Photos"))
    photos = lineage_label()
    assert photos.startswith("my-photos-") and KEY.match(photos)
    assert photos == lineage_label(f"sqlite:///{tmp_path / 'My Photos' / 'lineage.db'}")
    assert not (tmp_path / "My Photos").exists()  # a label creates nothing
    monkeypatch.setenv("GRACEFUL_HOME", str(tmp_path / "other" / "My Photos"))
    assert lineage_label() != photos  # the same name elsewhere: another lineage
    assert artifact_key("cycle-summary", photos) == f"cycle-summary-{photos}"
    assert KEY.match(artifact_key("nfr-matrix"))


def test_a_database_lineage_label_has_no_password(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"postgresql+psycopg://alice:{SECRET}@db.example:5432/Shop_Lineage"
    monkeypatch.setenv("GRACEFUL_DB_URL", url)
    label = lineage_label()
    assert label.startswith("shop-lineage-") and KEY.match(label)
    assert SECRET.lower() not in label
    # the hash is of the redacted URL: another password, the same lineage and label
    other = url.replace(SECRET, "another-one")
    assert lineage_label(other) == label
    assert lineage_label(url.replace("Shop_Lineage", "other")) != label


def test_run_names_say_what_runs() -> None:
    assert backfill_run_name_for(0.2, "representative") == "backfill 0.2 representative"
    assert backfill_run_name_for(500.0, "random") == "backfill 500 random"
    assert index_run_name_for("images:/data/album") == "index images:/data/album"
    secret = index_run_name_for(f"parquet:s3://AKIA1:{SECRET}@shop/products")
    assert SECRET not in secret and secret.startswith("index parquet:s3://AKIA1:***@")
    assert index_run_name_for(None) == "index the collection"


def test_a_rejected_or_skipped_cycle_ends_in_a_named_completed_state() -> None:
    from flows.cycle import final_state

    rejected = {
        "generation": 4,
        "promoted": False,
        "reasons": ["accuracy 0.9 >= champion 0.8 - 0.02", "FAIL NFR against 3 = 0.2 above 0.1"],
    }
    state = final_state(rejected)
    assert (state.name, state.type.value) == ("Rejected", "COMPLETED")
    assert state.message == "generation 4 rejected: NFR against 3 = 0.2 above 0.1"
    assert state.data == rejected  # still the flow's return value
    skipped = {"skipped": True, "message": "skipped: no new data since generation 3"}
    state = final_state(skipped)
    assert (state.name, state.message) == ("Skipped", skipped["message"])
    promoted = {"generation": 5, "promoted": True, "reasons": []}
    assert final_state(promoted) is promoted  # a plain Completed


def test_summaries_say_numbers_and_collections_plainly() -> None:
    assert text.by_generation({"1": 216, "2": 54}) == "generation 2: 54, generation 1: 216"
    assert text.by_generation({}) == "empty"
    assert text.generations([]) == "none" and text.generations([2, 1]) == "generations 1, 2"
    assert text.retired([]) == "none"
    assert text.retired([(1, "no items left")]) == "generation 1 (no items left)"
    assert text.yes_no(True) == "yes" and text.yes_no(None) == "–"
    assert text.curve([[0.0, 0.5], [0.5, 0.6], [1.0, 0.75]]) == (
        "M_mix 0.5000 at β=0 → 0.7500 at β=1 (3 points)"
    )
    assert text.curve([]) == "not measured"
    said = [
        text.cycle_backfill({"job": 3, "items_done": 54, "m_mix_after": 0.61, "completed": [1]}),
        text.cycle_backfill({"indexed": 270, "m_mix": 0.5}),
        text.cycle_backfill({"collection": None}),
        text.cycle_backfill({}),
        text.search_index({"kind": "flat", "items": 270, "recall": None}),
    ]
    assert said[0] == (
        "job 3: re-embedded 54 items, M_mix after 0.6100; generation 1 re-embedded whole (owed)"
    )
    for line in said:
        assert not re.search(r"[{}]|\[\]|\bTrue\b|\bFalse\b|\bNone\b|'", line), line


def test_table_artifacts_put_the_row_label_first() -> None:
    from flows.publish import matrix_rows

    rows = matrix_rows([[2, 1, 0.25], [1, 1, 0.5], [2, 2, 0.75]], [1, 2])
    assert [list(r) for r in rows] == [["a \\ b", "b=1", "b=2"]] * 2
    # no column reads as an integer: the UI (JavaScript) would put those first
    assert not any(k.isdigit() for r in rows for k in r)
    assert rows[1] == {"a \\ b": "2", "b=1": "0.2500", "b=2": "0.7500"}

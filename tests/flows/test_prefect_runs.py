"""What the Prefect UI shows of two lineages on one server (the session's `prefect server`):
runs named for what they run, a rejected generation's `Rejected` state with the gate's
reason, a skipped cycle's `Skipped`, artifact keys scoped by lineage (neither overwrites
the other's history), summaries without Python reprs, and a backfill's log saying what it
did."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prefect_kit import call

from flows.naming import lineage_label

REPR = re.compile(r"\{'|'\}|\[\]|\[\(|\bTrue\b|\bFalse\b|\bNone\b")


def _post(base: str, path: str, body: dict) -> list[dict]:
    return call("POST", f"{base}{path}", json=body)


def _run(c, *args: str) -> str:
    proc = c.start(*args)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, f"graceful {args} failed:\n{err[-4000:]}"
    return out


def _label(home: Path) -> str:
    return lineage_label(f"sqlite:///{home.resolve() / 'lineage.db'}")


def _artifacts(api: str, label: str) -> list[dict]:
    """Every artifact (each version) whose key is this lineage's, oldest first."""
    arts = _post(api, "/artifacts/filter", {"sort": "CREATED_DESC", "limit": 200})
    return [a for a in reversed(arts) if a["key"] and a["key"].endswith(f"-{label}")]


def _runs(api: str, arts: list[dict]) -> dict[str, dict]:
    """The flow runs those artifacts came from, by run name."""
    ids = sorted({a["flow_run_id"] for a in arts})
    runs = _post(api, "/flow_runs/filter", {"flow_runs": {"id": {"any_": ids}}})
    return {r["name"]: r for r in runs}


@pytest.mark.slow
def test_runs_states_keys_and_summaries_of_two_lineages(tmp_path: Path, cli) -> None:
    api = cli(tmp_path).env["PREFECT_API_URL"]
    # lineage A: a first generation that learns nothing (lr ~ 0) is not above chance:
    # rejected; the same cycle again is skipped (it would repeat the rejection)
    home_a = tmp_path / "a" / "home"
    reject = tmp_path / "reject.toml"
    reject.write_text("[train]\nlr = 1e-9\n")
    a = cli(home_a)
    _run(
        a, "cycle", "--dataset", "digits", "--stages", "1", "--epochs", "1", "--config", str(reject)
    )
    skipped = _run(a, "cycle", "--epochs", "1", "--config", str(reject))
    assert "skipped: generation 1 was trained on this snapshot and rejected" in skipped
    # lineage B (a home of the same name elsewhere): two promoted generations, a backfill
    home_b = tmp_path / "b" / "home"
    b = cli(home_b)
    _run(
        b,
        *["run", "--dataset", "digits", "--generations", "2", "--epochs", "2", "--no-gate"],
        "--backfill-budget",
        "0",
    )
    _run(b, "backfill", "--budget", "0.2", "--policy", "representative")

    label_a, label_b = _label(home_a), _label(home_b)
    assert label_a != label_b and label_a.startswith("home-") and label_b.startswith("home-")
    arts_a, arts_b = _artifacts(api, label_a), _artifacts(api, label_b)

    # run names and final states
    runs_a = _runs(api, arts_a)
    assert set(runs_a) == {"generation 1", "skipped: generation 1 rejected on this snapshot"}
    rejected = runs_a["generation 1"]
    assert (rejected["state_type"], rejected["state_name"]) == ("COMPLETED", "Rejected")
    message = rejected["state"]["message"]
    assert message.startswith("generation 1 rejected: first generation: accuracy"), message
    assert "not above chance" in message
    skip = runs_a["skipped: generation 1 rejected on this snapshot"]
    assert (skip["state_type"], skip["state_name"]) == ("COMPLETED", "Skipped")
    assert skip["state"]["message"].startswith("skipped: generation 1 was trained on this")
    runs_b = _runs(api, arts_b)
    assert set(runs_b) == {"generation 1", "generation 2", "backfill 0.2 representative"}
    assert {r["state_name"] for r in runs_b.values()} == {"Completed"}
    # the UI's Tags filter selects one lineage's runs
    for label, runs in ((label_a, runs_a), (label_b, runs_b)):
        tagged = _post(
            api,
            "/flow_runs/filter",
            {"flow_runs": {"tags": {"all_": [f"lineage:{label}"]}}, "limit": 200},
        )
        assert {r["id"] for r in tagged} == {r["id"] for r in runs.values()}

    # lineage-scoped keys: each lineage keeps its own history under its own keys
    def versions(arts: list[dict], kind: str, label: str) -> list[dict]:
        return [x for x in arts if x["key"] == f"{kind}-{label}"]

    summaries_a = versions(arts_a, "cycle-summary", label_a)
    summaries_b = versions(arts_b, "cycle-summary", label_b)
    assert len(summaries_a) == 2 and summaries_a[0]["description"] == "generation 1: rejected"
    assert summaries_a[1]["description"].startswith("skipped: generation 1 was trained on")
    assert [s["description"] for s in summaries_b] == [
        "generation 1: promoted",
        "generation 2: promoted",
    ]
    latest = _post(api, "/artifacts/latest/filter", {"limit": 200})
    latest = {x["key"]: x for x in latest}
    assert latest[f"cycle-summary-{label_a}"]["description"].startswith("skipped")
    assert latest[f"cycle-summary-{label_b}"]["description"] == "generation 2: promoted"
    assert {x["key"] for x in arts_b} >= {
        f"nfr-matrix-{label_b}",
        f"compat-matrix-{label_b}",
        f"backfill-summary-{label_b}",
        f"update-cycle-progress-{label_b}",
        f"backfill-progress-{label_b}",
    }

    # tables: the row label first; summaries: formatted, no Python reprs
    table = versions(arts_b, "compat-matrix", label_b)[-1]["data"]
    rows = json.loads(table) if isinstance(table, str) else table
    assert [list(r) for r in rows] == [["a \\ b", "b=1", "b=2"]] * 2
    for art in arts_a + arts_b:
        if art["type"] != "markdown":
            continue
        body = re.sub(r"\(data:image/png;base64,[^)]*\)", "(plot)", art["data"])
        assert not REPR.search(body), (art["key"], REPR.search(body), body)
    gen2 = summaries_b[1]["data"]
    assert "- 270 items: generation 1: 270" in gen2
    assert "this cycle's backfill: job 1: re-embedded 0 items, M_mix after" in gen2
    backfill = versions(arts_b, "backfill-summary", label_b)[-1]["data"]
    assert "collection after: generation 2: 54, generation 1: 216" in backfill
    assert "no regret yes" in backfill or "no regret no" in backfill

    # the backfill's log says what it did
    run = runs_b["backfill 0.2 representative"]
    logs = _post(
        api,
        "/logs/filter",
        {"logs": {"flow_run_id": {"any_": [run["id"]]}}, "sort": "TIMESTAMP_ASC", "limit": 200},
    )
    said = "\n".join(x["message"] for x in logs)
    assert re.search(
        r"backfill job \d+ \(representative, budget 0\.2\): generation 2 re-embedded 54 of "
        r"the job's 54 items \(from generation 1\); the collection holds 270",
        said,
    ), said
    assert re.search(r"M_mix 0\.\d{4} before, 0\.\d{4} after", said), said
    assert re.search(r"backfill curve: M_mix 0\.\d{4} at β=0 → 0\.\d{4} at β=1 \(11 points\)", said)
    assert "collection by generation: generation 2: 54, generation 1: 216" in said

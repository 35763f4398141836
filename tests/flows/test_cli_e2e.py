"""The whole cycle end to end through the CLI: real Prefect flow runs (ephemeral API),
real local Ray, SQLite, Parquet and faiss, on scikit-learn's digits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

GRACEFUL = [sys.executable, "-m", "flows.cli"]
ROOT = Path(__file__).resolve().parents[2]


def graceful(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, GRACEFUL_HOME=str(home), COLUMNS="200")
    env.pop("GRACEFUL_DB_URL", None)
    proc = subprocess.run(
        [*GRACEFUL, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"graceful {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def snapshot(path: Path) -> dict[str, bytes]:
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


@pytest.mark.slow
def test_run_report_backfill_end_to_end(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run = graceful(
        home,
        "run",
        "--dataset",
        "digits",
        "--generations",
        "3",
        "--epochs",
        "4",
        "--backfill-budget",
        "0.5",
        "--no-gate",
    )
    assert "NFR(a, b)" in run.stdout and "C[a][b]" in run.stdout

    rep = json.loads(graceful(home, "report", "--json").stdout)
    ids = [g["id"] for g in rep["generations"]]
    assert ids == [1, 2, 3]
    assert all(g["status"] == "promoted" for g in rep["generations"])
    assert [g["id"] for g in rep["generations"] if g["champion"]] == [3]
    # NFR for every pair (g, k < g) and C[a][b] for every pair b <= a
    assert sorted((a, b) for a, b, _ in rep["nfr"]) == [(2, 1), (3, 1), (3, 2)]
    assert sorted((a, b) for a, b, _ in rep["compat_top1"]) == [
        (1, 1),
        (2, 1),
        (2, 2),
        (3, 1),
        (3, 2),
        (3, 3),
    ]
    for key in ("nfi", "btc", "bec"):
        assert len(rep[key]) == 3
    assert [a for a, _ in rep["nfr_any"]] == [1, 2, 3]
    assert all(0.0 <= v <= 1.0 for _, _, v in rep["nfr"] + rep["compat_top1"])
    assert 0.0 <= rep["ac"] <= 1.0 and 0.0 < rep["am"] <= 1.0
    g2 = rep["generations"][1]
    for field in ("architecture", "epochs", "train_samples", "train_seconds", "constraints"):
        assert field in g2
    assert {(c["target"], c["kind"]) for c in g2["constraints"]} == {
        (1, "influence"),
        (1, "focal"),
        (1, "embedding"),
    }
    # the scenario grows: more data and wider models at later stages
    samples = [g["train_samples"] for g in rep["generations"]]
    assert samples[0] < samples[1] < samples[2]
    # gallery: 270 items (the even half of digits' 540 test items), every item once
    assert rep["gallery"]["items"] == 270
    assert sum(rep["gallery"]["by_generation"].values()) == 270
    assert len(rep["backfills"]) == 2 and all(j["items_done"] == 135 for j in rep["backfills"])
    assert rep["backfills"][0]["curve"][0][0] == 0.0 and len(rep["backfills"][0]["curve"]) == 11

    # every generation records its snapshot; the scenario's stages differ
    snaps = [g["snapshot"] for g in rep["generations"]]
    assert [s["items"] for s in snaps] == samples
    assert all(sum(s["classes"].values()) == s["items"] for s in snaps)
    assert len({s["fingerprint"] for s in snaps}) == 3

    # nothing new since the champion (the scenario's last stage again): skipped, exit 0
    skipped = graceful(home, "cycle")
    assert "skipped: no new data since generation 3" in skipped.stdout
    assert [
        g["id"] for g in json.loads(graceful(home, "report", "--json").stdout)["generations"]
    ] == [1, 2, 3]

    # a full backfill moves every item to the champion and retires the ancestors
    graceful(home, "backfill", "--budget", "1.0", "--policy", "oldest-first")
    rep = json.loads(graceful(home, "report", "--json").stdout)
    assert rep["gallery"]["by_generation"] == {"3": 270}
    retired = {g["id"] for g in rep["generations"] if g["retired"]}
    assert retired == {1, 2}
    assert all(c["status"] == "retired" for g in rep["generations"] for c in g["constraints"])

    hits = graceful(home, "search", "--item", "1", "--k", "3")
    assert "nearest collection items" in hits.stdout
    # the contract's JSON: keys (the scenario's: positions of the test split), scores,
    # generations; the collection is the evaluation set's gallery half, all by generation 3
    found = json.loads(graceful(home, "search", "--item", "1", "--k", "3", "--json").stdout)
    assert len(found) == 3 and all(h["generation"] == 3 for h in found)
    assert [h["score"] for h in found] == sorted((h["score"] for h in found), reverse=True)
    from workers.data.datasets import load_dataset
    from workers.data.scenario import eval_split

    gallery_half = {str(int(i)) for i in eval_split(len(load_dataset("digits").y_test))[0]}
    assert {h["key"] for h in found} <= gallery_half
    import numpy as np

    np.save(tmp_path / "q.npy", load_dataset("digits").x_test[1])
    hits = graceful(home, "search", "--file", str(tmp_path / "q.npy"), "--k", "3")
    assert "nearest collection items" in hits.stdout
    assert "q.npy" in hits.stdout and hits.stdout.count("│ 1 ") >= 1
    both = graceful(home, "search", check=False)
    assert both.returncode == 2 and "--item or --file" in both.stderr

    # the runs and their artifacts are in the Prefect API (what the UI shows)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas import filters as F
    from prefect.client.schemas.sorting import ArtifactSort

    from flows.naming import lineage_label

    # artifact keys carry the lineage (its home's name and a hash of its database URL)
    label = lineage_label(f"sqlite:///{home.resolve() / 'lineage.db'}")
    keys = [f"{k}-{label}" for k in ("nfr-matrix", "cycle-summary", "backfill-summary")]
    with get_client(sync_client=True) as client:
        # every filter passed explicitly: this server version rejects null filter fields
        arts = client.read_artifacts(
            artifact_filter=F.ArtifactFilter(key=F.ArtifactFilterKey(any_=keys)),
            flow_run_filter=F.FlowRunFilter(),
            task_run_filter=F.TaskRunFilter(),
            sort=ArtifactSort.ID_DESC,
            limit=100,
            offset=0,
        )
        kinds = sorted({(a.key, a.type) for a in arts})
        assert kinds == [
            (f"backfill-summary-{label}", "markdown"),
            (f"cycle-summary-{label}", "markdown"),
            (f"nfr-matrix-{label}", "table"),
        ]
        assert sum(a.key == f"cycle-summary-{label}" for a in arts) == 4  # one says skipped
        assert any("skipped" in (a.description or "") for a in arts)
        runs = [client.read_flow_run(r) for r in {a.flow_run_id for a in arts}]
        assert len(runs) == 5  # four update cycles (one skipped) and one partial backfill
        assert sorted(r.state_name for r in runs) == ["Completed"] * 4 + ["Skipped"]
        assert {r.state_type.value for r in runs} == {"COMPLETED"}
        assert sorted(r.name for r in runs) == [
            "backfill 1 oldest-first",
            "generation 1",
            "generation 2",
            "generation 3",
            "skipped: no new data since generation 3",
        ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--dataset", "mnist-ish"], "unknown"),
        (["run", "--dataset", "imagefolder:/no/such/dir"], "/no/such/dir"),
        (["run", "--dataset", "digits", "--generations", "0"], "generations"),
        (["run", "--dataset", "digits", "--method", "magic", "--epochs", "1"], "method"),
        (["run", "--dataset", "digits", "--weight", "focal"], "--weight takes"),
        (["cycle", "--dataset", "digits", "--weight", "magic=1"], "unknown constraint kind"),
    ],
)
def test_bad_input_is_rejected_and_store_untouched(tmp_path: Path, args, message) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "keep.txt").write_text("existing state")
    before = snapshot(home)
    proc = graceful(home, *args, check=False)
    assert proc.returncode != 0
    assert message in (proc.stderr + proc.stdout).lower()
    assert snapshot(home) == before


def test_home_that_is_a_file_is_rejected(tmp_path: Path) -> None:
    home = tmp_path / "home-file"
    home.write_text("not a directory")
    proc = graceful(home, "run", "--dataset", "digits", "--generations", "1", check=False)
    assert proc.returncode == 2
    assert "not a directory" in proc.stderr
    assert home.read_text() == "not a directory"

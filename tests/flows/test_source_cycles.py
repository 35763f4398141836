"""Sources through the product's front doors: `graceful cycle` on a Parquet source in an
S3 bucket (a real S3-compatible server, moto's, on 127.0.0.1), and the scheduled
update-cycle deployment firing on a real `prefect server` as an image folder grows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect_kit import call
from sources.data import digits, parquet_rows, write_images

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--epochs", "4", "--no-gate", "--backfill-budget", "0"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graceful(cli, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = cli.start(*args) if env is None else None
    if proc is None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *args],
            cwd=ROOT,
            env=dict(cli.env, **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_a_parquet_source_in_an_s3_bucket_grows_over_cycles(tmp_path: Path, cli, s3) -> None:
    import pyarrow.parquet as pq

    fs, aws = s3
    xtr, ytr, xte, yte = digits()
    tables = {
        "eval.parquet": parquet_rows(xte, yte, "test", 0, 15, range(5)),
        "part-0.parquet": parquet_rows(xtr, ytr, "train", 0, 12, range(4)),
    }
    for name, table in tables.items():
        pq.write_table(table, f"photos/set/{name}", filesystem=fs)
    c = cli(tmp_path / "home")
    spec = "parquet:s3://photos/set"

    def cycle(*extra: str) -> subprocess.CompletedProcess:
        done = _graceful(c, "cycle", *extra, *FAST, env=aws)
        assert done.returncode == 0, done.stderr[-3000:]
        assert aws["AWS_SECRET_ACCESS_KEY"] not in done.stdout + done.stderr
        return done

    cycle("--dataset", spec)
    skipped = cycle()  # the lineage knows its source
    assert "skipped: no new data since generation 1" in skipped.stdout
    pq.write_table(
        parquet_rows(xtr, ytr, "train", 12, 20, range(4)),
        "photos/set/part-1.parquet",
        filesystem=fs,
    )
    cycle()
    pq.write_table(
        parquet_rows(xtr, ytr, "train", 0, 20, [4]), "photos/set/part-2.parquet", filesystem=fs
    )
    cycle()
    rep = json.loads(_graceful(c, "report", "--json", env=aws).stdout)
    snaps = [g["snapshot"] for g in rep["generations"]]
    assert [s["items"] for s in snaps] == [48, 80, 100]
    assert snaps[2]["classes"]["digit-4"] == 20 and "digit-4" not in snaps[1]["classes"]
    assert snaps[0]["source"] == spec

    # an endpoint nobody listens on: one clear error line, no secret, nothing recorded
    dead = dict(aws, AWS_ENDPOINT_URL=f"http://127.0.0.1:{_free_port()}")
    bad = _graceful(c, "cycle", "--force", *FAST, env=dead)
    assert bad.returncode == 1
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: cannot reach s3://photos/set")
    assert sum("error" in line.lower() for line in lines) == 1 and "Traceback" not in bad.stderr
    assert aws["AWS_SECRET_ACCESS_KEY"] not in bad.stdout + bad.stderr
    rep2 = json.loads(_graceful(c, "report", "--json", env=aws).stdout)
    assert len(rep2["generations"]) == 3


@pytest.mark.slow
def test_the_schedule_trains_only_when_the_source_changed(
    tmp_path: Path, prefect_api: str, stop_group
) -> None:
    api = prefect_api
    xtr, ytr, xte, yte = digits()
    root = tmp_path / "photos"
    write_images(root, "train", xtr, ytr, 0, 12, range(4))
    write_images(root, "test", xte, yte, 0, 15, range(5))
    home = tmp_path / "home"
    env = dict(
        os.environ,
        PREFECT_API_URL=api,
        GRACEFUL_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_RUNNER_POLL_FREQUENCY="2",
    )
    env.pop("GRACEFUL_DB_URL", None)
    deployment = f"scheduled-update-{tmp_path.name}"
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--dataset", f"imagefolder:{root}"]
        # 48 training images are one step an epoch: 30 steps train the first generation
        # past chance (the gate promotes no first generation at chance)
        + ["--interval-minutes", "0.25", "--epochs", "30", "--name", deployment],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def runs() -> list[dict]:
        deps = call("POST", f"{api}/deployments/filter", json={"limit": 50})
        mine = [d["id"] for d in deps if d["name"] == deployment]
        if not mine:
            return []
        body = {"deployments": {"id": {"any_": mine}}, "sort": "START_TIME_ASC", "limit": 50}
        return call("POST", f"{api}/flow_runs/filter", json=body)

    def finished() -> list[dict]:
        return [r for r in runs() if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")]

    def wait_for(n: int, timeout: float = 400) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = finished()
            if len(done) >= n:
                return sorted(done, key=lambda r: r["start_time"])
            time.sleep(2)
        raise AssertionError(f"{n} scheduled runs did not finish: {runs()}")

    def skipped(run: dict) -> bool:
        body = {"logs": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 200}
        logs = call("POST", f"{api}/logs/filter", json=body)
        return any("skipped: no new data since generation" in x["message"] for x in logs)

    try:
        first, second = wait_for(2)[:2]
        assert first["state_type"] == second["state_type"] == "COMPLETED"
        assert first["auto_scheduled"] and second["auto_scheduled"]  # fired by the schedule
        seen = [(r["name"], r["start_time"], r["state_type"], skipped(r)) for r in runs()]
        assert not skipped(first) and skipped(second), seen
        # the skip's summary artifact says so too
        arts = call(
            "POST",
            f"{api}/artifacts/filter",
            json={"artifacts": {"flow_run_id": {"any_": [second["id"]]}}},
        )
        summary = [a for a in arts if a["key"].startswith("cycle-summary-")]
        assert summary and "no new data since generation 1" in summary[0]["data"]

        # a new class arrives at once (a directory renamed into place)
        staging = tmp_path / "staging"
        write_images(staging, "train", xtr, ytr, 0, 12, [4])
        (staging / "train" / "digit-4").rename(root / "train" / "digit-4")
        deadline = time.monotonic() + 400
        trained = None
        while trained is None and time.monotonic() < deadline:
            later = wait_for(3)[2:]
            trained = next((r for r in later if not skipped(r)), None)
            time.sleep(2)
        assert trained is not None and trained["state_type"] == "COMPLETED"
        assert trained["auto_scheduled"] is True
    finally:
        stop_group(serve, timeout=30)

    rep = json.loads(
        subprocess.run(
            [sys.executable, "-m", "flows.cli", "report", "--json"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout
    )
    gens = rep["generations"]
    assert len(gens) == 2  # the skipped firings added nothing
    assert gens[0]["snapshot"]["items"] == 48 and gens[1]["snapshot"]["items"] == 60
    assert gens[1]["snapshot"]["classes"]["digit-4"] == 12
    assert "digit-4" not in gens[0]["snapshot"]["classes"]

"""`prefect.yaml` against a real `prefect server` (the session's, on 127.0.0.1): the process
work pool `graceful`, `prefect deploy --all` from the repository root, a `prefect worker
start --pool graceful`, and an on-demand backfill run with a flat `--param budget=0.2`
recorded in the lineage the worker's GRACEFUL_HOME names."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prefect_kit import call

ROOT = Path(__file__).resolve().parents[2]

# a small lineage fast: two generations of 2 epochs, every one promoted, nothing backfilled
CONFIG = """\
dataset = "digits"

[train]
epochs = 2

[gate]
enabled = false

[backfill]
budget = 0
"""


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the worker exited ({proc.returncode}) waiting for {what}")
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}")


def _tracked_state() -> str:
    """The repository's status, to check that deploying writes nothing into it."""
    return subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout


@pytest.mark.slow
def test_prefect_yaml_deploys_to_a_process_pool_and_runs_a_flat_backfill(
    tmp_path: Path, prefect_api: str, stop_group
) -> None:
    api = prefect_api
    home = tmp_path / "home"
    env = dict(
        os.environ,
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_API_URL=api,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="2",
        # what the flow runs see: the worker's environment (prefect.yaml's header)
        GRACEFUL_HOME=str(home),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        COLUMNS="200",
    )
    env.pop("GRACEFUL_DB_URL", None)

    def sh(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        assert proc.returncode == 0, f"{args}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    prefect = [sys.executable, "-m", "prefect"]
    graceful = [sys.executable, "-m", "flows.cli"]
    config = tmp_path / "graceful.toml"
    config.write_text(CONFIG)
    sh(*graceful, "run", "--config", str(config), "--generations", "2")
    before = json.loads(sh(*graceful, "report", "--json").stdout)
    assert [g["epochs"] for g in before["generations"]] == [2, 2]  # the file's
    assert before["gallery"]["by_generation"] == {"1": 270}

    repo_before = _tracked_state()
    sh(*prefect, "work-pool", "create", "graceful", "--type", "process")
    sh(*prefect, "--no-prompt", "deploy", "--all", timeout=300)
    assert _tracked_state() == repo_before  # deploying wrote nothing into the checkout

    deps = {d["name"]: d for d in call("POST", f"{api}/deployments/filter", json={"limit": 20})}
    assert {"scheduled-update", "on-demand-backfill", "on-demand-index"} <= set(deps)
    names = ("scheduled-update", "on-demand-backfill", "on-demand-index")
    assert {deps[n]["work_pool_name"] for n in names} == {"graceful"}
    # no scheduled cycle may start during this test
    r = httpx.patch(f"{api}/deployments/{deps['scheduled-update']['id']}", json={"paused": True})
    assert r.status_code < 300, r.text
    # the backfill's form: budget and policy at the top level, the model's defaults
    schema = deps["on-demand-backfill"]["parameter_openapi_schema"]["properties"]
    assert schema["budget"]["default"] == 0.3 and "enum" in schema["policy"]
    assert deps["scheduled-update"]["parameters"]["config"]["dataset"] == "digits"

    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [*prefect, "worker", "start", "--pool", "graceful", "--name", "graceful-test"],
        cwd=tmp_path,  # anywhere: the deployment's pull step goes to the repository root
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        run = sh(
            *prefect,
            "deployment",
            "run",
            "partial-backfill/on-demand-backfill",
            "--param",
            "budget=0.2",
        )
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", run.stdout).group(1)

        def finished():
            state = call("GET", f"{api}/flow_runs/{flow_run_id}")["state"]
            terminal = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
            return state if state and state["type"] in terminal else None

        state = _wait(finished, 480, "the backfill flow run", worker)
        flow_run = call("GET", f"{api}/flow_runs/{flow_run_id}")
        log.flush()
        assert state["type"] == "COMPLETED", (
            state,
            (tmp_path / "worker.log").read_text()[-4000:],
        )
        assert flow_run["parameters"]["budget"] == 0.2
    finally:
        stop_group(worker, timeout=30)
        log.close()
        # the session's server is shared: later tests (graceful serve) register deployments
        # of the same names and must not find these
        for n in names:
            httpx.delete(f"{api}/deployments/{deps[n]['id']}")

    rep = json.loads(sh(*graceful, "report", "--json").stdout)
    job = rep["backfills"][-1]
    assert job["budget"] == 0.2 and job["policy"] == "representative"  # flat, and the default
    assert job["generation"] == 2 and job["items_done"] == 54  # 20% of the 270 items
    assert rep["gallery"]["by_generation"] == {"1": 216, "2": 54}

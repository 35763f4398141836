"""Deployments against a real `prefect server` (the session's, on 127.0.0.1):
`graceful serve` registers the scheduled cycle and the on-demand backfill, and a
backfill triggered through the API (as from the UI) runs to completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect_kit import call

ROOT = Path(__file__).resolve().parents[2]


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_serve_deployments_and_trigger_a_backfill(tmp_path: Path, prefect_api, stop_group) -> None:
    api = prefect_api
    env = dict(
        os.environ,
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_API_URL=api,
        GRACEFUL_HOME=str(tmp_path / "home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    serve = None
    try:
        cli = [sys.executable, "-m", "flows.cli"]
        run = subprocess.run(
            [
                *cli,
                "run",
                "--dataset",
                "digits",
                "--generations",
                "2",
                "--epochs",
                "2",
                "--backfill-budget",
                "0",
                "--no-gate",
            ],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr[-3000:]

        serve = subprocess.Popen(
            [*cli, "serve", "--interval-minutes", "60"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

        def deployments():
            names = {
                d["name"]: d for d in call("POST", f"{api}/deployments/filter", json={"limit": 10})
            }
            wanted = {"scheduled-update", "on-demand-backfill", "on-demand-index"}
            if not wanted <= set(names):
                return None
            # registered by this serve (not an earlier test's of the same names on the
            # session's server): the index deployment's parameters are serve's
            return names if "config" in names["on-demand-index"]["parameters"] else None

        deps = _wait(deployments, 120, "the deployments")
        # the indexing deployment's form: the collection's spec and what to do with it
        index_dep = call("GET", f"{api}/deployments/{deps['on-demand-index']['id']}")
        assert index_dep["parameters"]["config"] == {
            "spec": None,
            "prune": False,
            "strict": False,
            "part_rows": 4096,
        }
        sched = call("GET", f"{api}/deployments/{deps['scheduled-update']['id']}/schedules")
        assert sched and sched[0]["schedule"]["interval"] == 3600.0
        # one update cycle at a time from the deployment (the lineage lock does the rest)
        cycle_dep = call("GET", f"{api}/deployments/{deps['scheduled-update']['id']}")
        limit = cycle_dep.get("concurrency_limit")
        if limit is None:  # newer servers report it as a global concurrency limit
            limit = (cycle_dep.get("global_concurrency_limit") or {}).get("limit")
        assert limit == 1, cycle_dep

        # trigger a partial backfill as the UI's "Run" button does
        params = {"config": {"budget": 1.0, "policy": "oldest-first", "batch_rows": 64}}
        created = call(
            "POST",
            f"{api}/deployments/{deps['on-demand-backfill']['id']}/create_flow_run",
            json={"parameters": params},
        )

        def finished():
            state = call("GET", f"{api}/flow_runs/{created['id']}")["state"]
            return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED") else None

        state = _wait(finished, 300, "the backfill run")
        assert state["type"] == "COMPLETED", state
        # named for what it ran, from the parameters the UI's form sent
        run_name = call("GET", f"{api}/flow_runs/{created['id']}")["name"]
        assert run_name == "backfill 1 oldest-first"
        report = subprocess.run(
            [*cli, "report", "--json"], env=env, cwd=ROOT, capture_output=True, text=True
        )
        rep = json.loads(report.stdout)
        assert rep["gallery"]["by_generation"] == {"2": 270}
        assert rep["backfills"][-1]["policy"] == "oldest-first"
    finally:
        if serve is not None:
            stop_group(serve, timeout=20)

"""A real SIGKILL at each step of the cycle (training, evaluation, promotion, backfill), and
the next `graceful cycle` resumes what was cut off; nothing is left half-told."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from store.collection import Collection
from store.lineage import Lineage

# every cycle of this test: digits, no gate (each step runs), 32 items per gallery part
BASE = ("--epochs", "2", "--no-gate", "--backfill-batch-rows", "32")


class Home:
    """One GRACEFUL_HOME driven through the CLI."""

    def __init__(self, cli) -> None:
        self.cli = cli
        self.path = cli.home
        self.lineage = Lineage(cli.db_url)

    def start(self, *args: str, failpoint: str | None = None) -> subprocess.Popen:
        return self.cli.start(*args, failpoint=failpoint)

    def run(self, *args: str, failpoint: str | None = None) -> subprocess.CompletedProcess:
        proc = self.start(*args, failpoint=failpoint)
        out, err = proc.communicate(timeout=600)
        _kill_group(proc)  # whatever it left behind (a failpoint kills the driver only)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def report(self) -> dict:
        result = self.run("report", "--json")
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


def _statuses(rep: dict) -> dict[int, str]:
    return {g["id"]: g["status"] for g in rep["generations"]}


def _assert_settled(home: Home) -> dict:
    """No run shown in progress, one champion, every gallery item exactly once."""
    rep = home.report()
    assert not {"training", "interrupted"} & set(_statuses(rep).values()), rep["generations"]
    assert all(b["status"] in ("done", "failed") for b in rep["backfills"]), rep["backfills"]
    assert sum(g["champion"] for g in rep["generations"]) == 1
    ids = Collection(home.lineage, root=home.path / "gallery").read_all().item_id
    assert len(ids) == len(np.unique(ids)) == rep["gallery"]["items"] == 270
    return rep


@pytest.mark.slow
def test_sigkill_at_each_step_then_the_next_cycle_resumes(
    tmp_path: Path, cli, kill_once_written
) -> None:
    home = Home(cli(tmp_path / "home"))

    # 1. training: killed once an epoch is checkpointed; the next cycle continues it
    proc = home.start("cycle", "--dataset", "digits", *BASE, "--epochs", "200")
    resume = home.path / "checkpoints" / "gen-1.resume.pt"
    kill_once_written(proc, resume)
    assert _statuses(home.report()) == {1: "interrupted"}  # not "training": nobody is
    err = _ok(home.run("cycle", *BASE))
    assert "resumed generation 1, interrupted before train" in err
    assert "training resumed from epoch" in err
    gen1 = home.lineage.generation(1)
    assert gen1.status == "promoted" and gen1.epochs == 200 and not resume.exists()

    # 2. evaluation: metrics stored, gate not reached
    killed = home.run("cycle", *BASE, failpoint="evaluate")
    assert killed.returncode == -signal.SIGKILL
    assert _statuses(home.report())[2] == "interrupted"
    err = _ok(home.run("cycle", *BASE))
    assert "resumed generation 2, interrupted before evaluate" in err
    assert [g.id for g in home.lineage.generations()] == [1, 2]  # nothing new was trained
    assert home.lineage.generation(2).status == "promoted"

    # 3. promotion: gated, not promoted; the next cycle promotes it, once
    killed = home.run("cycle", *BASE, failpoint="promote")
    assert killed.returncode == -signal.SIGKILL
    gen3 = home.lineage.generation(3)
    assert gen3.gate_passed and not gen3.is_champion and home.lineage.champion().id == 2
    err = _ok(home.run("cycle", *BASE))
    assert "resumed generation 3, interrupted before promote" in err
    assert home.lineage.champion().id == 3

    # 4. backfill: one 32-item part committed; the next cycle finishes the job first
    # (the scenario's 3 stages are used up: --force trains on the last one again)
    killed = home.run(
        "cycle", *BASE, "--force", "--backfill-budget", "1.0", failpoint="backfill-part"
    )
    assert killed.returncode == -signal.SIGKILL
    rep = home.report()
    [job] = [b for b in rep["backfills"] if b["generation"] == 4]
    assert job["status"] == "interrupted" and job["items_done"] == 32
    done = home.run("cycle", *BASE)  # nothing new to train on, but the backfill is finished
    err = _ok(done)
    assert f"finished the interrupted backfill job {job['job_id']}" in err
    assert "skipped: no new data since generation 4" in done.stdout
    job = next(j for j in home.lineage.backfill_jobs() if j.id == job["job_id"])
    assert job.status == "done" and job.items_done == job.total_items == 270
    rep = _assert_settled(home)
    assert _statuses(rep) == {g: "promoted" for g in (1, 2, 3, 4)}
    assert rep["gallery"]["by_generation"] == {"4": 270}

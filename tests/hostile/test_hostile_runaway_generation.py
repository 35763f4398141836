"""A runaway generation can be bounded, stopped and replaced: ``epochs`` has an upper
bound, a resumed generation takes a changed epoch budget while it can (and says why not
once it cannot), and ``graceful abandon G`` closes an interrupted one for good."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest
from hostile_helpers import error_line
from pydantic import ValidationError
from sources.data import champion
from typer.testing import CliRunner

from flows import cli as graceful
from flows.config import TrainConfig
from store.lineage import Lineage


def test_epochs_are_bounded_in_the_typed_config() -> None:
    from flows.config import MAX_EPOCHS

    assert TrainConfig(epochs=MAX_EPOCHS).epochs == MAX_EPOCHS
    with pytest.raises(ValidationError, match=f"less than or equal to {MAX_EPOCHS}"):
        TrainConfig(epochs=MAX_EPOCHS + 1)
    with pytest.raises(ValidationError):
        TrainConfig.model_validate_json('{"epochs": 100000}')  # a deployment's parameters


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["cycle", "--epochs", "100000"], "--epochs"),
        (["run", "--epochs", "0"], "--epochs"),
        (["serve", "--epochs", "5000"], "--epochs"),
        (["run", "--backfill-retire-share", "2"], "--backfill-retire-share"),
        (["backfill", "--budget", "-1"], "--budget"),
        (["search", "--item", "1", "--k", "0"], "--k"),
        (["index", "--part-rows", "0"], "--part-rows"),
        (["cycle", "--epochs", "many"], "--epochs"),
        (["cycle", "--no-such-option"], "--no-such-option"),
    ],
)
def test_an_out_of_range_option_is_one_error_line_and_exit_2(
    args: list[str], named: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRACEFUL_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(graceful.app, args)
    assert result.exit_code == 2, result.output
    line = error_line(result.stderr)
    assert named in line and "--help" in line  # the problem and where the fix is
    assert not (tmp_path / "home").exists()  # nothing was created


def test_abandon_refuses_what_is_not_an_interrupted_generation(home: Path) -> None:
    champion(Lineage(), 0)
    for args, what in (
        (["abandon", "1"], "generation 1 is promoted: only an interrupted generation"),
        (["abandon", "9"], "unknown generation 9"),
    ):
        result = CliRunner().invoke(graceful.app, args)
        assert result.exit_code == 2, result.output
        assert what in error_line(result.stderr)
    assert Lineage().generation(1).status == "promoted"


def _kill_group(proc) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.mark.slow
def test_a_runaway_generation_is_resized_or_abandoned(
    tmp_path: Path, cli, kill_once_written
) -> None:
    c = cli(tmp_path / "home")
    lin = Lineage(c.db_url)
    base = ("--no-gate", "--backfill-batch-rows", "64")

    def run(*args: str, failpoint: str | None = None):
        proc = c.start(*args, failpoint=failpoint)
        out, err = proc.communicate(timeout=600)
        _kill_group(proc)
        return proc.returncode, out, err

    # 1. killed before any epoch finished: the resumed generation takes the new budget
    code, _, _ = run("cycle", "--dataset", "digits", *base, "--epochs", "900", failpoint="train")
    assert code == -signal.SIGKILL and lin.generation(1).epochs == 900
    code, _, err = run("cycle", *base, "--epochs", "2")
    assert code == 0, err[-3000:]
    assert "resumed generation 1" in err and "takes --epochs 2 (was 900)" in err
    assert lin.generation(1).epochs == 2 and lin.generation(1).status == "promoted"

    # 2. a runaway: killed once its first epoch is checkpointed
    proc = c.start("cycle", *base, "--epochs", "1000", "--force")
    resume = c.home / "checkpoints" / "gen-2.resume.pt"
    kill_once_written(proc, resume)
    assert lin.generation(2).status == "training"  # interrupted, 1000 epochs recorded

    # no command resumed it with its recorded 1000 epochs: abandon it
    code, out, err = run("abandon", "2", "--reason", "runaway: 1000 epochs")
    assert code == 0, err
    gen2 = lin.generation(2)
    assert gen2.status == "failed" and gen2.error == "abandoned: runaway: 1000 epochs"
    assert not resume.exists()
    code, _, _ = run("abandon", "2")
    assert code == 2  # once is enough: it is no longer interrupted

    # 3. the next cycle trains a new generation with its own options
    code, _, err = run("cycle", *base, "--epochs", "1", "--force")
    assert code == 0, err[-3000:]
    assert "resumed" not in err
    gens = {g.id: g for g in lin.generations()}
    assert sorted(gens) == [1, 2, 3] and gens[3].epochs == 1 and gens[3].status == "promoted"
    assert gens[2].status == "failed"


def test_a_resumed_training_past_its_first_epoch_keeps_its_budget_and_says_why(
    home: Path,
) -> None:
    from flows.config import CycleConfig
    from flows.recovery import resume_file, take_epochs
    from flows.steps import Step

    lin = Lineage()
    gen = lin.add_generation(
        dataset="digits", stage=0, architecture={}, embed_dim=8, epochs=40, status="training"
    )
    recorded = CycleConfig(train=TrainConfig(epochs=40))
    asked = CycleConfig(train=TrainConfig(epochs=3))
    default = CycleConfig()  # no --epochs given: the recorded budget, silently
    assert take_epochs(lin, gen.id, Step.TRAIN, recorded, default) == (recorded, None)
    resume_file(gen.id).write_bytes(b"an epoch checkpoint")
    cfg, note = take_epochs(lin, gen.id, Step.TRAIN, recorded, asked)
    assert cfg.train.epochs == 40 and lin.generation(gen.id).epochs == 40
    assert "keeps its 40 epochs, not --epochs 3" in note and "graceful abandon" in note
    cfg, note = take_epochs(lin, gen.id, Step.EVALUATE, recorded, asked)
    assert cfg.train.epochs == 40 and "applies to the next generation" in note

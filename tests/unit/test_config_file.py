"""`graceful run|cycle|serve --config FILE.toml`: the typed config as TOML, the options given
on the command line over it, the models' defaults under both; `graceful config --show`."""

from __future__ import annotations

import inspect
import json
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows import cli
from flows.config import (
    BackfillConfig,
    CycleConfig,
    GateConfig,
    GracefulConfig,
    ServeConfig,
    TrainConfig,
)

FILE = """\
dataset = "digits"

[train]
epochs = 2
weights = {focal = 0.5}

[gate]
max_backfill = 0.3
first_above_chance = false

[backfill]
budget = 0.2
policy = "oldest-first"

[serve]
interval_minutes = 30
"""


@pytest.fixture
def captured(home: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Runs `run`/`cycle`/`serve` up to the point they start work; what they would have
    started with lands in the dict."""
    seen: dict = {}

    def run_cycles(cfg, n):
        seen["config"], seen["n"] = cfg, n

    def serve_all(config, **kw):
        seen["config"], seen["serve"] = config, kw

    import deploy.deployments

    monkeypatch.setattr(cli, "_run_cycles", run_cycles)
    monkeypatch.setattr(cli, "_print_summary", lambda: None)
    monkeypatch.setattr(deploy.deployments, "serve_all", serve_all)
    return seen


def graceful(*args: str):
    return CliRunner().invoke(cli.app, list(args))


def write(tmp_path: Path, text: str, name: str = "graceful.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def one_error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["run", "cycle"])
def test_the_file_sets_train_gate_and_backfill(command, tmp_path, captured) -> None:
    result = graceful(command, "--config", str(write(tmp_path, FILE)))
    assert result.exit_code == 0, result.stderr
    cfg: CycleConfig = captured["config"]
    assert cfg.dataset == "digits"
    assert cfg.train.epochs == 2 and "epochs" in cfg.train.model_fields_set
    assert cfg.train.weights["focal"] == 0.5
    assert cfg.gate.max_backfill == 0.3 and cfg.gate.first_above_chance is False
    assert (cfg.backfill.budget, cfg.backfill.policy) == (0.2, "oldest-first")
    # what the file leaves out is the models' default, never the CLI's literal
    assert cfg.train.method == TrainConfig().method
    assert cfg.train.weights["influence"] == TrainConfig().weights["influence"]
    assert cfg.gate.max_nfr == GateConfig().max_nfr
    assert cfg.backfill.retire_share == BackfillConfig().retire_share


def test_options_given_override_the_file_and_defaults_do_not(tmp_path, captured) -> None:
    path = write(tmp_path, FILE)
    result = graceful(
        "cycle",
        "--config",
        str(path),
        "--epochs",
        "3",
        "--gate-max-backfill",
        "0.4",
        "--backfill-policy",
        "random",
        "--weight",
        "embedding=1.5",
        "--no-gate",
    )
    assert result.exit_code == 0, result.stderr
    cfg: CycleConfig = captured["config"]
    assert cfg.train.epochs == 3
    assert cfg.gate.max_backfill == 0.4 and cfg.gate.enabled is False
    assert cfg.backfill.policy == "random"
    assert cfg.backfill.budget == 0.2  # the file's: --backfill-budget was not given
    assert cfg.gate.first_above_chance is False  # the file's
    assert cfg.train.weights["embedding"] == 1.5 and cfg.train.weights["focal"] == 0.5


def test_without_a_file_the_config_is_the_models_and_epochs_stay_unset(captured) -> None:
    result = graceful("cycle")
    assert result.exit_code == 0, result.stderr
    cfg: CycleConfig = captured["config"]
    assert cfg == CycleConfig()
    # an interrupted generation keeps its budget unless --epochs is given (flows.recovery)
    assert "epochs" not in cfg.train.model_fields_set


def test_run_takes_stages_from_the_file_unless_generations_is_given(tmp_path, captured) -> None:
    path = write(tmp_path, "stages = 2\n[train]\nepochs = 2\n")
    assert graceful("run", "--config", str(path)).exit_code == 0
    assert captured["n"] == 2 and captured["config"].stages == 2
    assert captured["config"].dataset == "digits"  # run's own default data set
    assert graceful("run", "--config", str(path), "--generations", "4").exit_code == 0
    assert captured["n"] == 4 and captured["config"].stages == 4


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("datset = 'digits'\n", "'datset'"),
        ("[train]\nepoch = 2\n", "'train.epoch'"),
        ("[gates]\nmax_backfill = 0.3\n", "'gates'"),
        ("[backfill]\nbudgett = 0.2\n", "'backfill.budgett'"),
    ],
)
def test_an_unknown_key_is_one_error_line_and_nothing_is_created(
    text: str, named: str, tmp_path: Path, home: Path, captured
) -> None:
    path = write(tmp_path, text)
    for command in ("run", "cycle", "serve"):
        line = one_error_line(graceful(command, "--config", str(path)))
        assert f"unknown key {named}" in line and str(path) in line, line
        assert "fix or remove it" in line
    assert not home.exists() and not captured  # nothing created, nothing started


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[gate]\nmax_backfill = 2\n", "gate.max_backfill"),
        ("[train]\nepochs = 0\n", "train.epochs"),
        ("[backfill]\npolicy = 'newest'\n", "backfill.policy"),
        ("[serve]\ninterval_minutes = -1\n", "serve.interval_minutes"),
        ("train = 3\n", "train"),
    ],
)
def test_a_bad_value_is_one_error_line_naming_the_key(
    text: str, named: str, tmp_path: Path, home: Path, captured
) -> None:
    path = write(tmp_path, text)
    line = one_error_line(graceful("cycle", "--config", str(path)))
    assert f"{path}: {named}: " in line, line
    assert not home.exists() and not captured


def test_an_unreadable_file_is_one_error_line(tmp_path: Path, home: Path, captured) -> None:
    missing = tmp_path / "missing.toml"
    line = one_error_line(graceful("cycle", "--config", str(missing)))
    assert f"cannot read config file {missing}" in line and "No such file" in line
    line = one_error_line(graceful("run", "--config", str(tmp_path)))  # a directory
    assert f"cannot read config file {tmp_path}" in line
    broken = write(tmp_path, "[train\nepochs = 2\n")
    line = one_error_line(graceful("serve", "--config", str(broken)))
    assert f"config file {broken} is not valid TOML" in line
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    assert "cannot read config file" in one_error_line(
        graceful("config", "--show", "--config", str(binary))
    )
    assert not home.exists() and not captured


def test_a_bad_option_over_a_good_file_names_the_option_field(tmp_path, home, captured) -> None:
    line = one_error_line(
        graceful("cycle", "--config", str(write(tmp_path, FILE)), "--against", "foo")
    )
    assert line.startswith("error: against: Input should be ")


def test_config_show_prints_the_effective_config_and_writes_nothing(
    tmp_path: Path, home: Path
) -> None:
    path = write(tmp_path, FILE)
    result = graceful("config", "--show", "--config", str(path))
    assert result.exit_code == 0, result.stderr
    shown = tomllib.loads(result.stdout)
    assert shown["train"]["epochs"] == 2 and shown["gate"]["max_backfill"] == 0.3
    assert shown["backfill"]["budget"] == 0.2 and shown["serve"]["interval_minutes"] == 30
    assert shown["gate"]["max_nfr"] == GateConfig().max_nfr  # every key, defaults included
    # what it prints reads back as the same config
    expected = GracefulConfig.model_validate(tomllib.loads(path.read_text()))
    assert GracefulConfig.model_validate(shown) == expected
    as_json = graceful("config", "--show", "--config", str(path), "--json")
    assert as_json.exit_code == 0
    assert GracefulConfig.model_validate(json.loads(as_json.stdout)) == expected
    # without a file: the models' defaults
    defaults = graceful("config", "--show", "--json")
    assert json.loads(defaults.stdout) == GracefulConfig().model_dump(mode="json")
    assert path.read_text() == FILE and not home.exists()  # reading never writes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graceful.toml"]


def test_config_without_show_is_bad_input(home: Path) -> None:
    assert "--show" in one_error_line(graceful("config"))


def test_serve_takes_the_file_as_the_deployments_parameters(tmp_path, captured) -> None:
    path = write(tmp_path, FILE)
    result = graceful("serve", "--config", str(path), "--epochs", "3", "--name", "nightly")
    assert result.exit_code == 0, result.stderr
    cfg: CycleConfig = captured["config"]
    assert cfg.train.epochs == 3 and cfg.backfill.budget == 0.2 and cfg.gate.max_backfill == 0.3
    assert captured["serve"] == {
        "interval_minutes": 30,
        "cron": None,
        "name": "nightly",
        "collection": None,
    }

    from deploy.deployments import build_deployments

    deps = {d.name: d for d in build_deployments(cfg, **captured["serve"])}
    cycle = deps["nightly"]
    assert CycleConfig.model_validate(cycle.parameters["config"]) == cfg
    assert cycle.schedules[0].schedule.interval.total_seconds() == 1800
    # the backfill's parameters are flat: budget and policy at the top
    backfill = deps["on-demand-backfill"].parameters
    assert backfill["budget"] == 0.2 and backfill["policy"] == "oldest-first"
    assert "config" not in backfill


def test_serve_interval_given_replaces_the_files_cron(tmp_path, captured) -> None:
    path = write(tmp_path, '[serve]\ncron = "0 3 * * *"\n')
    assert graceful("serve", "--config", str(path)).exit_code == 0
    assert captured["serve"]["cron"] == "0 3 * * *"
    assert graceful("serve", "--config", str(path), "--interval-minutes", "60").exit_code == 0
    assert captured["serve"]["cron"] is None and captured["serve"]["interval_minutes"] == 60


def test_serve_defaults_are_the_serve_config() -> None:
    defaults = {n: p.default for n, p in inspect.signature(cli.serve).parameters.items()}
    s = ServeConfig()
    assert defaults["interval_minutes"] == s.interval_minutes
    assert (defaults["cron"], defaults["name"], defaults["collection"]) == (
        s.cron,
        s.name,
        s.collection,
    )
    assert defaults["epochs"] == TrainConfig().epochs


def test_the_backfill_flow_takes_flat_parameters_and_a_whole_config() -> None:
    from flows.backfill import backfill_config, backfill_flow

    flat = {
        n: p.default
        for n, p in inspect.signature(backfill_flow.fn).parameters.items()
        if n != "config"
    }
    assert flat == BackfillConfig().model_dump()  # the model's defaults, not copies
    assert backfill_config(None, **{**flat, "budget": 0.2}).budget == 0.2
    # a whole config (an older trigger's) wins for the fields it sets
    old = BackfillConfig.model_validate({"budget": 1.0, "policy": "oldest-first"})
    cfg = backfill_config(old, **{**flat, "budget": 0.2, "batch_rows": 64})
    assert (cfg.budget, cfg.policy, cfg.batch_rows) == (1.0, "oldest-first", 64)

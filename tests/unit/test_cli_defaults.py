"""The CLI's defaults are the typed configs' (what the benchmarks measured): read from the
models, checked here against them."""

from __future__ import annotations

import inspect

import pytest

from flows import cli
from flows.config import BackfillConfig, GateConfig, TrainConfig


@pytest.mark.parametrize("command", [cli.run, cli.cycle])
def test_cycle_commands_default_to_the_configs(command) -> None:
    defaults = {name: p.default for name, p in inspect.signature(command).parameters.items()}
    train, gate, backfill = TrainConfig(), GateConfig(), BackfillConfig()
    assert defaults["method"] == train.method.value
    assert defaults["against"] == train.against
    assert defaults["ancestor_weights"] == train.ancestor_weights
    assert defaults["epochs"] == train.epochs
    assert defaults["backfill_budget"] == backfill.budget
    assert defaults["backfill_policy"] == backfill.policy
    assert defaults["backfill_retire_share"] == backfill.retire_share
    assert defaults["max_nfr"] == gate.max_nfr
    assert defaults["ecc_margin"] == gate.ecc_margin
    assert defaults["on_incompatible"] == gate.on_incompatible
    assert defaults["max_backfill"] == gate.max_backfill


def test_backfill_command_defaults_to_the_config() -> None:
    defaults = {n: p.default for n, p in inspect.signature(cli.backfill).parameters.items()}
    b = BackfillConfig()
    assert (defaults["budget"], defaults["policy"], defaults["retire_share"]) == (
        b.budget,
        b.policy,
        b.retire_share,
    )


@pytest.mark.parametrize(
    ("option", "field"),
    [("--against", "against"), ("--gate-on-incompatible", "on_incompatible")],
)
def test_a_bad_option_value_is_one_error_line_naming_the_field(
    option: str, field: str, tmp_path, monkeypatch
) -> None:
    from typer.testing import CliRunner

    monkeypatch.setenv("GRACEFUL_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(cli.app, ["run", "--generations", "1", option, "foo"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}: Input should be ")
    assert "(got 'foo')" in lines[0]
    assert not (tmp_path / "home").exists()  # nothing was created


@pytest.mark.parametrize("command", ["cycle", "serve", "index", "search", "abandon"])
def test_help_reflows_a_commands_description(command: str) -> None:
    """A docstring's line breaks are the source's, not the help's: every paragraph of a
    command's description is one paragraph in ``--help``, wrapped to the terminal, so
    a wide terminal shows it on one line (typer keeps the breaks after the first one)."""
    from typer.testing import CliRunner

    result = CliRunner().invoke(cli.app, [command, "--help"], env={"COLUMNS": "2000"})
    assert result.exit_code == 0, result.output
    doc = inspect.getdoc(getattr(cli, command.replace("-", "_")))
    paragraphs = [" ".join(p.split()) for p in doc.split("\n\n")]
    lines = [" ".join(line.split()) for line in result.output.splitlines()]
    for paragraph in paragraphs:
        assert any(paragraph in line for line in lines), paragraph

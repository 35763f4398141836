"""Values a hostile run tried (issue 20): a budget of inf or nan, an unknown policy, a cron
string that is none, an interval of -5 or 0 minutes, and reading commands pointed at a
GRACEFUL_HOME that holds no lineage. Each is one `error:` line, exit 2, before anything
starts, and nothing is created."""

from __future__ import annotations

from pathlib import Path

import pytest
from hostile_helpers import error_line
from typer.testing import CliRunner

from flows import cli as graceful


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What the commands started; a refused one starts nothing (no cycle, no backfill, no
    deployment served)."""
    import deploy.deployments
    import flows.backfill

    seen: list[str] = []
    monkeypatch.setattr(graceful, "_run_cycles", lambda cfg, n: seen.append("cycles"))
    monkeypatch.setattr(graceful, "_print_summary", lambda: None)
    monkeypatch.setattr(deploy.deployments, "serve_all", lambda *a, **k: seen.append("serve"))
    monkeypatch.setattr(flows.backfill, "backfill_flow", lambda **k: seen.append("backfill"))
    return seen


def _refused(args: list[str]) -> str:
    result = CliRunner().invoke(graceful.app, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    return error_line(result.stderr)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["backfill", "--budget", "inf"], "--budget"),
        (["backfill", "--budget", "nan"], "--budget"),
        (["backfill", "--budget", "-inf"], "--budget"),
        (["run", "--generations", "1", "--backfill-budget", "inf"], "--backfill-budget"),
        (["run", "--generations", "1", "--backfill-budget", "nan"], "--backfill-budget"),
        (["cycle", "--backfill-budget", "inf"], "--backfill-budget"),
        (["cycle", "--backfill-budget", "nan"], "--backfill-budget"),
    ],
)
def test_a_budget_of_inf_or_nan_is_bad_input(
    args: list[str], named: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started
) -> None:
    monkeypatch.setenv("GRACEFUL_HOME", str(tmp_path / "home"))
    line = _refused(args)
    assert named in line and "is no budget" in line and "0.3 or 500" in line, line
    assert started == [] and not (tmp_path / "home").exists()


def test_a_budget_of_inf_in_a_config_file_is_bad_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started
) -> None:
    monkeypatch.setenv("GRACEFUL_HOME", str(tmp_path / "home"))
    for value in ("inf", "nan"):
        path = tmp_path / f"{value}.toml"
        path.write_text(f"[backfill]\nbudget = {value}\n")  # TOML has inf and nan
        line = _refused(["cycle", "--config", str(path)])
        assert "backfill.budget" in line and "finite number" in line, line
    assert started == [] and not (tmp_path / "home").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["backfill", "--policy", "newest-first"],
        ["run", "--generations", "1", "--backfill-policy", "newest-first"],
        ["cycle", "--backfill-policy", "newest-first"],
        ["run", "--generations", "1", "--method", "newest-first"],  # as an unknown method
    ],
)
def test_an_unknown_policy_is_bad_input_like_an_unknown_method(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started
) -> None:
    monkeypatch.setenv("GRACEFUL_HOME", str(tmp_path / "home"))
    line = _refused(args)
    assert "(got 'newest-first')" in line and "Input should be" in line, line
    if "--method" not in args:  # the policies it takes are named
        assert "policy:" in line and "'representative'" in line
    assert started == [] and not (tmp_path / "home").exists()


@pytest.mark.parametrize(
    ("args", "what"),
    [
        (["--cron", "not-a-cron"], "'not-a-cron' is not a cron schedule"),
        (["--cron", "61 * * * *"], "'61 * * * *' is not a cron schedule"),
        (["--cron", "* * * *"], "is not a cron schedule"),
        (["--interval-minutes", "-5"], "greater than 0"),
        (["--interval-minutes", "0"], "greater than 0"),
        (["--interval-minutes", "inf"], "finite number"),
        (["--interval-minutes", "nan"], "finite number"),
    ],
)
def test_serve_refuses_a_bad_schedule_before_anything_starts(
    args: list[str], what: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started
) -> None:
    monkeypatch.setenv("GRACEFUL_HOME", str(tmp_path / "home"))
    line = _refused(["serve", *args])
    assert what in line, line
    if "--cron" in args:
        assert "five fields" in line and "'0 3 * * *'" in line  # the fix
    assert started == [] and not (tmp_path / "home").exists()


def test_serve_refuses_a_bad_cron_in_its_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started
) -> None:
    monkeypatch.setenv("GRACEFUL_HOME", str(tmp_path / "home"))
    path = tmp_path / "serve.toml"
    path.write_text('[serve]\ncron = "every night"\n')
    line = _refused(["serve", "--config", str(path)])
    assert "serve.cron" in line and "is not a cron schedule" in line, line
    ok = CliRunner().invoke(graceful.app, ["serve", "--cron", "0 3 * * *"])
    assert ok.exit_code == 0, ok.output
    assert started == ["serve"]  # a good cron string serves


# -- reading commands on a GRACEFUL_HOME without a lineage -------------------------------------
READERS = [
    ["report", "--json"],
    ["report"],
    ["search", "--item", "shelf-0/0000.png"],
    ["search", "--file", "query.npy"],
    ["backfill"],
    ["pin", "1"],
    ["abandon", "1"],
    ["index"],
]


@pytest.mark.parametrize("args", READERS, ids=lambda a: " ".join(a))
@pytest.mark.parametrize("where", ["missing", "empty"])
def test_a_reading_command_on_a_home_without_a_lineage_creates_nothing(
    args: list[str], where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started
) -> None:
    home = tmp_path / "no-such-home"
    if where == "empty":
        home.mkdir()
    monkeypatch.setenv("GRACEFUL_HOME", str(home))
    monkeypatch.delenv("GRACEFUL_DB_URL", raising=False)
    monkeypatch.delenv("GRACEFUL_SEARCH_URL", raising=False)
    line = _refused(args)
    assert f"no lineage at GRACEFUL_HOME={home}" in line, line
    assert ("does not exist" if where == "missing" else "holds no lineage.db") in line
    assert "`graceful run`" in line  # the fix
    if where == "missing":
        assert not home.exists()
    else:
        assert list(home.iterdir()) == []  # no lineage.db, no subdirectory
    assert started == []


def test_config_show_on_a_missing_home_prints_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "no-such-home"
    monkeypatch.setenv("GRACEFUL_HOME", str(home))
    result = CliRunner().invoke(graceful.app, ["config", "--show"])
    assert result.exit_code == 0, result.output
    assert "[backfill]" in result.stdout and not home.exists()

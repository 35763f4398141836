"""The README says only what is true: its length, its configuration table (generated from
the models), the make targets and the ``graceful`` subcommands and options it names."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import click
import pytest
import typer

from flows.cli import app
from flows.config_table import markdown_table, rows

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"(`+)(.+?)\1", re.S)
SUBCOMMAND = re.compile(r"\bgraceful ([a-z][a-z-]*(?:\|[a-z][a-z-]*)*)")


def _text() -> str:
    """The README."""
    return README.read_text(encoding="utf-8")


def _code(text: str) -> list[str]:
    """What the README shows as code: fenced blocks line by line (a ``#`` comment cut
    off), then inline spans."""
    blocks = [m.group(1) for m in FENCE.finditer(text)]
    lines = [line.split(" #")[0] for block in blocks for line in block.splitlines()]
    prose = FENCE.sub("", text)
    return lines + [" ".join(m.group(2).split()) for m in SPAN.finditer(prose)]


def _commands() -> dict[str, click.Command]:
    return typer.main.get_command(app).commands  # type: ignore[attr-defined]


def _make_targets() -> set[str]:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)\s*:(?!=)", makefile, re.M))


def test_readme_is_short() -> None:
    """At most ~150 lines a person wrote; the generated configuration table comes on top."""
    text = _text()
    head, _, rest = text.partition("<!-- config-table:start -->")
    _, _, tail = rest.partition("<!-- config-table:end -->")
    assert len(head.splitlines()) + len(tail.splitlines()) <= 115


def test_readme_config_table_is_generated_from_the_models() -> None:
    text = _text()
    assert text.count(START) == 1 and text.count(END) == 1
    between = text.split(START, 1)[1].split(END, 1)[0]
    assert between.strip("\n") == markdown_table(), "run `make readme-config` into the README"


def test_config_table_lists_every_key_with_enum_values_and_choices() -> None:
    table = {key.strip("`"): (default, text) for key, default, text in rows()}
    assert {"dataset", "train.epochs", "gate.max_backfill", "serve.cron"} <= set(table)
    assert table["train.epochs"][0] == "`15`"
    default, text = table["gate.on_incompatible"]
    assert default == "`targeted`" and "`reject` \\| `backfill` \\| `targeted`" in text
    assert table["backfill.policy"][0] == "`representative`"
    assert all(text for _, text in table.values()), "a key without a description"


def test_readme_make_targets_exist() -> None:
    targets = _make_targets()
    named = {m for code in _code(_text()) for m in re.findall(r"\bmake ([a-z][\w-]*\*?)", code)}
    assert {"demo", "test"} <= named
    missing = {n for n in named if not fnmatch.filter(targets, n)}
    assert not missing, f"make targets the README names but the Makefile lacks: {missing}"


DOCS = ["README.md", "bench/README.md", "docs/data.md", "docs/operations.md"]


def _graceful_calls(text: str) -> list[tuple[str, list[str]]]:
    """Each ``graceful SUB`` the text shows as code (``run|cycle`` names two), with the
    options written after it up to the next ``graceful``."""
    calls = []
    for code in _code(text):
        found = list(SUBCOMMAND.finditer(code))
        ends = [m.start() for m in found[1:]] + [len(code)]
        for m, end in zip(found, ends, strict=False):
            named = code[m.end() : end]
            options = re.findall(r"(?<![\w-])--[a-z][a-z-]*", named)
            calls += [(name, options) for name in m.group(1).split("|")]
    return calls


def test_readme_names_the_main_commands() -> None:
    named = {name for name, _ in _graceful_calls(_text())}
    assert {"run", "cycle", "index", "search", "search-server", "backfill", "serve"} <= named


@pytest.mark.parametrize("doc", DOCS)
def test_graceful_commands_and_options_exist(doc: str) -> None:
    commands = _commands()
    wrong: list[str] = []
    for name, options in _graceful_calls((ROOT / doc).read_text(encoding="utf-8")):
        if name not in commands:
            wrong.append(f"graceful {name}")
            continue
        known = {o for p in commands[name].params for o in p.opts + p.secondary_opts}
        wrong += [f"graceful {name} {o}" for o in options if o not in known | {"--help"}]
    assert not wrong, f"{doc} names what the CLI does not have: {wrong}"


@pytest.mark.parametrize("doc", DOCS)
def test_links_inside_the_repository_resolve(doc: str) -> None:
    """Every link to a file of the repository names one that exists (``../shared`` lies
    outside it)."""
    path = ROOT / doc
    links = re.findall(r"\]\(([^)#\s]+)", path.read_text(encoding="utf-8"))
    targets = [(path.parent / link).resolve() for link in links if "://" not in link]
    inside = [t for t in targets if t.is_relative_to(ROOT)]
    assert inside
    assert [str(t) for t in inside if not t.exists()] == []

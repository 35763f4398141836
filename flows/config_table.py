"""The README's configuration table, generated from the typed config (``flows/config.py``).

``make readme-config`` prints it; ``tests/unit/test_readme.py`` checks that the README's
copy (between its ``config-table`` markers) is exactly this, so it cannot drift from the
models.
"""

from __future__ import annotations

import enum
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from flows.config import GracefulConfig

HEADER = "| key | default | description |\n|---|---|---|"


def _section(annotation: Any) -> type[BaseModel] | None:
    """The nested model a field holds (a TOML section), or None for a plain key."""
    is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
    return annotation if is_model else None


def _choices(annotation: Any) -> list[str]:
    """The values an enum or ``Literal`` field takes (``X | None`` looked through)."""
    if get_origin(annotation) in (Union, types.UnionType):
        return [c for arg in get_args(annotation) if arg is not type(None) for c in _choices(arg)]
    if get_origin(annotation) is Literal:
        return [str(a) for a in get_args(annotation)]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [str(m.value) for m in annotation]
    return []


def _value(v: Any) -> str:
    """A default as TOML writes it: enums by value, booleans lower case, tables inline."""
    if isinstance(v, enum.Enum):
        v = v.value
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_value(k)} = {_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def rows(model: type[BaseModel] = GracefulConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted TOML key, default, description) for every key of ``model``: its own keys
    first, then each section's, as a TOML file lays them out."""
    own: list[tuple[str, str, str]] = []
    sections: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        nested = _section(field.annotation)
        if nested is not None:
            sections += rows(nested, f"{prefix}{name}.")
            continue
        description = field.description or ""
        choices = _choices(field.annotation)
        if choices:
            listed = " | ".join(f"`{c}`" for c in choices)
            description = f"{description} ({listed})" if description else listed
        value = field.get_default(call_default_factory=True)
        default = "*unset*" if value is None else f"`{_value(value)}`"
        own.append((f"`{prefix}{name}`", default, _cell(description)))
    return own + sections


def markdown_table() -> str:
    """The configuration table: every key of a ``--config`` file (``CycleConfig`` with its
    ``[train]``, ``[gate]``, ``[backfill]`` and ``ServeConfig``'s ``[serve]``)."""
    lines = [HEADER] + [f"| {key} | {default} | {text} |" for key, default, text in rows()]
    return "\n".join(lines)


START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"


def write_into(path: Path) -> None:
    """Replace the table between the markers in ``path`` (the README) with today's."""
    text = path.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    path.write_text(f"{head}{START}\n{markdown_table()}\n{END}{tail}")


if __name__ == "__main__":
    if sys.argv[1:]:
        write_into(Path(sys.argv[1]))
    else:
        print(markdown_table())

"""A ``--config`` file: the typed config (:class:`flows.config.GracefulConfig`) as TOML.

Its tables are the config models' sections (``[train]``, ``[gate]``, ``[backfill]``,
``[serve]``; the cycle's own keys, such as ``dataset``, at the top). Every key must be one
of the models' fields and every value valid, checked before anything runs; what the file
leaves out keeps the models' defaults (they are written once, in ``flows/config.py``).
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from flows import config_table
from flows.config import GracefulConfig


class ConfigFileError(ValueError):
    """A config file that cannot be used: unreadable, not TOML, an unknown key, a bad value.
    The message names the file and the key, and says what to do."""


def read_config_file(path: Path | str) -> dict[str, Any]:
    """The file's tables, checked: every key known and the whole valid on its own (values
    the command line overrides must be valid in the file too)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigFileError(
            f"cannot read config file {path}: {why}; give --config a readable TOML file"
        ) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(
            f"config file {path} is not valid TOML: {exc}; fix it (`graceful config --show` "
            "prints a valid one)"
        ) from exc
    if unknown := unknown_key(GracefulConfig, data):
        raise ConfigFileError(f"config file {path}: {unknown}; fix or remove it")
    try:
        GracefulConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})"
            for e in exc.errors()
        )
        raise ConfigFileError(f"config file {path}: {problems}; fix it in {path}") from exc
    return data


def _section(model: type[BaseModel], name: str) -> type[BaseModel] | None:
    """The model of ``name``'s section when that field is one (``train``: TrainConfig)."""
    return config_table._section(model.model_fields[name].annotation)


def unknown_key(model: type[BaseModel], data: dict[str, Any], where: str = "") -> str | None:
    """The first key of ``data`` that ``model`` (or one of its sections) does not have,
    said with the keys it does have; None when every key is known."""
    for key, value in data.items():
        if key not in model.model_fields:
            known = ", ".join(model.model_fields)
            table = f"[{where.rstrip('.')}]" if where else "the top level"
            return f"unknown key {where + key!r} (the keys of {table}: {known})"
        section = _section(model, key)
        if section is not None and isinstance(value, dict):
            found = unknown_key(section, value, f"{where}{key}.")
            if found:
                return found
    return None


# -- printing it back (``graceful config --show``) -----------------------------------------
_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(name: str) -> str:
    return name if _BARE.match(name) else json.dumps(name)


def _value(v: Any) -> str:
    """One TOML value (dicts inline); a JSON string is a TOML basic string."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)  # inf, nan and 1e-05 are TOML too
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no TOML for {v!r}")


def _lines(values: dict[str, Any]) -> list[str]:
    # TOML has no null: a key left unset (its default is "none") is shown as a comment
    return [
        f"# {_key(k)} is unset" if v is None else f"{_key(k)} = {_value(v)}"
        for k, v in values.items()
    ]


def to_toml(config: GracefulConfig) -> str:
    """``config`` as a TOML file that reads back to the same config."""
    data = config.model_dump(mode="json")
    out = _lines({k: v for k, v in data.items() if _section(GracefulConfig, k) is None})
    for name in GracefulConfig.model_fields:
        if _section(GracefulConfig, name) is not None:
            out += ["", f"[{name}]", *_lines(data[name])]
    return "\n".join(out) + "\n"

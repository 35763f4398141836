"""What the Prefect UI calls things: flow run names, the lineage's label, artifact keys.

Several lineages may report to one Prefect server (one per ``GRACEFUL_HOME`` or
``GRACEFUL_DB_URL``). Their artifacts are keyed by kind *and* lineage
(``cycle-summary-photos-3fa2b1c9``), so one lineage's history never overwrites
another's. The label is a slug of the lineage's name (the home directory, or the
database's name) and a short hash of its database URL with the password masked: a
password never reaches a name, a key, a message or a hash.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

from store.settings import StoreError, graceful_home, redact_url

HASH_CHARS = 8
SLUG_CHARS = 24


def _slug(text: str) -> str:
    """Lowercase letters, digits and dashes (what Prefect allows in an artifact key)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:SLUG_CHARS].strip("-")


def lineage_url() -> str:
    """The lineage's database URL with its password masked (nothing is created)."""
    url = os.environ.get("GRACEFUL_DB_URL")
    if not url:
        url = f"sqlite:///{graceful_home(create=False) / 'lineage.db'}"
    return redact_url(url)


def lineage_label(url: str | None = None) -> str:
    """``<name>-<hash>``: the lineage's name (its home directory's, or its database's) and
    8 hex digits of the SHA-256 of its redacted database URL."""
    try:
        safe = redact_url(url) if url else lineage_url()
    except StoreError:  # GRACEFUL_HOME is not a directory: the command refuses it anyway
        safe = "unknown"
    digest = hashlib.sha256(safe.encode()).hexdigest()[:HASH_CHARS]
    if safe.startswith("sqlite"):
        parts = [p for p in re.split(r"[/\\]", safe) if p]
        name = parts[-2] if len(parts) >= 2 else ""
    else:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            name = make_url(safe).database or ""
        except (ArgumentError, ValueError):
            name = ""
    name = _slug(name)
    return f"{name}-{digest}" if name else f"lineage-{digest}"


def artifact_key(kind: str, label: str | None = None) -> str:
    """An artifact key of this lineage: ``<kind>-<lineage label>``."""
    return f"{kind}-{label or lineage_label()}"


def number(value: float) -> str:
    """A budget as a user typed it: ``0.2``, ``500`` (no ``500.0``)."""
    return f"{value:g}"


def safe_spec(spec: str | None) -> str:
    """A data or collection spec fit for a name or a message (a URL's password masked)."""
    return redact_url(spec) if spec else "the collection"


def backfill_run_name_for(budget: float, policy: Any) -> str:
    return f"backfill {number(float(budget))} {getattr(policy, 'value', policy)}"


def index_run_name_for(spec: str | None) -> str:
    return f"index {safe_spec(spec)}"


def _parameters() -> dict[str, Any]:
    from prefect.runtime import flow_run

    return dict(flow_run.parameters or {})


def _field(params: dict[str, Any], name: str) -> Any:
    """A parameter of the flow, or the same field of its whole ``config`` parameter."""
    config = params.get("config")
    if isinstance(config, dict):
        return config[name] if name in config else params.get(name)
    if name in getattr(config, "model_fields_set", ()):
        return getattr(config, name, None)
    return params.get(name)


def cycle_run_name() -> str:
    """The update cycle's name until its generation is known: the lineage's label."""
    try:
        return f"cycle on {lineage_label()}"
    except Exception:  # a name never fails a run
        return "update cycle"


def backfill_run_name() -> str:
    """``backfill 0.2 representative``: the budget and policy the run was given."""
    try:
        params = _parameters()
        return backfill_run_name_for(_field(params, "budget"), _field(params, "policy"))
    except Exception:
        return "backfill"


def index_run_name() -> str:
    """``index images:/data/album`` (a URL's password masked)."""
    try:
        return index_run_name_for(_field(_parameters(), "spec"))
    except Exception:
        return "index"


def _update_run(what: str, **fields: object) -> None:
    """Set ``fields`` of the current flow run, through the API and on the run the context
    holds. Outside a flow run, or if the API refuses, nothing happens: a name or a tag is
    never worth failing a run."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            client.update_flow_run(ctx.flow_run.id, **fields)
        for field, value in fields.items():  # the run's later log lines carry them
            setattr(ctx.flow_run, field, value)
    except Exception as exc:
        from prefect import get_run_logger

        get_run_logger().debug("could not %s the flow run: %s", what, type(exc).__name__)


def name_run(name: str) -> None:
    """Rename the current flow run (once what it does is known: its generation, its
    collection's spec)."""
    _update_run("rename", name=name)


def tag_run() -> None:
    """Tag the current flow run ``lineage:<label>`` (a run started by the CLI, a deployment
    or a schedule alike): every run of this lineage carries it, so the UI's Tags filter
    selects one lineage's runs on a shared server."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    tags = list(ctx.flow_run.tags or [])
    tag = f"lineage:{lineage_label()}"
    if tag not in tags:
        _update_run("tag", tags=[*tags, tag])

"""Shared test settings: an isolated Prefect home and GRACEFUL_HOME per test."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Before prefect is imported anywhere: an isolated Prefect database for this test session
# (the ephemeral API runs against it), and start-up time for a 2-core machine.
_PREFECT_HOME = tempfile.mkdtemp(prefix="graceful-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh GRACEFUL_HOME (SQLite lineage, gallery, checkpoints) for one test."""
    path = tmp_path / "home"
    monkeypatch.setenv("GRACEFUL_HOME", str(path))
    monkeypatch.delenv("GRACEFUL_DB_URL", raising=False)
    return path


@pytest.fixture(scope="session", autouse=True)
def _stop_ray():
    """Tests that use Ray share one local cluster; it is stopped at the end."""
    yield
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()

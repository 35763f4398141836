"""Joining a Ray cluster and steering the training task, without a cluster: the
``GRACEFUL_TRAIN_RESOURCES`` knob, and a ``RAY_ADDRESS`` that cannot be joined failing with
the fix in one line (the real cluster: ``tests/flows/test_local_cluster.py``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from workers.runtime import TRAIN_RESOURCES_ENV, train_resources

ROOT = Path(__file__).resolve().parents[2]
_RAY_SETTINGS = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def test_train_resources_default_to_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRAIN_RESOURCES_ENV, raising=False)
    assert train_resources() == {}
    monkeypatch.setenv(TRAIN_RESOURCES_ENV, "  ")
    assert train_resources() == {}


def test_train_resources_are_read_as_floats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRAIN_RESOURCES_ENV, '{"graceful_worker": 1, "big_box": 0.5}')
    assert train_resources() == {"graceful_worker": 1.0, "big_box": 0.5}


@pytest.mark.parametrize(
    "value",
    ["graceful_worker", "[1]", "{}", '{"a": 0}', '{"a": -1}', '{"a": true}', '{"a": "1"}'],
)
def test_train_resources_refuse_what_is_not_a_map_of_amounts(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(TRAIN_RESOURCES_ENV, value)
    with pytest.raises(ValueError, match=f"{TRAIN_RESOURCES_ENV} takes a JSON object"):
        train_resources()


def test_train_resources_leave_cpus_and_gpus_to_graceful(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRAIN_RESOURCES_ENV, '{"GPU": 1}')
    with pytest.raises(ValueError, match="custom resources only"):
        train_resources()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _RAY_SETTINGS}
    env.pop(TRAIN_RESOURCES_ENV, None)
    return dict(env, PYTHONPATH=str(ROOT), **extra)


def test_a_bad_knob_is_bad_input_before_anything_is_created(tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "cycle", "--dataset", "digits"],
        cwd=ROOT,
        env=_env(GRACEFUL_HOME=str(home), **{TRAIN_RESOURCES_ENV: "graceful_worker"}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error:") and TRAIN_RESOURCES_ENV in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not home.exists()


JOIN = "from workers.runtime import ensure_ray\nensure_ray()\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", JOIN],
        cwd=ROOT,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_joining_with_no_token_names_the_fix(tmp_path: Path) -> None:
    address = f"127.0.0.1:{_free_port()}"
    proc = _join(RAY_ADDRESS=address, HOME=str(tmp_path))  # no ~/.ray/auth_token there
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("workers.runtime.RayUnavailable:"), proc.stderr[-2000:]
    assert f"the Ray cluster at {address} needs its token" in last
    assert "RAY_AUTH_TOKEN_PATH" in last


def test_joining_where_nothing_answers_says_so(tmp_path: Path) -> None:
    token = tmp_path / "auth_token"
    token.write_text("ab" * 32)
    address = f"127.0.0.1:{_free_port()}"
    proc = _join(RAY_ADDRESS=address, RAY_AUTH_TOKEN_PATH=str(token))
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert f"no Ray cluster answers at {address}" in last, proc.stderr[-2000:]
    assert "ab" * 32 not in proc.stderr

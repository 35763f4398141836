"""Shared test settings: an isolated Prefect home and GRACEFUL_HOME per test."""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Before prefect is imported anywhere: an isolated Prefect database for this test session
# (the ephemeral API runs against it), and start-up time for a 2-core machine.
_PREFECT_HOME = tempfile.mkdtemp(prefix="graceful-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
# no RAY_AUTH_MODE here: Ray keeps token auth on, a user's own setting wins (deploy/CLUSTER.md)


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


# -- PostgreSQL: one real server per test session, a fresh database per test ---------------
def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    if not found[-1]:
        raise RuntimeError(f"PostgreSQL's {name} is not installed (apt-get install postgresql)")
    return found[-1]


def _as_postgres(cmd: list[str]) -> list[str]:
    # initdb refuses to run as root; CI runs as root, a developer maybe not
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A PostgreSQL 15 server on 127.0.0.1 for the test session; yields its base URL."""
    data = Path(tempfile.mkdtemp(prefix="graceful-pg-"))
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    port = _free_port()
    subprocess.run(
        _as_postgres([_pg_bin("initdb"), "-D", str(data / "db"), "-U", "postgres", "-A", "trust"]),
        check=True,
        capture_output=True,
    )
    ctl = _pg_bin("pg_ctl")
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {data}"
    subprocess.run(
        _as_postgres(
            [ctl, "-D", str(data / "db"), "-o", opts, "-w", "-l", str(data / "log"), "start"]
        ),
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(
            _as_postgres([ctl, "-D", str(data / "db"), "-m", "fast", "stop"]), check=False
        )
        shutil.rmtree(data, ignore_errors=True)


_DB_NUMBERS = itertools.count()


@pytest.fixture
def pg_url(pg_server: str) -> str:
    """A new, empty database on the session's PostgreSQL server."""
    from sqlalchemy import create_engine, text

    name = f"graceful_{os.getpid()}_{next(_DB_NUMBERS)}"
    admin = create_engine(f"{pg_server}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return f"{pg_server}/{name}"


# -- Prefect: one real server per test session for the CLI's subprocesses --------------------
@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``prefect server start`` on 127.0.0.1 (its own PREFECT_HOME); yields its API URL.

    CLI subprocesses that share it skip the ephemeral API's start-up, and concurrent
    ones do not start two ephemeral servers on one database.
    """
    import sys
    import time
    import urllib.request

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(
        os.environ,
        PREFECT_HOME=str(tmp_path_factory.mktemp("prefect-server")),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    server = subprocess.Popen(
        [*cmd, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the Prefect server did not start")
            time.sleep(0.5)
        yield api
    finally:
        stop_group(server)


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the process group we started, SIGKILL it if it lingers."""
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)


@pytest.fixture(name="stop_group")
def _stop_group_fixture():
    """:func:`stop_group` for tests that start servers of their own."""
    return stop_group


# -- an S3-compatible server (moto's) on 127.0.0.1 -------------------------------------------
@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch):
    """An S3-compatible server (moto) on 127.0.0.1 with a bucket; yields its filesystem."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "graceful-test-key",
        "AWS_SECRET_ACCESS_KEY": "graceful-test-secret-do-not-print",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    fs = pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{port}",
        scheme="http",
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
        region="us-east-1",
        allow_bucket_creation=True,
    )
    fs.create_dir("photos")
    try:
        yield fs, env
    finally:
        server.stop()

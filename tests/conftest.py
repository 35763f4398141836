"""Shared test settings: an isolated Prefect home and GRACEFUL_HOME per test."""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import shutil
import socket
import subprocess
import sys
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


@contextlib.contextmanager
def _pg_cluster(password: str | None = None) -> Iterator[str]:
    """A PostgreSQL 15 server on 127.0.0.1; yields its base URL. Without ``password`` it
    trusts every connection; with one, the user ``postgres`` must give it (scram)."""
    data = Path(tempfile.mkdtemp(prefix="graceful-pg-"))
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    port = _free_port()
    auth = ["-A", "trust"]
    if password is not None:
        pwfile = data / "pw"
        pwfile.write_text(password + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres", "postgres")
        auth = ["-A", "scram-sha-256", f"--pwfile={pwfile}"]
    subprocess.run(
        _as_postgres([_pg_bin("initdb"), "-D", str(data / "db"), "-U", "postgres", *auth]),
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


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A PostgreSQL 15 server on 127.0.0.1 for the test session; yields its base URL."""
    with _pg_cluster() as url:
        yield url


@pytest.fixture(scope="session")
def pg_password_server() -> Iterator[tuple[str, str]]:
    """A PostgreSQL server that checks passwords: (base URL without one, the password)."""
    password = "graceful-pg-right-password"
    with _pg_cluster(password) as url:
        yield url, password


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
def prefect_api(prefect_server: tuple[str, Path]) -> str:
    """The session's Prefect server's API URL."""
    return prefect_server[0]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``prefect server start`` on 127.0.0.1 (its own PREFECT_HOME); yields its API URL and
    its SQLite database (``PREFECT_HOME/prefect.db``: runs, states, logs, events).

    CLI subprocesses that share it skip the ephemeral API's start-up, and concurrent
    ones do not start two ephemeral servers on one database.
    """
    import sys
    import time
    import urllib.request

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    prefect_home = tmp_path_factory.mktemp("prefect-server")
    env = dict(
        os.environ,
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
    env.pop("PREFECT_SERVER_DATABASE_CONNECTION_URL", None)
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    # its log, for a failing call's message (tests/flows/prefect_kit.call)
    log = prefect_home / "server.log"
    os.environ["GRACEFUL_TEST_PREFECT_LOG"] = str(log)
    with log.open("wb") as out:  # the server writes to its own copy
        server = subprocess.Popen(
            [*cmd, "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
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
        yield api, prefect_home / "prefect.db"
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


# -- the `graceful` CLI as subprocesses, pointed at the session's Prefect server -------------
ROOT = Path(__file__).resolve().parents[1]  # the repository


class Cli:
    """Starts `graceful` on one GRACEFUL_HOME (and lineage URL) against a Prefect API."""

    def __init__(self, home: Path, api: str, db_url: str | None = None) -> None:
        self.home = home
        self.env = dict(os.environ, GRACEFUL_HOME=str(home), PREFECT_API_URL=api, COLUMNS="200")
        self.env.pop("GRACEFUL_DB_URL", None)
        self.env.pop("GRACEFUL_FAILPOINT", None)
        if db_url:
            self.env["GRACEFUL_DB_URL"] = db_url
        self.db_url = db_url or f"sqlite:///{home / 'lineage.db'}"

    def start(self, *args: str, failpoint: str | None = None) -> subprocess.Popen:
        """`graceful ARGS` in its own process group (a kill takes its Ray processes too)."""
        env = dict(self.env, GRACEFUL_FAILPOINT=failpoint) if failpoint else self.env
        return subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )


@pytest.fixture
def cli(prefect_api: str):
    """``cli(home, db_url=None)`` -> a :class:`Cli` on the session's Prefect server."""
    return lambda home, db_url=None: Cli(home, prefect_api, db_url)


def kill_once_written(proc: subprocess.Popen, path: Path, timeout: float = 300) -> None:
    """SIGKILL ``proc``'s process group as soon as ``path`` exists (a training's resume file:
    killed once an epoch is checkpointed), as a crash would."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} was never written"
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.fixture(name="kill_once_written")
def _kill_once_written_fixture():
    """:func:`kill_once_written` for the kill tests."""
    return kill_once_written

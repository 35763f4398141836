"""`deploy/local-cluster.sh start 2` / `stop` for real: a head and a worker node on loopback
with token auth; a `graceful cycle` joins it through the start line's exports and its
training task runs on the worker node; a client without the cluster's token gets one
`error:` line and records nothing; `stop` ends exactly the cluster's processes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "local-cluster.sh"
pytestmark = pytest.mark.slow  # two Ray nodes, a Prefect server, one cycle: ~40 s on 2 cores

# settings of the user's (or an earlier test's) Ray that must not leak into the runs
_RAY_SETTINGS = (
    "RAY_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
    "GRACEFUL_TRAIN_RESOURCES",
)
_NODE = re.compile(r"^node (\d+) \((head|worker)\) ([0-9a-f]{56}) (\S+)$")
_TRAINED_ON = re.compile(r"trained on Ray node ([0-9a-f]{56}) \(([^)]*)\)")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _RAY_SETTINGS}
    env.update(extra)
    return env


def _script(state_dir: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = _clean_env(GRACEFUL_CLUSTER_DIR=str(state_dir), GRACEFUL_PYTHON=sys.executable)
    return subprocess.run(
        [str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """The cluster's directory (short: Ray's socket paths live under it); the cluster is
    stopped whatever the test did, by the script, else by the pids of its session."""
    path = Path(tempfile.mkdtemp(prefix="gc-", dir="/tmp")) / "c"
    try:
        yield path
    finally:
        with contextlib.suppress(Exception):
            _script(path, "stop", timeout=120)
        recorded = path / "cluster.json"
        if recorded.exists():  # the script failed: end the session's processes by pid
            sys.path.insert(0, str(ROOT))
            from deploy.local_cluster import members

            for pid in members(json.loads(recorded.read_text())):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(path.parent, ignore_errors=True)


def _cluster_processes(ray_dir: Path, decoys: set[int]) -> dict[int, float]:
    """pid -> create time of the cluster's processes, found independently of the script:
    those whose command line names the cluster's Ray directory, and their descendants."""
    roots = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(ray_dir) in cmdline and proc.pid not in decoys:
            roots.append(proc)
    found = {}
    for proc in roots:
        with contextlib.suppress(psutil.NoSuchProcess):
            for p in [proc, *proc.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    found[p.pid] = p.create_time()
    return found


def _alive(pid: int, created: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _listeners(pids: dict[int, float]) -> set[tuple[str, str, int]]:
    found = set()
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc = psutil.Process(pid)
            for c in proc.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    found.add((proc.name(), c.laddr.ip, c.laddr.port))
    return found


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _graceful(cli, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    cli.env = env
    proc = cli.start(*args)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    return proc.returncode, out, err


def test_local_cluster_trains_on_the_worker_node_and_stops_only_itself(
    state_dir: Path, tmp_path: Path, cli
) -> None:
    ray_dir = state_dir / "ray"
    # decoys a stop by name or by path would take: they must survive `stop`
    decoy_args = ["-c", "import time; time.sleep(900)", "raylet", "gcs_server", f"{ray_dir}/x"]
    decoys = [
        subprocess.Popen([sys.executable, *decoy_args], start_new_session=True) for _ in range(2)
    ]
    try:
        _run(state_dir, ray_dir, tmp_path, cli, {d.pid for d in decoys})
        for decoy in decoys:
            assert decoy.poll() is None, "stop ended a process that is not the cluster's"
    finally:
        for decoy in decoys:
            decoy.kill()
            decoy.wait(timeout=30)


def _run(state_dir: Path, ray_dir: Path, tmp_path: Path, cli, decoys: set[int]) -> None:
    started = _script(state_dir, "start", "2")
    assert started.returncode == 0, started.stderr[-3000:]
    lines = started.stdout.strip().splitlines()
    last = lines[-1]
    assert last.startswith("export RAY_ADDRESS=127.0.0.1:"), started.stdout
    words = shlex.split(last)
    client = dict(w.split("=", 1) for w in words[1:])
    assert client["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" not in client
    token_file = Path(client["RAY_AUTH_TOKEN_PATH"])
    token = token_file.read_text().strip()
    assert len(token) == 64 and token not in started.stdout + started.stderr
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    nodes = {int(m[1]): m for m in map(_NODE.match, lines[:-1]) if m}
    assert sorted(nodes) == [1, 2] and nodes[1][2] == "head" and nodes[2][2] == "worker"
    assert "graceful_worker=1" in nodes[2][4] and "graceful_worker" not in nodes[1][4]
    worker_node = nodes[2][3]

    cluster = _cluster_processes(ray_dir, decoys)
    names = [psutil.Process(p).name() for p in cluster]
    assert names.count("raylet") == 2 and names.count("gcs_server") == 1, names
    exposed = sorted(x for x in _listeners(cluster) if not _is_loopback(x[1]))
    assert not exposed, f"the cluster listens beyond loopback: {exposed}"

    # a second start on the same directory is refused while the cluster runs
    again = _script(state_dir, "start", "2")
    assert again.returncode == 1 and again.stderr.startswith("error:"), again.stderr

    # a cycle joins through the start line's exports; its training goes to the worker node
    home = cli(tmp_path / "home")
    env = {k: v for k, v in home.env.items() if k not in _RAY_SETTINGS}
    env.update(client, GRACEFUL_TRAIN_RESOURCES='{"graceful_worker": 1}')
    code, out, err = _graceful(
        home, env, "cycle", "--dataset", "digits", "--epochs", "1", "--no-gate"
    )
    assert code == 0, err[-4000:]
    trained = _TRAINED_ON.search(err)
    assert trained, err[-3000:]
    assert trained[1] == worker_node and trained[2] == "127.0.0.1"
    assert token not in out + err

    # clients without the cluster's token: one error line naming the fix, nothing recorded
    empty_home = tmp_path / "no-token-home"
    empty_home.mkdir()
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    wrong.chmod(0o600)
    without = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"}
    for case in (dict(without, HOME=str(empty_home)), dict(env, RAY_AUTH_TOKEN_PATH=str(wrong))):
        code, out, err = _graceful(
            home, case, "cycle", "--dataset", "digits", "--epochs", "1", "--force"
        )
        assert code == 1, err[-3000:]
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
        assert "RAY_AUTH_TOKEN_PATH" in errors[0] and client["RAY_ADDRESS"] in errors[0]
        assert token not in out + err
    code, out, err = _graceful(home, env, "report", "--json")
    assert code == 0, err[-3000:]
    generations = json.loads(out)["generations"]
    assert [(g["id"], g["status"]) for g in generations] == [(1, "promoted")]

    # stop: exactly the cluster's processes end (the decoys are checked by the caller)
    cluster = _cluster_processes(ray_dir, decoys)  # with the workers the cycle started
    stopped = _script(state_dir, "stop")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    deadline = time.monotonic() + 30
    while any(_alive(p, t) for p, t in cluster.items()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p, t in cluster.items() if _alive(p, t)], "cluster processes remain"
    assert not token_file.exists() and not (state_dir / "cluster.json").exists()
    again = _script(state_dir, "stop")
    assert again.returncode == 0 and "nothing to stop" in again.stdout

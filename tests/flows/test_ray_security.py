"""Closed by default: a real local Ray run started by graceful listens on loopback only, and
its GCS refuses a client without the cluster's token while one with the token gets in.

The run is graceful's own ``workers.runtime.ensure_ray()`` plus one task, in a subprocess whose
environment has no Ray auth or address settings (whatever the user set for other tests), so
what is checked is graceful's default.
"""

from __future__ import annotations

import importlib
import ipaddress
import os
import select
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # a Ray start and three Ray clients: about 30 s on 2 cores

# settings of the user's (or an earlier test's) Ray that must not leak into the checked run
_RAY_SETTINGS = (
    "RAY_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
)

DRIVER = textwrap.dedent(
    """
    import sys
    import ray
    from workers.runtime import ensure_ray, run_on_ray

    def double(x):
        return 2 * x

    ensure_ray()
    assert run_on_ray(double, 21) == 42  # a real task: worker processes are up
    print(ray.get_runtime_context().gcs_address, flush=True)
    sys.stdin.read()  # the cluster stays up until the test closes stdin
    """
)

CLIENT = textwrap.dedent(
    """
    import ray
    from workers.runtime import ensure_ray

    ensure_ray()  # joins RAY_ADDRESS
    print("CONNECTED", ray.cluster_resources()["CPU"], flush=True)
    """
)


@dataclass
class Run:
    """The driver process of one graceful Ray run, its GCS address and its token file."""

    proc: subprocess.Popen
    gcs_address: str
    token: Path


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _RAY_SETTINGS}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    token = tmp_path_factory.mktemp("ray-auth") / "auth_token"  # not yet there
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER],
        cwd=ROOT,
        env=_clean_env(RAY_AUTH_TOKEN_PATH=str(token)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 300)  # until the task has run
        line = proc.stdout.readline().strip() if ready else ""
        assert line, f"the Ray driver gave no address (exit code {proc.poll()})"
        yield Run(proc, line, token)
    finally:
        proc.stdin.close()  # the driver returns and shuts its cluster down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def _psutil() -> ModuleType:
    """Ray's bundled psutil (``import ray`` puts ray/thirdparty_files on sys.path)."""
    import ray  # noqa: F401

    return importlib.import_module("psutil")


def _listeners(pid: int) -> set[tuple[str, str, int]]:
    """(process name, ip, port) of every listening TCP socket of ``pid`` and its descendants."""
    psutil = _psutil()
    root = psutil.Process(pid)
    found = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = proc.name()
            conns = proc.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                found.add((name, c.laddr.ip, c.laddr.port))
    return found


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:127.0.0.1 (an IPv6 socket bound to 127.0.0.1)
    return addr.is_loopback


def test_every_ray_listener_of_a_run_is_on_loopback(run: Run) -> None:
    listeners = _listeners(run.proc.pid)
    gcs_port = int(run.gcs_address.rsplit(":", 1)[1])
    assert listeners, "found no listening socket: the run's processes were not found"
    assert gcs_port in {port for _, _, port in listeners}  # the GCS is among them
    assert len({name for name, _, _ in listeners}) >= 3  # GCS, raylet, workers, agents
    exposed = sorted(x for x in listeners if not _is_loopback(x[1]))
    assert not exposed, f"Ray listens beyond loopback: {exposed}"
    assert run.gcs_address.startswith("127.0.0.1:")


def test_the_token_file_is_private(run: Run) -> None:
    assert run.token.is_file(), "no token was created: token authentication is off"
    assert stat.S_IMODE(run.token.stat().st_mode) == 0o600


def test_the_gcs_refuses_a_grpc_call_without_the_token(run: Run) -> None:
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    request = gcs_service_pb2.GetAllNodeInfoRequest()
    with grpc.insecure_channel(run.gcs_address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        for metadata in (None, [("authorization", "Bearer " + "0" * 64)]):
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetAllNodeInfo(request, metadata=metadata, timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        token = run.token.read_text().strip()
        reply = stub.GetAllNodeInfo(
            request, metadata=[("authorization", f"Bearer {token}")], timeout=30
        )
        assert len(reply.node_info_list) == 1


def test_a_ray_client_without_the_token_is_refused_and_one_with_it_joins(run: Run) -> None:
    # Ray retries a refused connection for RAY_gcs_server_port_wait_time_s (default ~20 s)
    refused = subprocess.run(
        [sys.executable, "-c", CLIENT],
        cwd=ROOT,
        env=_clean_env(
            RAY_ADDRESS=run.gcs_address,
            RAY_AUTH_MODE="disabled",
            RAY_gcs_server_port_wait_time_s="3",
        ),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert refused.returncode != 0 and "CONNECTED" not in refused.stdout
    assert "InvalidAuthToken" in refused.stderr, refused.stderr[-3000:]

    # graceful's join path: RAY_ADDRESS plus the token, auth mode left to graceful's default
    joined = subprocess.run(
        [sys.executable, "-c", CLIENT],
        cwd=ROOT,
        env=_clean_env(RAY_ADDRESS=run.gcs_address, RAY_AUTH_TOKEN_PATH=str(run.token)),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert joined.returncode == 0, joined.stderr[-3000:]
    assert joined.stdout.startswith("CONNECTED")

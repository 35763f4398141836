"""A Ray cluster of N nodes on this machine, on loopback only, with token authentication:
``deploy/local-cluster.sh start N`` / ``stop`` (the contract; see ``deploy/CLUSTER.md``).

Every node listens on 127.0.0.1. Ray's own ``ray start`` cannot do this: with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (what keeps a node on loopback on Linux) it refuses
to start a worker node, and without it every ``127.0.0.1`` is swapped for the machine's
routable IP (and the servers listen on all interfaces). So the nodes are started here the
way Ray's own multi-node tests start them (``ray.cluster_utils.Cluster``: a
``ray._private.node.Node`` per node), with the variable set.

The cluster's state lives in one directory (``GRACEFUL_CLUSTER_DIR``, default
``/tmp/graceful-cluster-<uid>``, mode 0700): the token (``auth_token``, 0600, a fresh one per
start), ``cluster.json`` (address, node ids, the cluster's session id) and Ray's temp
directory ``ray/`` (sessions, logs, sockets). The launcher runs in a session of its own, so
every Ray process of the cluster carries that session id; ``stop`` ends exactly the processes
of that session (checked against the cluster's start time), never any other Ray on the host.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
DIR_ENV = "GRACEFUL_CLUSTER_DIR"
WORKER_RESOURCE = "graceful_worker"  # every worker node (not the head) has one unit
# Ray's unix sockets live under <dir>/ray/session_<date>_<pid>/sockets/; a socket path has
# at most 107 characters, so the directory must stay short
MAX_DIR_CHARS = 36
START_TIMEOUT_S = 120


class ClusterError(Exception):
    """A refusal of ``start`` or ``stop``: one ``error:`` line, exit ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def node_resource(index: int) -> str:
    """The custom resource only node ``index`` has (1 is the head)."""
    return f"graceful_node_{index}"


def cluster_dir() -> Path:
    custom = os.environ.get(DIR_ENV)
    return Path(custom) if custom else Path(f"/tmp/graceful-cluster-{os.getuid()}")


# -- the cluster's processes: one session ------------------------------------------------
def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise ClusterError("cannot read the boot time from /proc/stat (Linux only)")


def _start_time(pid: int, boot: float) -> float | None:
    """When ``pid`` started (epoch seconds), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is fields[0]
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def members(state: dict[str, Any]) -> list[int]:
    """The live processes of the recorded cluster: in its session and started after it
    (a session id is not reused while a process of the session lives; the start time
    guards against one reused after they all ended). The launcher itself is not one."""
    sid, since = int(state["sid"]), float(state["started"]) - 1.0
    boot = _boot_time()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        try:
            if os.getsid(pid) != sid:
                continue
        except OSError:  # gone, or not ours to see
            continue
        started = _start_time(pid, boot)
        if started is not None and started >= since and _alive(pid):
            found.append(pid)
    return sorted(found)


def _alive(pid: int) -> bool:
    """A running process (a zombie has ended: only its parent's wait is missing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _own_session() -> None:
    """Make this process the leader of a new session (fork once if it leads a group)."""
    if os.getsid(0) == os.getpid():
        return
    try:
        os.setsid()
        return
    except PermissionError:  # a process-group leader cannot: its child can
        pass
    sys.stdout.flush()
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status))
    os.setsid()


# -- state --------------------------------------------------------------------------------
def _state_path(root: Path) -> Path:
    return root / "cluster.json"


def read_state(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads(_state_path(root).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ClusterError(f"cannot read {_state_path(root)}: {exc}") from exc


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a new file of mode 0600 (replacing an old one atomically)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


def _private_dir(root: Path) -> None:
    """``root`` as a directory of ours, mode 0700 (not a link: the token goes in it)."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = root.lstat()
    if not root.is_dir() or root.is_symlink() or info.st_uid != os.getuid():
        raise ClusterError(f"{root} is not a directory of this user; set {DIR_ENV} elsewhere")
    root.chmod(0o700)


def client_env(state: dict[str, Any]) -> dict[str, str]:
    """What a client needs to join: the address, token auth and the token file (never the
    token), and loopback kept as it is (``ray status`` swaps it for the routable IP
    otherwise)."""
    return {
        "RAY_ADDRESS": state["address"],
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": state["token_path"],
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }


def export_line(state: dict[str, Any]) -> str:
    return "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in client_env(state).items())


# -- start --------------------------------------------------------------------------------
def start(n: int, cpus: int | None, dashboard: bool) -> dict[str, Any]:
    root = cluster_dir().absolute()
    ray_dir = root / "ray"
    if len(str(ray_dir)) > MAX_DIR_CHARS:
        raise ClusterError(
            f"{ray_dir} is too long for Ray's socket paths (at most {MAX_DIR_CHARS} "
            f"characters): set {DIR_ENV} to a shorter directory, e.g. /tmp/gc-$USER",
            code=2,
        )
    old = read_state(root)
    if old is not None and members(old):
        raise ClusterError(
            f"a cluster started from {root} is running (RAY_ADDRESS={old['address']}): "
            f"run `deploy/local-cluster.sh stop` first, or set {DIR_ENV} to another directory"
        )
    _private_dir(root)
    _clear(root, logs=True)  # an earlier cluster's files (stopped, or gone with a reboot)
    token = root / "auth_token"
    _write_private(token, secrets.token_hex(32))  # 256 bits, Ray's own format; fresh
    _own_session()
    started = time.time()
    state: dict[str, Any] = {
        "address": None,
        "sid": os.getsid(0),
        "started": started,
        "token_path": str(token),
        "ray_dir": str(ray_dir),
        "nodes": [],
    }
    _environment(token)
    try:
        _start_nodes(state, n, cpus, dashboard)
    except BaseException as exc:
        _terminate(members(state))  # whatever did start: never a half cluster left running
        _clear(root)
        if isinstance(exc, ClusterError):
            raise
        raise ClusterError(f"the cluster did not start: {type(exc).__name__}: {exc}") from exc
    _write_private(_state_path(root), json.dumps(state, indent=1))
    return state


def _environment(token: Path) -> None:
    """Settings every process of the cluster inherits (read by Ray at import)."""
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):  # the cluster's token is its file
        os.environ.pop(name, None)
    os.environ.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        # keeps 127.0.0.1 as every node's address (else: the routable IP, all interfaces)
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
    )


def _start_nodes(state: dict[str, Any], n: int, cpus: int | None, dashboard: bool) -> None:
    import ray._private.ray_constants as ray_constants
    from ray._private.node import Node
    from ray._private.parameter import RayParams
    from ray._raylet import Config

    Config.initialize("")  # token auth for this process too (the mode is read at import)
    ray_constants.ENABLE_RAY_CLUSTER = False
    head = None
    for index in range(1, n + 1):
        resources = {node_resource(index): 1.0}
        if index > 1:
            resources[WORKER_RESOURCE] = 1.0
        params = RayParams(
            node_ip_address=LOOPBACK,
            node_name=f"graceful-node-{index}",
            temp_dir=state["ray_dir"],
            num_cpus=cpus,
            resources=resources,
            min_worker_port=0,  # random ports: other clusters on this machine keep theirs
            max_worker_port=0,
            dashboard_agent_listen_port=None,
            include_dashboard=dashboard and head is None,
            dashboard_host=LOOPBACK,
            dashboard_port=0,
            include_log_monitor=head is None,  # one per machine, as in Ray's own tests
        )
        if head is not None:
            params.gcs_address = head.gcs_address
        # shutdown_at_exit/spawn_reaper off: the processes outlive this launcher (ray start)
        node = Node(params, head=head is None, shutdown_at_exit=False, spawn_reaper=False)
        if head is None:
            head = node
            state["address"] = node.gcs_address
            if node.gcs_address.rsplit(":", 1)[0] != LOOPBACK:
                raise ClusterError(f"the head bound to {node.gcs_address}, not {LOOPBACK}")
        state["nodes"].append(
            {
                "index": index,
                "head": index == 1,
                "node_id": node.node_id,
                "resources": resources,
                # the processes this node started itself (its raylet starts the rest)
                "pids": {
                    kind: [info.process.pid for info in infos]
                    for kind, infos in node.all_processes.items()
                },
            }
        )
    _wait_alive(state)


def _wait_alive(state: dict[str, Any]) -> None:
    """Until the GCS lists every node alive."""
    from ray._private.state import GlobalState
    from ray._raylet import GcsClientOptions

    options = GcsClientOptions.create(
        state["address"], None, allow_cluster_id_nil=True, fetch_cluster_id_if_nil=False
    )
    gcs = GlobalState()
    gcs._initialize_global_state(options)
    wanted = {node["node_id"] for node in state["nodes"]}
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        alive = {n["NodeID"] for n in gcs.node_table() if n["Alive"]}
        if wanted <= alive:
            return
        if time.monotonic() > deadline:
            raise ClusterError(
                f"{len(wanted - alive)} of {len(wanted)} nodes did not join in "
                f"{START_TIMEOUT_S} s; see the logs under {state['ray_dir']}"
            )
        time.sleep(0.2)


# -- stop ---------------------------------------------------------------------------------
def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _signal_and_wait(pids: list[int], sig: int, wait_s: float) -> list[int]:
    """Send ``sig`` to ``pids``; those still running after up to ``wait_s``."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    deadline = time.monotonic() + wait_s
    while pids and time.monotonic() < deadline:
        time.sleep(0.1)
        pids = [p for p in pids if _alive(p)]
    return [p for p in pids if _alive(p)]


def _terminate(pids: list[int]) -> None:
    """End ``pids`` in the order Ray's own shutdown uses: the raylets first (they take
    their workers and agents with them) while the GCS still answers, then the head's
    other processes, the GCS last; SIGKILL for any that outlast a short grace."""
    raylets = [p for p in pids if _comm(p) == "raylet"]
    gcs = [p for p in pids if _comm(p) == "gcs_server"]
    others = [p for p in pids if p not in raylets and p not in gcs]
    left = _signal_and_wait(raylets, signal.SIGTERM, 10.0)
    left += _signal_and_wait([p for p in others if _alive(p)], signal.SIGTERM, 3.0)
    left += _signal_and_wait(gcs, signal.SIGTERM, 5.0)
    _signal_and_wait(left, signal.SIGKILL, 10.0)


def _clear(root: Path, logs: bool = False) -> None:
    """The token and the state file go; Ray's logs (``ray/``) too when ``logs``."""
    import shutil

    for name in ("auth_token", "cluster.json"):
        (root / name).unlink(missing_ok=True)
    if logs:
        shutil.rmtree(root / "ray", ignore_errors=True)


def stop() -> tuple[dict[str, Any] | None, int]:
    """End the recorded cluster's processes; (its state, how many were running)."""
    root = cluster_dir().absolute()
    state = read_state(root)
    if state is None:
        return None, 0
    running = members(state)
    _terminate(running)
    left = members(state)  # anything started meanwhile (a worker) goes too
    if left:
        _signal_and_wait(left, signal.SIGKILL, 10.0)
        left = members(state)
    if left:
        raise ClusterError(f"processes {left} of the cluster did not end; kill them by pid")
    _clear(root)
    return state, len(running)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="deploy/local-cluster.sh",
        description="A Ray cluster of N nodes on loopback, token auth on (deploy/CLUSTER.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start", help="start a head and N-1 worker nodes")
    p_start.add_argument("n", type=int, help="nodes, the head included (>= 1)")
    p_start.add_argument("--cpus", type=int, default=None, help="CPUs per node (default: all)")
    p_start.add_argument(
        "--dashboard", action="store_true", help="the dashboard on the head (for `ray list`)"
    )
    sub.add_parser("stop", help="end the cluster's processes, and nothing else")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            if args.n < 1 or (args.cpus is not None and args.cpus < 1):
                raise ClusterError("N and --cpus are at least 1", code=2)
            state = start(args.n, args.cpus, args.dashboard)
            for node in state["nodes"]:
                kind = "head" if node["head"] else "worker"
                resources = ",".join(f"{k}={v:g}" for k, v in node["resources"].items())
                print(f"node {node['index']} ({kind}) {node['node_id']} {resources}")
            print(export_line(state), flush=True)
        else:
            state, count = stop()
            if state is None:
                print(f"no cluster recorded in {cluster_dir()}: nothing to stop")
            else:
                print(f"stopped the cluster at {state['address']}: {count} processes ended")
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    return 0


if __name__ == "__main__":
    sys.exit(main())

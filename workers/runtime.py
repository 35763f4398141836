"""Ray, started lazily: join ``RAY_ADDRESS`` or start a local cluster on first use.

Closed by default: Ray's token authentication stays on (``RAY_AUTH_MODE=token`` unless the
user set the mode), and a local cluster listens on loopback only. See ``deploy/CLUSTER.md``.

Tasks ask for a GPU only when a node that can run them has one (a ``num_gpus=1`` task on a
cluster without a GPU would pend forever) and otherwise the CPUs of one such node (a task
never spans nodes). ``GRACEFUL_TRAIN_RESOURCES`` steers the training task to the nodes that
have the custom Ray resources it names (``deploy/local-cluster.sh`` gives each worker node
``graceful_worker``).

Joining ``RAY_ADDRESS`` is checked first with one call to the cluster's GCS: a cluster that
refuses this client's token, or nothing answering there, is a :class:`RayUnavailable` with
the fix in its message (one ``error:`` line in the CLI), before a cycle records anything.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")

LOOPBACK = "127.0.0.1"
_LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
# Ray maps a loopback node address to the host's routable IP unless multi-node clusters are
# off; this variable (read by ray_constants at import) turns them off on Linux too.
_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
TRAIN_RESOURCES_ENV = "GRACEFUL_TRAIN_RESOURCES"
_BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})
PROBE_TIMEOUT_S = 15.0
_FIX = (
    "export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=<the cluster's token file> (the last "
    "line of deploy/local-cluster.sh start has both), or RAY_AUTH_TOKEN; see deploy/CLUSTER.md"
)


class RayUnavailable(RuntimeError):
    """The Ray cluster cannot be used: it refused this client, nothing answers at its
    address, or no node has what a task needs. The message names the fix."""


def ensure_ray() -> None:
    """Connect to ``RAY_ADDRESS`` or start a loopback-only local cluster, once per process."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or "local"
    _token_auth_by_default()
    if address == "local" or address.removeprefix("ray://").rsplit(":", 1)[0] in _LOOPBACK_NAMES:
        _single_node()
    common: dict[str, Any] = {
        "ignore_reinit_error": True,
        "log_to_driver": False,
        "logging_level": "ERROR",
        "configure_logging": True,
    }
    if address != "local":
        # the cluster's own settings (bind address, ports, auth) apply; only connect
        _join(address, common)
        return
    if os.environ["RAY_AUTH_MODE"].lower() == "token":
        ensure_token()
    # "local": never attach to some other cluster found on this machine
    ray.init(
        address="local",
        include_dashboard=False,
        dashboard_host=LOOPBACK,
        _node_ip_address=LOOPBACK,
        **common,
    )
    host = ray.get_runtime_context().gcs_address.rsplit(":", 1)[0]
    if host != LOOPBACK:  # fail closed if a Ray upgrade stops honouring the loopback address
        ray.shutdown()
        raise RuntimeError(f"the local Ray cluster bound to {host}, not {LOOPBACK}")


def join_cluster() -> None:
    """Join ``RAY_ADDRESS`` now, if it names a cluster: a cluster that refuses this client
    or does not answer fails here, before the caller records anything. Without an address
    nothing happens (a local cluster starts on first use, as before)."""
    if (os.environ.get("RAY_ADDRESS") or "local") != "local":
        ensure_ray()


def _join(address: str, common: dict[str, Any]) -> None:
    import ray
    from ray.exceptions import AuthenticationError

    _probe(address)  # fails fast with the fix, where ray.init retries for ~20 s
    try:
        ray.init(address=address, **common)
    except AuthenticationError:
        raise RayUnavailable(
            f"the Ray cluster at {address} refused this client ({_token_source()[0]}): {_FIX}"
        ) from None
    except ConnectionError as exc:
        raise RayUnavailable(
            f"cannot join the Ray cluster at {address} (RAY_ADDRESS): {exc}; start it "
            "(deploy/local-cluster.sh start N) or correct RAY_ADDRESS"
        ) from None


def _token_source() -> tuple[str, bool]:
    """Where this client's token comes from, for an error message (never the token), and
    whether it has one."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return "RAY_AUTH_MODE=disabled: it sends no token", False
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "its token from RAY_AUTH_TOKEN", True
    path = token_path()
    named = "RAY_AUTH_TOKEN_PATH=" if os.environ.get("RAY_AUTH_TOKEN_PATH") else ""
    with contextlib.suppress(OSError):
        if path.stat().st_size > 0:
            return f"its token from {named}{path}", True
    return f"no token: {named}{path} is missing or empty", False


def _probe(address: str) -> None:
    """One authenticated call to the GCS at ``address`` (host:port), as Ray's own clients
    make it (TLS and the token as configured)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in host:
        return  # "auto", ray://: Ray resolves them itself
    source, has_token = _token_source()
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" and not has_token:
        raise RayUnavailable(f"the Ray cluster at {address} needs its token; {source}: {_FIX}")
    try:
        import grpc
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:  # a Ray without these internals: ray.init reports it
        return
    with init_grpc_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), timeout=PROBE_TIMEOUT_S)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise RayUnavailable(
                    f"the Ray cluster at {address} refused this client "
                    f"({exc.details()}; {source}): {_FIX}"
                ) from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise RayUnavailable(
                    f"no Ray cluster answers at {address} (RAY_ADDRESS): start it "
                    "(deploy/local-cluster.sh start N), correct RAY_ADDRESS, or unset it "
                    "for a local cluster"
                ) from None
            # anything else: ray.init decides


def token_path() -> Path:
    """Where Ray reads its auth token: ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``."""
    custom = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(custom).expanduser() if custom else Path.home() / ".ray" / "auth_token"


def ensure_token() -> Path | None:
    """Create the token file (mode 0600) if no token exists; ``None`` if ``RAY_AUTH_TOKEN``.

    Ray would write it itself, but readable by all (umask), only at the default path (a
    missing ``RAY_AUTH_TOKEN_PATH`` file is an error), and not atomically: two processes
    starting at once could each write a different token, or read a half-written one.
    """
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = token_path()
    if path.exists() and path.stat().st_size > 0:
        return path
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # 256 bits, Ray's own format
        with contextlib.suppress(FileExistsError):  # another process's token wins
            os.link(tmp, path)  # unlike a rename, never replaces an existing token
    except OSError as exc:
        raise RuntimeError(
            f"cannot create the Ray auth token {path}: {exc}; "
            "set RAY_AUTH_TOKEN_PATH to a writable file or RAY_AUTH_TOKEN to the token"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _token_auth_by_default() -> None:
    """``RAY_AUTH_MODE=token`` unless the user chose a mode, and make this process see it."""
    # Ray turns token auth on for a new local cluster by default but never when an address is
    # given; graceful asks for it in both cases.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray._raylet import Config

    # Ray caches the mode when it is imported: a mode set later would reach the GCS and raylet
    # (they read the environment) but not this driver, which would then be refused by its own
    # cluster. Ray re-reads it the same way when it enables token auth itself.
    Config.initialize("")


def _single_node() -> None:
    """Let ``127.0.0.1`` stay this node's address (instead of the routable IP)."""
    os.environ[_SINGLE_NODE_ENV] = "0"  # for every Ray process started from here
    import ray._private.ray_constants as ray_constants

    # ray may have been imported before the variable was set; it is read at import
    ray_constants.ENABLE_RAY_CLUSTER = False


def train_resources() -> dict[str, float]:
    """The custom Ray resources the training task requires: ``GRACEFUL_TRAIN_RESOURCES``, a
    JSON object of names and amounts (``'{"graceful_worker": 1}'`` trains on a worker node
    of ``deploy/local-cluster.sh``); none when unset."""
    text = os.environ.get(TRAIN_RESOURCES_ENV, "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    ok = isinstance(value, dict) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in value.values()
    )
    if not ok or not value:
        raise ValueError(
            f"{TRAIN_RESOURCES_ENV} takes a JSON object of custom Ray resources and positive "
            f"amounts, e.g. '{{\"graceful_worker\": 1}}'; got {text!r}"
        )
    builtin = sorted(_BUILTIN_RESOURCES & set(value))
    if builtin:
        raise ValueError(
            f"{TRAIN_RESOURCES_ENV} names custom resources only; {builtin} are chosen by "
            "graceful (a GPU where a node has one, else its CPUs)"
        )
    return {str(k): float(v) for k, v in value.items()}


def task_resources(custom: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Ray options for one torch task: a GPU when a node that has ``custom`` has one, else
    the CPUs (at most 4) of the largest such node; ``custom`` itself as ``resources``."""
    import ray

    ensure_ray()
    custom = dict(custom or {})
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fits = [r for r in nodes if all(r.get(k, 0) >= v for k, v in custom.items())]
    if not fits:
        have = sorted({k for r in nodes for k in r if k not in _BUILTIN_RESOURCES})
        have = [k for k in have if not k.startswith("node:")]
        raise RayUnavailable(
            f"no node of the Ray cluster has the resources {custom} ({TRAIN_RESOURCES_ENV}); "
            f"its nodes' custom resources: {have or 'none'}"
        )
    extra: dict[str, Any] = {"resources": custom} if custom else {}
    if any(r.get("GPU", 0) >= 1 for r in fits):
        return {"num_gpus": 1, "num_cpus": 1, **extra}
    cpus = max(r.get("CPU", 1) for r in fits)
    return {"num_cpus": max(1, min(4, int(cpus))), **extra}


def ddp_resources(workers: int, custom: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Ray Train's ``ScalingConfig`` arguments for ``workers`` data-parallel workers on the
    nodes that have ``custom``: ``use_gpu`` and a GPU each where those nodes hold one per
    worker, else CPUs (as many each as the nodes allow, at most 4, the same for all);
    ``custom`` divided among the workers, so the group asks what one training task asks.

    A cluster that cannot place them all is a :class:`RayUnavailable` now (Ray Train would
    wait for them)."""
    import ray

    ensure_ray()
    custom = dict(custom or {})
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fits = [r for r in nodes if all(r.get(k, 0) >= v for k, v in custom.items())]
    # a share of a custom resource, rounded down to what Ray keeps (4 decimals)
    share = {k: math.floor(v / workers * 1e4) / 1e4 for k, v in custom.items()}
    if sum(int(r.get("GPU", 0)) for r in fits) >= workers:
        return {"use_gpu": True, "resources_per_worker": {"CPU": 1.0, "GPU": 1.0, **share}}
    most = min(4, max(1, int(sum(r.get("CPU", 0) for r in fits)) // workers))
    for cpus in range(most, 0, -1):  # the most CPUs each that still places every worker
        if sum(int(r.get("CPU", 0) // cpus) for r in fits) >= workers:
            return {"use_gpu": False, "resources_per_worker": {"CPU": float(cpus), **share}}
    have = sum(int(r.get("CPU", 0)) for r in fits)
    where = f"the nodes with {custom} ({TRAIN_RESOURCES_ENV})" if custom else "the Ray nodes"
    raise RayUnavailable(
        f"{workers} training workers need a CPU each; {where} offer {have}: "
        "lower train.workers or add nodes"
    )


@dataclass(frozen=True)
class Placed(Generic[T]):
    """A task's result and the Ray node that ran it."""

    value: T
    node_id: str
    node_ip: str


def _run_placed(fn: Callable[..., T], args: tuple, kwargs: dict) -> Placed[T]:
    import ray

    value = fn(*args, **kwargs)
    return Placed(value, ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address())


def run_placed(
    fn: Callable[..., T],
    args: tuple = (),
    kwargs: Mapping[str, Any] | None = None,
    custom: Mapping[str, float] | None = None,
) -> Placed[T]:
    """Run ``fn(*args, **kwargs)`` as one Ray task (on a node with ``custom`` resources)
    and wait for its result, with the node that ran it."""
    import ray

    res = task_resources(custom)
    name = getattr(fn, "__name__", "task")  # the task's name in Ray's state and dashboard
    remote = ray.remote(max_retries=0, **res)(_run_placed).options(name=name)
    return ray.get(remote.remote(fn, tuple(args), dict(kwargs or {})))


def run_on_ray(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` as one Ray task and wait for its result."""
    return run_placed(fn, args, kwargs).value

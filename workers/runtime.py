"""Ray, started lazily: join ``RAY_ADDRESS`` or start a local cluster on first use.

Closed by default: Ray's token authentication stays on (``RAY_AUTH_MODE=token`` unless the
user set the mode), and a local cluster listens on loopback only. See ``deploy/CLUSTER.md``.

Tasks ask for a GPU only when the cluster has one (a ``num_gpus=1`` task on a cluster
without a GPU would pend forever) and otherwise take the CPUs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

LOOPBACK = "127.0.0.1"
_LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
# Ray maps a loopback node address to the host's routable IP unless multi-node clusters are
# off; this variable (read by ray_constants at import) turns them off on Linux too.
_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def ensure_ray() -> None:
    """Connect to ``RAY_ADDRESS`` or start a loopback-only local cluster, once per process."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    if address == "local":
        address = None
    _token_auth_by_default()
    if address is None or _is_loopback(address):
        _single_node()
    common: dict[str, Any] = {
        "ignore_reinit_error": True,
        "log_to_driver": False,
        "logging_level": "ERROR",
        "configure_logging": True,
    }
    if address is not None:
        # the cluster's own settings (bind address, ports, auth) apply; only connect
        ray.init(address=address, **common)
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


def _is_loopback(address: str) -> bool:
    host = address.removeprefix("ray://").rsplit(":", 1)[0]
    return host in _LOOPBACK_NAMES


def _single_node() -> None:
    """Let ``127.0.0.1`` stay this node's address (instead of the routable IP)."""
    os.environ[_SINGLE_NODE_ENV] = "0"  # for every Ray process started from here
    import ray._private.ray_constants as ray_constants

    # ray may have been imported before the variable was set; it is read at import
    ray_constants.ENABLE_RAY_CLUSTER = False


def task_resources() -> dict[str, float]:
    """GPU when the cluster has one, else the CPUs (at most 4) for one torch task."""
    import ray

    ensure_ray()
    res = ray.cluster_resources()
    if res.get("GPU", 0) >= 1:
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_cpus": max(1, min(4, int(res.get("CPU", 1))))}


def run_on_ray(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` as one Ray task and wait for its result."""
    import ray

    res = task_resources()
    remote = ray.remote(max_retries=0, **res)(fn)
    return ray.get(remote.remote(*args, **kwargs))


def submit(fn: Callable[..., Any], *args: Any, **kwargs: Any):
    """Submit ``fn`` as a Ray task; returns the ObjectRef (for bounded pipelines)."""
    import ray

    res = task_resources()
    return ray.remote(max_retries=0, **res)(fn).remote(*args, **kwargs)

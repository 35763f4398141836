"""Ray, started lazily: join ``RAY_ADDRESS`` or start a local cluster on first use.

Tasks ask for a GPU only when the cluster has one (a ``num_gpus=1`` task on a cluster
without a GPU would pend forever) and otherwise take the CPUs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def ensure_ray() -> None:
    """Connect to (or start) Ray once per process."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = os.environ.get("RAY_ADDRESS") or None
    ray.init(
        address=address,
        ignore_reinit_error=True,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
        configure_logging=True,
    )


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

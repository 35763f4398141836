"""Step progress, shown both in the CLI (rich) and in the Prefect UI (progress artifact)."""

from __future__ import annotations

from collections.abc import Callable

# Set by the CLI to drive its rich progress bar; flows work without it.
_listener: Callable[[str, float], None] | None = None


def set_listener(listener: Callable[[str, float], None] | None) -> None:
    global _listener
    _listener = listener


class StepProgress:
    """Reports (step name, fraction done) to the CLI and to a Prefect progress artifact."""

    def __init__(self, key: str, total: int, description: str | None = None) -> None:
        from prefect.artifacts import create_progress_artifact

        self.total, self.done = total, 0
        self.artifact_id = create_progress_artifact(
            progress=0.0, key=key, description=description or key
        )

    def step(self, name: str) -> None:
        self.done += 1
        self.report(name, 100.0 * self.done / self.total)

    def report(self, name: str, pct: float) -> None:
        """Move the artifact to ``pct`` and tell the listener (the CLI's bar)."""
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(self.artifact_id, progress=pct)
        if _listener is not None:
            _listener(name, pct)


def counter(key: str, description: str | None = None) -> Callable[[int, int], None]:
    """A ``(done, total)`` callback that moves a Prefect progress artifact named ``key``
    (for work counted in items: a backfill, an indexing)."""
    progress = StepProgress(key, total=100, description=description)
    return lambda done, total: progress.report(
        f"{done:,}/{total:,} items", 100.0 * done / max(1, total)
    )

"""File helpers shared by the gallery and the checkpoints (no heavy imports)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CheckpointError(RuntimeError):
    """A missing, swapped or unreadable checkpoint."""


def verify_checkpoint(path: str | Path | None, sha256: str | None, what: str = "") -> Path:
    """The checkpoint's path once its file exists and matches the lineage's sha256."""
    who = f" of {what}" if what else ""
    if not path or not Path(path).exists():
        raise CheckpointError(f"the checkpoint{who} at {path} does not exist")
    if sha256 is not None and file_sha256(Path(path)) != sha256:
        raise CheckpointError(
            f"the checkpoint{who} at {path} does not match the sha256 in the lineage "
            "(swapped or damaged); restore the original file"
        )
    return Path(path)

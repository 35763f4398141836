"""PNG plots of the matrices and curves (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np


@contextmanager
def _figure(path: Path, title: str, size: tuple[float, float]) -> Iterator:
    """A figure and its axes, titled, saved to ``path`` when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    yield fig, ax
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def heatmap(
    pairs: Sequence[Sequence[float]], title: str, path: Path, cmap: str = "viridis"
) -> Path:
    """A lower-triangular heat map of ``[a, b, value]`` triples (rows a, columns b)."""
    ids = sorted({int(p[0]) for p in pairs} | {int(p[1]) for p in pairs})
    pos = {g: i for i, g in enumerate(ids)}
    grid = np.full((len(ids), len(ids)), np.nan)
    for a, b, v in pairs:
        grid[pos[int(a)], pos[int(b)]] = v
    with _figure(path, title, (1.2 + 0.9 * len(ids), 1.0 + 0.8 * len(ids))) as (fig, ax):
        im = ax.imshow(grid, cmap=cmap)
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_xticks(range(len(ids)), [str(g) for g in ids])
        ax.set_yticks(range(len(ids)), [str(g) for g in ids])
        ax.set_xlabel("b (older / gallery)")
        ax.set_ylabel("a (newer / query)")
        fig.colorbar(im, ax=ax, fraction=0.046)
    return path


def curves(series: dict[str, Sequence[Sequence[float]]], title: str, path: Path) -> Path:
    """Backfill curves: M_mix against beta, one line per name."""
    with _figure(path, title, (5.5, 3.8)) as (_, ax):
        for name, curve in series.items():
            c = np.asarray(curve, dtype=float)
            ax.plot(c[:, 0], c[:, 1], marker="o", label=name)
        ax.set_xlabel("β (share of old items backfilled)")
        ax.set_ylabel("M_mix (top-1)")
        ax.grid(alpha=0.3)
        ax.legend()
    return path

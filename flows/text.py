"""Words for logs and summaries: numbers and collections said plainly, never a Python repr
(``{'items': 270}``, ``True``, ``[]``) in what a user reads in the Prefect UI."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def num(value: float | None, fmt: str = ".4f") -> str:
    """A figure, or ``–`` where there is none."""
    return "–" if value is None else f"{value:{fmt}}"


def yes_no(value: bool | None) -> str:
    return "–" if value is None else ("yes" if value else "no")


def by_generation(counts: Mapping[Any, int] | None) -> str:
    """``generation 3: 200, generation 2: 70`` (newest first), or ``empty``."""
    if not counts:
        return "empty"
    items = sorted(((int(g), int(n)) for g, n in counts.items()), reverse=True)
    return ", ".join(f"generation {g}: {n:,}" for g, n in items)


def generations(ids: Iterable[int]) -> str:
    """``generations 1, 2`` / ``generation 1`` / ``none``."""
    ids = sorted(int(i) for i in ids)
    if not ids:
        return "none"
    return ("generation " if len(ids) == 1 else "generations ") + ", ".join(map(str, ids))


def retired(pairs: Sequence[Sequence[Any]] | None) -> str:
    """The constraints retired, from ``(generation, reason)`` pairs, or ``none``."""
    if not pairs:
        return "none"
    return "; ".join(f"generation {g} ({reason})" for g, reason in pairs)


def curve(points: Sequence[Sequence[float]] | None) -> str:
    """``M_mix 0.8123 at β=0 → 0.8501 at β=1 (11 points)``, or ``not measured``."""
    if not points:
        return "not measured"
    (b0, m0), (b1, m1) = points[0], points[-1]
    return f"M_mix {m0:.4f} at β={b0:g} → {m1:.4f} at β={b1:g} ({len(points)} points)"


def cycle_backfill(result: Mapping[str, Any] | None) -> str:
    """What a cycle's backfill step did (``flows.cycle_steps.backfill_step``'s result)."""
    if not result:
        return "none (not promoted)"
    if "indexed" in result:
        return f"indexed the collection: {result['indexed']:,} items, M_mix {num(result['m_mix'])}"
    if result.get("collection", "") is None:
        return "no collection yet (`graceful index SPEC` makes one)"
    line = f"job {result['job']}: re-embedded {result['items_done']:,} items"
    if result.get("m_mix_after") is not None:
        line += f", M_mix after {num(result['m_mix_after'])}"
    if result.get("completed"):
        line += f"; {generations(result['completed'])} re-embedded whole (owed)"
    return line


def search_index(info: Mapping[str, Any] | None) -> str:
    """``flat, 270 items`` / ``ivf, 250,000 items, recall@10 0.9731`` / ``none``."""
    if not info or not info.get("kind"):
        return "none"
    line = f"{info['kind']}, {int(info.get('items') or 0):,} items"
    if info.get("recall") is not None:
        line += f", recall@10 {info['recall']:.4f}"
    return line

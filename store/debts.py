"""A promotion's targeted-backfill debt: the collection items (by id) the champion owes
a re-embedding (flows/targeted.py), kept beside the lineage as ``debts/gen-G.npy``.

Written once, atomically, before the promotion it belongs to (a kill after it still
leaves the debt on record); its item count is recorded with the generation's gate
metrics (``debt_items``), so a file that went missing or changed is named, not ignored.
"""

from __future__ import annotations

import numpy as np

from store.settings import StoreError, subdir


def debt_path(gen_id: int):
    return subdir("debts") / f"gen-{gen_id}.npy"


def save_debt(gen_id: int, item_ids: np.ndarray) -> None:
    """Record the items generation ``gen_id`` owes (sorted, unique item ids)."""
    path = debt_path(gen_id)
    tmp = path.with_name(path.stem + ".tmp.npy")
    np.save(tmp, np.unique(np.asarray(item_ids, dtype=np.int64)))
    tmp.replace(path)


def load_debt(gen_id: int, expected: int | None = None) -> np.ndarray:
    """The items generation ``gen_id`` owes (empty when it owes none); refuses a file
    whose count is not the ``expected`` one recorded at the gate."""
    path = debt_path(gen_id)
    if not path.exists():
        if expected:
            raise StoreError(
                f"the targeted-backfill debt of generation {gen_id} ({expected} items) is "
                f"missing: {path}; restore it, or run `graceful backfill --budget 1.0`"
            )
        return np.zeros(0, dtype=np.int64)
    ids = np.load(path, allow_pickle=False)
    if expected is not None and len(ids) != expected:
        raise StoreError(
            f"the targeted-backfill debt {path} holds {len(ids)} items, not the {expected} "
            "the gate recorded; restore it, or run `graceful backfill --budget 1.0`"
        )
    return np.asarray(ids, dtype=np.int64)

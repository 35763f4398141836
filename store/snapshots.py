"""The files a cycle keeps beside the lineage, under ``GRACEFUL_HOME/snapshots``: what each
generation trained on (its snapshot's keys, or the scenario's rows), the config it trained
under (so an interrupted cycle resumes as it began), and the evaluation items. Each is
written atomically; files named by a fingerprint are written once."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from store.settings import subdir


def cycle_config_path(gen_id: int) -> Path:
    """The config a generation trains under, kept so an interrupted cycle can resume."""
    return subdir("snapshots") / f"gen-{gen_id}-cycle.json"


def eval_items_path(fingerprint: str) -> Path:
    """The evaluation set's items, named by its fingerprint."""
    return subdir("snapshots") / f"eval-{fingerprint[:24]}.parquet"


def keys_path(fingerprint: str) -> Path:
    """A snapshot's items (keys, labels, what locates them), named by its fingerprint."""
    return subdir("snapshots") / f"keys-{fingerprint[:24]}.parquet"


def write_once(path: Path, table: pa.Table) -> None:
    """Write ``table`` to ``path`` atomically unless it exists (names are fingerprints)."""
    if not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)


def save_generation_inputs(gen_id: int, config_json: str) -> None:
    """The config generation ``gen_id`` trains under (as JSON), written atomically (what
    it trains on is its snapshot's keys file)."""
    cfg_path = cycle_config_path(gen_id)
    tmp = cfg_path.with_name(cfg_path.name + ".tmp")
    tmp.write_text(config_json)
    tmp.replace(cfg_path)

"""The data a lineage trains and evaluates on: its spec, whether it grows from a user's
source or steps through the scenario's stages, its image size, its evaluation set."""

from __future__ import annotations

from store.lineage import Lineage
from store.settings import StoreError
from workers.data.datasets import Dataset, load_dataset, parse_spec
from workers.data.sources import is_source, load_eval


def last_snapshot(lineage: Lineage):
    """The newest generation's snapshot record, or None."""
    snapshots = lineage.snapshots()
    return snapshots[max(snapshots)] if snapshots else None


def source_mode(lineage: Lineage, spec: str | None, stages: int | None = None) -> bool:
    """Whether cycles here train on a source's snapshots (not the scenario's stages).

    A lineage keeps the mode it started with; a new one trains on a source when given an
    image folder or Parquet source and no scenario stage count.
    """
    last = last_snapshot(lineage)
    if last is not None:
        return last.stages is None and is_source(last.source)
    if lineage.generations():
        return False  # made before snapshots: the scenario
    return stages is None and is_source(spec)


def scenario_gallery(lineage: Lineage):
    """The collection's info when it is the scenario's evaluation gallery, else None."""
    info = lineage.gallery_info()
    return info if info is not None and info.scenario else None


def resolve_spec(lineage: Lineage, spec: str | None) -> str:
    """The cycle's data: the given spec, else the scenario gallery's, else the last
    snapshot's (a user's collection is not training data)."""
    info = scenario_gallery(lineage)
    if spec is None:
        last = last_snapshot(lineage)
        if info is not None:
            spec = info.dataset
        elif last is not None:
            spec = last.source
        else:
            raise StoreError("no data set: pass --dataset (this lineage has trained nothing)")
    parse_spec(spec)  # a clear error before anything is loaded or stored
    return spec


class LineageOptionError(StoreError):
    """An option that contradicts what the lineage recorded: bad input (exit 2)."""


def lineage_image_size(lineage: Lineage, asked: int | None = None) -> int | None:
    """The image size a lineage's generations take (recorded with the first generation
    that was given one), or ``asked`` for a lineage that has none yet; refuses another."""
    recorded = next(
        (
            int(g.architecture["image_size"])
            for g in lineage.generations()
            if g.architecture and g.architecture.get("image_size")
        ),
        None,
    )
    if recorded is not None and asked is not None and asked != recorded:
        raise LineageOptionError(
            f"image_size {asked} differs from this lineage's {recorded}: every generation "
            "here embeds images of that size; keep it, or start a new GRACEFUL_HOME"
        )
    if recorded is None and asked is not None and lineage.generations():
        raise LineageOptionError(
            f"image_size {asked}: this lineage's generations take the automatic size; keep "
            "it, or start a new GRACEFUL_HOME"
        )
    return recorded if recorded is not None else asked


def resolve_dataset(
    lineage: Lineage, spec: str | None, stages: int | None = None, image_size: int | None = None
) -> Dataset:
    """The data set a cycle evaluates on: the scenario's, or a source's evaluation set,
    its images at the lineage's size."""
    spec = resolve_spec(lineage, spec)
    size = lineage_image_size(lineage, image_size)
    if source_mode(lineage, spec, stages):
        vocab = lineage.vocabulary()
        ev = load_eval(spec, size)
        missing = sorted(set(ev.labels) - set(vocab))
        if missing:
            raise StoreError(
                f"the evaluation set of {spec!r} has classes this lineage never saw "
                f"({', '.join(missing[:5])}): it changed; restore it"
            )
        ds = ev.dataset(spec, vocab)
    else:
        ds = load_dataset(spec, size)
    info = scenario_gallery(lineage)
    if info is not None and info.dataset != ds.spec:
        raise StoreError(
            f"the gallery in this GRACEFUL_HOME indexes {info.dataset!r}; "
            f"use another GRACEFUL_HOME for {ds.spec!r}"
        )
    return ds


def eval_dataset(lineage: Lineage) -> Dataset | None:
    """The lineage's evaluation data (the scenario's data set or the source's evaluation
    set), or None before anything trained."""
    try:
        return resolve_dataset(lineage, None)
    except StoreError:
        return None

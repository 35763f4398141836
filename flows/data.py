"""The data a lineage trains and evaluates on: its source (workers.data.source), its image
size, its evaluation set and vocabulary."""

from __future__ import annotations

from store.lineage import Lineage
from store.settings import StoreError
from workers.data.datasets import Dataset
from workers.data.source import Source, SourceKind, open_source
from workers.data.sources import EvalSet
from workers.learning.spec import SourceItems


def lineage_source(lineage: Lineage, spec: str | None = None, stages: int | None = None) -> Source:
    """The source a lineage trains on: ``spec`` (else the one it trained on last), of the
    kind its snapshots recorded. A new lineage trains on a user's source when given an
    image folder or Parquet source and no stage count, else steps through the scenario.
    """
    snapshots = lineage.snapshots()
    last = snapshots[max(snapshots)] if snapshots else None  # the newest generation's
    gens = lineage.generations()
    if last is not None:  # the kind is recorded once: a snapshot with a stage count
        kind = SourceKind.SCENARIO if last.stages is not None else SourceKind.ITEMS
        spec = last.source if spec is None else spec
    elif gens:  # made before snapshots recorded the source: only the scenario was
        kind = SourceKind.SCENARIO
        spec = gens[-1].dataset if spec is None else spec
    elif spec is None:
        raise StoreError("no data set: pass --dataset (this lineage has trained nothing)")
    else:
        kind = SourceKind.SCENARIO if stages is not None else None
    return open_source(spec, kind)


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


def evaluation_set(lineage: Lineage, source: Source, image_size: int | None = None) -> EvalSet:
    """The source's evaluation set, its images at the lineage's size; refuses one with
    classes the lineage never saw (it changed under the lineage)."""
    ev = source.evaluation(lineage_image_size(lineage, image_size))
    vocab = lineage.vocabulary()
    missing = sorted(set(ev.labels) - set(vocab)) if vocab else []
    if missing:
        raise StoreError(
            f"the evaluation set of {source.spec!r} has classes this lineage never saw "
            f"({', '.join(missing[:5])}): it changed; restore it"
        )
    return ev


def vocabulary(lineage: Lineage, source: Source, ev: EvalSet) -> dict[str, int]:
    """Class name -> head row: the lineage's; a lineage made before it recorded one (the
    scenario's, then) keeps its data set's order."""
    return lineage.vocabulary() or {n: i for i, n in enumerate(source.class_order(set(ev.labels)))}


def training_items(
    source: Source, ev: EvalSet, vocab: dict[str, int], fingerprint: str, keys_path: str = ""
) -> SourceItems:
    """A snapshot as the trainer streams it: the source, its keys file, the head rows of
    its classes and the input format its evaluation set fixes."""
    return SourceItems(
        spec=source.spec,
        keys_path=keys_path,
        vocabulary=vocab,
        input_format=ev.input_format.as_dict(),
        fingerprint=fingerprint,
        kind=source.kind.value,
    )


def resolve_dataset(
    lineage: Lineage, spec: str | None, stages: int | None = None, image_size: int | None = None
) -> Dataset:
    """The evaluation data a cycle measures on, as a ``Dataset`` (evaluation split only)."""
    source = lineage_source(lineage, spec, stages)
    ev = evaluation_set(lineage, source, image_size)
    return ev.dataset(source.spec, vocabulary(lineage, source, ev))


def eval_dataset(lineage: Lineage) -> Dataset | None:
    """The lineage's evaluation data, or None before anything trained."""
    try:
        return resolve_dataset(lineage, None)
    except StoreError:
        return None


def class_vocabulary(lineage: Lineage, ds: Dataset | None = None) -> dict[str, int]:
    """Class name -> head row of the lineage (a source's vocabulary, else the class names
    of ``ds`` or of its evaluation set: the scenario's): how a labelled collection's
    labels are stored."""
    vocab = lineage.vocabulary()
    if vocab:
        return vocab
    ds = ds if ds is not None else eval_dataset(lineage)
    return {} if ds is None else {str(n): i for i, n in enumerate(ds.class_names)}

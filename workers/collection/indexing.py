"""Indexing a collection: embed with the champion the items it does not hold yet,
re-embed the ones whose content changed, and (on request) remove the ones gone.

The items to embed stream through Ray Data: a dataset of their keys, in the order they
will be stored, is mapped in batches by actors (:class:`EmbedByKey`, one per worker, a
GPU each where the cluster has GPUs) that read each item from the collection's source by
key and embed it; the driver takes the results in order, a part at a time, and commits
each part (its items, the collection's size and id high-water mark) in one transaction.
Memory is a few parts, whatever the collection's size. An indexing killed at any point
and run again finds the committed items, and ends with every item present once.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from store.collection import UNLABELLED, Collection, CollectionRows, CollectionStoreError
from store.failpoints import failpoint
from store.files import verify_checkpoint
from store.lineage import Generation, Lineage
from store.settings import StoreError
from workers.collection.items import (
    CollectionError,
    Listing,
    list_items,
    open_reader,
    parse_collection_spec,
    same_kind,
)

Progress = Callable[[int, int], None]
PART_ROWS = 4096  # items per part of a new collection part


class EmbedByKey:
    """A Ray Data batch mapper: reads items by key from the collection's source and
    embeds them with one generation (loaded and hash-checked once per actor)."""

    def __init__(
        self, checkpoint: str, sha: str | None, spec: str, threads: int | None = None
    ) -> None:
        import torch

        from workers.learning.models import load_model

        if threads:
            torch.set_num_threads(int(threads))
        self.model = load_model(checkpoint, sha)
        self.reader = open_reader(spec, tuple(self.model.config["input_shape"]))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from workers.learning.embed import forward

        keys = [str(k) for k in batch["key"]]
        x, bad = self.reader.take_each(keys)
        bad_set = set(bad)
        ok = np.asarray([k not in bad_set for k in keys], dtype=bool)
        out = forward(self.model, x)
        emb = np.zeros((len(keys), out.embedding.shape[1]), np.float32)
        margin = np.zeros(len(keys), np.float32)
        emb[ok], margin[ok] = out.embedding, out.margin
        return {"key": np.asarray(keys, dtype=object), "ok": ok, "embedding": emb, "margin": margin}


def embed_stream(
    champion: Generation, spec: str, keys: pa.Array | pa.ChunkedArray, batch_rows: int
) -> Iterator[dict[str, np.ndarray]]:
    """Batches (key, ok, embedding, margin) of ``keys`` embedded by ``champion``, in the
    order given, through Ray Data (actors on the cluster's GPUs where it has them)."""
    import logging

    import ray.data

    from workers.runtime import task_resources

    if len(keys) == 0:
        return
    res = task_resources()
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # our own progress reports it
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # parts are committed in id order
    ctx.enable_progress_bars = False
    # one block per batch: the actor holds a batch's inputs and outputs, not all of them
    table = pa.table({"key": keys})
    ds = ray.data.from_arrow(
        [table.slice(i, batch_rows) for i in range(0, table.num_rows, batch_rows)]
    )
    with warnings.catch_warnings():  # the switch is deprecated for 2.64 (pinned below it)
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        mapped = ds.map_batches(
            EmbedByKey,
            fn_constructor_kwargs={
                "checkpoint": champion.checkpoint_path,
                "sha": champion.checkpoint_sha256,
                "spec": spec,
                "threads": int(res.get("num_cpus", 1)),
            },
            batch_size=batch_rows,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=res.get("num_cpus", 1),
            num_gpus=res.get("num_gpus", 0),
            # a failed actor fails the indexing (a rerun resumes it) rather than restarting;
            # Ray Data's documented switch (also keeps its restart warning off the console)
            max_restarts=0,
        )
    yield from mapped.iter_batches(batch_size=batch_rows, batch_format="numpy")


@dataclass
class IndexResult:
    """What one indexing did (counts of items)."""

    spec: str
    generation: int
    added: int = 0
    reembedded: int = 0
    pruned: int = 0
    unchanged: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    items: int = 0
    seconds: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "generation": self.generation,
            "added": self.added,
            "reembedded": self.reembedded,
            "pruned": self.pruned,
            "unchanged": self.unchanged,
            "skipped": len(self.skipped),
            "skipped_items": self.skipped[:20],
            "items": self.items,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class Plan:
    """The difference between a listing and the collection."""

    new: pa.Table  # key, label, fingerprint: items to add
    changed: pa.Table  # key, label, fingerprint, item_id: items to re-embed
    gone: pa.Table  # key, item_id: items to prune
    unchanged: int


def plan_index(listing: Listing, held: pa.Table) -> Plan:
    """Compare the items of a listing with those the collection ``held`` (key, item_id,
    fingerprint): what to add, re-embed and prune."""
    items = listing.table
    at = pc.index_in(items.column("key"), value_set=held.column("key"))
    new_mask = pc.is_null(at)
    new = items.filter(new_mask)
    both = items.filter(pc.invert(new_mask))
    pos = pc.drop_null(at)
    held_fp = held.column("fingerprint").take(pos)
    diff = pc.not_equal(both.column("fingerprint"), held_fp)
    changed = both.filter(diff).append_column(
        "item_id", held.column("item_id").take(pos).filter(diff)
    )
    gone_mask = pc.invert(pc.is_in(held.column("key"), value_set=items.column("key")))
    gone = held.select(["key", "item_id"]).filter(gone_mask)
    return Plan(new, changed, gone, int(len(both) - len(changed)))


def _labels(names: pa.Array | pa.ChunkedArray, vocabulary: dict[str, int]) -> np.ndarray:
    """Class names -> head rows; a missing or unknown name is ``UNLABELLED``."""
    known = pa.array(list(vocabulary), pa.string())
    rows = np.asarray(list(vocabulary.values()) or [0], dtype=np.int64)
    at = pc.fill_null(pc.index_in(names, value_set=known), -1).to_numpy().astype(np.int64)
    return np.where(at < 0, UNLABELLED, rows[np.maximum(at, 0)])


def check_collection(collection: Collection, spec: str, champion: Generation) -> None:
    """A spec of the collection's kind, and a champion embedding in its dimension."""
    info = collection.info()
    if info is not None and not same_kind(info.dataset, spec):
        kind = parse_collection_spec(info.dataset)[0]
        raise CollectionError(
            f"the collection here holds {kind} items ({info.dataset}); {spec!r} is another "
            "kind: index it in another GRACEFUL_HOME"
        )
    if info is not None and int(champion.embed_dim) != int(info.embed_dim):
        raise CollectionStoreError(
            f"embedding dim mismatch: generation {champion.id} embeds in dim "
            f"{champion.embed_dim} but the collection stores dim {info.embed_dim}"
        )


def run_index(
    lineage: Lineage,
    collection: Collection,
    spec: str,
    champion: Generation,
    vocabulary: dict[str, int],
    prune: bool = False,
    strict: bool = False,
    part_rows: int = PART_ROWS,
    progress: Progress | None = None,
    update_index: bool = True,
) -> IndexResult:
    """Index collection ``spec`` with ``champion``: add new keys, re-embed changed ones,
    prune gone ones (``prune``). Holds the collection's writer lock throughout. With
    ``update_index`` the persisted faiss index is brought up to date at the end (else the
    next :meth:`CollectionIndex.open` does it: the flow runs it as its own step)."""
    t0 = time.perf_counter()
    if champion is None or champion.id is None or not champion.checkpoint_path:
        raise StoreError("no champion generation to index with: run a cycle first")
    if part_rows < 1:
        raise CollectionStoreError(f"part_rows must be >= 1, got {part_rows}")
    verify_checkpoint(
        champion.checkpoint_path, champion.checkpoint_sha256, f"champion generation {champion.id}"
    )
    with collection.writing():
        check_collection(collection, spec, champion)
        if collection.exists():
            collection.verify(check_hash=False)
            collection.reconcile()
        held = collection.keys()
        known = None
        if parse_collection_spec(spec)[0] in ("images", "imagefolder"):
            # files whose size and mtime match are neither decoded nor hashed again
            known = dict(
                zip(
                    held.column("key").to_pylist(),
                    held.column("fingerprint").to_pylist(),
                    strict=True,
                )
            )
        listing = list_items(spec, known)
        del known
        t_list = time.perf_counter()
        if listing.skipped and strict:
            first = listing.skipped[0]
            raise CollectionError(
                f"{len(listing.skipped)} unreadable item(s) in {spec} (first: {first['key']}: "
                f"{first['reason']}); fix or remove them, or run without --strict to skip them"
            )
        plan = plan_index(listing, held)
        listed_skipped = list(listing.skipped)
        del held, listing  # the plan holds what is left to do: memory is the plan's
        result = IndexResult(spec, int(champion.id), skipped=list(listed_skipped))
        result.unchanged = plan.unchanged
        total = len(plan.new) + len(plan.changed) + (len(plan.gone) if prune else 0)
        done = 0
        report: Progress = progress or (lambda done, total: None)
        report(0, total)
        info = collection.info()
        if info is not None and info.dataset != spec:
            collection.set_dataset(spec)  # the same kind of source, moved: keys still hold
        if prune and len(plan.gone):
            result.pruned = _prune(collection, plan.gone)
            done += result.pruned
            report(done, total)
        if len(plan.changed):
            n, bad = _reembed(collection, champion, spec, plan.changed, vocabulary, part_rows)
            result.reembedded, done = n, done + n + len(bad)
            result.skipped += bad
            report(done, total)
        t_embed = time.perf_counter()
        if len(plan.new):
            for n, bad in _add(collection, champion, spec, plan.new, vocabulary, part_rows):
                result.added += n
                result.skipped += bad
                done += n + len(bad)
                report(done, total)
        if strict and len(result.skipped) > len(listed_skipped):
            first = result.skipped[len(listed_skipped)]
            raise CollectionError(
                f"item {first['key']} could not be read: {first['reason']}; the items read "
                "before it are indexed; fix it, or run without --strict to skip it"
            )
        result.items = int(collection.require().items) if collection.exists() else 0
    from store.index import CollectionIndex

    t_index = time.perf_counter()
    if collection.exists() and update_index:
        CollectionIndex.open(collection)
    result.seconds = time.perf_counter() - t0
    result.stats = {
        "list_seconds": t_list - t0,
        "add_seconds": t_index - t_embed,  # embed (Ray Data) + write + commit, new items
        "index_seconds": time.perf_counter() - t_index,
    }
    return result


def _add(
    collection: Collection,
    champion: Generation,
    spec: str,
    new: pa.Table,
    vocabulary: dict[str, int],
    part_rows: int,
) -> Iterator[tuple[int, list[dict[str, str]]]]:
    """Embed the new items and append them, a part at a time; yields (added, skipped)."""
    labels = _labels(new.column("label"), vocabulary)
    fps = new.column("fingerprint")
    at = 0
    for batch in embed_stream(champion, spec, new.column("key"), part_rows):
        n = len(batch["key"])
        ok = np.asarray(batch["ok"], dtype=bool)
        bad = [{"key": str(k), "reason": "gone or unreadable when read"} for k in batch["key"][~ok]]
        if ok.any():
            start = collection.next_item_id()
            m = int(ok.sum())
            rows = CollectionRows(
                item_id=np.arange(start, start + m, dtype=np.int64),
                label=labels[at : at + n][ok],
                generation=np.full(m, int(champion.id), np.int32),  # type: ignore[arg-type]
                margin=np.asarray(batch["margin"], np.float32)[ok],
                embedding=np.asarray(batch["embedding"], np.float32)[ok],
                key=np.asarray(batch["key"], dtype=object)[ok],
                fingerprint=np.asarray(fps.slice(at, n).to_pylist(), dtype=object)[ok],
            )
            collection.append(spec, rows)
            failpoint("index-part")  # the kill tests stop here, a part committed
        at += n
        yield int(ok.sum()), bad


def _parts_of(collection: Collection, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Committed part -> the given item ids it holds."""
    out: dict[str, np.ndarray] = {}
    want = np.sort(np.asarray(ids, dtype=np.int64))
    for name, batch in collection.iter_batches(["item_id"]):
        have = np.asarray(batch.column(0).to_numpy(), dtype=np.int64)
        hit = have[np.isin(have, want)]
        if len(hit):
            out[name] = np.concatenate([out[name], hit]) if name in out else hit
    return out


def _prune(collection: Collection, gone: pa.Table) -> int:
    """Remove the ``gone`` items, part by part (a part left empty is dropped)."""
    removed = 0
    for name, ids in _parts_of(collection, gone.column("item_id").to_numpy()).items():
        rows = collection.read_rows(name)
        keep = ~np.isin(rows.item_id, ids)
        if keep.any():
            collection.rewrite_part(name, rows.take(np.flatnonzero(keep)))
        else:
            collection.drop_part(name)
        removed += int((~keep).sum())
        failpoint("prune-part")
    return removed


def _reembed(
    collection: Collection,
    champion: Generation,
    spec: str,
    changed: pa.Table,
    vocabulary: dict[str, int],
    part_rows: int,
) -> tuple[int, list[dict[str, str]]]:
    """Embed the changed items again and rewrite their parts (labels and fingerprints too)."""
    order = np.argsort(changed.column("item_id").to_numpy(), kind="stable")
    changed = changed.take(pa.array(order))
    ids = changed.column("item_id").to_numpy()
    labels = _labels(changed.column("label"), vocabulary)
    fps = np.asarray(changed.column("fingerprint").to_pylist(), dtype=object)
    by_part = _parts_of(collection, ids)
    part_of = {int(i): name for name, got in by_part.items() for i in got}
    pending: dict[str, list[tuple[int, np.ndarray, float, bool]]] = {}
    left = {name: len(got) for name, got in by_part.items()}
    done, bad = 0, []
    at = 0
    for batch in embed_stream(champion, spec, changed.column("key"), part_rows):
        for j in range(len(batch["key"])):
            i = at + j
            name = part_of[int(ids[i])]
            ok = bool(batch["ok"][j])
            if not ok:
                bad.append({"key": str(batch["key"][j]), "reason": "gone or unreadable when read"})
            pending.setdefault(name, []).append(
                (i, batch["embedding"][j], float(batch["margin"][j]), ok)
            )
            left[name] -= 1
            if left[name] == 0:
                done += _rewrite(collection, name, pending.pop(name), ids, labels, fps, champion)
        at += len(batch["key"])
    return done, bad


def _rewrite(collection, name, got, ids, labels, fps, champion) -> int:
    rows = collection.read_rows(name)
    pos = {int(v): p for p, v in enumerate(rows.item_id)}
    n = 0
    for i, emb, margin, ok in got:
        if not ok:
            continue  # an item unreadable now keeps its last embedding (counted as skipped)
        p = pos[int(ids[i])]
        rows.embedding[p], rows.margin[p] = emb, margin
        rows.generation[p], rows.label[p], rows.fingerprint[p] = champion.id, labels[i], fps[i]
        n += 1
    if n:
        collection.rewrite_part(name, rows)
    return n

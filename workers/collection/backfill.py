"""The compute of a streaming, resumable backfill of the Parquet collection with the
champion generation. A job (flows.backfill_job; its record: store.backfill_jobs) runs
it in four steps, each with memory bounded by a few parts, not by the collection:

1. **check**: every part is whole, has the gallery's schema and the sha256 in the
   manifest, and no foreign Parquet file sits in the gallery directory; the champion
   embeds in the gallery's dimension. Any failure raises before anything is written.
2. **select**: the policy order is computed from a streaming pass over the columns it
   needs (item id, generation, margin; the ``representative`` policy also streams the
   old embeddings twice: a seeded sample trains its strata, a second pass assigns them).
   The chosen items (policy order, within the budget) are fixed and saved next to the
   job, so a killed job resumes with the same selection.
3. **re-embed**: part by part, the chosen items are read by key from the collection's
   spec (``CollectionInfo.dataset``, through workers.collection.items.open_reader: a
   folder of images, Parquet row groups located by ``item_id``, or a source's
   evaluation set), embedded by a Ray actor holding the champion (GPU where the cluster
   has one), and the part is rewritten. Up to 3 parts are in flight, so
   the actor embeds the next part while this one is written.
4. **commit**: each rewritten part is committed atomically together with the job's
   progress (one SQL transaction; see :mod:`store.collection`). A job killed at any point
   and started again finishes with every item present exactly once, each with one
   embedding and the generation that made it.

Afterwards the persisted faiss index is brought up to the new manifest (only the parts
that changed are re-read).
"""

from __future__ import annotations

import os
import resource
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from store.collection import Collection, CollectionRows, CollectionStoreError
from store.failpoints import failpoint
from store.lineage import CollectionInfo, Generation
from store.settings import StoreError
from workers.collection.indexing import EmbedByKey
from workers.collection.policies import (
    EMBEDDING_POLICIES,
    SAMPLE_PER_STRATUM,
    assign_strata,
    backfill_order,
    check_policy,
    item_hash,
    n_strata,
    train_strata,
)
from workers.learning.embed import forward
from workers.measuring import metrics as M

BETAS = tuple(round(0.1 * i, 1) for i in range(11))
SCAN_ROWS = 8192  # rows per streamed batch
_CHANGED = "the collection changed while it was read; start the backfill again"
Progress = Callable[[int, int], None]


# -- embedding on Ray ------------------------------------------------------------------
def rss_breakdown() -> dict[str, int]:
    """Resident memory of this process now, by kind (bytes): anonymous (its own heap),
    file-backed, shared memory (for a Ray process: pages of the object store it mapped)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    ``VmHWM`` of ``/proc/self/status`` where there is one: unlike ``ru_maxrss`` it is not
    inherited through fork and exec from a bigger parent.
    """
    hwm = rss_breakdown().get("VmHWM")
    return hwm if hwm else int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class EmbedActor(EmbedByKey):
    """Holds one generation's model for a whole job and reads the items' inputs itself,
    by key, from the collection's spec: the driver sends keys, not images."""

    def __init__(self, checkpoint: str, sha: str | None, threads: int | None, spec: str) -> None:
        super().__init__(checkpoint, sha, spec, threads)
        self.seconds = 0.0
        self.read_seconds = 0.0

    def ready(self) -> bool:
        return True

    def embed(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = time.perf_counter()
        out = forward(self.model, x)
        self.seconds += time.perf_counter() - t
        return out.embedding, out.margin

    def embed_items(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings and margins of the collection's items ``keys`` (in the order of the
        collection's parts, which a streamed source reads forward)."""
        t = time.perf_counter()
        try:
            x = self.reader.take_keys(list(keys))
        except Exception as exc:  # noqa: BLE001 - the message names the item and the fix
            raise StoreError(
                f"{exc}; an item is gone from the collection's source: run "
                "`graceful index SPEC --prune`, then the backfill again"
            ) from None
        self.read_seconds += time.perf_counter() - t
        return self.embed(x)

    def stats(self) -> dict[str, float]:
        mem = rss_breakdown()
        return {
            "embed_seconds": self.seconds,
            "read_seconds": self.read_seconds,
            "peak_rss": float(peak_rss_bytes()),
            "rss_anon": float(mem.get("RssAnon", 0)),
            "rss_shmem": float(mem.get("RssShmem", 0)),
        }


# parts in flight between reading, embedding and committing (the pipeline's depth)
PIPELINE_DEPTH = 3


def start_actor(champion: Generation, spec: str):
    """A Ray actor embedding with ``champion`` (the cluster's GPU if it has one), reading
    items of collection ``spec`` by key. Its OpenMP threads sleep instead of spinning while they
    wait, so the driver's Parquet work next to it costs it little."""
    import ray

    from workers.runtime import task_resources

    res = task_resources()
    env = {"OMP_WAIT_POLICY": os.environ.get("GRACEFUL_OMP_WAIT_POLICY", "PASSIVE")}
    cls = ray.remote(max_restarts=0, max_task_retries=0, **res)(EmbedActor)
    actor = cls.options(runtime_env={"env_vars": env}).remote(
        champion.checkpoint_path,
        champion.checkpoint_sha256,
        int(res.get("num_cpus", 1)),
        spec,
    )
    ray.get(actor.ready.remote())  # fail here on a bad checkpoint or data set, before writes
    return actor


# -- measuring -------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelledQueries:
    """What M_mix is measured with: the evaluation set's query half embedded by the
    champion and their labels; for the backfill curve, the champion's embeddings of the
    reference items, by key."""

    emb: np.ndarray
    labels: np.ndarray
    reference_keys: Sequence[str] = ()
    reference_emb: np.ndarray | None = None

    def reference_for(self, keys: Sequence[str]) -> np.ndarray | None:
        """The champion's embeddings of ``keys`` in their order, or None where one is
        not among the reference items."""
        if self.reference_emb is None:
            return None
        at = {k: i for i, k in enumerate(self.reference_keys)}
        rows = [at.get(str(k), -1) for k in keys]
        return None if -1 in rows else self.reference_emb[rows]


def m_mix(query_emb: np.ndarray, query_labels: np.ndarray, rows: CollectionRows) -> float:
    """Top-1 of champion queries against the real collection (each item's current embedding)."""
    return M.retrieval_top1(query_emb, query_labels, rows.embedding, rows.label)


def m_mix_stream(
    collection: Collection,
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    batch_rows: int = SCAN_ROWS,
) -> float:
    """:func:`m_mix` over the committed collection, streamed in row batches (bounded memory)."""
    q = np.array(query_emb, dtype=np.float32, copy=True)
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    best = np.full(len(q), -np.inf, dtype=np.float32)
    label = np.full(len(q), -1, dtype=np.int64)
    for _, batch in collection.iter_batches(["label", "embedding"], batch_rows=batch_rows):
        emb = _emb(batch, 1)
        if emb.shape[1] != q.shape[1]:
            raise CollectionStoreError(
                f"embedding dim mismatch: queries have {q.shape[1]}, the collection has "
                f"{emb.shape[1]}"
            )
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        sims = q @ emb.T
        arg = sims.argmax(axis=1)
        top = sims[np.arange(len(q)), arg]
        better = top > best
        best[better] = top[better]
        label[better] = batch.column(0).to_numpy()[arg[better]]
    return float(np.mean(label == np.asarray(query_labels)))


def backfill_curve(
    rows: CollectionRows,
    new_emb: np.ndarray,
    order: np.ndarray,
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    betas: tuple[float, ...] = BETAS,
) -> list[tuple[float, float]]:
    """M_mix after backfilling fraction beta of the old items in ``order``.

    ``new_emb`` holds the champion's embedding of every gallery item, aligned with ``rows``.
    """
    if len(new_emb) != len(rows):
        raise CollectionStoreError(
            f"{len(new_emb)} champion embeddings for a collection of {len(rows)} items"
        )
    pos = np.searchsorted(rows.item_id, order) if len(order) else np.zeros(0, np.int64)
    if np.any(np.diff(rows.item_id) <= 0) or not np.array_equal(rows.item_id[pos], order):
        sorter = {int(i): p for p, i in enumerate(rows.item_id)}
        pos = np.array([sorter[int(i)] for i in order], dtype=np.int64)
    curve = []
    for beta in betas:
        emb = rows.embedding.copy()
        take = pos[: round(beta * len(pos))]
        emb[take] = new_emb[take]
        curve.append((float(beta), M.retrieval_top1(query_emb, query_labels, emb, rows.label)))
    return curve


# -- selection -------------------------------------------------------------------------
def _emb(batch, col: int) -> np.ndarray:
    c = batch.column(col)
    return c.flatten().to_numpy(zero_copy_only=False).reshape(len(batch), -1)


def policy_order(
    collection: Collection,
    target: int,
    policy: str,
    seed: int = 0,
    num_classes: int | None = None,
    batch_rows: int = SCAN_ROWS,
    retire_share: float = 0.0,
    complete: Sequence[int] = (),
    first_items: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """(item ids not yet embedded by ``target`` in ``policy`` order, gallery size).

    Streams only the columns the policy needs and keeps per-item scalars (item id,
    generation, margin, stratum: 20 bytes an item, filled in place) plus, for
    ``representative``, a sample of at most 256 embeddings a stratum.
    """
    check_policy(policy)
    manifest = collection.manifest()  # one snapshot for every pass
    names = [p.name for p in manifest]
    n = sum(int(p.rows) for p in manifest)
    need_emb = policy in EMBEDDING_POLICIES
    cols = ["item_id", "generation", "margin"] + (["embedding"] if need_emb else [])
    k = n_strata(num_classes)
    cap = SAMPLE_PER_STRATUM * k
    item_id = np.empty(n, dtype=np.int64)
    generation = np.empty(n, dtype=np.int32)
    margin = np.empty(n, dtype=np.float32)
    s_keys = np.zeros(0, dtype=np.uint64)
    s_emb: np.ndarray | None = None
    at = 0
    for _, batch in collection.iter_batches(cols, names=names, batch_rows=batch_rows):
        m = batch.num_rows
        if at + m > n:
            raise CollectionStoreError(_CHANGED)
        item_id[at : at + m] = batch.column(0).to_numpy()
        generation[at : at + m] = batch.column(1).to_numpy()
        margin[at : at + m] = batch.column(2).to_numpy()
        if need_emb:  # keep the `cap` stale items of smallest hash: a seeded uniform sample
            stale = generation[at : at + m] != target
            if stale.any():
                keys = np.concatenate([s_keys, item_hash(item_id[at : at + m][stale], seed)])
                emb = _emb(batch, 3)[stale]
                emb = emb if s_emb is None else np.concatenate([s_emb, emb])
                keep = np.argsort(keys, kind="stable")[:cap]
                s_keys, s_emb = keys[keep], emb[keep]
        at += m
    if at != n:
        raise CollectionStoreError(_CHANGED)
    strata = None
    if need_emb:
        strata = np.full(n, -1, dtype=np.int16 if k < 2**15 else np.int32)
        if s_emb is not None and len(s_emb):
            centroids = train_strata(s_emb, k, seed)
            at = 0
            for _, batch in collection.iter_batches(
                ["embedding"], names=names, batch_rows=batch_rows
            ):
                strata[at : at + batch.num_rows] = assign_strata(centroids, _emb(batch, 0))
                at += batch.num_rows
    retire_below = int(retire_share * n)  # items: a generation holding so few retires now
    order = backfill_order(
        item_id,
        generation,
        margin,
        target,
        policy,
        seed,
        strata=strata,
        retire_below=retire_below,
        complete=complete,
        first_items=first_items,
    )
    return order, n


def _in_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    if len(sorted_set) == 0:
        return np.zeros(len(values), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[pos] == values


def progress_scan(collection: Collection, chosen: np.ndarray, target: int) -> tuple[int, list[str]]:
    """(chosen items already embedded by ``target``, parts still holding chosen stale items)."""
    done, todo = 0, []
    for name in collection.part_names():
        pending = False
        for _, batch in collection.iter_batches(["item_id", "generation"], names=[name]):
            hit = _in_sorted(np.asarray(batch.column(0).to_numpy(), dtype=np.int64), chosen)
            fresh = np.asarray(batch.column(1).to_numpy()) == target
            done += int((hit & fresh).sum())
            pending |= bool((hit & ~fresh).any())
        if pending:
            todo.append(name)
    return done, todo


def reembed_parts(
    collection: Collection,
    info: CollectionInfo,
    todo: list[str],
    chosen: np.ndarray,
    target: int,
    champion: Generation,
    done: int,
    total: int,
    progress: Progress | None,
    crash_after_parts: int | None,
    st: dict[str, Any],
    on_commit: Callable[[Any, int], None] | None = None,
) -> int:
    """Read -> embed (Ray actor) -> write + commit, part by part; returns items embedded.

    The driver reads only what it keeps (ids, labels; the whole part only when some of
    its items stay as they are) and sends item ids; the actor reads their inputs.
    ``on_commit(session, items_done)`` writes in each part's commit (the job's progress).
    """
    import ray

    t = time.perf_counter()
    actor = start_actor(champion, info.dataset)
    st["actor_start_seconds"] = time.perf_counter() - t
    t_stream = time.perf_counter()
    inflight: deque = deque()
    committed = 0
    embedded = 0
    timers = {"read": 0.0, "submit": 0.0, "wait": 0.0, "write": 0.0}

    def finish() -> None:
        nonlocal committed, embedded
        name, keys, full, mask, ref = inflight.popleft()
        t = time.perf_counter()
        emb, margin = ray.get(ref)
        t1 = time.perf_counter()
        timers["wait"] += t1 - t
        if full is None:  # every item of the part is re-embedded
            ids, labels, item_keys, prints = keys
            gens = np.full(len(ids), target, np.int32)
            rows = CollectionRows(ids, labels, gens, margin, emb, item_keys, prints)
        else:
            rows = full
            rows.embedding[mask] = emb
            rows.margin[mask] = margin
            rows.generation[mask] = target
        embedded += int(mask.sum())
        n_done = done + embedded
        record = None if on_commit is None else lambda session: on_commit(session, n_done)
        collection.rewrite_part(name, rows, also=record)
        timers["write"] += time.perf_counter() - t1
        committed += 1
        if progress:
            progress(n_done, total)
        failpoint("backfill-part")  # the kill tests stop here, a part committed
        if crash_after_parts is not None and committed >= crash_after_parts:
            raise KeyboardInterrupt(f"simulated kill after {committed} parts")

    try:
        for name in todo:
            t = time.perf_counter()
            head = collection.read_part(
                name, info, columns=["item_id", "generation", "label", "key", "fingerprint"]
            )
            ids = np.asarray(head.column(0).to_numpy(), dtype=np.int64)
            gens = np.asarray(head.column(1).to_numpy())
            mask = _in_sorted(ids, chosen) & (gens != target)
            if not mask.any():
                continue
            full = None if mask.all() else collection.read_rows(name, info)
            labels = np.asarray(head.column(2).to_numpy(), dtype=np.int64)
            t1 = time.perf_counter()
            item_keys = np.asarray(head.column(3).to_pylist(), dtype=object)
            prints = np.asarray(head.column(4).to_pylist(), dtype=object)
            ref = actor.embed_items.remote(item_keys[mask].tolist())
            timers["read"] += t1 - t
            timers["submit"] += time.perf_counter() - t1
            inflight.append((name, (ids, labels, item_keys, prints), full, mask, ref))
            if len(inflight) >= PIPELINE_DEPTH:
                finish()
        while inflight:
            finish()
        st["stream_seconds"] = time.perf_counter() - t_stream
        st.update({f"driver_{k}_seconds": v for k, v in timers.items()})
        st.update({f"actor_{k}": v for k, v in ray.get(actor.stats.remote()).items()})
    finally:
        inflight.clear()
        ray.kill(actor)
    return embedded

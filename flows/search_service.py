"""``graceful search-server``: the search service and page (FastAPI, served by uvicorn).

Loaded once, kept current. At start the champion's encoder and the collection's faiss
index are loaded into one :class:`flows.query.Searcher` (the served state). A watcher
thread polls the lineage (the champion, and the collection's manifest: one indexed
query each) every ``poll_seconds``; when either moved it builds the next state beside
the served one (the new champion's model, and a *copy* of the index synced to the
committed manifest), then swaps one reference. A request reads that reference once and
uses that state to its end, so it never meets half a swap: a new encoder with the old
index is a valid state (the collection is mixed by design), a half-synced index never
is, and it is never served. Why polling and how it works across processes:
``deploy/SEARCH.md``.

Endpoints: ``POST /search`` (JSON ``{"key"|"vector", "k", "label"}`` or a multipart
upload ``file`` with form fields ``k``, ``label``), ``GET /items/{key}``,
``GET /thumbnails/{key}``, ``GET /state``, ``GET /healthz``, ``GET /metrics``
(Prometheus text), ``/`` (the page), ``/docs`` (OpenAPI). Every error is JSON
``{"error": ..., "status": ...}``; bad input is a 4xx, never a 500.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request

from flows.query import MAX_K, BadQuery, NotReady, Searcher, UnknownKey, check_k
from store.collection import Collection
from store.lineage import Lineage
from store.settings import NoLineage, StoreError, require_lineage

log = logging.getLogger("uvicorn.error")  # shown with the server's own lines

TOKEN_ENV = "GRACEFUL_SEARCH_TOKEN"
MAX_BODY_BYTES = 20 * 1024 * 1024  # a request body above this: 413
# an over-long body up to this is read to its end before the 413 (a client that sends it
# whole then reads the answer instead of a reset connection); a longer one is cut off
DRAIN_BYTES = 64 * 1024 * 1024
POLL_SECONDS = 0.5  # how often the watcher reads the champion and the manifest
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
PAGE = Path(__file__).with_name("static") / "search.html"


class TooLarge(BadQuery):
    """A request body over the limit (413)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- the served state -------------------------------------------------------------------
class ServedState:
    """The current :class:`Searcher` (or why there is none), swapped whole by a watcher."""

    def __init__(self, poll_seconds: float = POLL_SECONDS) -> None:
        self.lineage: Lineage | None = None  # opened once one exists (reading never creates one)
        self.poll_seconds = poll_seconds
        self.searcher: Searcher | None = None
        self.version = 0  # bumped at every swap; answers carry it
        self.problem = "starting"
        self.swaps = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one refresh at a time

    def current(self) -> tuple[Searcher, int]:
        """The state a request uses to its end (read once), and its version."""
        s, v = self.searcher, self.version
        if s is None:
            raise NotReady(self.problem)
        return s, v

    def refresh(self) -> bool:
        """Load or advance the state when the champion or the manifest moved; True if it
        swapped."""
        with self._lock:
            cur = self.searcher
            try:
                if self.lineage is None:  # none yet: wait (503), creating no home nor database
                    try:
                        require_lineage()
                    except NoLineage as exc:
                        raise NotReady(f"no champion generation yet: {exc}") from None
                    self.lineage = Lineage()
                if cur is None:
                    nxt = Searcher.open(self.lineage).load()
                else:
                    champion = self.lineage.champion()
                    names = [p.name for p in Collection(self.lineage).manifest()]
                    if champion is None or (
                        champion.id == cur.champion and tuple(sorted(names)) == cur.manifest
                    ):
                        return False
                    nxt = cur.advance(champion, names).load()
            except NotReady as exc:
                self.problem = str(exc)
                return False
            # one reference swap: requests that began keep the state they read
            self.searcher, self.version = nxt, self.version + 1
            if cur is not None:
                self.swaps += 1
                log.info(
                    "served state %d: champion %d, %d parts",
                    self.version,
                    nxt.champion,
                    len(nxt.manifest),
                )
            return True

    def start(self) -> None:
        try:
            self.refresh()
        except StoreError as exc:
            self.problem = str(exc)
        self._thread = threading.Thread(target=self._watch, name="graceful-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.refresh()
            except Exception as exc:  # a database hiccup: the served state stays, try again
                log.warning("search state refresh failed: %s", exc)


# -- metrics ----------------------------------------------------------------------------
class Metrics:
    """Counters and a latency histogram per route, written as Prometheus text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.buckets: dict[str, list[int]] = defaultdict(lambda: [0] * len(LATENCY_BUCKETS))
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.champion_answers: dict[int, int] = defaultdict(int)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(method, route, status)] += 1
            b = self.buckets[route]
            for i, edge in enumerate(LATENCY_BUCKETS):
                if seconds <= edge:
                    b[i] += 1
            self.sums[route] += seconds
            self.counts[route] += 1

    def answered(self, champion: int) -> None:
        with self._lock:
            self.champion_answers[champion] += 1

    def text(self, state: ServedState) -> str:
        out = []

        def head(name: str, kind: str, text: str) -> None:
            out.extend([f"# HELP {name} {text}", f"# TYPE {name} {kind}"])

        with self._lock:
            head("graceful_search_requests_total", "counter", "HTTP requests by route and status")
            for (m, r, s), n in sorted(self.requests.items()):
                out.append(
                    f'graceful_search_requests_total{{method="{m}",route="{r}",status="{s}"}} {n}'
                )
            head("graceful_search_errors_total", "counter", "HTTP answers with status >= 400")
            errors: dict[tuple[str, int], int] = defaultdict(int)
            for (_, r, s), n in self.requests.items():
                if s >= 400:
                    errors[(r, s)] += n
            for (r, s), n in sorted(errors.items()):
                out.append(f'graceful_search_errors_total{{route="{r}",status="{s}"}} {n}')
            head("graceful_search_request_seconds", "histogram", "request latency by route")
            for r in sorted(self.counts):
                for edge, n in zip(LATENCY_BUCKETS, self.buckets[r], strict=True):
                    out.append(
                        f'graceful_search_request_seconds_bucket{{route="{r}",le="{edge}"}} {n}'
                    )
                out.append(
                    f'graceful_search_request_seconds_bucket{{route="{r}",le="+Inf"}} '
                    f"{self.counts[r]}"
                )
                out.append(f'graceful_search_request_seconds_sum{{route="{r}"}} {self.sums[r]:.6f}')
                out.append(f'graceful_search_request_seconds_count{{route="{r}"}} {self.counts[r]}')
            head("graceful_search_answers_total", "counter", "searches answered, by champion")
            for g, n in sorted(self.champion_answers.items()):
                out.append(f'graceful_search_answers_total{{champion="{g}"}} {n}')
        s = state.searcher
        head("graceful_search_champion_generation", "gauge", "the champion queries are embedded by")
        out.append(f"graceful_search_champion_generation {-1 if s is None else s.champion}")
        head("graceful_search_state_version", "gauge", "served state, bumped at every swap")
        out.append(f"graceful_search_state_version {state.version}")
        head("graceful_search_state_swaps_total", "counter", "swaps of the served state")
        out.append(f"graceful_search_state_swaps_total {state.swaps}")
        head("graceful_search_collection_items", "gauge", "served items by embedding generation")
        for g, n in sorted(() if s is None else s.counts.items()):
            out.append(f'graceful_search_collection_items{{generation="{g}"}} {n}')
        return "\n".join(out) + "\n"


def _route(path: str) -> str:
    for prefix in ("/items/", "/thumbnails/"):
        if path.startswith(prefix):
            return prefix.rstrip("/")
    known = ("/", "/search", "/state", "/healthz", "/metrics", "/docs", "/openapi.json")
    return path if path in known else "other"


# -- the app ----------------------------------------------------------------------------
def create_app(token: str | None = None, poll_seconds: float = POLL_SECONDS):
    """The FastAPI app over the environment's lineage."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
    from starlette.exceptions import HTTPException

    state = ServedState(poll_seconds)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app):
        await run_in_threadpool(state.start)
        yield
        state.stop()

    app = FastAPI(
        title="graceful search",
        summary="Nearest collection items by key, image or vector, embedded by the champion",
        lifespan=lifespan,
    )

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message, "status": status}, status_code=status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        start = time.perf_counter()
        path, length = request.url.path, request.headers.get("content-length")
        if token and path != "/healthz" and not _authorised(request, token):
            response = error(401, f"missing or wrong API token ({TOKEN_ENV})")
        elif length and length.isdigit() and int(length) > max(MAX_BODY_BYTES, DRAIN_BYTES):
            response = error(
                413, f"the request is {int(length):,} bytes; at most {MAX_BODY_BYTES:,}"
            )
        else:
            try:
                response = await call_next(request)
            except Exception as exc:  # a fault of ours: JSON, counted, logged
                log.exception("search service error")
                response = error(500, f"internal error: {type(exc).__name__}: {exc}")
        metrics.observe(
            request.method, _route(path), response.status_code, time.perf_counter() - start
        )
        return response

    @app.exception_handler(BadQuery)
    async def bad_query(_: Request, exc: BadQuery):
        status = 404 if isinstance(exc, UnknownKey) else 413 if isinstance(exc, TooLarge) else 400
        return error(status, str(exc))

    async def unavailable(_: Request, exc: Exception):  # not ready yet, or a store failing
        return error(503, str(exc))

    app.add_exception_handler(NotReady, unavailable)
    app.add_exception_handler(StoreError, unavailable)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return error(400, problems or "invalid request")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        """Liveness and readiness (no token needed)."""
        s = state.searcher
        return {
            "status": "ok" if s is not None else "not ready",
            "ready": s is not None,
            "champion": None if s is None else s.champion,
            "problem": None if s is not None else state.problem,
        }

    @app.get("/state")
    def served() -> dict[str, Any]:
        """The champion and the mix of generations in the served collection."""
        from workers.data.datasets import MAX_IMAGE_PIXELS

        s, version = state.current()
        return {
            "champion": s.champion,
            "version": version,
            "items": s.index.ntotal,
            "by_generation": {str(g): n for g, n in s.counts.items()},
            "collection": s.dataset,
            "index": s.index.kind.value,
            "max_k": MAX_K,
            "max_body_bytes": MAX_BODY_BYTES,
            "max_image_pixels": MAX_IMAGE_PIXELS,
        }

    @app.post("/search")
    async def search(request: Request) -> dict[str, Any]:
        """Nearest collection items. JSON ``{"key": KEY, "k": 5}`` or ``{"vector": [...],
        "k": 5}`` (optional ``"label"``), or a multipart upload: field ``file``, form
        fields ``k`` and ``label``. Answers ``{"champion": g, "results": [{"key",
        "score", "generation", "label"}]}``."""
        s, version = state.current()
        body = await _read_body(request, MAX_BODY_BYTES)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            request._body = body  # the form parser reads the body already read (and limited)
            try:
                form = await request.form(max_files=1, max_fields=8)
            except Exception as exc:
                raise BadQuery(f"cannot parse the multipart form: {exc}") from None
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise BadQuery("the multipart form has no file field 'file'")
            data = await upload.read()
            name = upload.filename or "upload"
            k, label = form.get("k", 5), form.get("label")
            query = await run_in_threadpool(s.image_query, data, name)
            what: dict[str, Any] = {"file": name}
        else:
            if not body:
                raise BadQuery('the request body is empty: send JSON {"key": ...} or a file')
            try:
                payload = json.loads(body)
            except (ValueError, UnicodeDecodeError) as exc:
                raise BadQuery(f"the body is not JSON: {exc}") from None
            if not isinstance(payload, dict):
                raise BadQuery('the body must be a JSON object: {"key": ...} or {"vector": ...}')
            unknown = set(payload) - {"key", "vector", "k", "label"}
            if unknown:
                raise BadQuery(f"unknown field(s) {sorted(unknown)}: use key, vector, k, label")
            if ("key" in payload) == ("vector" in payload):
                raise BadQuery('give exactly one of "key" or "vector"')
            k, label = payload.get("k", 5), payload.get("label")
            if "key" in payload:
                if not isinstance(payload["key"], str | int):
                    raise BadQuery("the key must be a string")
                query, _ = await run_in_threadpool(s.key_query, str(payload["key"]))
                what = {"key": str(payload["key"])}
            else:
                query = s.vector_query(payload["vector"])
                what = {"vector": len(payload["vector"])}
        k = check_k(k)
        wanted = None if label in (None, "") else _label_row(s, label)
        hits = await run_in_threadpool(_nearest, s, query, k, wanted)
        metrics.answered(s.champion)
        return {"champion": s.champion, "state": version, "query": what, "results": hits}

    @app.get("/items/{key:path}")
    def item(key: str) -> dict[str, Any]:
        """One collection item: its key, id, label and the generation that embedded it."""
        row = _row(state.current()[0], key)
        return {"key": key, "item_id": row["item_id"]} | row | {"thumbnail": f"/thumbnails/{key}"}

    @app.get("/thumbnails/{key:path}")
    def thumbnail(key: str):
        """A small PNG of a collection item, made from the collection's source."""
        s, _ = state.current()
        png = _thumbnail(s, _row(s, key)["key"])
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=60"})

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus():
        """Prometheus text: requests, latency, errors, champion, items by generation."""
        return PlainTextResponse(
            metrics.text(state), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(PAGE, media_type="text/html")

    return app


def _authorised(request, token: str) -> bool:
    given = request.headers.get("authorization", "")
    given = given[7:] if given.lower().startswith("bearer ") else ""
    given = given or request.query_params.get("token", "") or request.cookies.get("token", "")
    return hmac.compare_digest(given.encode(), token.encode())


async def _read_body(request, limit: int) -> bytes:
    """The body, refused past ``limit`` bytes whatever the headers said."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > max(limit, DRAIN_BYTES):
            break
    if size > limit:
        chunks.clear()
        raise TooLarge(f"the request body is {size:,} bytes or more; at most {limit:,}")
    return b"".join(chunks)


def _row(s: Searcher, key: str) -> dict[str, Any]:
    row = s.row(key)
    if row is None:
        raise UnknownKey(f"unknown key {key!r}: the collection ({s.dataset}) does not hold it")
    return row


def _label_row(s: Searcher, label: Any) -> int:
    """A label filter: a head row, or a class name of the lineage's vocabulary."""
    if isinstance(label, int) or (isinstance(label, str) and label.lstrip("-").isdigit()):
        return int(label)
    names = s.lineage.vocabulary()
    if label not in names:
        raise BadQuery(f"unknown label {label!r}: the lineage's classes are {sorted(names)[:20]}")
    return int(names[label])


def _nearest(s: Searcher, query: np.ndarray, k: int, label: int | None) -> list[dict[str, Any]]:
    """The k nearest items (with ``label`` only: searched wider until k are found)."""
    width = k
    while True:
        hits = [h for h in s.nearest(query, width) if label is None or h["label"] == label][:k]
        if label is None or len(hits) == k or width >= s.index.ntotal:
            break
        width = min(s.index.ntotal, width * 8)
    return [{f: h[f] for f in ("key", "score", "generation", "label")} for h in hits]


def _thumbnail(s: Searcher, key: str) -> bytes:
    """An image file of the collection: read inside its folder only (the key is checked
    and must be the collection's); other sources: the item's model input as a picture."""
    from workers.collection.items import CollectionError, parse_collection_spec
    from workers.data.datasets import DatasetError, array_png, thumbnail_png

    kind, where = parse_collection_spec(s.dataset)
    try:
        if kind in ("images", "imagefolder") and where:
            root = Path(where).resolve()
            path = (root / key).resolve()
            if not path.is_relative_to(root):
                raise BadQuery(f"key {key!r} leaves the collection's folder")
            return thumbnail_png(path, key)
        if len(s.input_shape) != 3:
            raise UnknownKey(f"item {key!r} is a feature vector: no picture to show")
        return array_png(s._source().take_keys([key])[0])
    except (DatasetError, CollectionError, OSError) as exc:
        raise StoreError(f"cannot read item {key!r} from {s.dataset}: {exc}") from None


def server(host: str, port: int, poll_seconds: float = POLL_SECONDS, log_level: str = "warning"):
    """A uvicorn server of the app (refuses an open bind without a token)."""
    import uvicorn

    token = os.environ.get(TOKEN_ENV) or None
    if not is_loopback(host) and not token:
        raise BadQuery(
            f"refusing to listen on {host} (not loopback) without an API token: set "
            f"{TOKEN_ENV}, or bind 127.0.0.1"
        )
    app = create_app(token=token, poll_seconds=poll_seconds)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False)
    return uvicorn.Server(config)


def serve_in_thread(host: str, port: int) -> threading.Thread:
    """The service on a daemon thread (``graceful serve --search`` beside the deployments;
    uvicorn installs no signal handlers off the main thread)."""
    thread = threading.Thread(target=server(host, port).run, name="graceful-search", daemon=True)
    thread.start()
    return thread

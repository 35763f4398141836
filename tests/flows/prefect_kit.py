"""Calls to the session's Prefect server as the UI makes them."""

from __future__ import annotations

import time
from typing import Any

import httpx


def call(method: str, url: str, **kw: Any) -> Any:
    """One API call, its JSON body. The session's server is busy on 2 cores (SQLite under
    every test's writers) and can answer a 5xx or time out once: the call is made again,
    as a person clicks again, for up to a minute. A 4xx is an answer: it fails with its
    body."""
    deadline = time.monotonic() + 60
    while True:
        try:
            r = httpx.request(method, url, timeout=30, **kw)
        except httpx.TransportError as exc:
            failure = repr(exc)
        else:
            if r.status_code < 500:
                assert r.is_success, f"{method} {url}: {r.status_code} {r.text[:2000]}"
                return r.json() if r.content else None
            failure = f"{r.status_code} {r.text[:2000]}"
        assert time.monotonic() < deadline, f"{method} {url}: {failure}"
        time.sleep(2.0)

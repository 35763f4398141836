"""Calls to the session's Prefect server as the UI makes them."""

from __future__ import annotations

import os
import time
from pathlib import Path
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
            failure = f"{r.status_code} {r.text[:2000]}"
            if r.status_code < 500:
                assert r.is_success, f"{method} {url}: {failure}{_server_log()}"
                return r.json() if r.content else None
        assert time.monotonic() < deadline, f"{method} {url}: {failure}{_server_log()}"
        time.sleep(2.0)


def _server_log() -> str:
    """The end of the session's Prefect server log (tests/conftest.py writes it)."""
    path = os.environ.get("GRACEFUL_TEST_PREFECT_LOG")
    if not path or not Path(path).exists():
        return ""
    return "\nthe server's log ends:\n" + Path(path).read_text(errors="replace")[-3000:]

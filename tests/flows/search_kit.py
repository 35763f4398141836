"""The search service in tests: a small image collection built in-process, and
`graceful search-server` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


# -- the search service: a small image collection and `graceful search-server` ---------------
def build_album(lin, root: Path, gen, start: int, stop: int, part_rows: int = 32) -> None:
    """PNGs ``start..stop`` under ``root`` appended to the collection ``images:root``,
    embedded by ``gen`` in this process (what `graceful index` commits, without Ray)."""
    import numpy as np
    from sources.data import write_pngs

    from store.collection import UNLABELLED, Collection, CollectionRows
    from workers.collection.items import open_reader
    from workers.learning.embed import forward
    from workers.learning.models import load_model

    write_pngs(root, start, stop)
    keys = [f"shelf-{i % 3}/{i:04d}.png" for i in range(start, stop)]
    model = load_model(gen.checkpoint_path, gen.checkpoint_sha256)
    x = open_reader(f"images:{root}", tuple(model.config["input_shape"])).take_keys(keys)
    out = forward(model, x)
    gallery = Collection(lin)
    for a in range(0, len(keys), part_rows):
        b = min(len(keys), a + part_rows)
        ids = np.arange(gallery.next_item_id(), gallery.next_item_id() + b - a)
        rows = CollectionRows(
            item_id=ids,
            label=np.full(b - a, UNLABELLED),
            generation=np.full(b - a, gen.id, np.int32),
            margin=out.margin[a:b],
            embedding=out.embedding[a:b],
            key=np.asarray(keys[a:b], dtype=object),
        )
        gallery.append(f"images:{root}", rows)


class SearchServer:
    """`graceful search-server` in a subprocess on a free loopback port."""

    def __init__(self, home: Path, *args: str, env: dict | None = None) -> None:
        import socket
        import time
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ, GRACEFUL_HOME=str(home), **(env or {}))
        self.env.pop("GRACEFUL_DB_URL", None)
        self.env.pop("GRACEFUL_SEARCH_URL", None)
        cmd = [sys.executable, "-m", "flows.cli", "search-server", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*cmd, "--poll-seconds", "0.2", *args],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"search-server exited: {self.proc.stdout.read()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("search-server did not start in 120 s") from None
                time.sleep(0.3)

    def request(self, method: str, path: str, body=None, headers=None, form=None):
        """(status, parsed JSON or bytes) of one request; never raises on HTTP errors."""
        import json
        import urllib.error
        import urllib.request
        import uuid

        headers = dict(headers or {})
        data = None
        if form is not None:  # {"name": value | (filename, bytes)}
            boundary = uuid.uuid4().hex
            chunks = []
            for name, value in form.items():
                head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
                if isinstance(value, tuple):
                    chunks += [f'{head}; filename="{value[0]}"\r\n\r\n'.encode(), value[1]]
                else:
                    chunks.append(f"{head}\r\n\r\n{value}".encode())
                chunks.append(b"\r\n")
            data = b"".join([*chunks, f"--{boundary}--\r\n".encode()])
            headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        elif body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, raw, kind = r.status, r.read(), r.headers.get("content-type", "")
        except urllib.error.HTTPError as exc:
            status, raw, kind = exc.code, exc.read(), exc.headers.get("content-type", "")
        return status, (json.loads(raw) if kind.startswith("application/json") else raw)

    def search(self, **body):
        return self.request("POST", "/search", body)

    def stop(self) -> str:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.stdout.read()

"""`graceful search-server` as users' applications call it: the real service (uvicorn in a
subprocess on a loopback port) searched by upload, key and vector; bad input as 4xx JSON;
the token; new parts and a new champion picked up without a restart while searches run;
`graceful search` through the service."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from search_kit import ROOT, build_album
from sources.data import champion

from store.collection import Collection, CollectionRows
from store.lineage import Lineage


@contextmanager
def searching(ask, clients: int):
    """``clients`` threads calling ``ask(i)`` -> (status, answer) until the block ends;
    yields (answers as (time, champion, state, results), failures)."""
    answers: list[tuple[float, int, int, list]] = []
    failures: list = []
    stop = threading.Event()

    def client(i: int) -> None:
        while not stop.is_set():
            status, ans = ask(i)
            if status != 200:
                failures.append((status, ans))
            else:
                answers.append((time.monotonic(), ans["champion"], ans["state"], ans["results"]))
            time.sleep(0.02)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    try:
        yield answers, failures
    finally:
        stop.set()
        for t in threads:
            t.join()


def by_state(answers: list) -> list[int]:
    """Champions in the order of the served state's version. Not completion time: a slow
    upload answered from the old state can finish after a key search answered from the
    new one (CI saw it), and that is correct serving."""
    return [c for _, c, _, _ in sorted(answers, key=lambda a: (a[2], a[0]))]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header says ``width`` x ``height`` (no pixel data): a decompression bomb
    as far as the header tells."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_search_by_upload_key_and_vector_and_every_bad_input(
    album, home: Path, search_server
) -> None:
    lin, root, gen = album
    srv = search_server(home)
    status, health = srv.request("GET", "/healthz")
    assert status == 200 and health["ready"] and health["champion"] == gen.id

    # upload: a collection file finds itself first
    probe = "shelf-1/0013.png"
    status, ans = srv.request(
        "POST", "/search", form={"file": ("q.png", (root / probe).read_bytes()), "k": "3"}
    )
    assert status == 200, ans
    assert ans["champion"] == gen.id and len(ans["results"]) == 3
    assert ans["results"][0]["key"] == probe
    assert set(ans["results"][0]) == {"key", "score", "generation", "label"}
    assert ans["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert ans["results"][0]["generation"] == gen.id and ans["results"][0]["label"] is None
    # key, and the vector of the item it found
    status, by_key = srv.search(key=probe, k=3)
    assert status == 200 and [h["key"] for h in by_key["results"]] == [
        h["key"] for h in ans["results"]
    ]
    emb = Collection(lin).read_all()
    vec = emb.embedding[list(emb.key).index(probe)].tolist()
    status, by_vec = srv.search(vector=vec, k=1)
    assert status == 200 and by_vec["results"][0]["key"] == probe
    # items and thumbnails
    status, item = srv.request("GET", f"/items/{probe}")
    assert status == 200 and item["key"] == probe and item["generation"] == gen.id
    status, png = srv.request("GET", f"/thumbnails/{probe}")
    assert status == 200 and png.startswith(b"\x89PNG")
    status, st = srv.request("GET", "/state")
    assert st["champion"] == gen.id and st["by_generation"] == {str(gen.id): 96}

    # bad input: a 4xx JSON error naming the problem, never a 500
    big = png_header_only(20_000, 20_000)
    cases = [
        (
            srv.request("POST", "/search", form={"file": ("a.txt", b"not an image")}),
            400,
            "cannot decode",
        ),
        (srv.request("POST", "/search", form={"file": ("big.png", big)}), 400, "89,478,485 pixels"),
        (srv.request("POST", "/search", form={"file": ("e.png", b"")}), 400, "empty"),
        (srv.request("POST", "/search", form={"k": "3"}), 400, "no file field"),
        (srv.request("POST", "/search", b""), 400, "body is empty"),
        (srv.request("POST", "/search", b"x" * (21 * 1024 * 1024)), 413, "20,971,520"),
        (srv.request("POST", "/search", b"{nope"), 400, "not JSON"),
        (srv.search(key="nope.png"), 404, "unknown key 'nope.png'"),
        (srv.search(key="../../etc/passwd"), 400, "not a relative path"),
        (srv.search(key="/etc/passwd"), 400, "not a relative path"),
        (srv.search(key=probe, k=0), 400, "k must be between 1 and 100"),
        (srv.search(key=probe, k=101), 400, "k must be between 1 and 100"),
        (srv.search(key=probe, k="many"), 400, "k must be an integer"),
        (srv.search(vector=[0.1] * 3), 400, "dimension 8"),
        (srv.request("POST", "/search", b'{"vector": [NaN, 1, 1, 1, 1, 1, 1, 1]}'), 400, "NaN"),
        (srv.search(key=probe, vector=vec), 400, "exactly one"),
        (srv.search(query=probe), 400, "unknown field"),
        (srv.request("GET", "/items/nope.png"), 404, "unknown key"),
        (srv.request("GET", "/items/..%2F..%2Fetc%2Fpasswd"), 400, "not a relative path"),
        (srv.request("GET", "/thumbnails/%2Fetc%2Fpasswd"), 400, "not a relative path"),
        (srv.request("GET", "/no/such/page"), 404, "Not Found"),
    ]
    for (status, body), want, text in cases:
        assert status == want and text in body["error"], (want, text, status, body)
        assert body["status"] == want
    # a key equal to a file outside the collection is never read: unknown to the index
    status, body = srv.request("GET", "/thumbnails/shelf-1/../../../etc/hostname")
    assert status in (400, 404)

    status, text = srv.request("GET", "/metrics")
    text = text.decode()
    assert 'graceful_search_requests_total{method="POST",route="/search",status="200"} 3' in text
    assert f"graceful_search_champion_generation {gen.id}" in text
    assert f'graceful_search_collection_items{{generation="{gen.id}"}} 96' in text
    assert 'graceful_search_request_seconds_bucket{route="/search",le="+Inf"}' in text
    assert "graceful_search_errors_total" in text and 'status="500"' not in text

    # the page and the OpenAPI docs
    status, page = srv.request("GET", "/")
    assert status == 200 and b"graceful search" in page
    status, spec = srv.request("GET", "/openapi.json")
    assert status == 200 and "/search" in spec["paths"]

    # `graceful search` through the service (GRACEFUL_SEARCH_URL)
    env = dict(srv.env, GRACEFUL_SEARCH_URL=srv.url)
    cmd = [sys.executable, "-m", "flows.cli", "search"]
    done = subprocess.run(
        [*cmd, "--file", str(root / probe), "--k", "2", "--json"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["key"] == probe
    done = subprocess.run(
        [*cmd, "--item", "nope.png"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        done.returncode == 2 and done.stderr.startswith("error:") and "unknown key" in done.stderr
    )


def test_no_champion_is_503_then_the_first_one_is_picked_up(
    home: Path, tmp_path: Path, search_server
) -> None:
    lin = Lineage()
    srv = search_server(home)
    status, body = srv.search(key="x.png")
    assert status == 503 and "no champion generation yet" in body["error"]
    status, health = srv.request("GET", "/healthz")
    assert status == 200 and not health["ready"]
    gen = champion(lin, 0)
    build_album(lin, tmp_path / "album", gen, 0, 10)
    deadline = time.monotonic() + 60
    while srv.search(key="shelf-0/0000.png")[0] != 200:
        assert time.monotonic() < deadline, "the new champion was not picked up"
        time.sleep(0.2)


def test_a_server_on_a_home_without_a_lineage_waits_and_creates_nothing(
    tmp_path: Path, search_server, monkeypatch
) -> None:
    """Reading never writes: no home, no database until a cycle makes them; then the
    first champion is served without a restart."""
    home = tmp_path / "not-yet"
    srv = search_server(home)
    status, body = srv.search(key="x.png")
    assert status == 503 and "no champion generation yet" in body["error"]
    assert "no lineage at GRACEFUL_HOME" in body["error"]
    time.sleep(1.0)  # the watcher polls twice a second: still nothing created
    assert not home.exists()
    monkeypatch.setenv("GRACEFUL_HOME", str(home))
    gen = champion(Lineage(), 0)
    build_album(Lineage(), tmp_path / "album", gen, 0, 10)
    deadline = time.monotonic() + 60
    while srv.search(key="shelf-0/0000.png")[0] != 200:
        assert time.monotonic() < deadline, "the lineage made later was not picked up"
        time.sleep(0.2)


def test_an_open_bind_needs_a_token_and_every_request_but_health_checks_it(
    album, home: Path, search_server
) -> None:
    env = {"GRACEFUL_HOME": str(home)}
    refused = subprocess.run(
        [sys.executable, "-m", "flows.cli", "search-server", "--host", "0.0.0.0"],
        env={**srv_env(env), "GRACEFUL_SEARCH_TOKEN": ""},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and "without an API token" in refused.stderr

    srv = search_server(home, env={"GRACEFUL_SEARCH_TOKEN": "s3cret"})
    assert srv.request("GET", "/healthz")[0] == 200
    status, body = srv.search(key="shelf-0/0000.png")
    assert status == 401 and "GRACEFUL_SEARCH_TOKEN" in body["error"]
    assert srv.request("GET", "/metrics")[0] == 401
    ok = {"Authorization": "Bearer s3cret"}
    status, _ = srv.request("POST", "/search", {"key": "shelf-0/0000.png"}, headers=ok)
    assert status == 200
    assert srv.request("GET", "/state?token=s3cret")[0] == 200
    assert srv.request("GET", "/state?token=wrong")[0] == 401


def srv_env(extra: dict) -> dict:
    import os

    env = dict(os.environ, **extra)
    env.pop("GRACEFUL_DB_URL", None)
    return env


def test_new_parts_and_a_new_champion_are_served_without_a_restart_or_an_error(
    album, home: Path, tmp_path: Path, search_server
) -> None:
    """Searches run while parts are added, a new champion is promoted and parts are
    re-embedded by it: every answer is whole (k distinct keys), none fails."""
    lin, root, g1 = album
    srv = search_server(home)
    probe = (root / "shelf-0/0000.png").read_bytes()
    form = {"file": ("q.png", probe), "k": "8"}
    ask = lambda _: srv.request("POST", "/search", form=form)  # noqa: E731
    with searching(ask, 3) as (answers, failures):
        time.sleep(1.0)
        build_album(lin, root, g1, 96, 160)  # indexing commits two more parts
        g2 = champion(lin, 1)  # a promotion
        time.sleep(1.0)
        gallery = Collection(lin)  # a backfill: part by part, re-embedded by generation 2
        from workers.collection.items import open_reader
        from workers.learning.embed import forward
        from workers.learning.models import load_model

        model = load_model(g2.checkpoint_path, g2.checkpoint_sha256)
        reader = open_reader(f"images:{root}", (1, 8, 8))
        for part in gallery.manifest():
            rows = gallery.read_rows(part.name)
            out = forward(model, reader.take_keys(list(rows.key)))
            new = CollectionRows(
                item_id=rows.item_id,
                label=rows.label,
                generation=np.full(len(rows), g2.id, np.int32),
                margin=out.margin,
                embedding=out.embedding,
                key=rows.key,
                fingerprint=rows.fingerprint,
            )
            gallery.rewrite_part(part.name, new)
            time.sleep(0.3)
        deadline = time.monotonic() + 30
        while srv.request("GET", "/state")[1]["by_generation"] != {str(g2.id): 160}:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(0.5)
    assert not failures, failures[:3]
    assert len(answers) > 20
    for _, _, _, results in answers:
        keys = [h["key"] for h in results]
        assert len(keys) == 8 == len(set(keys))  # nothing missing, nothing doubled
    champions = by_state(answers)
    assert champions[0] == g1.id and champions[-1] == g2.id
    assert champions == sorted(champions)  # swapped once, never back
    # answers of one state agree on which generation embedded each key
    seen: dict[tuple[int, str], int] = {}
    for _, _, state, results in answers:
        for h in results:
            assert seen.setdefault((state, h["key"]), h["generation"]) == h["generation"]
    last = max(answers, key=lambda a: (a[2], a[0]))[3]
    assert {h["generation"] for h in last} == {g2.id}
    assert last[0]["key"] == "shelf-0/0000.png"
    status, text = srv.request("GET", "/metrics")
    assert "graceful_search_state_swaps_total" in text.decode()
    assert 'status="500"' not in text.decode()


@pytest.mark.slow
def test_searches_answer_through_a_real_cycle_that_promotes_and_backfills(
    home: Path, cli, search_server
) -> None:
    """`graceful run` then `graceful cycle --no-gate --force` (a promotion and its backfill)
    while clients search by key and upload: zero failed requests, and the swap."""
    c = cli(home)
    first = c.start("run", "--dataset", "digits", "--generations", "1", "--epochs", "2")
    _, err = first.communicate(timeout=900)
    assert first.returncode == 0, err
    srv = search_server(home)
    from workers.data.datasets import load_dataset

    x = load_dataset("digits").x_test[1][0]
    buf = io.BytesIO()
    from PIL import Image

    Image.fromarray((x * 255).round().astype(np.uint8), mode="L").save(buf, format="PNG")

    def ask(i: int):
        if i % 2:
            return srv.search(key="1", k=5)
        return srv.request("POST", "/search", form={"file": ("q.png", buf.getvalue()), "k": "5"})

    with searching(ask, 2) as (answers, failures):
        cycle = c.start("cycle", "--epochs", "2", "--no-gate", "--force")
        _, err = cycle.communicate(timeout=900)
        assert cycle.returncode == 0, err
        time.sleep(2.0)
    assert not failures, failures[:3]
    champions = by_state(answers)
    assert champions[0] == 1 and champions[-1] == 2 and champions == sorted(champions)
    states = {s for _, _, s, _ in answers}
    assert len(states) >= 2  # the promotion and the backfill's parts were picked up
    for _, _, _, results in answers:
        keys = [h["key"] for h in results]
        assert len(keys) == 5 == len(set(keys))
    counts = Lineage().gallery_counts()
    status, st = srv.request("GET", "/state")
    assert {int(g): n for g, n in st["by_generation"].items()} == counts

"""The search page in headless Chromium (Debian `chromium`), driven over the DevTools
protocol: upload a photo, see the results as thumbnails with scores and generations, the
champion and the mix of generations at the top; a screenshot is saved."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """Headless Chromium on a loopback DevTools port; one page, commands in order."""

    def __init__(self, tmp: Path) -> None:
        from websockets.sync.client import connect

        self.proc = subprocess.Popen(
            [
                CHROMIUM,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={tmp / 'chromium'}",
                "--window-size=1100,800",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        port_file = tmp / "chromium" / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.monotonic() < deadline, "chromium did not start"
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.loads(r.read()) if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None)
        self.next_id = 0

    def send(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return msg["result"]

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while not self.js(expression):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.2)

    def close(self) -> None:
        self.ws.close()
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=20)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed")
def test_the_page_finds_an_uploaded_photo_and_shows_thumbnails(
    album, home: Path, tmp_path: Path, search_server
) -> None:
    lin, root, gen = album
    srv = search_server(home)
    browser = Browser(tmp_path)
    try:
        browser.send("Page.enable")
        browser.send("Page.navigate", url=srv.url + "/")
        browser.wait_for("document.getElementById('champion').textContent !== '?'")
        assert browser.js("document.getElementById('champion').textContent") == str(gen.id)
        assert "96 (100.0%)" in browser.js("document.getElementById('mix').textContent")
        # upload a photo through the file input (as a user's pick would)
        doc = browser.send("DOM.getDocument")
        node = browser.send("DOM.querySelector", nodeId=doc["root"]["nodeId"], selector="#file")
        probe = root / "shelf-2/0005.png"
        browser.send("DOM.setFileInputFiles", nodeId=node["nodeId"], files=[str(probe)])
        browser.wait_for("document.querySelectorAll('figure.hit').length > 0")
        hits = browser.js(
            "[...document.querySelectorAll('figure.hit')].map(f => ({"
            "key: f.querySelector('.key').textContent,"
            "score: +f.querySelector('.score').textContent,"
            "generation: +f.querySelector('.generation').textContent,"
            "loaded: f.querySelector('img').complete && f.querySelector('img').naturalWidth > 0"
            "}))"
        )
        assert hits[0]["key"] == "shelf-2/0005.png" and hits[0]["score"] == pytest.approx(
            1, abs=1e-3
        )
        assert all(h["generation"] == gen.id for h in hits)
        browser.wait_for(
            "[...document.querySelectorAll('figure.hit img')]"
            ".every(i => i.complete && i.naturalWidth > 0)"
        )
        status = browser.js("document.getElementById('status').textContent")
        assert f"embedded by generation {gen.id}" in status
        # a key typed in
        browser.js(
            "document.getElementById('key').value = 'shelf-0/0003.png';"
            "document.querySelector('#by-key button').click()"
        )
        browser.wait_for(
            "document.querySelector('figure.hit .key')?.textContent === 'shelf-0/0003.png'"
        )
        shot = browser.send("Page.captureScreenshot", format="png")
        shots = Path(os.environ.get("GRACEFUL_SCREENSHOTS", tmp_path))  # where to keep it
        shots.mkdir(parents=True, exist_ok=True)
        (shots / "search_page.png").write_bytes(base64.b64decode(shot["data"]))
        assert (shots / "search_page.png").stat().st_size > 1000
    finally:
        browser.close()

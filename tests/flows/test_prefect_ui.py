"""The Prefect UI on a port other than 4200, as the README's recipe starts it: the UI's
settings point it at this server's API (``PREFECT_UI_API_URL``; without it the UI asks
127.0.0.1:4200 and stays blank), and headless Chromium renders the flow-runs page with
the cycle's run, named for its generation."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != 4200:
            return port


def _chromium(url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="graceful-chromium-")
    try:
        return subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--window-size=1400,900",
                "--virtual-time-budget=20000",  # the UI's fetches settle within it
                *args,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (Debian: chromium)")
def test_the_ui_on_another_port_shows_the_cycles_run(tmp_path: Path, stop_group) -> None:
    from PIL import Image

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    api = f"{base}/api"
    env = dict(
        os.environ,
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_API_URL=api,  # the recipe: the UI talks to this port, not 4200
    )
    for name in ("PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL", "GRACEFUL_DB_URL"):
        env.pop(name, None)
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
        + ["--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, "the Prefect server exited"
            assert time.monotonic() < deadline, "the Prefect server did not start"
            time.sleep(0.5)
        # what the UI fetches first: the API it is to talk to
        settings = httpx.get(f"{base}/ui-settings", timeout=10).json()
        assert settings["api_url"] == api, settings

        cycle = subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", "--dataset", "digits"]
            + ["--generations", "1", "--epochs", "2", "--no-gate"],
            cwd=ROOT,
            env=dict(env, PREFECT_API_URL=api, GRACEFUL_HOME=str(tmp_path / "home")),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert cycle.returncode == 0, cycle.stderr[-3000:]

        png = tmp_path / "flow-runs.png"
        shot = _chromium(f"{base}/runs", f"--screenshot={png}")
        assert png.exists() and png.stat().st_size > 10_000, shot.stderr[-2000:]
        with Image.open(png) as img:
            assert img.size == (1400, 900)
            colours = img.convert("RGB").getcolors(maxcolors=1 << 20) or []
        assert len(colours) > 50, f"{png} looks blank ({len(colours)} colours)"

        words = ""
        for _ in range(3):  # on a loaded machine the list's rows can render after the count
            dom = _chromium(f"{base}/runs", "--dump-dom").stdout
            words = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))
            if "generation 1" in words:
                break
        # the run list came from this server's API: the flow, the run's name, its state
        assert "update-cycle" in words and "generation 1" in words, words[:3000]
        assert "Completed" in words
    finally:
        stop_group(server, timeout=30)

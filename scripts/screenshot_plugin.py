"""A screenshot of the learnscope tab of TensorBoard, as a user sees it.

    python scripts/screenshot_plugin.py RUNDIR OUT.png [--filter REGEX] [--width 1500]

Starts ``python -m tensorboard.main --logdir RUNDIR`` on a free loopback port
(127.0.0.1 only, TensorBoard's default settings), opens ``#learnscope`` in headless
Chromium driven by Playwright (the system browser: ``/usr/bin/chromium`` or
``--chromium PATH``; Playwright's own browser download is not needed), waits until the
tab has drawn, makes the window as tall as the tab's content so nothing is scrolled
away or hidden, and saves a full-page PNG. ``--filter`` types into the tab's filter
box first, as a user would. Then it stops the browser and the server.

The same helpers (:func:`tensorboard_server`, :func:`open_learnscope_tab`) serve
tests/test_plugin_browser.py.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
SRC = Path(__file__).resolve().parent.parent / "src"


def find_chromium(explicit: str | None = None) -> str | None:
    """The Chromium/Chrome binary: ``explicit``, /usr/bin/chromium, or one on PATH."""
    if explicit:
        return explicit
    if Path("/usr/bin/chromium").exists():
        return "/usr/bin/chromium"
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _plugin_environment(scratch: Path) -> dict[str, str]:
    """The server's environment. When the installed learnscope predates the plugin's
    entry point (a checkout installed elsewhere), a scratch ``.dist-info`` declares it,
    so TensorBoard still finds the tab the way it finds any pip-installed plugin."""
    env = dict(os.environ)
    paths = [str(SRC)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    names = {ep.name for ep in importlib.metadata.entry_points(group="tensorboard_plugins")}
    if "learnscope" not in names:
        info = scratch / "learnscope_tab_dev-0.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: learnscope-tab-dev\nVersion: 0\n")
        (info / "entry_points.txt").write_text(
            "[tensorboard_plugins]\nlearnscope = learnscope.tensorboard_plugin:LearnscopePlugin\n"
        )
        paths.insert(0, str(scratch))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


@contextlib.contextmanager
def tensorboard_server(logdir: str | Path, *extra: str, timeout: float = 120.0) -> Iterator[str]:
    """``python -m tensorboard.main --logdir LOGDIR`` on 127.0.0.1:<free port>; yields its
    URL once the learnscope tab is enabled for the log directory."""
    port = free_port()
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1"]
        command += ["--port", str(port), *extra]
        log = open(Path(scratch) / "tensorboard.log", "w+b")  # noqa: SIM115 - read back on failure
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_plugin_environment(Path(scratch)))
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_for_tab(url, server, timeout)
            yield url
        except Exception:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-4000:])
            raise
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
            log.close()


def _wait_for_tab(url: str, server: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"tensorboard exited with code {server.returncode}")
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(f"{url}/data/plugins_listing", timeout=5) as response:
                listing = json.load(response)
            if listing.get("learnscope", {}).get("enabled"):
                return _wait_until_loaded(url, deadline)
        time.sleep(0.5)
    raise TimeoutError(f"the learnscope tab was not enabled at {url} within {timeout:.0f} s")


def _wait_until_loaded(url: str, deadline: float, settle: int = 3) -> None:
    """Wait until TensorBoard's loading has caught up: every run's last step unchanged
    over ``settle`` polls 2 s apart (TensorBoard reads event files in the background)."""
    seen, stable = None, 0
    while time.monotonic() < deadline and stable < settle:
        with urllib.request.urlopen(f"{url}/data/plugin/learnscope/runs", timeout=60) as response:
            steps = {run["name"]: run["max_step"] for run in json.load(response)["runs"]}
        stable = stable + 1 if steps == seen and steps else 0
        seen = steps
        time.sleep(2)


@contextlib.contextmanager
def chromium_page(chromium: str, width: int = 1500, height: int = 1000) -> Iterator[Any]:
    """A Playwright page in headless ``chromium`` (the system binary)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox", "--headless"]
        )
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def open_learnscope_tab(page: Any, url: str, timeout_ms: float = 120_000) -> Any:
    """Open ``url/#learnscope`` and return the tab's frame once it has drawn."""
    page.goto(f"{url}/#learnscope", timeout=timeout_ms)
    page.wait_for_selector("iframe", timeout=timeout_ms)
    frame = next(f for f in page.frames if "plugin_entry" in f.url)
    frame.wait_for_selector("body[data-ready='1']", timeout=timeout_ms)
    return frame


def screenshot(page: Any, frame: Any, out: str | Path) -> None:
    """Make the window as tall as the tab's content (nothing scrolled away), wait until
    every image has loaded and the height is stable, then save it."""
    viewport = page.viewport_size
    height = -1
    for _ in range(5):
        content = frame.evaluate("document.documentElement.scrollHeight")
        iframe_box = page.locator("iframe").bounding_box()
        chrome = iframe_box["y"] if iframe_box else 0  # TensorBoard's own bar above the tab
        if int(chrome + content + 16) == height:
            break
        height = int(chrome + content + 16)
        page.set_viewport_size({"width": viewport["width"], "height": height})
        page.wait_for_timeout(700)  # the iframe grows with the window; lazy images start loading
        frame.wait_for_function("[...document.images].every(i => i.complete)", timeout=60_000)
    page.screenshot(path=str(out), full_page=True)


def route_timings(frame: Any) -> list[str]:
    """The tab's requests as the browser saw them: route, bytes on the wire and decoded, ms."""
    entries = frame.evaluate(
        "performance.getEntriesByType('resource').filter(e => e.name.includes('/plugin/learnscope/'))"
        ".map(e => [e.name.split('/plugin/learnscope/')[1], e.transferSize, e.decodedBodySize, e.duration])"
    )
    return [
        f"{name[:60]}: {wire / 1e6:.3f} MB on the wire, {body / 1e6:.3f} MB JSON, {ms:.0f} ms"
        for name, wire, body, ms in entries
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rundir")
    parser.add_argument("out")
    parser.add_argument("--filter", default=None, help="type this into the tab's filter box first")
    parser.add_argument("--width", type=int, default=1500)
    parser.add_argument("--chromium", default=None)
    parser.add_argument(
        "--keep-all", action="store_true", help="start TensorBoard with --samples_per_plugin keeping every point"
    )
    args = parser.parse_args()
    chromium = find_chromium(args.chromium)
    if chromium is None:
        sys.exit("no Chromium found: apt-get install -y chromium, or pass --chromium PATH")
    extra = ["--samples_per_plugin", "scalars=0,images=0,learnscope=0"] if args.keep_all else []
    with tensorboard_server(args.rundir, *extra, timeout=600) as url, chromium_page(chromium, args.width) as page:
        frame = open_learnscope_tab(page, url)
        if args.filter:
            frame.fill("#ls-filter", args.filter)
            frame.wait_for_timeout(300)
        screenshot(page, frame, args.out)
        print("\n".join(route_timings(frame)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

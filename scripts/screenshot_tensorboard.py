"""Screenshots of the learnscope charts in a real TensorBoard.

    python scripts/screenshot_tensorboard.py LOGDIR OUT.png [--probe lca|nfa|both]

Starts ``tensorboard --logdir LOGDIR`` on a free loopback port (127.0.0.1 only),
drives headless Chromium to the *Custom Scalars* dashboard, keeps the learnscope
charts named in ``SHOTS`` (other categories and charts are hidden, nothing else is
changed: TensorBoard's default smoothing and outlier setting stay), opens each
chart's legend ("Matches"), waits until every kept chart has drawn its lines,
and saves one PNG per probe: ``OUT_lca.png`` and ``OUT_nfa.png`` (with a 256-colour
palette when Pillow is installed, to keep them small). Then it stops the browser
and the server.

Needs a Chromium or Chrome binary (``apt-get install chromium``; or ``--chromium
PATH``). The browser is driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``), so no driver or Python package beyond the standard
library is needed, and no debugging port is opened. Chromium runs with
``--no-sandbox`` (it usually runs as root in containers) and only ever loads the
local TensorBoard page.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome", "chrome")


@dataclass(frozen=True)
class Shot:
    """What one screenshot shows: ``(category title, chart title regex)`` pairs
    (a category not listed is hidden; charts without data are left out)."""

    sections: tuple[tuple[str, str], ...]


SHOTS = {
    "lca": Shot(
        (
            ("learnscope LCA", r"^(layer LCA per step|layer LCA cumulative|helped fraction per layer)"),
            (
                "learnscope LCA parts",
                r"^(parts cumulative, all layers|gradient part per layer, cum|momentum part per layer, cum)",
            ),
            (
                "learnscope LCA health",
                r"^(total LCA vs actual loss change|cumulative relative error|helped / hurt fraction)",
            ),
        )
    ),
    "nfa": Shot(
        (("learnscope NFA", r"(pearson vs rotation null|^excess_a1, all layers)"),),
    ),
}

# Runs in the page. Polymer elements keep their content in shadow roots, hence the
# recursive query. Returns the state of the kept charts and the rectangle to capture.
PREPARE_JS = r"""
(sections, redraw) => {
  const deepAll = (root, selector, found = []) => {  // light DOM and every shadow root below root
    for (const scope of root.shadowRoot ? [root, root.shadowRoot] : [root]) {
      scope.querySelectorAll(selector).forEach((e) => found.push(e));
      scope.querySelectorAll('*').forEach((e) => { if (e.shadowRoot) deepAll(e.shadowRoot, selector, found); });
    }
    return found;
  };
  const views = deepAll(document, 'tf-category-paginated-view');
  const wanted = new Map(sections);
  const names = views.map((v) => v.category && v.category.name);
  const missing = sections.map(([name]) => name).filter((name) => !names.includes(name));
  if (!views.length || missing.length) return {state: 'waiting', missing, names};
  let kept = 0, drawn = 0, left = Infinity, top = Infinity, right = -Infinity, bottom = -Infinity;
  for (const view of views) {
    const titles = wanted.get(view.category.name);
    view.style.display = titles === undefined ? 'none' : '';
    if (titles === undefined) continue;
    for (const card of deepAll(view, 'tf-custom-scalar-multi-line-chart-card')) {
      const keep = titles.includes(card.title);
      card.style.display = keep ? '' : 'none';
      if (!keep) continue;
      kept += 1;
      const toggle = card.shadowRoot.querySelector('.toggle-matches-button');
      if (!card._matchesListOpened && toggle) toggle.click();
      if (redraw) card.redraw();  // charts drawn before the layout changed keep their old size
      const loader = deepAll(card, 'tf-line-chart-data-loader')[0];
      const lines = deepAll(card, 'path.line').filter((p) => (p.getAttribute('d') || '').length > 20);
      if (card._matchesListOpened && loader && !loader.dataLoading && lines.length) drawn += 1;
    }
    // TensorBoard scrolls an inner pane, not the page: with it unscrolled these are page coordinates
    const r = view.getBoundingClientRect();
    left = Math.min(left, r.left); top = Math.min(top, r.top);
    right = Math.max(right, r.right); bottom = Math.max(bottom, r.bottom);
  }
  return {state: kept && drawn === kept ? 'ready' : 'drawing', kept, drawn, bottom,
          clip: {x: left, y: top, width: right - left, height: bottom - top, scale: 1}};
}
"""


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe: messages are
    JSON objects terminated by a NUL byte, written to the browser's fd 3 and read
    from its fd 4."""

    def __init__(self, binary: str, width: int, height: int) -> None:
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()

        def wire_pipes() -> None:  # in the child, before exec: its fds 3 and 4
            read_end, write_end = os.dup(to_browser_read), os.dup(from_browser_write)
            os.dup2(read_end, 3, inheritable=True)
            os.dup2(write_end, 4, inheritable=True)

        self._profile = tempfile.mkdtemp(prefix="learnscope-screenshot-")
        self._process = subprocess.Popen(
            [
                binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
                "--no-first-run", "--disable-extensions", "--disable-background-networking",
                "--remote-debugging-pipe", f"--user-data-dir={self._profile}", f"--window-size={width},{height}",
                "about:blank",
            ],
            preexec_fn=wire_pipes, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer = b""
        self._next_id = 0
        self._session: str | None = None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable")
        self.viewport(width, height)

    def call(self, method: str, **params):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self._session is not None and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:  # skip events until our reply
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error'].get('message', reply['error'])}")
                return reply["result"]

    def viewport(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def evaluate(self, function: str, *args):
        expression = f"({function})(...{json.dumps(list(args))})"
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails'].get('exception', result)}")
        return result["result"].get("value")

    def screenshot(self, clip: dict) -> bytes:
        data = self.call("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)["data"]
        return base64.b64decode(data)

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self._process.wait(timeout=10)
        except Exception:  # a browser that will not close is killed below
            pass
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        for fd in (self._to_browser, self._from_browser):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self._profile, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def start_tensorboard(logdir: Path, port: int, log) -> subprocess.Popen:
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
               "--port", str(port)]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)


def wait_for_tensorboard(server: subprocess.Popen, base: str, timeout: float, log) -> None:
    """Until the server answers with the custom-scalar layout and learnscope scalars."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"tensorboard exited with code {server.returncode}: {log.read()[-2000:].decode()}")
        try:
            layout = get_json(f"{base}/data/plugin/custom_scalars/layout")
            tags = get_json(f"{base}/data/plugin/scalars/tags")
            if layout.get("category") and any(tag.startswith(("lca/", "nfa/")) for run in tags.values() for tag in run):
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"tensorboard at {base} served no learnscope layout and scalars within {timeout:.0f} s")


def charts_to_keep(base: str, shot: Shot) -> list[tuple[str, list[str]]]:
    """Per category of the shot, the titles of the charts that match its regex and
    have data (a chart matches tags the way the custom-scalars plugin does: re.match)."""
    layout = get_json(f"{base}/data/plugin/custom_scalars/layout")
    tags = {tag for run in get_json(f"{base}/data/plugin/scalars/tags").values() for tag in run}
    keep = []
    for category_title, chart_pattern in shot.sections:
        category = next((c for c in layout["category"] if c["title"] == category_title), None)
        if category is None:
            continue
        titles = [
            chart["title"]
            for chart in category["chart"]
            if re.search(chart_pattern, chart["title"])
            and any(re.match(pattern, tag) for pattern in chart["multiline"]["tag"] for tag in tags)
        ]
        if titles:
            keep.append((category_title, titles))
    if not keep:
        raise RuntimeError(f"no chart with data in the categories {[c for c, _ in shot.sections]}")
    return keep


def take(browser: Chromium, url: str, sections: list[tuple[str, list[str]]], width: int, timeout: float) -> bytes:
    """Navigate, hide what is not kept, grow the viewport to the kept charts (TensorBoard
    scrolls an inner pane, so only what fits the viewport is drawn and captured), and
    capture once every kept chart has drawn and the layout has stopped changing."""
    height = 1000
    browser.viewport(width, height)
    browser.call("Page.navigate", url=url)
    deadline = time.monotonic() + timeout
    state: dict = {}
    previous_bottom = None
    while time.monotonic() < deadline:
        time.sleep(0.5)
        state = browser.evaluate(PREPARE_JS, sections, False) or {}
        if state.get("state") == "waiting":
            continue
        needed = int(state["bottom"]) + 20
        if needed != height:
            height = needed
            browser.viewport(width, height)
            browser.evaluate(PREPARE_JS, sections, True)
        elif state["state"] == "ready" and state["bottom"] == previous_bottom:
            browser.evaluate(PREPARE_JS, sections, True)
            time.sleep(1.5)  # the redraw is asynchronous
            state = browser.evaluate(PREPARE_JS, sections, False)
            if state["state"] == "ready" and state["bottom"] == previous_bottom:
                return browser.screenshot(state["clip"])
        previous_bottom = state["bottom"]
    raise TimeoutError(f"the charts did not render within {timeout:.0f} s: {state}")


def palette_png(png: bytes) -> bytes:
    """The PNG with an adaptive 256-colour palette (TensorBoard's charts use few
    colours: less than half the size, no visible change); unchanged without Pillow."""
    try:
        from PIL import Image
    except ImportError:
        return png
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue() if out.tell() < len(png) else png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", type=Path, help="TensorBoard log directory with learnscope runs")
    parser.add_argument("out", type=Path, help="OUT.png: writes OUT_lca.png and OUT_nfa.png")
    parser.add_argument("--probe", choices=("lca", "nfa", "both"), default="both")
    parser.add_argument("--width", type=int, default=1480, help="browser window width in pixels")
    parser.add_argument("--port", type=int, default=None, help="TensorBoard port (default: a free one)")
    browsers = ", ".join(BROWSERS)
    parser.add_argument("--chromium", default=None, help=f"browser binary (default: the first found of {browsers})")
    parser.add_argument("--full-colour", action="store_true", help="keep the browser's 24-bit PNG (larger)")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for the server and for each page")
    args = parser.parse_args(argv)

    if not args.logdir.is_dir():
        parser.error(f"log directory {args.logdir} does not exist")
    binary = args.chromium or next((path for name in BROWSERS if (path := shutil.which(name))), None)
    if binary is None:
        parser.error("no Chromium found: apt-get install chromium, or pass --chromium PATH")
    probes = ("lca", "nfa") if args.probe == "both" else (args.probe,)

    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as server_log:  # closed after the server that writes it has stopped
        server = start_tensorboard(args.logdir, port, server_log)
        browser = None
        try:
            wait_for_tensorboard(server, base, args.timeout, server_log)
            browser = Chromium(binary, args.width, 1000)
            for probe in probes:
                sections = charts_to_keep(base, SHOTS[probe])
                png = take(browser, f"{base}/#custom_scalars", sections, args.width, args.timeout)
                path = args.out.with_name(f"{args.out.stem}_{probe}{args.out.suffix or '.png'}")
                path.parent.mkdir(parents=True, exist_ok=True)
                data = png if args.full_colour else palette_png(png)
                path.write_bytes(data)
                print(f"{path} ({len(data) / 1024:.0f} KiB)")
        except (RuntimeError, TimeoutError) as error:
            print(f"screenshot_tensorboard: {error}", file=sys.stderr)
            return 1
        finally:
            if browser is not None:
                browser.close()
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())

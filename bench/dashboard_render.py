"""Dashboard figures: page weight and time from navigation to the first full render of a real
3-provider pool in headless Chromium, against fetching the same state as JSON (the baseline, in
the same process).

    python bench/dashboard_render.py [--runs 5] [--screenshot docs/dashboard.png]

Prints a table and writes bench/dashboard_render.json. Chromium is driven over the Chrome DevTools
Protocol on a WebSocket (`Browser` below, also used by tests/coordinator/test_dashboard.py): no
Selenium, no Playwright, nothing downloaded.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 30.0


def find_chromium() -> str | None:
    explicit = os.environ.get("MESHPOOL_CHROMIUM")
    if explicit:
        return explicit
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


class Browser:
    """Headless Chromium and one page, driven over the DevTools protocol (flattened sessions)."""

    def __init__(self, executable: str | None = None, width: int = 1400, height: int = 1000):
        executable = executable or find_chromium()
        if not executable:
            raise FileNotFoundError("no chromium found (apt-get install chromium, or set MESHPOOL_CHROMIUM)")
        self.profile = tempfile.mkdtemp(prefix="meshpool-chromium-")
        args = [executable, "--headless=new", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
                "--no-first-run", "--no-default-browser-check", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-extensions", "--disable-background-networking", "--hide-scrollbars",
                f"--window-size={width},{height}", "about:blank"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run its sandbox as root
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        self._stack = ExitStack()
        self.ws = self._stack.enter_context(connect(f"ws://127.0.0.1:{port}{path}", max_size=64 * 2**20,
                                                    open_timeout=START_TIMEOUT_S))
        self._ids = itertools.count(1)
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable", session=True)
        self.call("Runtime.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False}, session=True)

    def call(self, method: str, params: dict | None = None, session: bool = False,
             timeout_s: float = CALL_TIMEOUT_S) -> dict:
        ident = next(self._ids)
        message = {"id": ident, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout_s
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if reply.get("id") == ident:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def navigate(self, url: str) -> None:
        """Go to `url` and return once its document is parsed (Page.navigate returns when it starts)."""
        self.call("Page.navigate", {"url": url}, session=True)
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState !== 'loading' && "
                      "document.body !== null", what=f"{url} loaded")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, session=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 30.0, what: str = ""):
        """Poll `expression` in the page until it is truthy; return its value."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                value = self.evaluate(expression)
            except RuntimeError:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never showed {what or expression} in {timeout_s} s")
            time.sleep(0.1)

    def screenshot(self, path: Path) -> Path:
        full = self.evaluate("JSON.stringify([document.documentElement.scrollWidth, "
                             "document.documentElement.scrollHeight])")
        width, height = json.loads(full)
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                    "clip": {"x": 0, "y": 0, "width": width, "height": height,
                                                             "scale": 1}}, session=True)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            if getattr(self, "_stack", None) is not None:
                self._stack.close()
        finally:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=10)
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# What a test or the benchmark asks the page: the providers and pipelines it draws.
PAGE_STATE_JS = """JSON.stringify({
  renders: Number(document.body.dataset.renders || 0),
  firstRenderMs: window.meshpoolFirstRenderMs || null,
  providers: [...document.querySelectorAll('#providers tbody tr[data-peer]')]
    .map(r => ({peer: r.dataset.peer, state: r.dataset.state, text: r.cells[0].textContent})),
  pipelines: [...document.querySelectorAll('#pipelines .pipeline')].map(p => ({id: p.dataset.pipeline,
    stages: [...p.querySelectorAll('.segment')].map(s => ({peer: s.dataset.peer, start: Number(s.dataset.start),
      end: Number(s.dataset.end), widthPx: s.getBoundingClientRect().width, label: s.textContent}))})),
})"""


def page_state(browser: Browser) -> dict:
    return json.loads(browser.evaluate(PAGE_STATE_JS))


def page_weight_bytes(api: str) -> dict[str, int]:
    sizes = {}
    for name, path in (("html", "/"), ("js", "/dashboard/app.js"), ("css", "/dashboard/style.css")):
        with urllib.request.urlopen(api + path, timeout=30) as response:
            sizes[name] = len(response.read())
    return sizes


def measure_render(browser: Browser, api: str, n_providers: int) -> tuple[float, float]:
    """ms from navigation start to the first render that shows every provider and a pipeline, and
    to DOMContentLoaded (page and script parsed, before the feed's first message)."""
    browser.navigate("about:blank")
    browser.navigate(api + "/")
    browser.wait_for(f"document.querySelectorAll('#providers tbody tr[data-peer]').length >= {n_providers} && "
                     "document.querySelectorAll('#pipelines .segment').length > 0", what="the pool")
    return (float(browser.evaluate("window.meshpoolFirstRenderMs")),
            float(browser.evaluate("performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--screenshot", type=Path, help="also save a PNG of the page (e.g. docs/dashboard.png)")
    parser.add_argument("--audit-probability-ppm", type=int, help="the pool's audit rate (default: the ledger's)")
    parser.add_argument("--requests", type=int, default=2, help="requests made before the page is measured")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from coordinator.local_pool import LocalPool

    with tempfile.TemporaryDirectory(prefix="meshpool-bench-") as tmp:
        audits = ["--audit-probability-ppm", str(args.audit_probability_ppm)] if args.audit_probability_ppm else []
        pool = LocalPool(Path(tmp), coordinator_args=audits)
        try:
            pool.start_coordinator()
            for i in range(3):
                pool.add_provider(f"provider{i}", max_memory_mb=300)
            pool.wait_for(lambda s: s["pipelines"] and len(s["pipelines"][0]["stages"]) == 3, 180, "3 stages")
            key = pool.add_consumer("bench", 10**12)
            for i in range(args.requests):
                prompt = ("The capital of France is", "Once upon a time")[i % 2]
                pool.post("/v1/completions", {"model": "smollm2-135m-instruct", "prompt": prompt, "max_tokens": 16},
                          api_key=key)
            weight = page_weight_bytes(pool.api)
            json_ms = []
            for _ in range(args.runs):
                started = time.perf_counter()
                pool.get("/dashboard/state")
                json_ms.append(1000 * (time.perf_counter() - started))
            with Browser() as browser:
                measured = [measure_render(browser, pool.api, 3) for _ in range(args.runs)]
                render_ms, dom_ms = [m[0] for m in measured], [m[1] for m in measured]
                if args.screenshot:
                    time.sleep(1.5)  # a second update, with tokens/s filled in
                    browser.screenshot(args.screenshot)
        finally:
            pool.stop()

    result = {"page_bytes": weight, "page_kb": round(sum(weight.values()) / 1024, 1),
              "render_ms": [round(x, 1) for x in render_ms], "render_ms_median": round(statistics.median(render_ms), 1),
              "dom_content_loaded_ms_median": round(statistics.median(dom_ms), 1),
              "state_json_ms_median": round(statistics.median(json_ms), 1), "runs": args.runs,
              "chromium": subprocess.run([find_chromium(), "--version"], capture_output=True, text=True).stdout.strip()}
    result["render_over_json"] = round(result["render_ms_median"] / max(result["state_json_ms_median"], 1e-3), 1)
    print(f"{'figure':40} {'value':>12}")
    print(f"{'page weight (html + js + css), KB':40} {result['page_kb']:>12}")
    for name, size in weight.items():
        print(f"{'  ' + name + ', bytes':40} {size:>12}")
    print(f"{'navigation -> first full render, ms':40} {result['render_ms_median']:>12}")
    print(f"{'  of which DOMContentLoaded, ms':40} {result['dom_content_loaded_ms_median']:>12}")
    print(f"{'GET /dashboard/state (baseline), ms':40} {result['state_json_ms_median']:>12}")
    print(f"{'ratio render / state JSON':40} {result['render_over_json']:>12}")
    out = Path(__file__).with_suffix(".json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

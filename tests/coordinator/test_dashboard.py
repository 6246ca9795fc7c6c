"""The dashboard at `GET /`, rendered by headless Chromium against a real 3-provider pool.

Chromium is driven over the DevTools protocol (bench/dashboard_render.py's `Browser`); without a
Chromium binary (scripts/chromium.sh installs one) the browser test is skipped, saying why.
The page must list every provider by its full peer id, draw every pipeline of `GET /pool` with
its layer ranges, and follow a join and a kill -9 live, without a reload.
"""

from __future__ import annotations

import json
import time

import pytest

from bench.dashboard_render import Browser, find_chromium, page_state, page_weight_bytes
from coordinator.dashboard.state import MAX_TEXT, DashboardState, device_summary
from coordinator.local_pool import LocalPool
from coordinator.metrics import Metrics
from tests.coordinator.test_metrics import secrets_of

CAP_MB = 300
MODEL = "smollm2-135m-instruct"


# -- in this process ----------------------------------------------------------------------


def test_state_cuts_provider_strings_and_counts_nothing_of_consumers():
    hostile = {"devices": [{"kind": "cpu", "index": 0, "name": "<img src=x onerror=alert(1)>" * 20,
                            "memory_total_bytes": 8 * 2**30, "mem_bandwidth_gb_per_s": "fast"}], "host": "nope"}
    summary = device_summary(hostile)
    assert len(summary["name"]) == MAX_TEXT and summary["bandwidth_gb_per_s"] is None and summary["memory_gb"] == 8.0
    assert device_summary(None)["device"] == "?:0"

    class Pool:
        def snapshot(self):
            return {"providers": [{"peer": "p1", "state": "serving", "vouched": True, "max_memory_bytes": 2**30,
                                   "profile": hostile, "addrs": ["/ip4/127.0.0.1/tcp/1"]},
                                  {"peer": "p2", "state": "dead", "profile": {}}],
                    "pipelines": [{"id": "x", "stages": [{"peer": "p1", "start": 0, "end": 30}]}],
                    "pending_requests": 0, "plan_error": ""}

    metrics = Metrics(MODEL)
    metrics.observe_step("x", "decode", 4, 0.05)
    state = DashboardState(Pool(), MODEL, 30, metrics).build()
    assert [p["peer"] for p in state["providers"]] == ["p1", "p2"]
    assert state["providers"][0]["stages"] == [[0, 30]] and "addrs" not in state["providers"][0]
    assert state["pipelines"][0]["tokens_per_s"] > 0 and state["pool"]["tokens_per_s"] > 0
    assert state["ledger"] is None and state["model"] == {"id": MODEL, "n_layers": 30}


# -- a real pool and a real browser -------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not find_chromium():
        pytest.skip("no chromium: scripts/chromium.sh installs it (apt-get install chromium)")
    with Browser() as b:
        yield b


def drawn(state: dict) -> list[list[tuple[str, int, int]]]:
    return sorted([(s["peer"], s["start"], s["end"]) for s in p["stages"]] for p in state["pipelines"])


def wait_page(browser: Browser, pool: LocalPool, predicate, what: str, timeout_s: float = 120.0) -> tuple[dict, dict]:
    """The page's state and /pool once `predicate(page, pool)` holds for both, read close together."""
    deadline = time.monotonic() + timeout_s
    while True:
        live = pool.get("/pool")
        page = page_state(browser)
        if predicate(page, live):
            return page, live
        if time.monotonic() > deadline:
            raise TimeoutError(f"the page never showed {what}: page {json.dumps(page)[:1500]} "
                               f"/pool {json.dumps(live)[:1500]}")
        time.sleep(0.3)


def agrees(page: dict, live: dict) -> bool:
    """Every provider of /pool listed by its full peer id with its state; every pipeline drawn."""
    rows = {p["peer"]: p for p in page["providers"]}
    providers = {p["peer"]: p["state"] for p in live["providers"]}
    return (set(rows) == set(providers) and all(rows[peer]["text"].endswith(peer) for peer in rows)
            and all(rows[peer]["state"] == state for peer, state in providers.items())
            and bool(live["pipelines"]) and drawn(page) == drawn(live))


def test_the_page_draws_the_pool_and_follows_a_join_and_a_kill_live(pool, browser, tmp_path):
    pool.post("/v1/completions", {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 16},
              api_key=pool.api_key)
    started = time.monotonic()
    browser.navigate(pool.api + "/")
    page, live = wait_page(browser, pool, agrees, "the 3-provider pool")
    first_render_ms = browser.evaluate("window.meshpoolFirstRenderMs")
    assert len(live["providers"]) == 3 and len(live["pipelines"][0]["stages"]) == 3
    n_layers = live["pipelines"][0]["stages"][-1]["end"]
    for stage in page["pipelines"][0]["stages"]:  # each segment as wide as its share of the layers
        bar = sum(s["widthPx"] for s in page["pipelines"][0]["stages"])
        assert abs(stage["widthPx"] / bar - (stage["end"] - stage["start"]) / n_layers) < 0.02
        assert f"[{stage['start']}, {stage['end']})" in stage["label"] and stage["peer"][-6:] in stage["label"]
    browser.evaluate("window.notReloaded = true")
    renders = page["renders"]

    joined = pool.add_provider("joiner", max_memory_mb=CAP_MB)
    page, live = wait_page(browser, pool, lambda pg, lv: joined in {p["peer"] for p in pg["providers"]} and agrees(pg, lv),
                           "the provider that joined")
    assert len(page["providers"]) == 4

    victim = live["pipelines"][0]["stages"][1]["peer"]
    pool.kill(victim)
    page, live = wait_page(browser, pool, lambda pg, lv: agrees(pg, lv) and
                           {p["peer"]: p["state"] for p in pg["providers"]}.get(victim) == "dead" and
                           all(victim not in {s[0] for s in p} for p in drawn(pg)),
                           "the kill -9 and the new plan")
    assert browser.evaluate("window.notReloaded") is True, "the page reloaded"
    assert page["renders"] > renders and len(live["pipelines"]) >= 1

    shot = browser.screenshot(tmp_path / "dashboard.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    dom = browser.evaluate("document.documentElement.outerHTML")
    for secret in secrets_of(pool):
        assert secret not in dom, "the rendered page holds a secret"
    weight = page_weight_bytes(pool.api)
    figures = {"page_kb": round(sum(weight.values()) / 1024, 1), "first_render_ms": first_render_ms,
               "join_kill_seconds": round(time.monotonic() - started, 1), "screenshot": str(shot)}
    (tmp_path / "dashboard_figures.json").write_text(json.dumps(figures, indent=2))
    print("dashboard figures:", figures)
    assert first_render_ms is not None and figures["page_kb"] < 64

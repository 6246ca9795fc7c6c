"""The dashboard's HTTP routes: the page, its two assets, its state and its live feed.

    GET /                     the page (static/index.html)
    GET /dashboard/app.js     the script; GET /dashboard/style.css the stylesheet
    GET /dashboard/state      the state document once (JSON, see state.py)
    GET /dashboard/events     the same document as server-sent events, every FEED_INTERVAL_S

Read-only and unauthenticated: the state holds nothing secret (no consumer, no key). The page
runs under a Content-Security-Policy that allows only its own script, style and feed.

The state is encoded by `edge.dumps` (NaN and infinities as null, allow_nan=False): a browser's
JSON.parse rejects a bare NaN, and one provider's bad figure would stop the feed for every viewer.
A state that cannot be built or encoded skips one update; the feed goes on.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response, StreamingResponse

from coordinator.dashboard.state import DashboardState
from coordinator.edge import dumps

log = logging.getLogger("meshpool.dashboard")

STATIC = Path(__file__).parent / "static"
FEED_INTERVAL_S = 1.0
MAX_FEED_CLIENTS = 64
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}
ASSETS = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}


def make_router(state: DashboardState) -> APIRouter:
    router = APIRouter(tags=["dashboard"])
    files = {name: (STATIC / name).read_bytes() for name in ASSETS}  # read once: three small files
    executor = ThreadPoolExecutor(2, "dashboard")
    clients = {"n": 0}

    def asset(name: str) -> Response:
        return Response(files[name], media_type=ASSETS[name], headers=HEADERS)

    async def current() -> dict:
        return await asyncio.get_running_loop().run_in_executor(executor, state.build)

    @router.get("/", include_in_schema=False)
    def page():
        return asset("index.html")

    @router.get("/dashboard/app.js", include_in_schema=False)
    def script():
        return asset("app.js")

    @router.get("/dashboard/style.css", include_in_schema=False)
    def style():
        return asset("style.css")

    @router.get("/dashboard/state", summary="the dashboard's state: providers, pipelines, rates, audits, ledger")
    async def get_state() -> Response:
        return Response(dumps(await current()), media_type="application/json")

    @router.get("/dashboard/events", summary="the dashboard's state as server-sent events, once a second")
    async def events(request: Request):
        if clients["n"] >= MAX_FEED_CLIENTS:
            raise HTTPException(503, f"at most {MAX_FEED_CLIENTS} dashboards at once", headers={"Retry-After": "10"})

        async def feed():
            clients["n"] += 1  # counted here, where the finally below is sure to run
            try:
                yield "retry: 2000\n\n"
                while not await request.is_disconnected():
                    try:
                        yield f"data: {dumps(await current())}\n\n"
                    except Exception as exc:  # one bad update is skipped, not the feed ended
                        log.warning("dashboard: building the state failed: %r", exc)
                    await asyncio.sleep(FEED_INTERVAL_S)
            finally:
                clients["n"] -= 1

        return StreamingResponse(feed(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return router

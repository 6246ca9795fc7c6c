"""HTTP API of the coordinator: the app factory, the OpenAI-shaped error handlers and the routers
(/pool: the pool's state; /v1: the consumer API in `openai_api`; /: the dashboard; /metrics:
Prometheus; /ledger: the auditors' read-only view of the ledger)."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse

from coordinator.pool import Pool


DESCRIPTION = """OpenAI-compatible consumer API of a meshpool coordinator, paid in credits.

Authenticate with `Authorization: Bearer <key>` (keys from `coordinator consumer add`). Each
request holds its maximum price in escrow and pays for the tokens produced.

**WebSocket `/v1/stream`** (not listed below, as OpenAPI has no WebSockets): send one JSON message
`{"api_key": "mp-...", "completion": <CompletionRequest>}` or `{"api_key": ..., "chat":
<ChatCompletionRequest>}` (or set the Authorization header instead of `api_key`); receive the same
chunks as the `stream: true` responses, then `{"object": "done", "id", "finish_reason", "usage"}`
and a normal close, or `{"error": <ErrorDetail>, "status": <HTTP status>}` and a close."""


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, headers: dict | None = None,
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.headers = status, message, type_, headers or {}
        self.param, self.code = param, code


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    parts = []
    for e in errors[:3]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    loc = [str(x) for x in errors[0].get("loc", ()) if x != "body"] if errors else []
    return "; ".join(parts) or "invalid request", (loc[0] if loc else None)


def create_app(pool: Pool, tokenizer, model_id: str, max_context_tokens: int, stop_ids: tuple[int, ...],
               accounts, rate_limit_rps: float = 10.0) -> FastAPI:
    from coordinator.accounts import RateLimiter
    from coordinator.metrics import Metrics
    from coordinator.openai_api import Service, make_router

    app = FastAPI(title="meshpool coordinator", description=DESCRIPTION)
    metrics = Metrics(model_id)
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        if _request.url.path.startswith("/v1/"):
            metrics.rejected(None, 422)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    pool_router = APIRouter()

    @pool_router.get("/pool")
    def pool_state() -> dict:
        return pool.snapshot()

    svc = Service(pool, tokenizer, model_id, max_context_tokens, stop_ids, accounts, RateLimiter(rate_limit_rps),
                  metrics=metrics)
    app.state.service = svc
    app.include_router(pool_router)
    app.include_router(make_router(svc))
    _mount_observability(app, pool, model_id, accounts, metrics)
    return app


def _mount_observability(app: FastAPI, pool: Pool, model_id: str, accounts, metrics) -> None:
    """The dashboard at /, Prometheus at /metrics, the read-only ledger at /ledger."""
    from coordinator.dashboard.ledger_view import LedgerView
    from coordinator.dashboard.routes import make_router as dashboard_router
    from coordinator.dashboard.state import DashboardState
    from coordinator.metrics import PoolCollector
    from coordinator.metrics import make_router as metrics_router
    from ledger.api import make_router as ledger_router
    from ledger.reader import LedgerReader

    reader = None
    engine = getattr(accounts, "reader_engine", None)
    if engine is not None:  # the accounts' read-only engine: snapshot reads while the coordinator writes
        reader = LedgerReader(engine)
        app.include_router(ledger_router(reader))
    view = LedgerView(reader) if reader is not None else None
    metrics.registry.register(PoolCollector(pool, view))
    shape = getattr(pool, "model_shape", None)
    n_layers = getattr(shape, "n_layers", 0) or getattr(accounts, "n_layers", 0)
    app.state.dashboard = DashboardState(pool, model_id, n_layers, metrics, view)
    app.include_router(metrics_router(metrics))
    app.include_router(dashboard_router(app.state.dashboard))

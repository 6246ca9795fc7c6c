"""HTTP API of the coordinator: the app factory, the OpenAI-shaped error handlers and the routers
(/pool: the pool's state; /v1: the consumer API in `openai_api`; /: the dashboard; /metrics:
Prometheus; /ledger: the auditors' read-only view of the ledger).

Every error any route or the framework produces leaves in OpenAI's shape `{"error": {"message",
"type", "param", "code"}}`, and none repeats what the client sent (no key, no body): a validation
error names the field and the rule, never the value. Bodies are bounded by `edge.BodyLimit` before
anything reads them."""

from __future__ import annotations

import contextlib
import logging

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from coordinator.edge import MAX_BODY_BYTES, APIError, BodyLimit, dumps, error_body, validation_message
from coordinator.pool import Pool

log = logging.getLogger("meshpool.api")

# What FastAPI says when the body is not UTF-8 or not JSON its parser can read (too deep a nesting)
FASTAPI_PARSE_ERROR = "There was an error parsing the body"
PARSE_ERROR = "the body is not valid JSON in UTF-8 (or is nested too deeply)"


DESCRIPTION = """OpenAI-compatible consumer API of a meshpool coordinator, paid in credits.

Authenticate with `Authorization: Bearer <key>` (keys from `coordinator consumer add`). Each
request holds its maximum price in escrow and pays for the tokens produced.

**WebSocket `/v1/stream`** (not listed below, as OpenAPI has no WebSockets): send one JSON message
`{"api_key": "mp-...", "completion": <CompletionRequest>}` or `{"api_key": ..., "chat":
<ChatCompletionRequest>}` (or set the Authorization header instead of `api_key`); receive the same
chunks as the `stream: true` responses, then `{"object": "done", "id", "finish_reason", "usage"}`
and a normal close, or `{"error": <ErrorDetail>, "status": <HTTP status>}` and a close with a code
(1003 a binary frame, 1007 not JSON, 1008 the wrong shape or a refused key, 1009 over 1 MB).

**Limits**: bodies over the app's limit (2 MiB by default) are a 413 before they are read; a prompt
that cannot fit the context by its length alone is a 422 `context_length_exceeded` before it is
tokenized; an address that sent too many bad keys gets 429 with Retry-After."""


def json_error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None, headers: dict | None = None) -> Response:
    return Response(dumps(error_body(message, type_, param, code)), status_code=status,
                    media_type="application/json", headers=headers)


def _http_error_type(status: int) -> str:
    return "service_unavailable" if status == 503 else "server_error" if status >= 500 else "invalid_request_error"


def create_app(pool: Pool, tokenizer, model_id: str, max_context_tokens: int, stop_ids: tuple[int, ...],
               accounts, rate_limit_rps: float = 10.0, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    from coordinator.accounts import RateLimiter
    from coordinator.edge import LoginThrottle, max_chars_per_token
    from coordinator.metrics import Metrics
    from coordinator.openai_api import Service, make_router

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # after the connections closed and before the ledger does (server.serve closes it after the
        # app), while the providers can still send receipts: settlements still running land first
        await app.state.service.close()

    app = FastAPI(title="meshpool coordinator", description=DESCRIPTION, lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.state.max_body_bytes = max_body_bytes
    metrics = Metrics(model_id)
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        return json_error(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if errors and errors[0].get("type") == "json_invalid":  # not JSON at all: a 400, as OpenAI's
            status, message, param = 400, PARSE_ERROR, None
        else:
            status, (message, param) = 422, validation_message(errors)
        if request.url.path.startswith("/v1/"):
            metrics.rejected(None, status)
        return json_error(status, message, param=param)

    @app.exception_handler(HTTPException)  # Starlette's: routing's 404/405, FastAPI's 400, BodyTooLarge
    async def _http(request: Request, exc: HTTPException):
        message = PARSE_ERROR if exc.detail == FASTAPI_PARSE_ERROR else str(exc.detail)
        code = "request_too_large" if exc.status_code == 413 else None
        if request.url.path.startswith("/v1/") and exc.status_code < 500:
            metrics.rejected(None, exc.status_code)
        return json_error(exc.status_code, message, _http_error_type(exc.status_code), code=code,
                          headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.error("%s %s failed: %r", request.method, request.url.path, exc, exc_info=exc)
        return json_error(500, "internal error", "server_error")

    pool_router = APIRouter()

    @pool_router.get("/pool")
    def pool_state() -> Response:
        return Response(dumps(pool.snapshot()), media_type="application/json")  # no NaN a profile held

    svc = Service(pool, tokenizer, model_id, max_context_tokens, stop_ids, accounts, RateLimiter(rate_limit_rps),
                  metrics=metrics, login_throttle=LoginThrottle(),
                  max_chars_per_token=max_chars_per_token(tokenizer))
    app.state.service = svc
    app.include_router(pool_router)
    app.include_router(make_router(svc))
    _mount_observability(app, pool, model_id, accounts, metrics)
    engine = getattr(accounts, "reader_engine", None)
    if engine is not None:  # a consumer's own ledger account, with its key; the rest of /ledger is public
        from coordinator.ledger_me import make_router as own_ledger_router
        from ledger.reader import LedgerReader

        app.include_router(own_ledger_router(svc, LedgerReader(engine)))
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

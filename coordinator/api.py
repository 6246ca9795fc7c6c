"""HTTP API of the coordinator: the app factory, the OpenAI-shaped error handlers and the routers
(/pool: the pool's state; /v1: the consumer API in `openai_api`)."""

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
    from coordinator.openai_api import Service, make_router

    app = FastAPI(title="meshpool coordinator", description=DESCRIPTION)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    pool_router = APIRouter()

    @pool_router.get("/pool")
    def pool_state() -> dict:
        return pool.snapshot()

    svc = Service(pool, tokenizer, model_id, max_context_tokens, stop_ids, accounts, RateLimiter(rate_limit_rps))
    app.state.service = svc
    app.include_router(pool_router)
    app.include_router(make_router(svc))
    return app

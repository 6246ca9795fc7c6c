"""HTTP API of the coordinator: the pool's state and a minimal OpenAI-style completions endpoint
(greedy, not streamed) so the pool can be used end to end."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Annotated

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from coordinator.driver import GenerationRequest
from coordinator.pool import Pool, PoolBusy

REQUEST_TIMEOUT_S = 600.0
RETRY_AFTER_S = 5


class CompletionRequest(BaseModel):
    model: str
    prompt: Annotated[str, Field(min_length=1, max_length=100_000)]
    max_tokens: Annotated[int, Field(ge=1, le=4096)] = 16


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, headers: dict | None = None):
        self.status, self.message, self.type, self.headers = status, message, type_, headers or {}


def error_body(message: str, type_: str) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": None}}


def create_app(pool: Pool, tokenizer, model_id: str, max_context_tokens: int, stop_ids: tuple[int, ...]) -> FastAPI:
    app = FastAPI(title="meshpool coordinator")

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        return JSONResponse(error_body(exc.message, exc.type), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        return JSONResponse(error_body(str(exc.errors()[:3]), "invalid_request_error"), status_code=422)

    pool_router = APIRouter()

    @pool_router.get("/pool")
    def pool_state() -> dict:
        return pool.snapshot()

    v1 = APIRouter(prefix="/v1")

    @v1.get("/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "meshpool"}]}

    @v1.post("/completions")
    async def completions(body: CompletionRequest) -> dict:
        if body.model != model_id:
            raise APIError(404, f"model {body.model!r} is not served here; try {model_id!r}", "not_found_error")
        prompt_ids = tokenizer(body.prompt)["input_ids"]
        if len(prompt_ids) + body.max_tokens > max_context_tokens:
            raise APIError(422, f"prompt ({len(prompt_ids)} tokens) plus max_tokens exceeds the context of "
                                f"{max_context_tokens} tokens", "invalid_request_error")
        request = GenerationRequest(prompt_ids, body.max_tokens, stop_ids=stop_ids)
        try:
            pool.submit(request)
        except PoolBusy as exc:
            raise APIError(503, str(exc), "service_unavailable", {"Retry-After": str(RETRY_AFTER_S)}) from exc
        loop = asyncio.get_running_loop()
        try:
            finished = await loop.run_in_executor(None, request.done.wait, REQUEST_TIMEOUT_S)
        except asyncio.CancelledError:
            request.fail("the client went away")
            raise
        if not finished or request.error:
            request.fail(request.error or "timed out")
            raise APIError(503, f"generation failed: {request.error or 'timed out'}", "service_unavailable",
                           {"Retry-After": str(RETRY_AFTER_S)})
        text = tokenizer.decode(request.tokens, skip_special_tokens=True)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_id,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": request.finish_reason}],
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(request.tokens),
                      "total_tokens": len(prompt_ids) + len(request.tokens)},
        }

    app.include_router(pool_router)
    app.include_router(v1)
    return app

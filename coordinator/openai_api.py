"""The OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (SSE with
`stream: true`), /v1/account and the WebSocket /v1/stream.

One request's life: its body bounded and parsed strictly at the edge (`edge.BodyLimit`, the
strict models of `schemas`), authenticate (API key -> consumer; an address that sent too many bad
keys waits), rate-limit, bound the prompt's characters by the context, tokenize, hold its maximum
price (402 if the balance cannot cover it), submit to the pool (503 if no pipeline can take it),
stream tokens through the detokenizer (a stream writes down how many tokens it has sent, and by
which stages, before each chunk leaves: `record_delivery`), then resolve the hold
(`Accounts.finish`: the ledger settles on the stages' receipts); the usage it reports is what was
billed. A body leaves after its hold settled; an SSE stream sends its end ([DONE]) once its last
token is out and settles behind it (`coordinator/settle_behind.py`): its usage is read from the
finished request, as settlement reads it, and the consumer's own account routes wait for those
settlements before they read. A client that goes away cancels
the generation; ledger calls run on a thread pool, never on the event loop. Every body sent
(responses, chunks, errors) is built from a model of `schemas`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import APIRouter, Depends, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from coordinator.accounts import Accounts, Charge, Consumer, InsufficientFunds, RateLimiter
from coordinator.edge import DEFAULT_MAX_CHARS_PER_TOKEN, APIError, LoginThrottle, validation_message
from coordinator.driver import GenerationRequest
from coordinator.metrics import Metrics
from coordinator.pool import Pool, PoolBusy
from coordinator.schemas import (MAX_NEW_TOKENS, Account, AssistantMessage, ChatChoice, ChatChunkChoice,
                                 ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChunkDelta, Completion,
                                 CompletionChoice, CompletionChunk, CompletionRequest, ErrorBody, ErrorDetail,
                                 ModelCard, ModelList, SamplingFields, StreamDone, StreamError, StreamRequest, Usage)
from coordinator.settle_behind import SETTLE_WAIT_S, PendingSettlements
from coordinator.streaming import Detokenizer, TokenStream
from wire.messages import SamplingParams

log = logging.getLogger("meshpool.api")

REQUEST_TIMEOUT_S = 600.0
RETRY_AFTER_S = 5
LEDGER_THREADS = 8
# Settling waits for the stages' receipts (up to coordinator.receipts.RECEIPT_WAIT_S when a stage
# died), so it runs on threads of its own: admissions never queue behind it.
SETTLE_THREADS = 32
WS_FIRST_MESSAGE_TIMEOUT_S = 30.0
MAX_WS_MESSAGE_BYTES = 1_000_000
# WebSocket close codes (RFC 6455 7.4.1) for a first message the server cannot take
WS_UNSUPPORTED_DATA = 1003  # a binary frame
WS_INVALID_PAYLOAD = 1007  # text that is not JSON
WS_POLICY_VIOLATION = 1008  # JSON of the wrong shape; a refused key, credit or rate
WS_TOO_BIG = 1009
WS_SERVER_ERROR = 1011

ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 402, 404, 413, 422, 429, 503)}


def error_model(exc: APIError) -> ErrorBody:
    return ErrorBody(error=ErrorDetail(message=exc.message, type=exc.type, param=exc.param, code=exc.code))


async def _close_quietly(ws: WebSocket, code: int, reason: str) -> None:
    try:
        await ws.close(code=code, reason=reason)
    except (WebSocketDisconnect, RuntimeError):
        pass


def sse_event(model: BaseModel) -> str:
    return f"data: {model.model_dump_json()}\n\n"


@dataclass
class Service:
    pool: Pool
    tokenizer: object
    model_id: str
    max_context_tokens: int
    stop_ids: tuple[int, ...]
    accounts: Accounts
    limiter: RateLimiter
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(LEDGER_THREADS, "api-ledger"))
    settler: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(SETTLE_THREADS, "api-settle"))
    # settlements on `settler` by consumer: what its account reads wait for, and shutdown drains
    pending: PendingSettlements = field(default_factory=PendingSettlements)
    metrics: Metrics | None = None
    login_throttle: LoginThrottle = field(default_factory=LoginThrottle)
    max_chars_per_token: int = DEFAULT_MAX_CHARS_PER_TOKEN  # see edge.max_chars_per_token

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = Metrics(self.model_id)

    async def call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def wait_settled(self, consumer: Consumer) -> None:
        """Read-your-writes: before a consumer's own account is read, its requests whose streams have
        ended have settled (bounded by SETTLE_WAIT_S; past that it is read as it stands)."""
        if not await self.pending.wait(consumer.account_id, SETTLE_WAIT_S):
            log.warning("consumer %s: a settlement still runs after %g s; its account is read as it stands",
                        consumer.account_id, SETTLE_WAIT_S)

    async def close(self) -> None:
        """At the app's shutdown (the connections are closed, the providers still up to send receipts):
        settlements still running land first, or are left to the next start's recovery."""
        left = await self.pending.drain(SETTLE_WAIT_S)
        if left:
            log.warning("%d settlements still running at shutdown; the next start settles their holds for "
                        "what they delivered", left)
        self.settler.shutdown(wait=False)
        self.executor.shutdown(wait=False)

    async def authenticate(self, authorization: str | None, address: str | None = None) -> Consumer:
        """The consumer of a key; 401 for a bad one, 429 for an address that sent too many bad ones
        (checked before the lookup, so a good key guessed then is refused too)."""
        scheme, _, key = (authorization or "").partition(" ")
        presented = scheme.lower() == "bearer" and bool(key.strip())
        address = address or "unknown"
        if presented:
            wait_s = self.login_throttle.wait_s(address)
            if wait_s > 0:
                self.metrics.rejected(None, 429)  # metrics
                raise APIError(429, "too many invalid API keys from this address; wait before trying again",
                               "rate_limit_exceeded", code="too_many_failed_logins",
                               headers={"Retry-After": str(max(1, round(wait_s + 0.5)))})
        consumer = await self.call(self.accounts.lookup, key.strip()) if presented else None
        if consumer is None:
            if presented:
                self.login_throttle.failed(address)
            self.metrics.rejected(None, 401)  # metrics
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                           "invalid_request_error", code="invalid_api_key")
        wait_s = self.limiter.take(consumer.account_id)
        if wait_s > 0:
            self.metrics.rejected(None, 429)  # metrics
            raise APIError(429, f"rate limit of {self.limiter.rps:g} requests/s reached for this key",
                           "rate_limit_exceeded", code="rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, round(wait_s + 0.5)))})
        return consumer

    def max_prompt_chars(self) -> int:
        """No prompt longer than this can fit: each token stands for at most `max_chars_per_token`
        characters, and the context must keep room for one new token."""
        return max(1, self.max_context_tokens - 1) * self.max_chars_per_token

    def check_chars(self, body: SamplingFields) -> None:
        """Refuse a prompt that cannot fit the context, from its length alone: before tokenizing it."""
        n, limit = body.chars(), self.max_prompt_chars()
        if n > limit:
            param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
            holds = "the messages hold" if param == "messages" else "the prompt has"
            raise APIError(422, f"{holds} {n} characters; at most {limit} fit the context of "
                                f"{self.max_context_tokens} tokens (a token is at most {self.max_chars_per_token} "
                                f"characters)", "invalid_request_error", param=param, code="context_length_exceeded")

    def prompt_ids(self, body: SamplingFields) -> list[int]:
        try:
            if isinstance(body, ChatCompletionRequest):
                messages = [m.model_dump() for m in body.messages]
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            return self.tokenizer(body.prompt)["input_ids"]
        except Exception as exc:  # the schema admits only valid text; anything else is still the input's fault
            log.warning("tokenizing a prompt failed: %r", exc)
            raise APIError(422, "the prompt could not be tokenized", "invalid_request_error", param="prompt") from None


class Generation:
    """One admitted, submitted request: its tokens as text deltas, then its settlement."""

    def __init__(self, svc: Service, consumer: Consumer, body: SamplingFields, kind: str):
        self.svc, self.consumer, self.body, self.kind = svc, consumer, body, kind
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        # chat without a limit runs to the end of the context, as OpenAI's does (set in start())
        self.max_tokens = body.new_tokens(0) if isinstance(body, ChatCompletionRequest) else body.max_tokens
        self.detok = Detokenizer(svc.tokenizer, body.stops())
        self.prompt_ids: list[int] = []
        self.charge: Charge | None = None
        self.billed = None  # what settle() billed: an accounts.Usage
        self.request: GenerationRequest | None = None
        self.cancelled = False
        self.settled = False
        self.recorded_tokens = 0  # delivered tokens written down (record_delivery)
        self.timer = svc.metrics.request(body.model)  # metrics: in flight from here until timer.end

    async def start(self) -> None:
        try:
            await self._start()
        except APIError as exc:
            self.timer.end(exc.status)  # metrics
            raise
        except BaseException:
            self.timer.end(500)  # metrics
            raise

    async def _start(self) -> None:
        svc, body = self.svc, self.body
        if body.model != svc.model_id:
            raise APIError(404, f"this model is not served here; try {svc.model_id!r}",
                           "invalid_request_error", param="model", code="model_not_found")
        svc.check_chars(body)
        self.prompt_ids = await svc.call(svc.prompt_ids, body)
        if not self.prompt_ids:
            raise APIError(422, "the prompt has no tokens", "invalid_request_error", param="prompt")
        if not self.max_tokens:
            self.max_tokens = max(1, min(MAX_NEW_TOKENS, svc.max_context_tokens - len(self.prompt_ids)))
        if len(self.prompt_ids) + self.max_tokens > svc.max_context_tokens:
            raise APIError(422, f"prompt ({len(self.prompt_ids)} tokens) plus max_tokens ({self.max_tokens}) "
                                f"exceeds the context of {svc.max_context_tokens} tokens",
                           "invalid_request_error", param="max_tokens")
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        sampling = SamplingParams(temperature=body.temperature, top_p=body.top_p, seed=seed)
        try:
            self.charge = await self._admit()
        except InsufficientFunds as exc:
            price = svc.accounts.price_units(len(self.prompt_ids), self.max_tokens)
            raise APIError(402, f"not enough credits: this request may cost {price} units ({exc})",
                           "insufficient_quota", code="insufficient_quota") from exc
        self.request = GenerationRequest(self.prompt_ids, self.max_tokens, sampling=sampling, stop_ids=svc.stop_ids,
                                         request_id=self.id)
        self.request.on_step = svc.metrics.observe_step  # metrics: pipeline step times and tokens/s
        self.stream = TokenStream(self.request, asyncio.get_running_loop())
        try:
            svc.pool.submit(self.request)
        except PoolBusy as exc:
            self.cancel("no pipeline")
            await self.settle()
            raise APIError(503, str(exc), "service_unavailable", code="no_pipeline",
                           headers={"Retry-After": str(exc.retry_after_s)}) from exc

    async def _admit(self) -> Charge:
        """Hold the request's price. It does not wait for the consumer's earlier streams still settling
        behind their [DONE]: each of those keeps its own hold, from which its settlement pays the
        stages and refunds the rest, and no settlement takes anything from the balance, so a new hold
        taken beside them can never overdraw the account. All they can do is keep a refund from the
        balance a moment longer: only if that refusal is a 402 are they waited for, once."""
        svc = self.svc
        args = (svc.accounts.admit, self.consumer, self.id, svc.model_id, len(self.prompt_ids), self.max_tokens)
        try:
            return await svc.call(*args)
        except InsufficientFunds:
            if not svc.pending.of(self.consumer.account_id):
                raise
        await svc.wait_settled(self.consumer)
        return await svc.call(*args)

    async def deltas(self) -> AsyncIterator[str]:
        """Text deltas; raises APIError(503) if the pool gave up on the request."""
        try:
            async for delta in self._deltas():
                yield delta
        except APIError as exc:
            self.timer.end(exc.status)  # metrics
            raise
        self.timer.end(200)  # metrics

    async def _deltas(self) -> AsyncIterator[str]:
        try:
            async with contextlib.aclosing(self.stream.batches(REQUEST_TIMEOUT_S)) as batches:
                async for batch in batches:
                    # the tokens that arrived together make one delta, so one chunk and one journal write (chunks())
                    delta = ""
                    for token in batch:
                        self.timer.token()  # metrics: one generated token, time to first token, gap between tokens
                        delta += self.detok.add(token)
                        if self.detok.stopped:
                            break
                    if delta:
                        yield delta
                    if self.detok.stopped:
                        self.cancel("stop sequence")
                        return
        except TimeoutError as exc:
            self.cancel("timed out")
            raise APIError(503, f"generation timed out after {REQUEST_TIMEOUT_S:g} s", "service_unavailable",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from exc
        if self.request.error and not self.cancelled:
            raise APIError(503, f"generation failed: {self.request.error}", "service_unavailable",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        rest = self.detok.flush()
        if rest:
            yield rest

    @property
    def finish_reason(self) -> str:
        if self.detok.stopped or (self.detok.ids and self.detok.ids[-1] in self.svc.stop_ids):
            return "stop"
        return "length"

    def usage(self) -> Usage:
        """What the request was billed for; after settle()."""
        n, produced = self.billed.prompt_tokens, self.billed.completion_tokens
        return Usage(prompt_tokens=n, completion_tokens=produced, total_tokens=n + produced)

    def ended_usage(self) -> Usage:
        """What settlement will bill, before it has: `Accounts.finish` counts the prompt as admitted and
        every token of the request, read once the request is done, after which its tokens never
        change (driver.GenerationRequest). A stream's generation has ended when it is asked: the pool
        finished or failed it, or a stop sequence cancelled it (which sets `done` at once)."""
        if not self.request.done.is_set():
            raise RuntimeError(f"request {self.id}: usage asked for before the generation ended")
        n, produced = self.charge.prompt_tokens, len(self.request.tokens)
        return Usage(prompt_tokens=n, completion_tokens=produced, total_tokens=n + produced)

    async def record_delivery(self) -> None:
        """Durable before sent: the count of tokens the client is about to have, and the stages that
        computed them, go to the database before the chunk does, so that a coordinator killed now
        settles them at its next start (coordinator/recovery.py). A body sent whole needs none of
        this: it leaves only after the hold settled. If the write fails the tokens are not sent."""
        n = len(self.detok.ids)
        if n <= self.recorded_tokens:
            return
        try:
            await self.svc.accounts.delivered_async(self.charge, self.request, n)
        except Exception as exc:
            log.error("request %s: recording %d delivered tokens failed: %r", self.id, n, exc)
            self.cancel("the delivery could not be recorded")
            raise APIError(503, "the coordinator could not record the delivery; nothing more is sent",
                           "service_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        self.recorded_tokens = n

    def cancel(self, reason: str) -> None:
        if self.request is not None and not self.request.done.is_set():
            self.cancelled = True
            self.request.fail(reason)  # the driver drops the session at its next step

    def _settle_args(self) -> tuple | None:
        if self.charge is None or self.settled:
            return None
        self.settled = True
        reason = "cancelled" if self.cancelled and not self.detok.stopped else self.finish_reason
        return self.charge, self.request, reason

    async def settle(self) -> None:
        args = self._settle_args()
        if args:
            self.billed = await asyncio.get_running_loop().run_in_executor(self.svc.settler, self.svc.accounts.finish,
                                                                           *args)

    def settle_soon(self) -> None:
        """From a cancelled task, where nothing can be awaited: cancel the generation, settle on a thread."""
        self.cancel("the client went away")
        self.timer.end(499)  # metrics: no-op when the request already ended
        self._settle_on_thread()

    def settle_behind(self) -> bool:
        """The generation has ended: settle on a thread while the stream's end goes out. False (nothing
        started) when too many settlements already run behind their streams: settle() then."""
        if self.charge is None or self.settled:
            return True
        if self.svc.pending.full():
            return False
        self._settle_on_thread()
        return True

    def _settle_on_thread(self) -> None:
        """Settle on the settle threads, kept by the consumer until it lands (Service.pending)."""
        args = self._settle_args()
        if args:
            future = self.svc.pending.submit(self.svc.settler, self.consumer.account_id, self.svc.accounts.finish,
                                             *args)
            future.add_done_callback(lambda f: f.exception() and log.error("settling %s failed", self.id,
                                                                             exc_info=f.exception()))

    # -- OpenAI shapes --------------------------------------------------------------------

    def chunk(self, text: str | None, finish_reason: str | None = None,
              role: bool = False) -> CompletionChunk | ChatCompletionChunk:
        head = {"id": self.id, "created": self.created, "model": self.svc.model_id}
        if self.kind == "chat":
            delta = ChunkDelta(role="assistant", content="") if role else ChunkDelta(content=text)
            return ChatCompletionChunk(**head, choices=[ChatChunkChoice(index=0, delta=delta,
                                                                        finish_reason=finish_reason)])
        choice = CompletionChoice(index=0, text=text or "", finish_reason=finish_reason)
        return CompletionChunk(**head, choices=[choice])

    def usage_chunk(self, usage: Usage) -> CompletionChunk | ChatCompletionChunk:
        kind = ChatCompletionChunk if self.kind == "chat" else CompletionChunk
        return kind(id=self.id, created=self.created, model=self.svc.model_id, choices=[], usage=usage)

    def body_of(self, text: str) -> Completion | ChatCompletion:
        head = {"id": self.id, "created": self.created, "model": self.svc.model_id, "usage": self.usage()}
        if self.kind == "chat":
            return ChatCompletion(**head, choices=[ChatChoice(index=0, message=AssistantMessage(content=text),
                                                              finish_reason=self.finish_reason)])
        return Completion(**head, choices=[CompletionChoice(index=0, text=text, finish_reason=self.finish_reason)])

    def done(self, usage: Usage) -> StreamDone:
        return StreamDone(id=self.id, finish_reason=self.finish_reason, usage=usage)

    async def text_chunks(self) -> AsyncIterator[CompletionChunk | ChatCompletionChunk]:
        """The stream's text as OpenAI chunks: role (chat), then the deltas, each recorded before it leaves."""
        if self.kind == "chat":
            yield self.chunk(None, role=True)
        async for delta in self.deltas():
            await self.record_delivery()
            yield self.chunk(delta)

    def finish_chunk(self) -> CompletionChunk | ChatCompletionChunk:
        return self.chunk(None, finish_reason=self.finish_reason)

    async def chunks(self) -> AsyncIterator[CompletionChunk | ChatCompletionChunk]:
        """The stream as OpenAI chunks: role (chat), deltas, the finish."""
        async for chunk in self.text_chunks():
            yield chunk
        yield self.finish_chunk()


def make_router(svc: Service) -> APIRouter:
    v1 = APIRouter(prefix="/v1", responses=ERRORS)

    async def consumer(request: Request) -> Consumer:
        return await svc.authenticate(request.headers.get("authorization"),
                                      request.client.host if request.client else None)

    @v1.get("/models", response_model=ModelList)
    def models() -> ModelList:
        return ModelList(data=[ModelCard(id=svc.model_id)])

    @v1.get("/account", response_model=Account, summary="balance, held and spent credits, recent usage")
    async def account(who: Consumer = Depends(consumer)) -> dict:
        await svc.wait_settled(who)  # the consumer's streams that ended are settled before it reads
        return await svc.call(svc.accounts.account, who)

    async def run(body: SamplingFields, who: Consumer, kind: str, http: Request):
        gen = Generation(svc, who, body, kind)
        await gen.start()
        if body.stream:
            return StreamingResponse(sse(gen, http), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            text = "".join([d async for d in gen.deltas()])
        except BaseException:
            gen.settle_soon()
            raise
        await gen.settle()
        return gen.body_of(text)

    async def sse(gen: Generation, http: Request) -> AsyncIterator[str]:
        try:
            async for chunk in gen.text_chunks():
                yield sse_event(chunk)
            # The generation has ended: its end goes out now and the hold settles behind it (waiting
            # for the stages' receipts first); the usage is what that settlement bills.
            if not gen.settle_behind():
                await gen.settle()
            yield sse_event(gen.finish_chunk())
            if gen.body.stream_options and gen.body.stream_options.include_usage:
                yield sse_event(gen.usage_chunk(gen.ended_usage()))
        except APIError as exc:
            yield sse_event(error_model(exc))
        finally:
            gen.settle_soon()  # no-op after a normal end; cancels and settles when the client left
        yield "data: [DONE]\n\n"

    @v1.post("/completions", response_model=Completion,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "a completion, or with stream=true server-sent chunks ending with [DONE]"}})
    async def completions(body: CompletionRequest, http: Request, who: Consumer = Depends(consumer)):
        return await run(body, who, "text", http)

    @v1.post("/chat/completions", response_model=ChatCompletion,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "a chat completion, or with stream=true server-sent chunks"}})
    async def chat_completions(body: ChatCompletionRequest, http: Request, who: Consumer = Depends(consumer)):
        return await run(body, who, "chat", http)

    @v1.websocket("/stream")
    async def stream(ws: WebSocket):
        """One request a connection: send {"completion": {...}} or {"chat": {...}} (plus "api_key" unless
        the Authorization header is set); receive the same chunks as the SSE stream, then
        {"object": "done", "finish_reason", "usage"}, or {"error": {...}, "status"}; then the server
        closes. A first frame the server cannot take (binary, not JSON, the wrong shape, too big) gets
        the error and a close with a code that says why (1003, 1007, 1008, 1009)."""
        await ws.accept()
        gen = None
        close_code = None
        try:
            message = await asyncio.wait_for(ws.receive(), WS_FIRST_MESSAGE_TIMEOUT_S)
            if message["type"] == "websocket.disconnect":
                return
            raw = message.get("text")
            if raw is None:
                close_code = WS_UNSUPPORTED_DATA
                raise APIError(400, "send the request as one text frame of JSON, not binary", "invalid_request_error")
            if len(raw) > MAX_WS_MESSAGE_BYTES:
                close_code = WS_TOO_BIG
                raise APIError(413, f"message over {MAX_WS_MESSAGE_BYTES} characters", "invalid_request_error")
            try:
                req = StreamRequest.model_validate_json(raw)
            except ValidationError as exc:
                errors = exc.errors(include_url=False, include_input=False, include_context=False)
                if errors and errors[0].get("type") == "json_invalid":
                    close_code = WS_INVALID_PAYLOAD
                    raise APIError(400, "the message is not valid JSON", "invalid_request_error") from None
                close_code = WS_POLICY_VIOLATION
                message_, param = validation_message(errors)
                raise APIError(422, message_, "invalid_request_error", param=param) from None
            if (req.completion is None) == (req.chat is None):
                close_code = WS_POLICY_VIOLATION
                raise APIError(422, "send exactly one of 'completion' and 'chat'", "invalid_request_error")
            auth = ws.headers.get("authorization") or (f"Bearer {req.api_key}" if req.api_key else None)
            who = await svc.authenticate(auth, ws.client.host if ws.client else None)
            gen = Generation(svc, who, req.chat or req.completion, "chat" if req.chat else "text")
            await gen.start()
            async for chunk in gen.chunks():
                await ws.send_text(chunk.model_dump_json())
            if not gen.settle_behind():  # as a stream's [DONE]: `done` leaves, the hold settles behind it
                await gen.settle()
            await ws.send_text(gen.done(gen.ended_usage()).model_dump_json())
            await ws.close()
        except APIError as exc:
            err = StreamError(error=error_model(exc).error, status=exc.status)
            if close_code is None:
                close_code = (WS_POLICY_VIOLATION if exc.status in (401, 402, 429) else
                              WS_SERVER_ERROR if exc.status >= 500 else WS_UNSUPPORTED_DATA)
            try:
                await ws.send_text(err.model_dump_json())
                # a close frame's reason holds at most 123 bytes
                await ws.close(code=close_code, reason=exc.message.encode()[:120].decode(errors="ignore"))
            except (WebSocketDisconnect, RuntimeError):
                pass  # the client left first
        except asyncio.TimeoutError:
            if gen is None:  # no request in time
                await _close_quietly(ws, WS_POLICY_VIOLATION, "no request within "
                                                              f"{WS_FIRST_MESSAGE_TIMEOUT_S:g} s")
        except WebSocketDisconnect:
            pass
        finally:
            if gen is not None:
                gen.settle_soon()

    return v1

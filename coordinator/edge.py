"""What the HTTP edge does before any route runs, and how it speaks JSON.

- `BodyLimit`: ASGI middleware that bounds every request body before it is parsed. A declared
  Content-Length over the limit is refused at once; a body without one (chunked) is counted as its
  chunks arrive and refused at the first byte past the limit, so at most `max_bytes` are ever read.
  The refusal is a 413 in OpenAI's error shape (`BodyTooLarge` is an HTTPException: FastAPI's body
  reader re-raises it, the app's handler renders it).
- `LoginThrottle`: a token bucket of failed logins per client address. An address that spent its
  burst of bad keys is answered 429 with Retry-After before its key is even looked up, so guessing
  keys is slow; the table of addresses is bounded (least recently seen forgotten first).
- `finite` / `dumps`: JSON that a browser's parser accepts: NaN and the infinities become null, and
  encoding runs with allow_nan=False so a value that slips past the sanitiser fails loudly here
  instead of reaching a client as a bare `NaN`.
- `max_chars_per_token`: the longest text one token of a tokenizer stands for; with the context
  limit it bounds a prompt's characters before the prompt is tokenized.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import OrderedDict

from starlette.exceptions import HTTPException

from coordinator.schemas import ErrorBody, ErrorDetail

# Room for the largest valid request: MAX_PROMPT_CHARS (100,000) characters at up to 12 bytes each
# once JSON-escaped (an astral character as two \uXXXX escapes), plus the other fields.
MAX_BODY_BYTES = 2 * 2**20
# Failed logins: a burst of LOGIN_BURST bad keys, then one every 1/LOGIN_REFILL_PER_S seconds.
LOGIN_BURST = 20
LOGIN_REFILL_PER_S = 1.0
MAX_THROTTLED_ADDRESSES = 10_000
# A tokenizer whose vocabulary cannot be read gets this bound (SmolLM2's longest token: 81 chars).
DEFAULT_MAX_CHARS_PER_TOKEN = 128
MAX_JSON_DEPTH = 32  # deeper parts of a document we send (say a provider's profile) are sent as null


class BodyTooLarge(HTTPException):
    def __init__(self, max_bytes: int):
        super().__init__(413, f"request body over {max_bytes} bytes")


class BodyLimit:
    """Refuse request bodies over `max_bytes` (413) while they arrive, before anything parses them."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            return await _send_413(send, self.max_bytes)
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:  # raised where no handler rendered it (e.g. a route reading the stream)
            if not started:
                await _send_413(send, self.max_bytes)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_413(send, max_bytes: int) -> None:
    body = dumps(error_body(f"request body over {max_bytes} bytes", "invalid_request_error",
                            code="request_too_large")).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape, from the schema the docs show."""
    return ErrorBody(error=ErrorDetail(message=message, type=type_, param=param, code=code)).model_dump()


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, headers: dict | None = None,
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.headers = status, message, type_, headers or {}
        self.param, self.code = param, code


def validation_message(errors) -> tuple[str, str | None]:
    """A message and the first bad parameter from pydantic's errors: where and which rule, never the
    input (an error's "input" and "ctx" may hold the key or the body)."""
    parts, seen, first = [], set(), None
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if _names_a_field(x)]
        where = ".".join(loc)
        if where in seen:  # a union's other branches: one reason a field is enough
            continue
        seen.add(where)
        first = first if first is not None else (loc[0] if loc else None)
        msg = str(e.get("msg", "invalid"))[:200]
        parts.append(f"{where}: {msg}" if where else msg)
        if len(parts) == 3:
            break
    return "; ".join(parts) or "invalid request", first


def _names_a_field(part) -> bool:
    """Parts of pydantic's `loc` that a client wrote: not where the value came from ("body",
    "query"), nor the validator of a union's branch ("function-after[...]")."""
    return part not in ("body", "query", "path", "header", "cookie") and not (isinstance(part, str) and "[" in part)


class LoginThrottle:
    """Failed logins per client address: `burst` at once, then `refill_per_s`; bounded memory."""

    def __init__(self, burst: float = LOGIN_BURST, refill_per_s: float = LOGIN_REFILL_PER_S,
                 max_addresses: int = MAX_THROTTLED_ADDRESSES, clock=time.monotonic):
        self.burst, self.refill_per_s, self.max_addresses, self.clock = burst, refill_per_s, max_addresses, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # address -> (tokens, at)
        self._lock = threading.Lock()

    def _tokens(self, address: str, now: float) -> float:
        tokens, at = self._buckets.get(address, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.refill_per_s)

    def wait_s(self, address: str) -> float:
        """0.0 if `address` may try a key now, else the seconds until it may."""
        now = self.clock()
        with self._lock:
            tokens = self._tokens(address, now)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.refill_per_s

    def failed(self, address: str) -> None:
        now = self.clock()
        with self._lock:
            tokens = self._tokens(address, now)
            self._buckets[address] = (max(0.0, tokens - 1.0), now)
            self._buckets.move_to_end(address)
            while len(self._buckets) > self.max_addresses:
                self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


def finite(value, _depth: int = 0):
    """`value` with every NaN and infinity replaced by None (dicts, lists and tuples walked), and
    whatever lies deeper than MAX_JSON_DEPTH or is not JSON at all replaced by None too."""
    if _depth > MAX_JSON_DEPTH:
        return None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v, _depth + 1) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return None


def dumps(value) -> str:
    """Strict, compact JSON: NaN and infinities sanitised to null, allow_nan=False behind it."""
    return json.dumps(finite(value), allow_nan=False, separators=(",", ":"))


def max_chars_per_token(tokenizer) -> int:
    """The longest text any single token decodes to: a prompt of more than this many characters per
    token of context cannot fit, whatever it holds."""
    try:
        n = len(tokenizer)
        longest = max(len(tokenizer.decode([i])) for i in range(n))
    except Exception:  # a tokenizer without a readable vocabulary (test doubles): the stated default
        return DEFAULT_MAX_CHARS_PER_TOKEN
    return max(1, longest)

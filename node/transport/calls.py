"""What the node's blocking face (host.py) and its asyncio face (aio.py) share: a registered
handler and a trio call with a deadline. Below both, so neither imports the other for it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from .config import TransportTimeout


@dataclass(frozen=True)
class Handler:
    kind: str  # "request" | "stream"
    fn: Callable[..., Any]
    loop: asyncio.AbstractEventLoop | None  # set for coroutine functions


async def with_timeout(timeout_s: float, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        with trio.fail_after(timeout_s):
            return await fn(*args)
    except trio.TooSlowError:
        raise TransportTimeout(f"{getattr(fn, '__name__', 'call')} timed out after {timeout_s} s") from None

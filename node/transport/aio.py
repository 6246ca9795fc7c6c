"""asyncio face of P2PNode, for FastAPI code (the coordinator).

Each call is handed to the node's trio thread (P2PNode.submit, bounded) and
awaited with asyncio.wrap_future; the deadline is enforced inside trio, so a
cancelled asyncio task never leaves a trio operation running past it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any

from .bridge import BridgeClosed, BridgeTimeout
from .config import StreamClosed, TransportTimeout
from wire.frames import Frame
from .calls import Handler, with_timeout
from .stream import Stream


async def _acall(node, timeout_s: float, fn: Callable[..., Any], *args: Any) -> Any:
    fut = node.submit(with_timeout, timeout_s, fn, *args)
    try:
        return await asyncio.wait_for(asyncio.wrap_future(fut), timeout_s + 5.0)
    except asyncio.TimeoutError:
        raise TransportTimeout(f"no answer from the p2p thread within {timeout_s} s") from None


class AsyncP2PNode:
    """Wraps a started or not-yet-started P2PNode; start/close block briefly."""

    def __init__(self, node) -> None:
        self.node = node

    @property
    def peer_id(self) -> str:
        return self.node.peer_id

    async def start(self) -> str:
        return await asyncio.to_thread(self.node.start)

    async def close(self) -> None:
        await asyncio.to_thread(self.node.close)

    async def connect(self, addr: str, timeout_s: float | None = None) -> str:
        return await _acall(self.node, timeout_s or self.node.cfg.connect_timeout_s, self.node._connect, addr)

    async def request(self, peer: str, protocol: str, frame: Frame, timeout_s: float | None = None) -> Frame:
        return await _acall(self.node, timeout_s or self.node.cfg.request_timeout_s, self.node._request, peer, protocol, frame)

    async def open_stream(self, peer: str, protocol: str, timeout_s: float | None = None) -> "AsyncStream":
        fs = await _acall(self.node, timeout_s or self.node.cfg.connect_timeout_s, self.node._open, peer, protocol)
        return AsyncStream(Stream(self.node, fs))

    def set_handler(self, protocol: str, fn: Callable[..., Any]) -> None:
        """fn: async (frame, peer_id) -> Frame, run on the current event loop."""
        self.node._register(protocol, _handler("request", fn))

    def set_stream_handler(self, protocol: str, fn: Callable[..., Any]) -> None:
        """fn: async (AsyncStream) -> None, run on the current event loop."""
        self.node._register(protocol, _handler("stream", fn))


def _handler(kind: str, fn: Callable[..., Any]) -> Any:
    if not asyncio.iscoroutinefunction(fn):
        raise TypeError("AsyncP2PNode handlers must be coroutine functions")
    return Handler(kind, fn, asyncio.get_running_loop())


class AsyncStream:
    """Stream for asyncio code; same semantics as host.Stream."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self.peer_id = stream.peer_id
        self.protocol = stream.protocol

    async def send(self, frame: Frame, timeout_s: float | None = None) -> None:
        fs, cfg = self._stream._fs, self._stream.node.cfg
        timeout_s = timeout_s or cfg.request_timeout_s
        parts, nbytes = fs.encode(frame)
        if fs.closed:
            raise StreamClosed(fs.end_reason or "stream closed")
        if not fs.outbox.try_acquire_slot():  # queue full: wait off the event loop
            if not await asyncio.to_thread(fs.outbox.acquire_slot, timeout_s):
                raise TransportTimeout(f"send queue to {self.peer_id} full for {timeout_s} s")
        if nbytes <= cfg.copy_send_bytes:
            fs.outbox.post([b"".join(parts)], nbytes, None)
            return
        done: concurrent.futures.Future = concurrent.futures.Future()
        fs.outbox.post(parts, nbytes, done)
        try:
            await asyncio.wait_for(asyncio.wrap_future(done), timeout_s + cfg.frame_timeout_s)
        except asyncio.TimeoutError:
            raise TransportTimeout(f"send to {self.peer_id} not done within {timeout_s} s") from None

    async def recv(self, timeout_s: float | None = None) -> Frame:
        fs = self._stream._fs
        try:
            return fs.unwrap(await fs.inbox.get_async(timeout_s or self._stream.node.cfg.request_timeout_s))
        except BridgeClosed as e:
            raise StreamClosed(str(e)) from None
        except BridgeTimeout as e:
            raise TransportTimeout(str(e)) from None

    async def close(self, timeout_s: float = 5.0) -> None:
        node = self._stream.node
        await _acall(node, timeout_s, node._release, self._stream._fs)

    async def __aenter__(self) -> "AsyncStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

"""Bounded hand-over of frames between the node's trio thread and its users.

`Inbox`: frames received on one stream. The trio reader puts (blocking on a
trio semaphore when full: backpressure), and any consumer takes without a
round trip through trio: a thread (threading.Condition), an asyncio task
(a loop future woken with call_soon_threadsafe) or a trio task. Each take
hands a slot back to trio with run_sync_soon, which never blocks.

`Outbox`: frames to send on one stream, in order, by one trio writer task.
Threads post with run_sync_soon (FIFO); a threading semaphore bounds how
many are queued. Small frames are copied at post time so the caller may
reuse its tensors at once; large ones are sent without a copy and the
caller waits for their completion.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import deque
from typing import Any

import trio

from .config import StreamClosed
from wire.frames import Frame


class BridgeClosed(Exception):
    """Raised by Inbox getters once the stream ended and no frame is left."""


class BridgeTimeout(Exception):
    pass


def _set_result_if_pending(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _call_in_trio(token: trio.lowlevel.TrioToken, fn: Any, *args: Any) -> bool:
    try:
        token.run_sync_soon(fn, *args)
        return True
    except trio.RunFinishedError:
        return False


class Inbox:
    """Created in the trio thread; put/close only from there."""

    def __init__(self, capacity: int) -> None:
        assert capacity > 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._items: deque[Frame] = deque()
        self._closed: str | None = None
        self._space = trio.Semaphore(capacity)
        self._token = trio.lowlevel.current_trio_token()
        self._trio_wakeup: trio.Event | None = None
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    # ---------------------------------------------------------- trio side
    async def put(self, frame: Frame) -> None:
        await self._space.acquire()
        with self._lock:
            self._items.append(frame)
            self._wake_locked()

    def close(self, reason: str) -> None:
        with self._lock:
            if self._closed is None:
                self._closed = reason
            self._wake_locked()

    def _wake_locked(self) -> None:
        self._cond.notify_all()
        if self._trio_wakeup is not None:
            self._trio_wakeup.set()
            self._trio_wakeup = None
        for loop, fut in self._async_waiters:
            try:
                loop.call_soon_threadsafe(_set_result_if_pending, fut)
            except RuntimeError:  # loop closed
                pass
        self._async_waiters.clear()

    def _pop_locked(self) -> Frame | None:
        if self._items:
            return self._items.popleft()
        if self._closed is not None:
            raise BridgeClosed(self._closed)
        return None

    async def get_trio(self) -> Frame:
        while True:
            with self._lock:
                frame = self._pop_locked()
                if frame is None:
                    if self._trio_wakeup is None:
                        self._trio_wakeup = trio.Event()
                    wakeup = self._trio_wakeup
            if frame is not None:
                self._space.release()
                return frame
            await wakeup.wait()

    # ---------------------------------------------------------- other threads
    def get(self, timeout_s: float) -> Frame:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                frame = self._pop_locked()
                if frame is not None:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BridgeTimeout(f"no frame within {timeout_s} s")
                self._cond.wait(remaining)
        _call_in_trio(self._token, self._space.release)
        return frame

    async def get_async(self, timeout_s: float) -> Frame:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            with self._lock:
                frame = self._pop_locked()
                if frame is None:
                    fut = loop.create_future()
                    self._async_waiters.append((loop, fut))
            if frame is not None:
                _call_in_trio(self._token, self._space.release)
                return frame
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                await asyncio.wait_for(fut, remaining)
            except asyncio.TimeoutError:
                with self._lock:
                    if (loop, fut) in self._async_waiters:
                        self._async_waiters.remove((loop, fut))
                raise BridgeTimeout(f"no frame within {timeout_s} s") from None


class Outbox:
    """Ordered, bounded queue of frames for one trio writer task."""

    def __init__(self, capacity: int) -> None:
        assert capacity > 0
        self._send, self._recv = trio.open_memory_channel[tuple](capacity)
        self._slots = threading.BoundedSemaphore(capacity)
        self._token = trio.lowlevel.current_trio_token()

    def acquire_slot(self, timeout_s: float) -> bool:
        return self._slots.acquire(timeout=timeout_s)

    def try_acquire_slot(self) -> bool:
        return self._slots.acquire(blocking=False)

    def post(self, parts: list, nbytes: int, done: concurrent.futures.Future | None) -> None:
        """From any thread, after acquire_slot(): queue the frame for the writer."""
        if not _call_in_trio(self._token, self._post_in_trio, parts, nbytes, done):
            self._fail(done, "node closed")

    def _post_in_trio(self, parts: list, nbytes: int, done: concurrent.futures.Future | None) -> None:
        try:
            self._send.send_nowait((parts, nbytes, done))
        except (trio.ClosedResourceError, trio.BrokenResourceError, trio.WouldBlock):
            self._fail(done, "stream closed")

    def _fail(self, done: concurrent.futures.Future | None, reason: str) -> None:
        self._slots.release()
        if done is not None and not done.done():
            done.set_exception(StreamClosed(reason))

    def close(self) -> None:
        """Trio side: no more posts; the writer drains what is queued."""
        self._send.close()

    async def next(self) -> tuple | None:
        """Trio side, for the writer: the next (parts, nbytes, done), None once closed and drained.
        Call done_with_item() after each."""
        try:
            return await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return None

    def done_with_item(self) -> None:
        self._slots.release()

    def fail_queued(self, reason: str) -> None:
        """Trio side, when the writer stops: fail whatever is still queued."""
        self._send.close()
        while True:
            try:
                _, _, done = self._recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            self._fail(done, reason)

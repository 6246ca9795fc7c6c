"""Stream: the blocking, thread-safe face of one FrameStream."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import Any

from .bridge import BridgeClosed, BridgeTimeout
from .channel import FrameStream
from .config import StreamClosed, TransportError, TransportTimeout
from wire.frames import Frame

log = logging.getLogger("meshpool.transport")


class Stream:
    """A frame stream usable from any thread but the node's own.

    send() copies frames up to cfg.copy_send_bytes and returns once they are
    queued (an error shows at the next send/recv); larger frames go without a
    copy and send() returns when they are written: don't change their tensors
    before. recv() takes from the stream's inbox without a trip through trio.
    """

    def __init__(self, node, fs: FrameStream) -> None:
        self.node = node
        self._fs = fs
        self.peer_id = fs.peer_id
        self.protocol = fs.protocol

    def send(self, frame: Frame, timeout_s: float | None = None) -> None:
        timeout_s = timeout_s or self.node.cfg.request_timeout_s
        done = self._post(frame, timeout_s, copy_small=True)
        if done is None:
            return
        try:
            done.result(timeout=timeout_s + self._fs.cfg.frame_timeout_s)
        except concurrent.futures.TimeoutError:
            raise TransportTimeout(f"send to {self.peer_id} not done within {timeout_s} s") from None

    def send_nowait(self, frame: Frame, timeout_s: float | None = None) -> concurrent.futures.Future:
        """Queue a frame without a copy and return at once, to overlap compute with sending
        (e.g. chunked prefill). Don't change its tensors until the future is done."""
        done = self._post(frame, timeout_s or self.node.cfg.request_timeout_s, copy_small=False)
        assert done is not None
        return done

    def _post(self, frame: Frame, timeout_s: float, *, copy_small: bool) -> concurrent.futures.Future | None:
        fs = self._fs
        parts, nbytes = fs.encode(frame)
        if fs.closed:
            raise StreamClosed(fs.end_reason or "stream closed")
        if not fs.outbox.acquire_slot(timeout_s):
            raise TransportTimeout(f"send queue to {self.peer_id} full for {timeout_s} s")
        if copy_small and nbytes <= self.node.cfg.copy_send_bytes:
            fs.outbox.post([b"".join(parts)], nbytes, None)
            return None
        done: concurrent.futures.Future = concurrent.futures.Future()
        fs.outbox.post(parts, nbytes, done)
        return done

    def recv(self, timeout_s: float | None = None) -> Frame:
        """Next frame; StreamClosed at the end (reason in the message), RemoteError, TransportTimeout."""
        if threading.current_thread() is self.node._thread:
            raise TransportError("Stream.recv called from the node's trio thread")
        try:
            return self._fs.unwrap(self._fs.inbox.get(timeout_s or self.node.cfg.request_timeout_s))
        except BridgeClosed as e:
            raise StreamClosed(str(e)) from None
        except BridgeTimeout as e:
            raise TransportTimeout(str(e)) from None

    def close(self, timeout_s: float = 5.0) -> None:
        try:
            self.node.call(timeout_s, self.node._release, self._fs)
        except TransportError as e:
            log.debug("close of stream with %s: %s", self.peer_id, e)

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

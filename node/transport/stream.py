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

    @property
    def on_link(self) -> bool:
        """Whether frames sent now go on the frame link (link.py) rather than the libp2p stream
        (a link test reports which path it timed: node/link_test.py)."""
        return self._fs.link_out is not None or self._fs.link_ready is not None

    def send(self, frame: Frame, timeout_s: float | None = None) -> None:
        timeout_s = timeout_s or self.node.cfg.request_timeout_s
        if self._fs.link_wanted:
            with self._fs.link_send_lock:  # one order for both paths while they switch
                if self._send_link(frame, timeout_s):
                    return
                done = self._post(frame, timeout_s, copy_small=True)
        else:
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
        timeout_s = timeout_s or self.node.cfg.request_timeout_s
        if self._fs.link_wanted:
            with self._fs.link_send_lock:
                if self._send_link(frame, timeout_s):  # written by now: the tensors are free again
                    done: concurrent.futures.Future = concurrent.futures.Future()
                    done.set_result(None)
                    return done
                done = self._post(frame, timeout_s, copy_small=False)
        else:
            done = self._post(frame, timeout_s, copy_small=False)
        assert done is not None
        return done

    def _send_link(self, frame: Frame, timeout_s: float) -> bool:
        """With link_send_lock held: write the frame on the frame link (link.py) from this thread if
        there is one, switching to it first if it just became ready; False: use the libp2p path."""
        fs = self._fs
        if fs.link_out is None and fs.link_ready is not None:
            # the marker goes after every frame queued on the libp2p stream: once it is written, so
            # are they, and the reader takes them all before it turns to the link
            marker = self._post(Frame("transport.link_on", 1, {}), timeout_s, copy_small=False, control=True)
            try:
                marker.result(timeout=timeout_s + fs.cfg.frame_timeout_s)
            except concurrent.futures.TimeoutError:
                raise TransportTimeout(f"send to {self.peer_id} not done within {timeout_s} s") from None
            fs.link_out, fs.link_ready = fs.link_ready, None
        if fs.link_out is None:
            return False
        parts, nbytes = fs.encode(frame)
        if fs.closed:
            raise StreamClosed(fs.end_reason or "stream closed")
        fs.send_link(parts, nbytes, timeout_s)
        return True

    def _post(self, frame: Frame, timeout_s: float, *, copy_small: bool,
              control: bool = False) -> concurrent.futures.Future | None:
        fs = self._fs
        parts, nbytes = fs.encode(frame, control=control)
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
        timeout_s = timeout_s or self.node.cfg.request_timeout_s
        fs = self._fs
        try:
            if fs.link_in_active:
                return fs.recv_link(timeout_s)
            frame = fs.inbox.get(timeout_s)
            if frame.type == "transport.link_on":  # every frame sent before it is taken: on to the link
                fs.link_in_active = True
                return fs.recv_link(timeout_s)
            return fs.unwrap(frame)
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

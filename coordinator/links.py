"""The coordinator's ends of a pipeline: a stream to stage 0 for steps, and a board where the
results that last stages send back are matched with the steps waiting for them."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import Callable

from node.transport import P2PNode, Stream, TransportError
from wire.messages import PROTO_STAGE, Close, Failed, Result, Step

log = logging.getLogger("meshpool.coordinator")

MAX_STEPS_IN_FLIGHT = 4096
CLOSE_TIMEOUT_S = 5.0


class StepAborted(ConnectionError):
    pass


class ResultBoard:
    """Futures of the steps in flight, keyed by (pipeline, step), with the stages of that
    pipeline: results are taken from its last stage only, failure reports from any stage."""

    def __init__(self):
        self.lock = threading.Lock()
        self.waiting: dict[tuple[str, int], tuple[concurrent.futures.Future, tuple[str, ...]]] = {}

    def expect(self, pipeline: str, step: int, stage_peers: tuple[str, ...]) -> concurrent.futures.Future:
        with self.lock:
            if len(self.waiting) >= MAX_STEPS_IN_FLIGHT:
                raise StepAborted("too many steps in flight")
            future = concurrent.futures.Future()
            self.waiting[(pipeline, step)] = (future, stage_peers)
            return future

    def deliver(self, message: Result | Failed, from_peer: str) -> bool:
        """Hand a result or a failure report to its step; False if it was not expected from that peer."""
        key = (message.pipeline, message.step)
        failed = isinstance(message, Failed)
        with self.lock:
            future, stage_peers = self.waiting.get(key, (None, ()))
            if future is None or from_peer not in (stage_peers if failed else stage_peers[-1:]):
                log.warning("%s for step %s from %s dropped: not expected from that peer", message.TYPE, key, from_peer)
                return False
            del self.waiting[key]
        if failed:
            future.set_exception(StepAborted(message.reason))
        else:
            future.set_result(message)
        return True

    def forget(self, pipeline: str, step: int) -> None:
        with self.lock:
            self.waiting.pop((pipeline, step), None)

    def abort(self, pipeline: str, reason: str) -> None:
        with self.lock:
            keys = [k for k in self.waiting if k[0] == pipeline]
            futures = [self.waiting.pop(k)[0] for k in keys]
        for future in futures:
            future.set_exception(StepAborted(reason))


class StreamLink:
    """Implements PipelineLink over one long-lived libp2p stream to stage 0."""

    def __init__(self, node: P2PNode, pipeline: str, stage_peers: tuple[str, ...], board: ResultBoard):
        self.node, self.pipeline, self.stage_peers, self.board = node, pipeline, stage_peers, board
        self.stage0_peer = stage_peers[0]
        self.stream: Stream | None = None
        self.aborted: str | None = None
        self.expected: set[int] = set()  # steps sent and not answered

    def send(self, step: Step, timeout_s: float,
             on_done: Callable[[concurrent.futures.Future], None]) -> concurrent.futures.Future:
        """Send a step to stage 0 and return at once: the future gets its Result (or StepAborted) from
        the board, and `on_done(future)` runs then, on the thread that delivers it. Steps of one link are
        sent in order on one stream, so every stage sees them in the order the driver issued them."""
        if self.aborted:
            raise StepAborted(self.aborted)
        future = self.board.expect(self.pipeline, step.step, self.stage_peers)
        self.expected.add(step.step)
        future.add_done_callback(lambda f: self.expected.discard(step.step))
        future.add_done_callback(on_done)
        try:
            if self.stream is None:
                self.stream = self.node.open_stream(self.stage0_peer, PROTO_STAGE, timeout_s=timeout_s, link=True)
            self.stream.send(step.to_frame(), timeout_s=timeout_s)
        except TransportError as exc:
            self.board.forget(self.pipeline, step.step)
            raise StepAborted(f"stage 0 ({self.stage0_peer}) unreachable: {exc}") from exc
        return future

    def close_sessions(self, sessions: list[str], requests: list[str]) -> None:
        if self.stream is None or self.aborted:
            return
        try:
            self.stream.send(Close(self.pipeline, tuple(sessions), tuple(requests)).to_frame(),
                             timeout_s=CLOSE_TIMEOUT_S)
        except TransportError as exc:
            log.info("closing sessions on %s: %s", self.pipeline, exc)

    def abort(self, reason: str) -> None:
        self.aborted = reason
        self.board.abort(self.pipeline, reason)

    def shutdown(self) -> None:
        for step in list(self.expected):  # steps abandoned in flight: their late results are dropped
            self.board.forget(self.pipeline, step)
        if self.stream is not None:
            self.stream.close()
            self.stream = None

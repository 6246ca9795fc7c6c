"""A hop's bandwidth, timed by the stage that would send on it.

The coordinator asks provider A (`LinkTest`, on the assign protocol) to time its hop to provider B.
A opens a stream to B the way a stage opens one to its next stage (PROTO_LINK_TEST with the frame
link, node/transport/link.py, falling back to the libp2p stream where no link can be made), sends
empty payloads until the stream has moved onto the path it will keep (the link comes up in the
background) and takes the least of a few round trips; then it sends `transfers` payloads of
`payload_bytes` and takes the least time from sending one to B's Ack. The coordinator turns the
two into a bandwidth (coordinator/hop_bandwidth.py). Bounded: payloads of at most
MAX_LINK_TEST_BYTES, at most MAX_LINK_TEST_TRANSFERS of them, the whole test within
TEST_TIMEOUT_S; B serves at most MAX_SERVING tests at once and a bounded number of frames each.
Payloads are zeros: never this process's memory.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from node.transport import P2PNode, Stream, StreamClosed, TransportError
from wire.messages import (MAX_LINK_TEST_TRANSFERS, PROTO_LINK_TEST, Ack, LinkMeasured, LinkPayload, LinkTest,
                           Message, MessageError, decode, refuse)

log = logging.getLogger("meshpool.provider")

ROUND_TRIPS = 3  # empty payloads timed once the stream is on its path: the least is the round trip
LINK_WAIT_S = 2.0  # how long the sender waits for the frame link to come up before timing libp2p
TEST_TIMEOUT_S = 20.0  # the whole test, set-up included
FRAME_TIMEOUT_S = 10.0  # one payload and its Ack
CONNECT_TIMEOUT_S = 5.0  # dialing the peer and opening the stream, each
MAX_SERVING = 2  # link tests a provider answers at once
MAX_FRAMES_SERVED = 64  # per test stream: more than a test sends (warm-up, round trips, transfers)


def run(node: P2PNode, test: LinkTest) -> Message:
    """Time the hop to `test.peer`; a LinkMeasured, or a refusal saying what failed."""
    deadline = time.monotonic() + TEST_TIMEOUT_S
    try:
        if test.addrs:
            node.connect(test.addrs[0], timeout_s=CONNECT_TIMEOUT_S)
        with node.open_stream(test.peer, PROTO_LINK_TEST, timeout_s=CONNECT_TIMEOUT_S, link=True) as stream:
            empty = LinkPayload(torch.zeros(0))
            _round_trip(stream, empty)
            waited = time.monotonic() + LINK_WAIT_S
            while not stream.on_link and time.monotonic() < min(waited, deadline):
                _round_trip(stream, empty)  # the link comes up in the background: frames move to it
            on_link = stream.on_link
            rtt_s = min(_round_trip(stream, empty) for _ in range(ROUND_TRIPS))
            payload = LinkPayload(torch.zeros(test.payload_bytes // 4 or 1))
            transfers = []
            for _ in range(min(test.transfers, MAX_LINK_TEST_TRANSFERS)):
                if time.monotonic() > deadline:
                    break
                transfers.append(_round_trip(stream, payload))
    except (TransportError, OSError, MessageError) as exc:
        return refuse(f"link test to {test.peer}: {type(exc).__name__}: {exc}")
    return LinkMeasured(test.peer, payload.x.numel() * 4, max(rtt_s * 1e3, 1e-3), max(min(transfers) * 1e3, 1e-3),
                        "link" if on_link else "libp2p")


def _round_trip(stream: Stream, payload: LinkPayload) -> float:
    started = time.perf_counter()
    stream.send(payload.to_frame(), timeout_s=FRAME_TIMEOUT_S)
    answer = decode(stream.recv(timeout_s=FRAME_TIMEOUT_S), Ack)
    if not answer.ok:
        raise MessageError(f"the peer refused the payload: {answer.reason}")
    return time.perf_counter() - started


class LinkTestServer:
    """B's side: acknowledge each payload once it is all received, a bounded number of tests at once."""

    def __init__(self) -> None:
        self._slots = threading.BoundedSemaphore(MAX_SERVING)

    def serve(self, stream: Stream) -> None:
        if not self._slots.acquire(blocking=False):
            stream.close()
            return
        try:
            for _ in range(MAX_FRAMES_SERVED):
                try:
                    frame = stream.recv(timeout_s=FRAME_TIMEOUT_S)
                except (StreamClosed, TransportError):
                    return
                try:
                    decode(frame, LinkPayload)
                    answer = Ack()
                except MessageError as exc:
                    answer = refuse(str(exc))
                stream.send(answer.to_frame(), timeout_s=FRAME_TIMEOUT_S)
                if not answer.ok:
                    return
        except TransportError as exc:
            log.debug("link test from %s: %s", stream.peer_id, exc)
        finally:
            self._slots.release()
            stream.close()

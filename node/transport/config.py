"""Transport settings and error classes (every limit and timeout in one place)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from wire.frames import FrameLimits

from .faults import FrameFaults

BULK_CIPHERS = ("aes-256-gcm", "none")
FRAME_LINK_ENV = "MESHPOOL_FRAME_LINK"


class TransportError(Exception):
    """Base of the transport's runtime errors (not FrameError)."""


class StreamClosed(TransportError, EOFError):
    """The stream ended (peer closed, reset, or we dropped it); reason in str()."""


class RemoteError(TransportError):
    """The peer answered with transport.error."""


class TransportTimeout(TransportError, TimeoutError):
    pass


@dataclass(frozen=True)
class TransportConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 0  # 0 = any free port
    muxer: str = "YAMUX"  # "YAMUX" or "MPLEX"; yamux measured ~5x faster here
    limits: FrameLimits = field(default_factory=FrameLimits)
    stream_queue_frames: int = 8  # received frames buffered per stream
    stream_send_frames: int = 8  # frames queued for sending per stream
    copy_send_bytes: int = 64 * 1024  # Stream.send copies frames up to this size and returns at once
    max_streams: int = 256  # open FrameStreams per node, both directions
    max_streams_per_peer: int = 64  # inbound streams one peer may hold open
    disconnect_on_bad_frame: bool = False  # also close the whole connection of a peer that sent one
    max_pending_calls: int = 1024  # calls from other threads in flight
    handler_threads: int = 16  # sync handlers running at once
    connect_timeout_s: float = 10.0
    request_timeout_s: float = 30.0
    handler_timeout_s: float = 60.0
    frame_timeout_s: float = 30.0  # rest of a frame, once its prefix arrived
    start_timeout_s: float = 15.0
    # bulk side channel (bulk.py); 0 disables it
    bulk_threshold_bytes: int = 256 * 1024
    bulk_cipher: str = "aes-256-gcm"  # "none" only for benchmarks
    bulk_accept_plaintext: bool = False
    bulk_setup_timeout_s: float = 5.0
    max_bulk_pending: int = 64
    # frame link (link.py) for streams opened with link=True (pipeline hops); MESHPOOL_FRAME_LINK=off
    # keeps those on libp2p, as before it existed (benchmarks measure both in one run)
    frame_link: bool = field(default_factory=lambda: os.environ.get(FRAME_LINK_ENV, "on") != "off")
    # seeded frame faults for chaos tests (faults.py): None, unless MESHPOOL_FAULTS is set
    faults: FrameFaults | None = field(default_factory=FrameFaults.from_env, compare=False)
    # Circuit Relay v2 (reach.py): serve the hop role, i.e. relay for peers that cannot be dialed
    relay_hop: bool = False
    hole_punch: bool = True  # DCUtR: upgrade relayed connections to direct ones where the NATs allow

    def __post_init__(self) -> None:
        assert self.muxer in ("YAMUX", "MPLEX"), self.muxer
        assert self.bulk_cipher in BULK_CIPHERS, self.bulk_cipher
        assert self.stream_queue_frames > 0 and self.stream_send_frames > 0 and self.max_streams > 0

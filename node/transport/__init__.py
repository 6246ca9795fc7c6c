"""meshpool transport: frames, identity and the libp2p host (issue 3)."""

from .config import RemoteError, StreamClosed, TransportConfig, TransportError, TransportTimeout
from wire.frames import Frame, FrameError, FrameLimits, MessageSpec, decode_frame, encode_frame, register_message
from .host import P2PNode, Stream, protocol_id
from .identity import Identity, load_or_create

__all__ = [
    "Frame", "FrameError", "FrameLimits", "MessageSpec", "decode_frame", "encode_frame", "register_message",
    "Identity", "load_or_create",
    "P2PNode", "Stream", "protocol_id",
    "TransportConfig", "TransportError", "StreamClosed", "RemoteError", "TransportTimeout",
]

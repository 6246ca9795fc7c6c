"""Length-prefixed frames: a msgpack header plus raw tensor bytes.

Wire layout of one frame (all integers big-endian):

    prefix   16 bytes   magic b"MPF1" | header_len u32 | payload_len u64
    header   header_len bytes of msgpack: {"t": type, "v": version,
             "f": {fields}, "x": [[dtype, [dims...]], ...]}
    pad      (-header_len) % 8 zero bytes, so the payload starts 8-aligned
    payload  payload_len bytes: the tensors one after another, each starting
             at an 8-aligned offset (zero padding in between)

Decoding checks every size against `FrameLimits` before it allocates: the
prefix bounds the header, the header must describe exactly `payload_len`
bytes (prod(shape) x itemsize per tensor, plus alignment), and only then is
the payload buffer allocated. Tensors are views on that one bytearray
(torch.frombuffer); nothing is unpickled and torch.load is never called.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

MAGIC = b"MPF1"
PREFIX = struct.Struct(">4sIQ")
PREFIX_BYTES = PREFIX.size  # 16
ALIGN_BYTES = 8

# dtype name on the wire -> (torch dtype, itemsize). bfloat16 travels as its
# raw 16-bit pattern; torch.frombuffer reads it back without numpy.
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "float32": (torch.float32, 4),
    "bfloat16": (torch.bfloat16, 2),
    "float16": (torch.float16, 2),
    "int64": (torch.int64, 8),
    "int32": (torch.int32, 4),
}
_DTYPE_NAMES = {dt: name for name, (dt, _) in DTYPES.items()}


class FrameError(ValueError):
    """A frame that breaks the wire format, a limit or its message schema."""


@dataclass(frozen=True)
class FrameLimits:
    max_header_bytes: int = 64 * 1024
    max_tensors: int = 16
    max_dims: int = 8
    max_frame_bytes: int = 64 * 1024 * 1024  # prefix + header + payload

    def __post_init__(self) -> None:
        assert 0 < self.max_header_bytes < 2**32
        assert 0 <= self.max_tensors and 0 < self.max_dims
        assert self.max_frame_bytes > PREFIX_BYTES + self.max_header_bytes


DEFAULT_LIMITS = FrameLimits()


@dataclass
class Frame:
    """One named, versioned message: small fields plus raw tensors."""

    type: str
    version: int = 1
    fields: dict[str, Any] = field(default_factory=dict)
    tensors: list[torch.Tensor] = field(default_factory=list)


# ---------------------------------------------------------------- registry
@dataclass(frozen=True)
class MessageSpec:
    """Schema of a message type: required fields with their Python types."""

    type: str
    version: int
    fields: Mapping[str, type | tuple[type, ...]]
    min_tensors: int = 0
    max_tensors: int | None = None


_REGISTRY: dict[tuple[str, int], MessageSpec] = {}


def register_message(spec: MessageSpec) -> MessageSpec:
    """Register a message type; re-registering the same spec is a no-op."""
    key = (spec.type, spec.version)
    old = _REGISTRY.get(key)
    if old is not None and old != spec:
        raise ValueError(f"message {spec.type} v{spec.version} already registered differently")
    _REGISTRY[key] = spec
    return spec


def message_spec(type_: str, version: int) -> MessageSpec | None:
    return _REGISTRY.get((type_, version))


def validate_message(frame: Frame, *, require_registered: bool = False) -> None:
    """Check a frame against its registered schema (if any)."""
    spec = _REGISTRY.get((frame.type, frame.version))
    if spec is None:
        if require_registered:
            raise FrameError(f"unknown message type {frame.type!r} v{frame.version}")
        return
    for name, types in spec.fields.items():
        if name not in frame.fields:
            raise FrameError(f"{frame.type} v{frame.version}: missing field {name!r}")
        value = frame.fields[name]
        # bool is an int subclass; refuse it where an int is wanted.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
            raise FrameError(
                f"{frame.type} v{frame.version}: field {name!r} has type "
                f"{type(value).__name__}, wanted {_type_names(types)}"
            )
    n = len(frame.tensors)
    if n < spec.min_tensors or (spec.max_tensors is not None and n > spec.max_tensors):
        raise FrameError(
            f"{frame.type} v{frame.version}: {n} tensors, wanted "
            f"{spec.min_tensors}..{spec.max_tensors if spec.max_tensors is not None else 'any'}"
        )


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _type_names(types: type | tuple[type, ...]) -> str:
    return "|".join(t.__name__ for t in _as_tuple(types))


# Messages the transport itself uses. Application messages register theirs
# the same way (e.g. "stage.activations" v1) in their own modules.
register_message(MessageSpec("transport.error", 1, {"reason": str}, max_tensors=0))
register_message(MessageSpec("transport.bulk_offer", 1, {"port": int, "token": bytes, "key": bytes}, max_tensors=0))
register_message(MessageSpec("transport.bulk_ref", 1, {"nbytes": int}, max_tensors=0))
# the receiver's answer when it cannot dial the offer: dial me at port with token (port 0: no bulk channel)
register_message(MessageSpec("transport.bulk_reverse", 1, {"port": int, "token": bytes}, max_tensors=0))
register_message(MessageSpec("transport.ping", 1, {}))
# the frame link (node/transport/link.py): offered like bulk_offer, answered like bulk_reverse; link_on
# marks where the opener's frames move from the libp2p stream to the link
register_message(MessageSpec("transport.link_offer", 1, {"port": int, "token": bytes, "key": bytes, "cipher": str},
                             max_tensors=0))
register_message(MessageSpec("transport.link_reverse", 1, {"port": int, "token": bytes}, max_tensors=0))
register_message(MessageSpec("transport.link_on", 1, {}, max_tensors=0))


# ---------------------------------------------------------------- encoding
def _align(n: int) -> int:
    return (n + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw bytes of a CPU tensor, without a copy when it is already contiguous."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def encode_frame_parts(frame: Frame, limits: FrameLimits = DEFAULT_LIMITS) -> list[memoryview | bytes]:
    """Encode to a list of buffers (prefix+header, then tensor bytes), no tensor copies."""
    if not isinstance(frame.type, str) or not frame.type:
        raise FrameError("frame type must be a non-empty string")
    if len(frame.tensors) > limits.max_tensors:
        raise FrameError(f"{len(frame.tensors)} tensors exceed the limit of {limits.max_tensors}")
    descs: list[list[Any]] = []
    bodies: list[memoryview] = []
    for i, t in enumerate(frame.tensors):
        if not isinstance(t, torch.Tensor):
            raise FrameError(f"tensor {i} is a {type(t).__name__}, not a torch.Tensor")
        name = _DTYPE_NAMES.get(t.dtype)
        if name is None:
            raise FrameError(f"tensor {i} has dtype {t.dtype}, not one of {sorted(DTYPES)}")
        if t.dim() > limits.max_dims:
            raise FrameError(f"tensor {i} has {t.dim()} dims, limit {limits.max_dims}")
        descs.append([name, list(t.shape)])
        bodies.append(_tensor_bytes(t))
    try:
        header = msgpack.packb(
            {"t": frame.type, "v": frame.version, "f": frame.fields, "x": descs}, use_bin_type=True
        )
    except (TypeError, ValueError, OverflowError) as e:
        raise FrameError(f"header does not encode as msgpack: {e}") from e
    if len(header) > limits.max_header_bytes:
        raise FrameError(f"header is {len(header)} bytes, limit {limits.max_header_bytes}")
    parts: list[memoryview | bytes] = []
    payload_len = 0
    for body in bodies:
        pad = _align(payload_len) - payload_len
        if pad:
            parts.append(bytes(pad))
        parts.append(body)
        payload_len += pad + body.nbytes
    total = PREFIX_BYTES + _align(len(header)) + payload_len
    if total > limits.max_frame_bytes:
        raise FrameError(f"frame is {total} bytes, limit {limits.max_frame_bytes}")
    head = PREFIX.pack(MAGIC, len(header), payload_len) + header + bytes(_align(len(header)) - len(header))
    return [head, *parts]


def encode_frame(frame: Frame, limits: FrameLimits = DEFAULT_LIMITS) -> bytes:
    """Encode to one bytes object (copies; use encode_frame_parts on hot paths)."""
    return b"".join(encode_frame_parts(frame, limits))


# ---------------------------------------------------------------- decoding
@dataclass(frozen=True)
class FrameHead:
    """A checked prefix + header: everything needed to receive the payload."""

    type: str
    version: int
    fields: dict[str, Any]
    tensors: tuple[tuple[torch.dtype, tuple[int, ...], int, int], ...]  # dtype, shape, offset, nbytes
    header_len: int
    payload_len: int

    @property
    def pad_len(self) -> int:
        return _align(self.header_len) - self.header_len

    @property
    def frame_len(self) -> int:
        return PREFIX_BYTES + _align(self.header_len) + self.payload_len


def parse_prefix(prefix: bytes | bytearray | memoryview, limits: FrameLimits = DEFAULT_LIMITS) -> tuple[int, int]:
    """(header_len, payload_len) from the 16-byte prefix, checked against the limits."""
    if len(prefix) != PREFIX_BYTES:
        raise FrameError(f"truncated prefix: {len(prefix)} of {PREFIX_BYTES} bytes")
    magic, header_len, payload_len = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise FrameError(f"bad magic {bytes(magic)!r}, wanted {MAGIC!r}")
    if header_len == 0 or header_len > limits.max_header_bytes:
        raise FrameError(f"header length {header_len} outside 1..{limits.max_header_bytes}")
    total = PREFIX_BYTES + _align(header_len) + payload_len
    if total > limits.max_frame_bytes:
        raise FrameError(f"frame of {total} bytes exceeds the limit of {limits.max_frame_bytes}")
    return header_len, payload_len


def parse_header(header: bytes | bytearray | memoryview, payload_len: int, limits: FrameLimits = DEFAULT_LIMITS) -> FrameHead:
    """Check the msgpack header and that it describes exactly payload_len bytes."""
    try:
        obj = msgpack.unpackb(
            header,
            raw=False,
            strict_map_key=True,
            max_bin_len=limits.max_header_bytes,
            max_str_len=limits.max_header_bytes,
            max_array_len=max(limits.max_tensors, 1024),
            max_map_len=1024,
            max_ext_len=0,
        )
    except Exception as e:  # msgpack raises many types on garbage (ValueError, ExtraData, ...)
        raise FrameError(f"header is not valid msgpack: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict) or set(obj) != {"t", "v", "f", "x"}:
        raise FrameError("header must be a map with exactly the keys t, v, f, x")
    type_, version, fields, descs = obj["t"], obj["v"], obj["f"], obj["x"]
    if not isinstance(type_, str) or not type_ or len(type_) > 128:
        raise FrameError("header t (message type) must be a string of 1..128 chars")
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version < 2**16:
        raise FrameError("header v (version) must be an int in 0..65535")
    if not isinstance(fields, dict):
        raise FrameError("header f (fields) must be a map")
    if not isinstance(descs, list):
        raise FrameError("header x (tensors) must be a list")
    if len(descs) > limits.max_tensors:
        raise FrameError(f"{len(descs)} tensors exceed the limit of {limits.max_tensors}")
    tensors = []
    offset = 0
    for i, d in enumerate(descs):
        if not (isinstance(d, list) and len(d) == 2 and isinstance(d[0], str) and isinstance(d[1], list)):
            raise FrameError(f"tensor {i}: descriptor must be [dtype, [dims...]]")
        name, shape = d
        if name not in DTYPES:
            raise FrameError(f"tensor {i}: dtype {name!r} not in {sorted(DTYPES)}")
        if len(shape) > limits.max_dims:
            raise FrameError(f"tensor {i}: {len(shape)} dims exceed the limit of {limits.max_dims}")
        for dim in shape:
            if not isinstance(dim, int) or isinstance(dim, bool) or not 0 <= dim < 2**40:
                raise FrameError(f"tensor {i}: dim {dim!r} is not an int in 0..2^40")
        dtype, itemsize = DTYPES[name]
        nbytes = math.prod(shape) * itemsize
        offset = _align(offset)
        if offset + nbytes > payload_len:
            raise FrameError(
                f"tensor {i}: {name}{shape} needs {nbytes} bytes at offset {offset}, "
                f"payload has {payload_len}"
            )
        tensors.append((dtype, tuple(shape), offset, nbytes))
        offset += nbytes
    if offset != payload_len:
        raise FrameError(f"tensors describe {offset} payload bytes, prefix says {payload_len}")
    return FrameHead(type_, version, fields, tuple(tensors), len(header), payload_len)


def tensors_from_payload(head: FrameHead, payload: bytearray | memoryview) -> list[torch.Tensor]:
    """Tensors as views on the payload buffer (writable when it is a bytearray)."""
    if len(payload) != head.payload_len:
        raise FrameError(f"payload is {len(payload)} bytes, header says {head.payload_len}")
    out = []
    for dtype, shape, offset, nbytes in head.tensors:
        if nbytes == 0:
            out.append(torch.empty(shape, dtype=dtype))
            continue
        flat = torch.frombuffer(payload, dtype=dtype, count=nbytes // DTYPES[_DTYPE_NAMES[dtype]][1], offset=offset)
        out.append(flat.view(shape))
    return out


def frame_from_head(head: FrameHead, payload: bytearray | memoryview, *, require_registered: bool = False) -> Frame:
    frame = Frame(head.type, head.version, head.fields, tensors_from_payload(head, payload))
    validate_message(frame, require_registered=require_registered)
    return frame


def decode_frame(data: bytes | bytearray | memoryview, limits: FrameLimits = DEFAULT_LIMITS) -> Frame:
    """Decode one whole frame held in memory (must be exactly one frame)."""
    view = memoryview(data)
    if len(view) < PREFIX_BYTES:
        raise FrameError(f"truncated prefix: {len(view)} of {PREFIX_BYTES} bytes")
    header_len, payload_len = parse_prefix(view[:PREFIX_BYTES], limits)
    start = PREFIX_BYTES + _align(header_len)
    if len(view) != start + payload_len:
        raise FrameError(f"frame is {len(view)} bytes, prefix says {start + payload_len}")
    head = parse_header(view[PREFIX_BYTES : PREFIX_BYTES + header_len], payload_len, limits)
    payload = view[start:]
    if isinstance(data, bytes) or view.readonly:
        payload = bytearray(payload)  # torch.frombuffer wants a writable buffer
    return frame_from_head(head, payload)


def frame_nbytes(parts: Iterable[memoryview | bytes]) -> int:
    return sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)

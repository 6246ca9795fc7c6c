"""Exact reads and chunked writes of frames on one py-libp2p stream.

py-libp2p 0.8.1 quirks handled here:
  * `INetStream.read(n)` returns *up to* n bytes (yamux hands out what it has
    buffered), and at end of stream either returns b"" or raises StreamEOF;
    `StreamReader` loops and treats both as EOF.
  * every read goes through net_stream's state lock and yamux's buffer
    bookkeeping, so small reads ask for a whole yamux frame and keep the rest.
"""

from __future__ import annotations

from typing import Any

import torch
import trio

from wire.frames import (
    PREFIX_BYTES,
    Frame,
    FrameError,
    FrameLimits,
    frame_from_head,
    frame_nbytes,
    parse_header,
    parse_prefix,
)

WRITE_CHUNK_BYTES = 1 << 20  # bytes per INetStream.write for large frames
READ_AHEAD_BYTES = 64 * 1024  # one yamux frame; small frames arrive in one read


def alloc_buffer(nbytes: int) -> memoryview:
    """Writable bytes; uninitialised when large (bytearray(n) would zero-fill megabytes first)."""
    if nbytes < 1 << 20:
        return memoryview(bytearray(nbytes))  # ~0.3 us vs ~6 us for torch.empty + numpy
    return memoryview(torch.empty(nbytes, dtype=torch.uint8).numpy()).cast("B")


class StreamReader:
    """Exact reads from a libp2p stream with a small read-ahead buffer."""

    def __init__(self, ns: Any) -> None:
        self.ns = ns
        self._buf = b""
        self._pos = 0

    async def _read(self, n: int) -> bytes:
        try:
            return await self.ns.read(n)
        except EOFError:
            return b""

    async def read_into(self, view: memoryview) -> int:
        """Fill view; returns bytes read (< len(view) only at end of stream)."""
        n = len(view)
        got = min(n, len(self._buf) - self._pos)
        if got:
            view[:got] = self._buf[self._pos : self._pos + got]
            self._pos += got
        while got < n:
            want = n - got
            if want >= READ_AHEAD_BYTES:
                chunk = await self._read(want)
                if not chunk:
                    return got
                view[got : got + len(chunk)] = chunk
                got += len(chunk)
            else:
                chunk = await self._read(READ_AHEAD_BYTES)
                if not chunk:
                    return got
                take = min(want, len(chunk))
                view[got : got + take] = chunk[:take]
                got += take
                self._buf, self._pos = chunk, take
        return got


async def read_frame(reader: StreamReader, limits: FrameLimits, frame_timeout_s: float) -> Frame | None:
    """Next frame from a libp2p stream, or None at a clean end of stream."""
    prefix = bytearray(PREFIX_BYTES)
    view = memoryview(prefix)
    if await reader.read_into(view[:1]) == 0:  # idle streams may wait here without limit
        return None
    with trio.move_on_after(frame_timeout_s) as scope:  # the rest of the frame must follow promptly
        got = 1 + await reader.read_into(view[1:])
        if got < PREFIX_BYTES:
            raise FrameError(f"truncated frame: stream ended after {got} prefix bytes")
        header_len, payload_len = parse_prefix(prefix, limits)
        pad = (-header_len) % 8
        header = bytearray(header_len + pad)
        if await reader.read_into(memoryview(header)) < len(header):
            raise FrameError("truncated frame: stream ended inside the header")
        head = parse_header(memoryview(header)[:header_len], payload_len, limits)
        payload = alloc_buffer(payload_len)  # size checked against the header above
        if await reader.read_into(payload) < payload_len:
            raise FrameError("truncated frame: stream ended inside the payload")
    if scope.cancelled_caught:
        raise FrameError(f"frame not completed within {frame_timeout_s} s")
    return frame_from_head(head, payload)


async def write_parts(ns: Any, parts: list) -> None:
    total = frame_nbytes(parts)
    if total <= WRITE_CHUNK_BYTES:
        await ns.write(b"".join(parts))  # one yamux write: lowest latency
        return
    for part in parts:
        view = memoryview(part).cast("B")
        for start in range(0, len(view), WRITE_CHUNK_BYTES):
            await ns.write(bytes(view[start : start + WRITE_CHUNK_BYTES]))

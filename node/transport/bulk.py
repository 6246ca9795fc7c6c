"""The bulk side channel: one plain TCP socket per stream direction, carrying
the bytes of large frames as AES-256-GCM records.

Why it exists: on loopback py-libp2p 0.8.1 streams (Noise + Yamux, 64 KiB
frames, pure-Python framing) move an 8 MB frame at ~120 MB/s while a plain
trio socket moves ~900 MB/s; see bench/transport.py.

How it is authenticated (no trust in the TCP socket itself):
  1. The sender A makes a fresh 32-byte token and a fresh 32-byte key, keeps
     them in a bounded pending table, and sends `transport.bulk_offer`
     {port, token, key, cipher} over the libp2p stream. That stream is Noise-
     encrypted and bound to both peer ids, so only B's peer id learns the
     token and key, and B knows the offer came from A's peer id.
  2. B dials A's bulk port (the IP is the one B's libp2p connection to A
     uses) and writes the token. A matches it to the pending offer and binds
     the socket to that stream; an unknown token closes the socket.
  3. Each large frame: `transport.bulk_ref` {nbytes} on the libp2p stream
     (so order with small frames is kept), then the frame bytes on the socket
     as records `u32 ciphertext_len | AES-GCM(key, nonce=counter, chunk)`.
     The counter nonce makes reordered, replayed or injected records fail
     authentication, which B treats like a bad frame.
  2b. If B cannot dial A (A is behind NAT: the direction a home router blocks), B makes a token
     of its own and answers `transport.bulk_reverse` {port, token} on the stream; A dials B's
     bulk port and writes that token, and the socket serves the same way. Port 0 says B has no
     way either, and A sends large frames over the libp2p stream from then on.
  On a relayed libp2p connection (reach.py) no bulk channel is offered: the IP the connection
  shows is the relay's, and the peers cannot dial each other by definition.
In benchmarks over emulated distance (`MESHPOOL_SHAPE_BULK`, shaper.py) the offered port is a
shaper in front of the listener, so large frames pay the same delay and rate as the streams.
With cipher "none" (bench only, and only if the receiver allows it) records
are plain and only the token binds the socket: not confidential, and a
network attacker able to inject into TCP could alter bytes.
"""

from __future__ import annotations

import logging
import secrets
import struct
from typing import Any

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .config import BULK_CIPHERS, TransportError
from .shaper import Shape, Shaped
from .shaper import serve as serve_shaped
from wire.frames import FrameError

log = logging.getLogger("meshpool.transport")

TOKEN_BYTES = 32
KEY_BYTES = 32
TAG_BYTES = 16
RECORD_PLAIN_BYTES = 1 << 20  # 1 MiB of plaintext per record
RECORD_LEN = struct.Struct(">I")
CIPHERS = BULK_CIPHERS


def new_secrets() -> tuple[bytes, bytes]:
    return secrets.token_bytes(TOKEN_BYTES), secrets.token_bytes(KEY_BYTES)


def _nonce(counter: int) -> bytes:
    return b"\0\0\0\0" + counter.to_bytes(8, "big")


async def recv_exactly_into(sock: trio.socket.SocketType, view: memoryview) -> None:
    """Fill view from sock; EOF before it is full is an error."""
    got = 0
    n = len(view)
    while got < n:
        k = await sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError(f"bulk socket closed after {got} of {n} bytes")
        got += k


class BulkSender:
    """Writes frames as records on a connected socket (single writer)."""

    def __init__(self, sock: trio.socket.SocketType, key: bytes, cipher: str) -> None:
        assert cipher in CIPHERS
        self.sock = sock
        self._aead = AESGCM(key) if cipher == "aes-256-gcm" else None
        self._counter = 0

    async def send_parts(self, parts: list) -> None:
        for part in parts:
            view = memoryview(part).cast("B")
            for start in range(0, len(view), RECORD_PLAIN_BYTES):
                chunk = view[start : start + RECORD_PLAIN_BYTES]
                if self._aead is not None:
                    record = self._aead.encrypt(_nonce(self._counter), chunk, None)
                    self._counter += 1
                    await self._send_all(RECORD_LEN.pack(len(record)))
                    await self._send_all(record)
                else:
                    await self._send_all(RECORD_LEN.pack(len(chunk)))
                    await self._send_all(chunk)

    async def _send_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            sent = await self.sock.send(view)
            view = view[sent:]

    def close(self) -> None:
        self.sock.close()


class BulkReceiver:
    """Reads one frame's bytes from records into a caller-sized buffer."""

    def __init__(self, sock: trio.socket.SocketType, key: bytes, cipher: str) -> None:
        assert cipher in CIPHERS
        self.sock = sock
        self._aead = AESGCM(key) if cipher == "aes-256-gcm" else None
        self._counter = 0
        self._scratch = bytearray(RECORD_PLAIN_BYTES + TAG_BYTES)
        self._len = bytearray(RECORD_LEN.size)

    async def recv_into(self, out: memoryview) -> None:
        got = 0
        while got < len(out):
            await recv_exactly_into(self.sock, memoryview(self._len))
            (rec_len,) = RECORD_LEN.unpack(self._len)
            overhead = TAG_BYTES if self._aead is not None else 0
            plain_len = rec_len - overhead
            if not 0 < plain_len <= min(RECORD_PLAIN_BYTES, len(out) - got):
                raise FrameError(f"bulk record of {rec_len} bytes does not fit the announced frame")
            if self._aead is None:
                await recv_exactly_into(self.sock, out[got : got + plain_len])
            else:
                scratch = memoryview(self._scratch)[:rec_len]
                await recv_exactly_into(self.sock, scratch)
                try:
                    self._aead.decrypt_into(_nonce(self._counter), scratch, None, out[got : got + plain_len])
                except InvalidTag as e:
                    raise FrameError("bulk record failed authentication") from e
                self._counter += 1
            got += plain_len

    def close(self) -> None:
        self.sock.close()


class BulkListener:
    """The sender's end of bulk channels: one TCP listener per node, matching
    each incoming connection's token to a pending offer (bounded, one use)."""

    def __init__(self, host: str, setup_timeout_s: float, max_pending: int, shape: Shape | None = None) -> None:
        self.host = host
        self.port: int | None = None  # the port offered to peers (a shaper's, when shaped)
        self.shape = shape if shape is not None else Shape.from_env()
        self.shaped = Shaped()  # what the shaper in front of the listener forwarded (when shaped)
        self.setup_timeout_s = setup_timeout_s
        self.max_pending = max_pending
        self._pending: dict[bytes, trio.MemorySendChannel] = {}
        self._handshakes = trio.Semaphore(2 * max_pending)

    async def start(self, nursery: trio.Nursery) -> None:
        sock = trio.socket.socket()
        await sock.bind((self.host, 0))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        nursery.start_soon(self._accept_loop, sock, nursery)
        if self.shape is not None:  # peers dial the shaper, which forwards to the listener
            self.port = await nursery.start(serve_shaped, (self.host, 0), (self.host, self.port), self.shape,
                                            self.shaped)

    def expect(self, token: bytes) -> trio.MemoryReceiveChannel:
        """Register an offer; the receive channel yields the matching socket."""
        if len(self._pending) >= self.max_pending:
            raise TransportError("too many pending bulk offers")
        send, recv = trio.open_memory_channel(1)
        self._pending[token] = send
        return recv

    def forget(self, token: bytes) -> None:
        self._pending.pop(token, None)

    def fulfil(self, token: bytes, sock: trio.socket.SocketType | None) -> bool:
        """Hand a socket dialed the other way (or None: no channel) to the offer waiting on token."""
        waiter = self._pending.pop(token, None)
        if waiter is None:
            return False
        try:
            waiter.send_nowait(sock)
            return True
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return False

    async def _accept_loop(self, listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        with listener:
            while True:
                sock, addr = await listener.accept()
                try:
                    self._handshakes.acquire_nowait()
                except trio.WouldBlock:
                    log.warning("too many bulk handshakes; closing connection from %s", addr)
                    sock.close()
                    continue
                nursery.start_soon(self._handshake, sock, addr)

    async def _handshake(self, sock: trio.socket.SocketType, addr: Any) -> None:
        try:
            token = bytearray(TOKEN_BYTES)
            try:
                with trio.fail_after(self.setup_timeout_s):
                    await recv_exactly_into(sock, memoryview(token))
            except (OSError, EOFError, trio.TooSlowError) as e:
                log.warning("bulk connection from %s gave no token: %s", addr, e)
                sock.close()
                return
            waiter = self._pending.pop(bytes(token), None)
            if waiter is None:
                log.warning("bulk connection from %s with an unknown token; closed", addr)
                sock.close()
                return
            sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
            try:
                waiter.send_nowait(sock)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                sock.close()
        finally:
            self._handshakes.release()

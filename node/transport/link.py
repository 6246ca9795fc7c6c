"""The frame link: one plain TCP socket per libp2p stream that carries pipeline frames (all sizes),
read and written by the threads that use the stream, never by the trio loop.

Why it exists: a batch-1 pipeline hop over a py-libp2p stream crosses threads four times (the
sender's thread -> trio writer -> yamux/Noise in Python -> trio reader -> the receiver's thread)
and pays pure-Python Noise and yamux framing on every frame; bench/pipeline_overhead.py measures
that against this path. Here the sender's own thread encrypts and writes the frame and the
receiver's own thread (the one serving the stream: a stage's upstream thread, the coordinator's
result thread) reads, decrypts and decodes it: no trio crossing, no extra copy.

Set-up and crypto are bulk.py's, unchanged: the opener offers a fresh token and AES-256-GCM key
over the (Noise-encrypted, peer-id bound) libp2p stream, the other side dials the opener's bulk
listener and writes the token, or asks to be dialed the other way (`transport.link_reverse`); a
relayed stream gets no link. The records are bulk.py's too: `u32 ciphertext_len | AES-GCM(key,
nonce=counter, chunk)`, so a reordered, replayed or injected record fails authentication. A frame
is one record when it fits RECORD_PLAIN_BYTES (a whole batch-1 frame always does) and otherwise
its parts in records, the first one holding the frame's prefix; the receiver learns the frame's
size from that prefix and checks it against its FrameLimits before taking more.

The switch from the libp2p stream to the link keeps frame order: the opener sends
`transport.link_on` on the libp2p stream after the frames it sent there, and the receiver reads
the link only once it has taken that marker from the stream's inbox (channel.py, stream.py).
"""

from __future__ import annotations

import socket
import threading

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .bulk import CIPHERS, RECORD_LEN, RECORD_PLAIN_BYTES, TAG_BYTES, _nonce
from .config import StreamClosed
from .wire import alloc_buffer
from wire.frames import PREFIX_BYTES, Frame, FrameError, FrameLimits, decode_frame, parse_prefix

SMALL_RECORD_BYTES = 64 * 1024  # records up to this size go out in one write with their length


class LinkTimeout(Exception):
    """No frame began within the wait asked for; nothing was consumed from the link."""


def stdlib_socket(sock: trio.socket.SocketType) -> socket.socket:
    """The connected trio socket as a blocking stdlib socket (same file descriptor), for threads."""
    plain = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    plain.setblocking(True)
    plain.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return plain


class LinkSender:
    """Writes frames as records; any thread, one frame at a time."""

    def __init__(self, sock: socket.socket, key: bytes, cipher: str) -> None:
        assert cipher in CIPHERS
        self.sock = sock
        self._aead = AESGCM(key) if cipher == "aes-256-gcm" else None
        self._counter = 0
        self._lock = threading.Lock()
        self.broken: str | None = None

    def send_parts(self, parts: list, nbytes: int, timeout_s: float) -> None:
        """Write one encoded frame; StreamClosed if the link broke (it is unusable from then on)."""
        with self._lock:
            if self.broken is not None:
                raise StreamClosed(self.broken)
            try:
                self.sock.settimeout(timeout_s)
                if nbytes <= RECORD_PLAIN_BYTES:
                    self._record(parts[0] if len(parts) == 1 else b"".join(parts))
                else:
                    for part in parts:  # the first part is the frame's prefix and header
                        view = memoryview(part).cast("B")
                        for start in range(0, len(view), RECORD_PLAIN_BYTES):
                            self._record(view[start : start + RECORD_PLAIN_BYTES])
            except OSError as e:  # a timeout too: a record may be half written, so the link is over
                self.broken = f"link send failed: {type(e).__name__}: {e}"
                raise StreamClosed(self.broken) from e

    def _record(self, chunk: bytes | memoryview) -> None:
        if self._aead is not None:
            chunk = self._aead.encrypt(_nonce(self._counter), chunk, None)
            self._counter += 1
        if len(chunk) <= SMALL_RECORD_BYTES:
            self.sock.sendall(RECORD_LEN.pack(len(chunk)) + chunk)  # one segment for a small frame
        else:
            self.sock.sendall(RECORD_LEN.pack(len(chunk)))
            self.sock.sendall(chunk)

    def close(self) -> None:
        """Send what is written, then FIN: the receiver sees the end after the last frame."""
        self.broken = self.broken or "link closed"
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.sock.close()


class LinkReceiver:
    """Reads frames from records; one reading thread at a time."""

    def __init__(self, sock: socket.socket, key: bytes, cipher: str, limits: FrameLimits,
                 frame_timeout_s: float) -> None:
        assert cipher in CIPHERS
        self.sock = sock
        self.limits = limits
        self.frame_timeout_s = frame_timeout_s
        self._aead = AESGCM(key) if cipher == "aes-256-gcm" else None
        self._overhead = TAG_BYTES if self._aead is not None else 0
        self._counter = 0
        self._scratch = bytearray(RECORD_PLAIN_BYTES + TAG_BYTES)
        self._len = bytearray(RECORD_LEN.size)
        self._lock = threading.Lock()

    def recv(self, timeout_s: float) -> Frame:
        """The next frame. LinkTimeout if none began within timeout_s; EOFError at the end of the
        link; FrameError for a bad record or frame (the link is unusable from then on)."""
        with self._lock:
            view = memoryview(self._len)
            self.sock.settimeout(timeout_s)
            try:
                got = self.sock.recv_into(view, len(view))
            except socket.timeout:
                raise LinkTimeout(f"no frame within {timeout_s} s") from None
            if got == 0:
                raise EOFError("link closed by the peer")
            self.sock.settimeout(self.frame_timeout_s)  # the rest of the frame must follow promptly
            try:
                self._exactly(view[got:])
                first = self._read_record(None, 0)
                if len(first) < PREFIX_BYTES:
                    raise FrameError(f"link record of {len(first)} bytes holds no frame prefix")
                header_len, payload_len = parse_prefix(first[:PREFIX_BYTES], self.limits)
                total = PREFIX_BYTES + header_len + (-header_len) % 8 + payload_len
                if len(first) > total:
                    raise FrameError(f"link record of {len(first)} bytes is longer than its {total}-byte frame")
                if len(first) == total:
                    return decode_frame(first, self.limits)
                out = alloc_buffer(total)  # a large frame: later records decrypt straight into it
                out[: len(first)] = first
                got = len(first)
                while got < total:
                    self._exactly(memoryview(self._len))
                    got += len(self._read_record(out, got))
                return decode_frame(out, self.limits)
            except socket.timeout:
                raise FrameError(f"frame on the link not completed within {self.frame_timeout_s} s") from None

    def _read_record(self, out: memoryview | None, at: int) -> memoryview:
        """The record whose length is in self._len, decrypted into out[at:] (or a new buffer)."""
        (rec_len,) = RECORD_LEN.unpack(self._len)
        plain_len = rec_len - self._overhead
        room = RECORD_PLAIN_BYTES if out is None else min(RECORD_PLAIN_BYTES, len(out) - at)
        if not 0 < plain_len <= room:
            raise FrameError(f"link record of {rec_len} bytes does not fit the frame")
        dest = memoryview(bytearray(plain_len)) if out is None else out[at : at + plain_len]
        if self._aead is None:
            self._exactly(dest)
            return dest
        scratch = memoryview(self._scratch)[:rec_len]
        self._exactly(scratch)
        try:
            self._aead.decrypt_into(_nonce(self._counter), scratch, None, dest)
        except InvalidTag as e:
            raise FrameError("link record failed authentication") from e
        self._counter += 1
        return dest

    def _exactly(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            k = self.sock.recv_into(view[got:], len(view) - got)
            if k == 0:
                raise EOFError(f"link closed after {got} of {len(view)} bytes of a record")
            got += k

    def shutdown(self) -> None:
        """Any thread: wake a reader blocked on the link (it then sees the end)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()

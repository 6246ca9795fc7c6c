"""Frames over one libp2p stream (trio side), with the bulk side channel.

A `FrameStream` owns one libp2p stream. Its reader task reads and checks
frames (wire.py) and puts them in a bounded Inbox (backpressure reaches the
sender through the yamux window); its writer task sends what the Outbox
holds, large frames over the bulk channel of bulk.py. A bad frame from the
peer resets the stream and logs why; nothing outside this stream is touched.

py-libp2p 0.8.1 quirks handled here:
  * `close()` on a yamux stream is a write half-close (FIN); the peer can still
    send its reply, so request/response closes after reading the reply.
  * Stream errors come as several unrelated classes (StreamEOF, StreamReset,
    StreamError, MuxedStream*); they all mean "this stream is over".
  * a reset by one side may reach the other as a plain end of stream.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

import trio
from libp2p.connection_types import ConnectionType

from . import bulk as bulkmod
from . import faults as faultsmod
from . import link as linkmod
from .bridge import BridgeClosed, Inbox, Outbox, _call_in_trio
from .config import RemoteError, StreamClosed, TransportConfig, TransportError, TransportTimeout
from wire.frames import (
    PREFIX_BYTES,
    Frame,
    FrameError,
    decode_frame,
    encode_frame,
    encode_frame_parts,
    frame_nbytes,
    validate_message,
)
from .wire import StreamReader, alloc_buffer, read_frame, write_parts

log = logging.getLogger("meshpool.transport")


def _is_relayed(ns: Any) -> bool:
    """Whether the libp2p stream runs over a relayed (/p2p-circuit) connection."""
    try:
        return ns.muxed_conn.get_connection_type() == ConnectionType.RELAYED
    except Exception:  # a muxer without connection types (mplex in tests): a direct TCP connection
        return False


class BulkHub(Protocol):
    """What a FrameStream needs from its node for the bulk channel."""

    bulk_port: int | None
    stats: Counter[str]  # frames_sent, bulk_frames_sent, frames_received, bulk_frames_received, streams_dropped

    def bulk_expect(self, token: bytes) -> trio.MemoryReceiveChannel: ...

    def bulk_forget(self, token: bytes) -> None: ...

    def bulk_fulfil(self, token: bytes, sock: Any) -> bool: ...

    def on_bad_frame(self, peer_id: str, reason: str) -> None: ...

    def submit(self, fn: Any, *args: Any) -> Any: ...

    def spawn(self, fn: Any, *args: Any) -> None: ...


class FrameStream:
    """Frames over one libp2p stream. Runs in the node's trio thread, except
    encode() and the inbox/outbox ends that bridge.py gives other threads."""

    def __init__(self, ns: Any, peer_id: str, protocol: str, cfg: TransportConfig, hub: BulkHub) -> None:
        self.ns = ns
        self._reader = StreamReader(ns)
        self.peer_id = peer_id
        self.protocol = protocol
        self.cfg = cfg
        self.hub = hub
        self.inbox = Inbox(cfg.stream_queue_frames)
        self.outbox = Outbox(cfg.stream_send_frames)
        self._send_lock = trio.Lock()
        self._reader_scope = trio.CancelScope()
        self._writer_done = trio.Event()
        self._bulk_out: bulkmod.BulkSender | None = None
        self._bulk_out_failed = False
        self._bulk_in: bulkmod.BulkReceiver | None = None
        self._bulk_offered: bytes | None = None  # token of our offer while the peer answers it
        self._bulk_in_pending: tuple | None = None  # (token, waiter, key, cipher) of our bulk_reverse
        self.relayed = _is_relayed(ns)
        # the frame link (link.py): the opener asks for one (link_wanted), the serving side takes it
        # only for a threaded stream handler (accept_link); the opener's threads switch to it at
        # their next send once it is ready, the reader's thread once it takes `transport.link_on`
        self.link_wanted = False
        self.accept_link = False
        self.link_ready: linkmod.LinkSender | None = None
        self.link_out: linkmod.LinkSender | None = None
        self.link_send_lock = threading.Lock()
        self.link_in: linkmod.LinkReceiver | None = None
        self.link_in_active = False
        self._link_in_sock: Any = None  # trio socket dialed for the peer's offer, until link_on
        self._link_in_secret: tuple | None = None  # (key, cipher) of the offer we took
        self._link_in_pending: tuple | None = None  # (token, waiter) of our link_reverse
        self._link_dialed: trio.Event | None = None  # set once our dial for the peer's offer is done
        self._link_offered: bytes | None = None
        self._link_dup: Frame | None = None
        self.end_reason: str | None = None
        self.closed = False
        self._faults = cfg.faults.for_stream(protocol) if cfg.faults is not None else None

    # ------------------------------------------------------------ receiving
    async def run_reader(self) -> None:
        with self._reader_scope:
            try:
                while True:
                    frame = await read_frame(self._reader, self.cfg.limits, self.cfg.frame_timeout_s)
                    if frame is None:
                        self.end_reason = self.end_reason or "peer closed the stream"
                        break
                    if frame.type.startswith("transport.") and frame.type != "transport.error":
                        frame = await self._control(frame)
                        if frame is None:
                            continue
                        if frame.type == "transport.link_on":  # a marker, never faulted or counted
                            await self.inbox.put(frame)
                            continue
                    self.hub.stats["frames_received"] += 1
                    if self._faults is None:
                        await self.inbox.put(frame)
                    else:
                        await self._put_faulted(frame)
            except FrameError as e:
                self.hub.stats["streams_dropped"] += 1
                self.end_reason = f"bad frame: {e}"
                log.warning("dropping stream %s from peer %s: %s", self.protocol, self.peer_id, e)
                self.hub.on_bad_frame(self.peer_id, str(e))  # before the reset the peer will see
                await self._abort()
            except Exception as e:  # libp2p stream errors: reset, EOF, closed connection
                self.end_reason = self.end_reason or f"stream error: {type(e).__name__}: {e}"
                log.debug("stream %s with %s ended: %s", self.protocol, self.peer_id, e)
        if self.end_reason != "peer closed the stream" or self.link_in is None:
            # the link's own end follows a clean close (the opener closes it first); anything else
            # wakes a thread blocked on the link now
            self._close_link_in()
        self.inbox.close(self.end_reason or "stream closed")

    async def _put_faulted(self, frame: Frame) -> None:
        """Chaos tests only (faults.py): hold back, drop or duplicate one received frame."""
        action, delay_s = self._faults.next()
        if delay_s > 0:
            self.hub.stats["faults_delayed"] += 1
            log.info("frame fault: delayed %s on %s from %s by %.0f ms", frame.type, self.protocol, self.peer_id,
                     delay_s * 1000)
            await trio.sleep(delay_s)
        if action == faultsmod.DROP:
            self.hub.stats["faults_dropped"] += 1
            log.info("frame fault: dropped %s on %s from %s", frame.type, self.protocol, self.peer_id)
            return
        await self.inbox.put(frame)
        if action == faultsmod.DUP:
            self.hub.stats["faults_duplicated"] += 1
            log.info("frame fault: duplicated %s on %s from %s", frame.type, self.protocol, self.peer_id)
            await self.inbox.put(frame)

    async def _control(self, frame: Frame) -> Frame | None:
        validate_message(frame, require_registered=True)
        if frame.type == "transport.bulk_offer":
            await self._accept_bulk_offer(frame.fields)
            return None
        if frame.type == "transport.bulk_ref":
            return await self._recv_bulk(frame.fields["nbytes"])
        if frame.type == "transport.bulk_reverse":
            await self._dial_reverse(frame.fields)
            return None
        if frame.type == "transport.link_offer":
            await self._accept_link_offer(frame.fields)
            return None
        if frame.type == "transport.link_reverse":
            await self._dial_link_reverse(frame.fields)
            return None
        if frame.type == "transport.link_on":
            await self._link_on()
            return frame  # goes through the inbox: its reader switches to the link after the frames before it
        if frame.type == "transport.ping":
            return None
        raise FrameError(f"unknown control message {frame.type}")

    def _check_offer(self, f: dict, cipher: str, what: str, plaintext: str) -> None:
        """A bulk or link offer's cipher, token, key and port, as the channel (bulk.py) needs them."""
        if cipher not in bulkmod.CIPHERS:
            raise FrameError(f"{what} with unknown cipher {cipher!r}")
        if cipher == "none" and not self.cfg.bulk_accept_plaintext:
            raise FrameError(f"peer offered {plaintext}; refused by config")
        if len(f["token"]) != bulkmod.TOKEN_BYTES or len(f["key"]) != bulkmod.KEY_BYTES:
            raise FrameError(f"{what} token/key of wrong length")
        if not 0 < f["port"] < 65536:
            raise FrameError(f"{what} port {f['port']} out of range")

    async def _accept_bulk_offer(self, f: dict) -> None:
        if self._bulk_in is not None:
            raise FrameError("second bulk offer on one stream")
        cipher = f.get("cipher", "aes-256-gcm")
        self._check_offer(f, cipher, "bulk offer", "a plaintext bulk channel")
        remote = None if self.relayed else self.ns.get_remote_address()
        sock = await self._bulk_dial(remote, f["port"], f["token"]) if remote else None
        if sock is None:
            await self._offer_reverse(f["key"], cipher)
        else:
            self._bulk_in = bulkmod.BulkReceiver(sock, f["key"], cipher)

    async def _bulk_dial(self, remote: tuple, port: int, token: bytes) -> Any:
        """A connected bulk socket to remote's port that has sent token, or None."""
        sock = trio.socket.socket()
        try:
            with trio.fail_after(self.cfg.bulk_setup_timeout_s):
                await sock.connect((remote[0], port))
                sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
                await sock.send(token)
            return sock
        except (OSError, trio.TooSlowError) as e:
            sock.close()
            log.info("bulk dial to %s:%s for %s failed: %s", remote[0], port, self.peer_id, e)
            return None

    async def _offer_reverse(self, key: bytes, cipher: str) -> None:
        """We could not dial the sender: ask it to dial us (bulk.py, 2b). The socket is awaited at
        the first bulk_ref, which the sender only sends once it has dialed; if it could not, it
        sends large frames over this stream and the pending token goes when the stream ends."""

        def pending(token: bytes, waiter: Any) -> None:
            self._bulk_in_pending = (token, waiter, key, cipher)

        await self._offer_to_be_dialed("transport.bulk_reverse", pending)

    async def _offer_to_be_dialed(self, frame_type: str, pending: Callable[[bytes, Any], None]) -> None:
        """Send `frame_type` with our bulk listener's port and a fresh token, after `pending(token,
        waiter)` has recorded the wait for the peer's dial; port 0 where we cannot be dialed."""
        no = Frame(frame_type, 1, {"port": 0, "token": b""})
        if self.relayed or self.hub.bulk_port is None:
            await self.send(no, control=True)
            return
        token, _ = bulkmod.new_secrets()
        try:
            waiter = self.hub.bulk_expect(token)
        except TransportError:
            await self.send(no, control=True)
            return
        pending(token, waiter)
        await self.send(Frame(frame_type, 1, {"port": self.hub.bulk_port, "token": token}), control=True)

    async def _dial_reverse(self, f: dict) -> None:
        """The peer could not dial our bulk offer and asks us to dial it instead."""
        token, self._bulk_offered = self._bulk_offered, None
        await self._reverse(token, f, "bulk")

    async def _reverse(self, offered: bytes | None, f: dict, what: str) -> None:
        """Dial the peer's listener for our pending `what` offer `offered` (port 0: it refuses), and
        hand the socket to whoever waits for the offer."""
        if offered is None:
            raise FrameError(f"{what}_reverse without a pending {what} offer")
        if not 0 <= f["port"] < 65536 or (f["port"] and len(f["token"]) != bulkmod.TOKEN_BYTES):
            raise FrameError(f"{what}_reverse with a bad port or token")
        remote = None if self.relayed else self.ns.get_remote_address()
        sock = await self._bulk_dial(remote, f["port"], f["token"]) if f["port"] and remote else None
        if not self.hub.bulk_fulfil(offered, sock) and sock is not None:
            sock.close()  # the offer timed out meanwhile

    async def _recv_bulk(self, nbytes: int) -> Frame:
        if self._bulk_in is None and self._bulk_in_pending is not None:
            token, waiter, key, cipher = self._bulk_in_pending
            self._bulk_in_pending = None
            with trio.move_on_after(self.cfg.bulk_setup_timeout_s):
                sock = await waiter.receive()
                self._bulk_in = bulkmod.BulkReceiver(sock, key, cipher)
            self.hub.bulk_forget(token)
        if self._bulk_in is None:
            raise FrameError("bulk_ref without a bulk channel")
        if not PREFIX_BYTES < nbytes <= self.cfg.limits.max_frame_bytes:
            raise FrameError(f"bulk frame of {nbytes} bytes outside limits")
        buf = alloc_buffer(nbytes)
        with trio.move_on_after(self.cfg.frame_timeout_s) as scope:
            try:
                await self._bulk_in.recv_into(buf)
            except (EOFError, OSError) as e:
                raise FrameError(f"bulk channel broke mid-frame: {e}") from e
        if scope.cancelled_caught:
            raise FrameError(f"bulk frame not completed within {self.cfg.frame_timeout_s} s")
        frame = decode_frame(buf, self.cfg.limits)
        if frame.type.startswith("transport."):
            raise FrameError("control message inside a bulk frame")
        self.hub.stats["bulk_frames_received"] += 1
        return frame

    # ------------------------------------------------------------ frame link (link.py)
    async def open_link(self) -> None:
        """Opener, in the background from the stream's start: offer a link and wait for its socket;
        the sending threads switch to it at their next send. Any failure keeps the libp2p path."""
        if self.relayed or self.hub.bulk_port is None:
            return
        token, key = bulkmod.new_secrets()
        try:
            waiter = self.hub.bulk_expect(token)
        except TransportError as e:
            log.info("frame link to %s not opened: %s", self.peer_id, e)
            return
        try:
            self._link_offered = token
            await self.send(Frame("transport.link_offer", 1, {"port": self.hub.bulk_port, "token": token, "key": key,
                                                             "cipher": self.cfg.bulk_cipher}), control=True)
            sock = None
            with trio.move_on_after(2 * self.cfg.bulk_setup_timeout_s):
                sock = await waiter.receive()
            if sock is None:
                log.info("no frame link with %s either way; frames go over libp2p", self.peer_id)
                return
            if self.closed:
                sock.close()
                return
            self.link_ready = linkmod.LinkSender(linkmod.stdlib_socket(sock), key, self.cfg.bulk_cipher)
        except Exception as e:  # the stream carries on over libp2p
            log.info("frame link to %s not opened: %s: %s", self.peer_id, type(e).__name__, e)
        finally:
            self._link_offered = None
            self.hub.bulk_forget(token)

    async def _accept_link_offer(self, f: dict) -> None:
        if self._link_in_secret is not None:
            raise FrameError("second link offer on one stream")
        cipher = f["cipher"]
        self._check_offer(f, cipher, "link offer", "a plaintext link")
        self._link_in_secret = (f["key"], cipher)
        if not self.accept_link:  # an asyncio or request handler reads through the inbox only
            await self.send(Frame("transport.link_reverse", 1, {"port": 0, "token": b""}), control=True)
            return
        # dialed beside the reader, not in it: a dial into a NAT may take the whole set-up timeout,
        # and the frames on this stream must not wait for it
        self._link_dialed = trio.Event()
        self.hub.spawn(self._dial_link_offer, f["port"], f["token"])

    async def _dial_link_offer(self, port: int, token: bytes) -> None:
        try:
            remote = None if self.relayed else self.ns.get_remote_address()
            sock = await self._bulk_dial(remote, port, token) if remote else None
            if sock is not None:
                if self.closed:
                    sock.close()
                else:
                    self._link_in_sock = sock
                return
            await self._offer_link_reverse()
        except Exception as e:  # runs in the node's nursery: whatever fails here ends only the link
            log.info("frame link from %s not taken: %s: %s", self.peer_id, type(e).__name__, e)
        finally:
            self._link_dialed.set()

    async def _offer_link_reverse(self) -> None:
        """We could not dial the opener's link offer: ask it to dial us (as _offer_reverse for bulk)."""

        def pending(token: bytes, waiter: Any) -> None:
            self._link_in_pending = (token, waiter)

        await self._offer_to_be_dialed("transport.link_reverse", pending)

    async def _dial_link_reverse(self, f: dict) -> None:
        """The peer could not dial our link offer (or refuses the link: port 0)."""
        token, self._link_offered = self._link_offered, None
        await self._reverse(token, f, "link")

    async def _link_on(self) -> None:
        """The opener sends on the link from here on: make the receiving end (its socket may still be
        on its way if the opener dials us)."""
        if self.link_in is not None or self._link_in_secret is None:
            raise FrameError("link_on without a link offer")
        if self._link_dialed is not None:  # the opener only switches once it has a socket, so this is short
            with trio.move_on_after(2 * self.cfg.bulk_setup_timeout_s):
                await self._link_dialed.wait()
        sock, self._link_in_sock = self._link_in_sock, None
        if sock is None and self._link_in_pending is not None:
            token, waiter = self._link_in_pending
            self._link_in_pending = None
            with trio.move_on_after(self.cfg.bulk_setup_timeout_s):
                sock = await waiter.receive()
            self.hub.bulk_forget(token)
        if sock is None:
            raise FrameError("link_on without a link")
        key, cipher = self._link_in_secret
        self.link_in = linkmod.LinkReceiver(linkmod.stdlib_socket(sock), key, cipher, self.cfg.limits,
                                            self.cfg.frame_timeout_s)

    def send_link(self, parts: list, nbytes: int, timeout_s: float) -> None:
        """Sending thread, with link_send_lock held and link_out set: write one frame on the link."""
        try:
            self.link_out.send_parts(parts, nbytes, timeout_s)
        except StreamClosed as e:
            self._link_failed(str(e))
            raise
        self.hub.stats["frames_sent"] += 1
        self.hub.stats["link_frames_sent"] += 1

    def recv_link(self, timeout_s: float) -> Frame:
        """The reading thread, once it took link_on: the next frame from the link, faults applied."""
        while True:
            if self._link_dup is not None:
                frame, self._link_dup = self._link_dup, None
                return frame
            if self.closed:
                raise StreamClosed(self.end_reason or "stream closed")
            try:
                frame = self.link_in.recv(timeout_s)
                if frame.type.startswith("transport."):
                    raise FrameError(f"control message {frame.type} on the link")
            except linkmod.LinkTimeout as e:
                raise TransportTimeout(str(e)) from None
            except FrameError as e:
                self.hub.stats["streams_dropped"] += 1
                log.warning("dropping stream %s from peer %s: bad frame on the link: %s", self.protocol,
                            self.peer_id, e)
                self._link_failed(f"bad frame: {e}", bad=True)
                self.link_in.close()  # the reading thread owns the socket; the trio side only shuts it down
                raise StreamClosed(self.end_reason) from None
            except (EOFError, OSError) as e:
                self._link_failed(self.end_reason or f"link ended: {e}")
                self.link_in.close()
                raise StreamClosed(self.end_reason) from None
            self.hub.stats["frames_received"] += 1
            self.hub.stats["link_frames_received"] += 1
            if self._faults is not None:
                frame = self._fault_link(frame)
                if frame is None:
                    continue
            return frame

    def _fault_link(self, frame: Frame) -> Frame | None:
        """As _put_faulted, in the reading thread: a delay holds back this frame and those behind it."""
        action, delay_s = self._faults.next()
        if delay_s > 0:
            self.hub.stats["faults_delayed"] += 1
            log.info("frame fault: delayed %s on %s from %s by %.0f ms", frame.type, self.protocol, self.peer_id,
                     delay_s * 1000)
            time.sleep(delay_s)
        if action == faultsmod.DROP:
            self.hub.stats["faults_dropped"] += 1
            log.info("frame fault: dropped %s on %s from %s", frame.type, self.protocol, self.peer_id)
            return None
        if action == faultsmod.DUP:
            self.hub.stats["faults_duplicated"] += 1
            log.info("frame fault: duplicated %s on %s from %s", frame.type, self.protocol, self.peer_id)
            self._link_dup = frame
        return frame

    def _link_failed(self, reason: str, *, bad: bool = False) -> None:
        """Any thread: the link is over, and so is the stream (as a libp2p stream that broke)."""
        self.end_reason = self.end_reason or reason
        if self.closed:
            return
        if bad:
            _call_in_trio(self.inbox._token, self.hub.on_bad_frame, self.peer_id, reason)
        try:
            self.hub.submit(self.reset, reason)
        except TransportError:
            pass  # the node is closing: its streams go with it

    def _close_link_in(self) -> None:
        sock, self._link_in_sock = self._link_in_sock, None
        if sock is not None:
            sock.close()
        if self._link_in_pending is not None:
            self.hub.bulk_forget(self._link_in_pending[0])
            self._link_in_pending = None
        if self.link_in is not None:
            self.link_in.shutdown()  # the reading thread sees the end and the socket closes with it

    def _close_link_out(self) -> None:
        for sender in (self.link_out, self.link_ready):
            if sender is not None:
                sender.close()

    async def recv(self) -> Frame:
        """Trio side (request/response); threads and asyncio use inbox.get / get_async."""
        try:
            return self.unwrap(await self.inbox.get_trio())
        except BridgeClosed as e:
            raise StreamClosed(str(e)) from None

    @staticmethod
    def unwrap(frame: Frame) -> Frame:
        if frame.type == "transport.error":
            raise RemoteError(str(frame.fields.get("reason", "?"))[:1000])
        return frame

    # ------------------------------------------------------------ sending
    def encode(self, frame: Frame, *, control: bool = False) -> tuple[list, int]:
        """Any thread: check and encode a frame (FrameError for a bad one)."""
        if frame.type.startswith("transport.") and not control:
            raise FrameError("message types starting with 'transport.' are reserved")
        parts = encode_frame_parts(frame, self.cfg.limits)
        return parts, frame_nbytes(parts)

    async def send(self, frame: Frame, *, control: bool = False) -> None:
        """Trio side: encode and write now (request/response path)."""
        parts, nbytes = self.encode(frame, control=control)
        with trio.fail_after(self.cfg.frame_timeout_s):
            await self._write(parts, nbytes)

    async def run_writer(self) -> None:
        """Writes what threads and asyncio tasks posted to the outbox, in order."""
        try:
            while (item := await self.outbox.next()) is not None:
                parts, nbytes, done = item
                try:
                    with trio.fail_after(self.cfg.frame_timeout_s):
                        await self._write(parts, nbytes)
                except trio.Cancelled:
                    if done is not None:
                        done.set_exception(StreamClosed("node closing"))
                    raise
                except Exception as e:
                    err = e if isinstance(e, StreamClosed) else StreamClosed(f"send failed: {type(e).__name__}: {e}")
                    if done is not None:
                        done.set_exception(err)
                    if not self.closed:
                        self.end_reason = self.end_reason or str(err)
                        log.info("send on %s to %s failed: %s", self.protocol, self.peer_id, err)
                        await self._abort()
                else:
                    if done is not None:
                        done.set_result(None)
                finally:
                    self.outbox.done_with_item()
        finally:
            self.outbox.fail_queued(self.end_reason or "stream closed")
            self._writer_done.set()

    async def _write(self, parts: list, nbytes: int) -> None:
        if self.closed:
            raise StreamClosed(self.end_reason or "stream closed")
        async with self._send_lock:
            try:
                if self._wants_bulk(nbytes):
                    if self._bulk_out is None:
                        await self._open_bulk()
                    if self._bulk_out is not None:
                        await write_parts(self.ns, [encode_frame(Frame("transport.bulk_ref", 1, {"nbytes": nbytes}))])
                        await self._bulk_out.send_parts(parts)
                        self.hub.stats["bulk_frames_sent"] += 1
                        self.hub.stats["frames_sent"] += 1
                        return
                await write_parts(self.ns, parts)
                self.hub.stats["frames_sent"] += 1
            except (trio.Cancelled, FrameError, StreamClosed):
                raise
            except Exception as e:
                raise StreamClosed(f"send failed: {type(e).__name__}: {e}") from e

    def _wants_bulk(self, nbytes: int) -> bool:
        t = self.cfg.bulk_threshold_bytes
        return (t > 0 and nbytes >= t and not self._bulk_out_failed and not self.relayed
                and self.hub.bulk_port is not None)

    async def _open_bulk(self) -> None:
        token, key = bulkmod.new_secrets()
        try:
            waiter = self.hub.bulk_expect(token)
        except TransportError as e:
            log.info("bulk channel to %s not opened: %s", self.peer_id, e)
            return
        try:
            offer = Frame("transport.bulk_offer", 1,
                          {"port": self.hub.bulk_port, "token": token, "key": key, "cipher": self.cfg.bulk_cipher})
            self._bulk_offered = token
            await write_parts(self.ns, [encode_frame(offer)])
            # the peer dials us, or answers bulk_reverse and we dial it (both hand the socket here)
            with trio.move_on_after(2 * self.cfg.bulk_setup_timeout_s):
                sock = await waiter.receive()
                if sock is not None:
                    self._bulk_out = bulkmod.BulkSender(sock, key, self.cfg.bulk_cipher)
                    return
            self._bulk_out_failed = True
            log.info("no bulk channel with %s either way; large frames go over libp2p", self.peer_id)
        finally:
            self._bulk_offered = None
            self.hub.bulk_forget(token)

    # ------------------------------------------------------------ ending
    async def close(self) -> None:
        """Send what is queued, then half-close (FIN); stops reading."""
        if self.closed:
            return
        self.outbox.close()
        with trio.move_on_after(self.cfg.frame_timeout_s):
            await self._writer_done.wait()
        self.closed = True
        self.end_reason = self.end_reason or "closed by us"
        self._reader_scope.cancel()
        self.inbox.close(self.end_reason)
        self._close_bulk()
        self._close_link_out()  # FIN after the last frame, before the stream's own: the reader sees the link end
        self._close_link_in()
        try:
            await self.ns.close()
        except Exception as e:
            log.debug("close of stream with %s: %s", self.peer_id, e)

    async def _abort(self) -> None:
        """Reset the libp2p stream; queued sends fail, readers see end_reason."""
        self.closed = True
        self.outbox.close()
        self._close_bulk()
        self._close_link_out()
        self._close_link_in()
        try:
            await self.ns.reset()
        except Exception as e:
            log.debug("reset of stream with %s: %s", self.peer_id, e)

    async def reset(self, reason: str) -> None:
        self.end_reason = self.end_reason or reason
        self._reader_scope.cancel()
        await self._abort()
        self.inbox.close(self.end_reason)

    def _close_bulk(self) -> None:
        if self._bulk_in_pending is not None:
            self.hub.bulk_forget(self._bulk_in_pending[0])
            self._bulk_in_pending = None
        for b in (self._bulk_out, self._bulk_in):
            if b is not None:
                b.close()

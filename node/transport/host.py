"""P2PNode: a py-libp2p host in its own thread and trio loop, with a
thread-safe blocking API (this module) and an asyncio API (aio.py).

Everything libp2p runs in the node's trio thread. Other threads hand it work
through `submit()` (bounded by max_pending_calls; each call carries a
deadline enforced inside trio) and get a concurrent.futures.Future back:
blocking callers wait on it with a timeout, asyncio callers wrap it.
The per-frame path of a stream skips that round trip: frames are taken from
the stream's Inbox and posted to its Outbox directly (bridge.py), so a
recv costs one thread wake-up and a small send none.

py-libp2p 0.8.1 quirks handled here:
  * the host only listens and dials inside `async with host.run(addrs)`
    (which runs the swarm as a background trio service), so the node's whole
    life is one trio.run in one thread;
  * `new_host` offers TLS, SECIO and plaintext next to Noise unless `sec_opt`
    is given: we pass Noise only;
  * mplex moved an 8 MB frame ~5x slower than yamux here, so yamux is default;
  * stream handlers are awaited in the swarm's task and streams are not
    closed for us: each inbound stream is closed or reset here;
  * a closed connection is reported to INotifee objects registered on the
    swarm: `on_peer_lost` (peers.py) passes the loss of a peer's last one on;
  * the swarm refuses for 60 s to dial a peer whose addresses all failed
    once: `connect()` lifts that, an explicit dial always dials.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.peer.peerstore import PeerStoreError
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

from .aio import AsyncStream
from .bulk import BulkListener
from .calls import Handler, with_timeout
from .channel import FrameStream
from .config import StreamClosed, TransportConfig, TransportError, TransportTimeout
from wire.frames import Frame
from .identity import Identity
from .peers import PeerEvents
from .reach import Reach, connection_kind, is_circuit
from .stream import Stream

log = logging.getLogger("meshpool.transport")

PROTOCOL_PREFIX = "/meshpool/"


def protocol_id(name: str, version: int) -> str:
    """`/meshpool/<name>/<n>`, the only protocol ids a P2PNode serves."""
    assert name and "/" not in name and version >= 0
    return f"{PROTOCOL_PREFIX}{name}/{version}"


async def _await_cf(fut: concurrent.futures.Future) -> Any:
    """Await a concurrent future from trio without a thread."""
    done = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def _wake(_: Any) -> None:
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass

    fut.add_done_callback(_wake)
    try:
        await done.wait()
    except trio.Cancelled:
        fut.cancel()
        raise
    return fut.result()


class P2PNode:
    """A libp2p host (TCP + Noise + Yamux) serving /meshpool/* protocols."""

    def __init__(self, identity: Identity | None = None, config: TransportConfig | None = None) -> None:
        self.identity = identity or Identity.generate()
        self.cfg = config or TransportConfig()
        self.peer_id = self.identity.peer_id_str
        self.addr: str | None = None
        self.bulk_port: int | None = None
        self.stats: Counter[str] = Counter()  # updated in the trio thread; read for tests and metrics
        self._handlers: dict[str, Handler] = {}
        self._streams: set[FrameStream] = set()
        self._bulk: BulkListener | None = None
        self._pending_calls = threading.BoundedSemaphore(self.cfg.max_pending_calls)
        self._started: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._host: Any = None
        self._reach: Reach | None = None
        self.relayed_addr: str | None = None  # our /p2p-circuit address once a relay reserved us a slot
        self._peer_events = PeerEvents()

    # ------------------------------------------------------------ lifecycle
    def start(self) -> str:
        """Start the host thread; returns the full multiaddr (…/p2p/<peer id>)."""
        assert self._thread is None, "start() called twice"
        self._thread = threading.Thread(target=self._thread_main, name=f"p2p-{self.peer_id[-6:]}", daemon=True)
        self._thread.start()
        try:
            self.addr = self._started.result(timeout=self.cfg.start_timeout_s)
        except concurrent.futures.TimeoutError:
            raise TransportTimeout(f"libp2p host did not start within {self.cfg.start_timeout_s} s") from None
        return self.addr

    def close(self, timeout_s: float = 10.0) -> None:
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        self._peer_events.close()
        if self._token is not None and self._stop is not None:
            try:
                self._token.run_sync_soon(self._stop.set)
            except trio.RunFinishedError:
                pass
        thread.join(timeout_s)
        if thread.is_alive():
            log.warning("p2p thread of %s did not stop within %s s", self.peer_id, timeout_s)

    def __enter__(self) -> "P2PNode":
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as e:  # noqa: BLE001 - reported to start() or logged
            if not self._started.done():
                self._started.set_exception(e)
            else:
                log.exception("p2p thread of %s died", self.peer_id)

    async def _main(self) -> None:
        kp = self.identity.key_pair
        listen = multiaddr.Multiaddr(f"/ip4/{self.cfg.listen_host}/tcp/{self.cfg.listen_port}")
        noise = NoiseTransport(kp, noise_privkey=create_x25519_key_pair().private_key)
        self._host = new_host(
            key_pair=kp,
            sec_opt={NOISE_PROTOCOL_ID: noise},
            muxer_preference=self.cfg.muxer,
            listen_addrs=[listen],
        )
        self._host.get_network().register_notifee(self._peer_events)
        self._stop = trio.Event()
        self._handler_limiter = trio.CapacityLimiter(self.cfg.handler_threads)
        self._stream_limiter = trio.CapacityLimiter(self.cfg.max_streams)
        self._reach = Reach(self._host, hop=self.cfg.relay_hop, hole_punch=self.cfg.hole_punch)
        async with self._host.run([listen]), self._reach.running():
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._token = trio.lowlevel.current_trio_token()
                if self.cfg.bulk_threshold_bytes > 0:
                    self._bulk = BulkListener(self.cfg.listen_host, self.cfg.bulk_setup_timeout_s,
                                              self.cfg.max_bulk_pending)
                    await self._bulk.start(nursery)
                    self.bulk_port = self._bulk.port
                for proto in self._handlers:
                    self._host.set_stream_handler(TProtocol(proto), self._make_trio_handler(proto))
                addrs = [str(a) for a in self._host.get_addrs()]
                addr = next((a for a in addrs if "/p2p/" in a), f"{addrs[0]}/p2p/{self.peer_id}")
                self._started.set_result(addr)
                await self._stop.wait()
                with trio.move_on_after(5):
                    for fs in list(self._streams):
                        await fs.reset("node closing")
                nursery.cancel_scope.cancel()
            with trio.move_on_after(5):
                await self._host.close()

    # ------------------------------------------------------------ bridge
    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Run `await fn(*args)` in the trio thread; bounded by max_pending_calls."""
        if self._token is None or self._nursery is None:
            raise TransportError("node is not running")
        if threading.current_thread() is self._thread:
            raise TransportError("blocking P2PNode API called from its own trio thread")
        if not self._pending_calls.acquire(blocking=False):
            raise TransportError(f"more than {self.cfg.max_pending_calls} calls in flight")
        fut: concurrent.futures.Future = concurrent.futures.Future()

        async def runner() -> None:
            try:
                if fut.set_running_or_notify_cancel():
                    fut.set_result(await fn(*args))
            except trio.Cancelled:
                fut.set_exception(StreamClosed("node closed"))
                raise
            except Exception as e:
                fut.set_exception(e)
            finally:
                self._pending_calls.release()

        try:
            self._token.run_sync_soon(self._nursery.start_soon, runner)
        except trio.RunFinishedError:
            self._pending_calls.release()
            raise TransportError("node is not running") from None
        return fut

    def call(self, timeout_s: float, fn: Callable[..., Any], *args: Any) -> Any:
        """Blocking submit: result of `await fn(*args)` within timeout_s."""
        fut = self.submit(with_timeout, timeout_s, fn, *args)
        try:
            return fut.result(timeout=timeout_s + 5.0)  # trio enforces timeout_s; this is a backstop
        except concurrent.futures.TimeoutError:
            raise TransportTimeout(f"no answer from the p2p thread within {timeout_s} s") from None

    # ------------------------------------------------------------ public API
    def connect(self, addr: str, timeout_s: float | None = None) -> str:
        """Dial a full multiaddr (with /p2p/<id>); returns the peer id."""
        return self.call(timeout_s or self.cfg.connect_timeout_s, self._connect, addr)

    def set_handler(self, protocol: str, fn: Callable[[Frame, str], Any], *, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Request/response: fn(frame, peer_id) -> reply Frame. Sync fns run in a
        worker thread (bounded by handler_threads); coroutine fns on `loop`."""
        self._register(protocol, Handler("request", fn, self._loop_for(fn, loop)))

    def set_stream_handler(self, protocol: str, fn: Callable[[Any], Any], *, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Long-lived streams: fn(Stream) in a worker thread, or an async fn(AsyncStream) on `loop`.
        The stream is closed when fn returns."""
        self._register(protocol, Handler("stream", fn, self._loop_for(fn, loop)))

    def on_peer_lost(self, fn: Callable[[str], Any]) -> None:
        """fn(peer_id) on a thread of its own, as soon as the last connection to that peer closes (the
        peer's process died, or it or we hung up): the news comes from the connection, not a clock."""
        self._peer_events.on_lost(fn)

    def request(self, peer: str, protocol: str, frame: Frame, timeout_s: float | None = None) -> Frame:
        """Open a stream, send one frame, return the reply frame."""
        return self.call(timeout_s or self.cfg.request_timeout_s, self._request, peer, protocol, frame)

    def open_stream(self, peer: str, protocol: str, timeout_s: float | None = None, *,
                    link: bool = False) -> "Stream":
        """A stream to peer. `link`: also open a frame link (link.py) in the background, and send
        every frame on it once it is up (pipeline hops); the libp2p stream stays for control, and
        carries the frames where no link can be made (a relayed connection, no dial either way)."""
        fs = self.call(timeout_s or self.cfg.connect_timeout_s, self._open, peer, protocol, link)
        return Stream(self, fs)

    def stream_count(self) -> int:
        return len(self._streams)

    # ------------------------------------------------------------ reachability (reach.py)
    def reserve_relay(self, relay_addr: str, timeout_s: float | None = None) -> str:
        """Reserve a slot on the relay at relay_addr; returns (and keeps) our /p2p-circuit address."""
        self.relayed_addr = self.call(timeout_s or self.cfg.connect_timeout_s, self._reserve, relay_addr)
        return self.relayed_addr

    def publicly_reachable(self, server_peer: str, timeout_s: float | None = None) -> bool:
        """AutoNAT dial-back from server_peer (a relay) to our listen address."""
        return self.call(timeout_s or self.cfg.connect_timeout_s, self._reach.publicly_reachable,
                         server_peer, [self.addr])

    def connection_kind(self, peer: str) -> str:
        """"direct", "hole-punched", "relayed" or "none" (read from the trio thread's swarm; a snapshot)."""
        if self._host is None:
            return "none"
        return connection_kind(self._host, peer, self._reach.punched if self._reach is not None else None)

    # ------------------------------------------------------------ trio side
    @staticmethod
    def _loop_for(fn: Callable[..., Any], loop: asyncio.AbstractEventLoop | None) -> asyncio.AbstractEventLoop | None:
        if inspect.iscoroutinefunction(fn):
            if loop is None:
                loop = asyncio.get_running_loop()  # raises if called outside a loop
            return loop
        return None

    def _register(self, protocol: str, handler: Handler) -> None:
        if not protocol.startswith(PROTOCOL_PREFIX):
            raise ValueError(f"protocol {protocol!r} must look like /meshpool/<name>/<n>")
        self._handlers[protocol] = handler
        if self._token is not None:
            self.call(self.cfg.connect_timeout_s, self._install_handler, protocol)

    async def _install_handler(self, protocol: str) -> None:
        self._host.set_stream_handler(TProtocol(protocol), self._make_trio_handler(protocol))

    async def _reserve(self, relay_addr: str) -> str:
        try:
            return await self._reach.reserve(relay_addr, self._nursery)
        except (trio.Cancelled, TransportError):
            raise
        except Exception as e:
            raise TransportError(f"no relay slot at {relay_addr}: {type(e).__name__}: {e}") from e

    async def _connect(self, addr: str) -> str:
        if is_circuit(addr):
            try:
                return await self._reach.dial(addr)
            except trio.Cancelled:
                raise
            except Exception as e:
                raise TransportError(f"could not connect through the relay to {addr}: {type(e).__name__}: {e}") from e
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
            # An address handed to us now replaces what we knew of the peer: py-libp2p dials the
            # addresses it remembers (a peer restarted on a new port was dialed only at its old one)
            # and refuses every dial for 60 s once they all failed (its "negative cache"), e.g. a
            # coordinator back from a restart.
            if info.peer_id not in self._host.get_network().connections:
                forget_addrs(self._host.get_peerstore(), info.peer_id)
            self._host.get_network().unblock_peer(info.peer_id)
            await self._host.connect(info)
        except trio.Cancelled:
            raise
        except Exception as e:  # libp2p raises many unrelated types; callers get one
            causes = getattr(e.__cause__, "exceptions", ())  # what each address failed with
            detail = "; ".join(f"{type(c).__name__}: {c}" for c in causes)[:500]
            raise TransportError(f"could not connect to {addr}: {type(e).__name__}: {e}"
                                 + (f" ({detail})" if detail else "")) from e
        return info.peer_id.to_base58()

    async def _open(self, peer: str, protocol: str, link: bool = False) -> FrameStream:
        if "/p2p/" in peer:
            peer = await self._connect(peer)
        if len(self._streams) >= self.cfg.max_streams:
            raise TransportError(f"more than {self.cfg.max_streams} open streams")
        try:
            ns = await self._host.new_stream(ID.from_base58(peer), [TProtocol(protocol)])
        except trio.Cancelled:
            raise
        except Exception as e:  # unknown protocol, refused stream, no route: one error type
            raise TransportError(f"could not open {protocol} to {peer}: {type(e).__name__}: {e}") from e
        fs = FrameStream(ns, peer, protocol, self.cfg, self)
        fs.link_wanted = link and self.cfg.frame_link and not fs.relayed and self.bulk_port is not None
        self._streams.add(fs)
        self._nursery.start_soon(self._run_stream, fs)
        return fs

    async def _run_stream(self, fs: FrameStream) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fs.run_reader)
                nursery.start_soon(fs.run_writer)
                if fs.link_wanted:
                    nursery.start_soon(fs.open_link)
        finally:
            self._streams.discard(fs)

    async def _release(self, fs: FrameStream) -> None:
        await fs.close()  # sends what is queued; frames still coming from the peer are dropped
        self._streams.discard(fs)

    async def _request(self, peer: str, protocol: str, frame: Frame) -> Frame:
        fs = await self._open(peer, protocol)
        try:
            await fs.send(frame)
            return await fs.recv()
        finally:
            await fs.close()

    def _make_trio_handler(self, protocol: str) -> Callable[[Any], Any]:
        async def handle(ns: Any) -> None:
            await self._serve(ns, protocol)

        return handle

    async def _serve(self, ns: Any, protocol: str) -> None:
        peer = ns.muxed_conn.peer_id.to_base58()
        handler = self._handlers.get(protocol)
        refusal = None
        if handler is None:
            refusal = "no handler"
        elif len(self._streams) >= self.cfg.max_streams:
            refusal = f"node has {self.cfg.max_streams} open streams"
        elif sum(fs.peer_id == peer for fs in self._streams) >= self.cfg.max_streams_per_peer:
            refusal = f"peer has {self.cfg.max_streams_per_peer} open streams"
        if refusal is not None:
            log.warning("refusing stream %s from %s: %s", protocol, peer, refusal)
            await ns.reset()
            return
        fs = FrameStream(ns, peer, protocol, self.cfg, self)
        fs.accept_link = handler.kind == "stream" and handler.loop is None  # a thread reads it: link.py
        self._streams.add(fs)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fs.run_reader)
                nursery.start_soon(fs.run_writer)
                if handler.kind == "request":
                    await self._serve_request(fs, handler)
                else:
                    await self._serve_stream(fs, handler)
                await fs.close()
        except Exception as e:  # never let a stream's failure reach libp2p's swarm task
            log.info("stream %s from %s ended: %s: %s", protocol, peer, type(e).__name__, e)
            await fs.reset(f"{type(e).__name__}: {e}")
        finally:
            self._streams.discard(fs)

    async def _invoke(self, handler: Handler, *args: Any) -> Any:
        if handler.loop is not None:
            return await _await_cf(asyncio.run_coroutine_threadsafe(handler.fn(*args), handler.loop))
        limiter = self._handler_limiter if handler.kind == "request" else self._stream_limiter
        return await trio.to_thread.run_sync(handler.fn, *args, limiter=limiter, abandon_on_cancel=True)

    async def _serve_request(self, fs: FrameStream, handler: Handler) -> None:
        try:
            with trio.fail_after(self.cfg.request_timeout_s):
                request = await fs.recv()
        except (StreamClosed, trio.TooSlowError, TransportError) as e:
            log.debug("no request on %s from %s: %s", fs.protocol, fs.peer_id, e)
            return
        try:
            with trio.fail_after(self.cfg.handler_timeout_s):
                reply = await self._invoke(handler, request, fs.peer_id)
            if not isinstance(reply, Frame):
                raise TypeError(f"handler returned {type(reply).__name__}, not a Frame")
            await fs.send(reply)
        except (StreamClosed, trio.Cancelled):
            raise
        except Exception as e:  # handler error or unencodable reply: tell the peer, keep serving
            log.warning("handler for %s from %s failed: %s: %s", fs.protocol, fs.peer_id, type(e).__name__, e)
            reason = f"{type(e).__name__}: {e}"[:500]
            await fs.send(Frame("transport.error", 1, {"reason": reason}), control=True)

    async def _serve_stream(self, fs: FrameStream, handler: Handler) -> None:

        stream = Stream(self, fs)
        arg = AsyncStream(stream) if handler.loop is not None else stream
        try:
            await self._invoke(handler, arg)
        except StreamClosed:
            pass
        except Exception as e:
            log.warning("stream handler for %s from %s failed: %s: %s", fs.protocol, fs.peer_id, type(e).__name__, e)
            await fs.reset(f"handler failed: {type(e).__name__}")

    # ------------------------------------------------------------ hub for FrameStream
    def bulk_expect(self, token: bytes) -> trio.MemoryReceiveChannel:
        assert self._bulk is not None
        return self._bulk.expect(token)

    def bulk_forget(self, token: bytes) -> None:
        if self._bulk is not None:
            self._bulk.forget(token)

    def bulk_fulfil(self, token: bytes, sock: Any) -> bool:
        return self._bulk is not None and self._bulk.fulfil(token, sock)

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        """Trio side: run `await fn(*args)` beside the caller, in the node's nursery."""
        self._nursery.start_soon(fn, *args)

    def on_bad_frame(self, peer_id: str, reason: str) -> None:
        """Trio side: a stream from peer_id was dropped for a bad frame (already logged)."""
        if self.cfg.disconnect_on_bad_frame and self._nursery is not None:
            log.warning("disconnecting peer %s after a bad frame: %s", peer_id, reason)
            self.stats["peers_disconnected"] += 1
            self._nursery.start_soon(self._disconnect, peer_id)

    async def _disconnect(self, peer_id: str) -> None:
        with trio.move_on_after(self.cfg.connect_timeout_s):
            try:
                await self._host.disconnect(ID.from_base58(peer_id))
            except Exception as e:
                log.info("disconnect of %s: %s", peer_id, e)


__all__ = ["P2PNode", "Stream", "protocol_id"]


def forget_addrs(peerstore, peer_id: ID) -> None:
    """Forget what addresses `peer_id` had. py-libp2p's clear_addrs raises "peer ID is expired" when the
    peer's signed record is older than its addresses' TTL (120 s after the last connect), having
    cleared them already: a provider whose connection to the coordinator was older than that could
    not dial it again after a restart (seen in test_pool_e2e's restarted coordinator, 73 s and more)."""
    try:
        peerstore.clear_addrs(peer_id)
    except PeerStoreError:
        pass

"""Which peers a node is connected to, and news of the ones it loses.

A process killed with `kill -9` leaves no goodbye, but its kernel closes its sockets: the yamux
reader on our side ends, py-libp2p 0.8.1 closes the SwarmConn, drops it from the swarm's table
and then tells every registered INotifee `disconnected(network, conn)`. One peer may hold several
connections (each side may dial the other), so a peer counts as lost only when its last one goes.

Callbacks run on a small pool of threads of their own, never in the trio thread: the swarm waits
for every notifee before it finishes closing a connection, and callers (the coordinator's pool,
the provider's heartbeat) take locks and make blocking calls.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable
from typing import Any

from libp2p.abc import INotifee

log = logging.getLogger("meshpool.transport")

CALLBACK_THREADS = 2  # disconnects are rare; two threads keep one slow callback from delaying the next


class QuietNotifee(INotifee):
    """An INotifee that ignores every event: subclasses override the ones they want."""

    async def connected(self, network: Any, conn: Any) -> None:
        return None

    async def disconnected(self, network: Any, conn: Any) -> None:
        return None

    async def opened_stream(self, network: Any, stream: Any) -> None:
        return None

    async def closed_stream(self, network: Any, stream: Any) -> None:
        return None

    async def listen(self, network: Any, multiaddr: Any) -> None:
        return None

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        return None


class PeerEvents(QuietNotifee):
    """Calls each `on_lost(peer_id)` when the last connection to that peer has closed."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[str], Any]] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(CALLBACK_THREADS, thread_name_prefix="peer-events")
        self._closed = False

    def on_lost(self, fn: Callable[[str], Any]) -> None:
        self._callbacks.append(fn)

    def close(self) -> None:
        """No callbacks after this: a node closing its own connections is not news to anyone."""
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, fn: Callable[[str], Any], peer: str) -> None:
        try:
            fn(peer)
        except Exception:  # a callback's bug must not stop the next peer's news
            log.exception("peer-lost callback for %s failed", peer)

    # -- INotifee (trio thread) ------------------------------------------------------------

    async def disconnected(self, network: Any, conn: Any) -> None:
        peer_id = conn.muxed_conn.peer_id
        if self._closed or network.get_connections(peer_id):
            return  # shutting down, or another connection to the peer is still open
        peer = peer_id.to_base58()
        log.info("connection to %s closed", peer)
        for fn in self._callbacks:
            try:
                self._pool.submit(self._run, fn, peer)
            except RuntimeError:  # closed meanwhile
                return


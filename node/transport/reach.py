"""Reachability through libp2p itself: Circuit Relay v2 and AutoNAT (py-libp2p 0.8.1).

A provider behind a home router can dial out but cannot be dialed. It asks the coordinator
(AutoNAT dial-back) whether its own address is reachable; if not, it reserves a slot on the
coordinator, which runs the relay's hop role, and announces the relayed address
`/ip4/<relay>/tcp/<port>/p2p/<relay id>/p2p-circuit/p2p/<its id>`. A peer that dials that
address opens a hop stream to the relay, the relay opens a stop stream to the provider, and the
two peers run Noise + yamux inside that pair of streams: a whole libp2p connection in which the
relay only copies bytes it cannot read.

What py-libp2p 0.8.1 gives and what this module adds:
  * `CircuitV2Protocol` (hop and stop handlers) and `CircuitV2Transport` (reserve, dial) work;
    the stop side upgrades and registers the relayed connection by itself.
  * the swarm's dialer drops every /p2p-circuit address (network/swarm.py, "Skip relay
    (p2p-circuit) addresses"), so `host.connect` cannot dial one: `dial()` here calls the
    relay transport directly and the swarm keeps the connection it returns.
  * the relay's default limits (1 GiB and one hour a circuit) would cut a long-lived
    pipeline: RELAY_LIMITS lifts the duration cap and makes the byte cap effectively unbounded.
  * AutoNAT's server dials back with `host.connect`, which reuses the connection the asker
    already has; a dial-back to an address whose IP differs from the one the server observes is
    refused (the amplification rule), and that refusal is the verdict behind a NAT.
  * DCUtR (hole punching) keeps no lasting record of which direct connections it made (its
    cache is emptied whenever any connection to the peer closes): `PunchedConnections` marks a
    direct connection that opens while a relayed one to the same peer is up, which only DCUtR
    does (nobody dials a peer's direct address when it announced only a relayed one).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Any

import multiaddr
import trio
from libp2p.host.autonat.autonat import AutoNATService
from libp2p.host.autonat.pb.autonat_pb2 import Message as AutoNATMessage
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import MAX_HOLE_PUNCH_ATTEMPTS, DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

from .config import TransportError
from .peers import QuietNotifee

log = logging.getLogger("meshpool.transport")

CIRCUIT = "/p2p-circuit"
# duration 0 = no cap on a circuit's life (protocol.py); the byte cap is per reservation and
# cannot be switched off, so it is set past anything a pool moves in a reservation's hour
RELAY_LIMITS = RelayLimits(duration=0, data=1 << 50, max_circuit_conns=64, max_reservations=64)
AUTONAT_TIMEOUT_S = 10.0
# py-libp2p's DCUtR gives a relayed peer 3 tries and then none while that connection lasts (the
# budget resets only when the peer disconnects); a try can miss for a moment (a loaded host, a NAT
# still settling: one of CI's runs spent all three and its stage hop stayed relayed for good), and a
# pool keeps relayed links for hours. A peer still only relayed gets three more this often.
PUNCH_RETRY_S = 20.0

# Reachability of a provider, as /pool and the planner name it
PUBLIC, HOLE_PUNCHED, RELAYED = "public", "hole-punched", "relayed"


def is_circuit(addr: str) -> bool:
    return CIRCUIT in addr


def circuit_addr(relay_addr: str, peer_id: str) -> str:
    """The address under which `peer_id` is reached through the relay at `relay_addr` (full, with /p2p/)."""
    if "/p2p/" not in relay_addr or is_circuit(relay_addr):
        raise ValueError(f"relay address {relay_addr!r} must be a direct multiaddr ending in /p2p/<id>")
    return f"{relay_addr}{CIRCUIT}/p2p/{peer_id}"


def _is_relayed(conn: Any) -> bool:
    addrs = []
    with contextlib.suppress(Exception):
        addrs = conn.get_transport_addresses() or []
    return any(CIRCUIT in str(a) for a in addrs)


class PunchedConnections(QuietNotifee):
    """The direct connections hole punching made: a direct connection that opens while the peer is
    connected through a relay. Weak references: a closed connection leaves the set with its object."""

    def __init__(self) -> None:
        self._conns: weakref.WeakSet = weakref.WeakSet()

    def __contains__(self, conn: Any) -> bool:
        return conn in self._conns

    async def connected(self, network: Any, conn: Any) -> None:
        if _is_relayed(conn):
            return
        with contextlib.suppress(Exception):  # a closing swarm: nothing to mark
            if any(_is_relayed(c) for c in network.get_connections(conn.muxed_conn.peer_id) if c is not conn):
                self._conns.add(conn)



def connection_kind(host: Any, peer_id: str, punched: PunchedConnections | None = None) -> str:
    """"direct", "hole-punched" (a direct connection DCUtR made out of a relayed one), "relayed" or
    "none": the connections this host has to the peer now."""
    try:
        conns = host.get_network().get_connections(ID.from_base58(peer_id))
    except Exception:  # unknown peer id or a closing swarm: no connection to speak of
        return "none"
    if not conns:
        return "none"
    direct = [conn for conn in conns if not _is_relayed(conn)]
    if not direct:
        return "relayed"
    if punched is not None and all(conn in punched for conn in direct):
        return "hole-punched"
    return "direct"


class Reach:
    """Relay (stop on every node, hop where `hop`), relay dials and reservations, AutoNAT."""

    def __init__(self, host: Any, hop: bool, hole_punch: bool = True) -> None:
        self.host, self.hop = host, hop
        self.protocol = CircuitV2Protocol(host, limits=RELAY_LIMITS, allow_hop=hop)
        roles = RelayRole.STOP | RelayRole.CLIENT | (RelayRole.HOP if hop else RelayRole(0))
        self.transport = CircuitV2Transport(host, self.protocol, RelayConfig(roles=roles, limits=RELAY_LIMITS))
        # every node answers dial-back requests only if it relays (a public node); all can ask
        self.autonat = AutoNATService(host, serve=hop)
        # DCUtR: every 2 s it tries to turn relayed connections into direct ones (TCP simultaneous
        # open from our listen port to the peer's observed address); the relayed one stays if not
        self.dcutr = DCUtRProtocol(host) if hole_punch else None
        self.punched = PunchedConnections()
        host.get_network().register_notifee(self.punched)
        self.reserved_at: str | None = None

    @contextlib.asynccontextmanager
    async def running(self):
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(background_trio_service(self.protocol))
            await self.protocol.event_started.wait()
            if self.dcutr is not None:
                await stack.enter_async_context(background_trio_service(self.dcutr))
                await self.dcutr.event_started.wait()
                nursery = await stack.enter_async_context(trio.open_nursery())
                stack.callback(nursery.cancel_scope.cancel)  # before the nursery waits for its tasks
                nursery.start_soon(self._renew_punch_budgets)
            yield self

    async def _renew_punch_budgets(self) -> None:
        while True:
            await trio.sleep(PUNCH_RETRY_S)
            attempts = self.dcutr._hole_punch_attempts  # libp2p 0.8.1 (pinned) keeps each peer's tries here
            for peer in [p for p, n in attempts.items() if n >= MAX_HOLE_PUNCH_ATTEMPTS]:
                if connection_kind(self.host, peer.to_base58(), self.punched) == RELAYED:
                    del attempts[peer]

    async def dial(self, addr: str) -> str:
        """Connect to a /p2p-circuit address through its relay; returns the destination's peer id."""
        maddr = multiaddr.Multiaddr(addr)
        _, dest = self.transport.parse_circuit_ma(maddr)
        if connection_kind(self.host, dest.to_base58()) != "none":
            return dest.to_base58()
        await self.transport.dial(maddr)
        return dest.to_base58()

    async def reserve(self, relay_addr: str, nursery: trio.Nursery) -> str:
        """Reserve a slot on the relay (refreshed before it expires); returns our relayed address."""
        info = info_from_p2p_addr(multiaddr.Multiaddr(relay_addr))
        await self.host.connect(info)
        stream = await self.host.new_stream(info.peer_id, [HOP_PROTOCOL_ID])
        try:
            ok = await self.transport.reserve(stream, info.peer_id, nursery)
        finally:
            with contextlib.suppress(Exception):
                await stream.close()
        if not ok:
            raise TransportError(f"the relay at {relay_addr} refused a reservation")
        self.reserved_at = relay_addr
        return circuit_addr(relay_addr, self.host.get_id().to_base58())

    async def publicly_reachable(self, server_peer: str, addrs: list[str]) -> bool:
        """AutoNAT: ask `server_peer` to dial us back at `addrs`; True if it could."""
        raw = [multiaddr.Multiaddr(a.split("/p2p/")[0]).to_bytes() for a in addrs]
        with trio.fail_after(AUTONAT_TIMEOUT_S):
            status, _ = await self.autonat.query_server(ID.from_base58(server_peer), raw, AUTONAT_TIMEOUT_S)
        log.info("AutoNAT verdict from %s: %s", server_peer, AutoNATMessage.ResponseStatus.Name(status))
        return status == AutoNATMessage.OK

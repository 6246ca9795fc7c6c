"""How a provider makes itself reachable: `provider join --relay auto|always|never`.

auto: ask the coordinator for an AutoNAT dial-back to our listen address. If it says it cannot
reach us (behind address translation the IP it observes is not the one we listen on, and it
refuses to dial anything else), reserve a slot on the coordinator's relay and announce the
relayed address; upstream stages then dial us through the relay (node/transport/reach.py).
A dial-back that cannot be asked (an old coordinator, a timeout) leaves the direct address:
that is how providers joined before.
always: reserve and announce the relayed address without asking. never: the direct address.
`--announce-addr /ip4/<public ip>/tcp/<port>` (a port forwarded on the home router, or a shaper in
front of us in benchmarks) is announced instead of the listen address, and auto takes it as given.
"""

from __future__ import annotations

import logging

from node.transport import P2PNode, TransportError

log = logging.getLogger("meshpool.provider")

RELAY_MODES = ("auto", "always", "never")


def announce_addr(node: P2PNode, coordinator_addr: str, coordinator_peer: str, mode: str,
                  announce: str = "") -> str:
    """The address this provider registers under (its direct one or a /p2p-circuit one)."""
    if mode not in RELAY_MODES:
        raise ValueError(f"relay mode {mode!r} is not one of {RELAY_MODES}")
    if announce and mode != "always":
        return f"{announce.split('/p2p/')[0]}/p2p/{node.peer_id}"
    if mode == "never":
        return node.addr
    if mode == "auto":
        try:
            if node.publicly_reachable(coordinator_peer):
                log.info("the coordinator can dial us at %s: announcing it", node.addr)
                return node.addr
        except (TransportError, TimeoutError) as exc:
            log.warning("no AutoNAT verdict from the coordinator (%s); announcing %s", exc, node.addr)
            return node.addr
    addr = node.reserve_relay(coordinator_addr)
    log.info("reachable through the coordinator's relay at %s", addr)
    return addr

"""Links as measured, with relayed hops priced as relayed (pure: no I/O, no clock).

Who dials whom decides what a hop costs: stage i opens the stream to stage i+1 at the address
i+1 announced, so a hop into a provider that announced only a relayed address goes through
the relay (two legs, and the relay's forwarding rate), whatever stage i is. Hops to and from the
coordinator use the connection the provider itself dialed: direct. Links between two providers
that are both dialable are not measured by the coordinator and keep the default.

The planner then avoids putting relayed providers where a hop must enter them when a cheaper
order exists: with a relayed provider first in the pipeline its inbound hop is the coordinator's
direct one.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from coordinator.planner.hardware import COORDINATOR, Link, Links

# Circuit Relay v2 in py-libp2p 0.8.1 copies a relayed connection's bytes through two yamux
# streams in pure Python, and the peers run Noise + yamux again inside: bench/reach.py measured
# an 8 MB frame through the relay at 4.5-6.6 MB/s on 127.0.0.1 and through 5-50 ms legs (2 shared
# cores, under contention), against 28 MB/s for a direct libp2p stream and 143 MB/s with the bulk
# channel in the same run. 0.05 Gbit/s = 6.25 MB/s.
RELAYED_BANDWIDTH_GBPS = 0.05
# added one-way time of the relay's copy loop: relayed small-frame RTT 6.3 ms against 1.1 ms
# direct on 127.0.0.1 (bench/reach.py), i.e. ~2.5 ms each way
RELAY_FORWARD_MS = 2.5


def measured_links(default: Link, rtt_ms: Mapping[str, float], relayed: Collection[str]) -> Links:
    """Links keyed (upstream, downstream): the coordinator's hops from measured round trips, hops
    into a relayed provider through the relay (the coordinator) at the relay's rate."""
    pairs: dict[tuple[str, str], Link] = {}
    for peer, rtt in rtt_ms.items():
        leg = Link(latency_ms=rtt / 2, bandwidth_gbps=default.bandwidth_gbps)
        pairs[(COORDINATOR, peer)] = pairs[(peer, COORDINATOR)] = leg
    peers = set(rtt_ms) | set(relayed)
    for a in relayed:  # out of a relayed provider into a dialable one: a direct dial (explicit, or
        for b in peers - set(relayed):  # Links.between would fall back to the reverse, relayed entry)
            pairs[(a, b)] = default
    for b in relayed:
        for a in peers - {b}:
            one_way_ms = (rtt_ms.get(a, 2 * default.latency_ms) + rtt_ms.get(b, 2 * default.latency_ms)) / 2
            pairs[(a, b)] = Link(latency_ms=one_way_ms + RELAY_FORWARD_MS,
                                 bandwidth_gbps=min(RELAYED_BANDWIDTH_GBPS, default.bandwidth_gbps))
    return Links(default, pairs)

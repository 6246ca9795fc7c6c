"""The coordinator's view of its providers' links: it measures each provider's round trip (a
Ping on the assign protocol, timed) every few seconds, keeps it in the registry for /pool and the
dashboard, and hands the planner links built from those measurements, relayed hops priced as
relayed (coordinator/planner/reach.py)."""

from __future__ import annotations

import logging
import time

from coordinator.background import BackgroundLoop
from coordinator.planner import Links
from coordinator.planner.placement import DATACENTRE_LINK
from coordinator.planner.reach import measured_links
from coordinator.registry import Registry
from node.transport import P2PNode, TransportError
from wire.messages import PROTO_ASSIGN, Ack, MessageError, Ping, decode

log = logging.getLogger("meshpool.coordinator")

PROBE_INTERVAL_S = 5.0
PROBE_TIMEOUT_S = 2.0
PROBES_PER_ROUND = 3  # the least of three: one round trip that met a busy thread says little
LIVE_STATES = ("newcomer", "idle", "serving", "leaving")


class LinkMonitor(BackgroundLoop):
    def __init__(self, node: P2PNode, registry: Registry, interval_s: float = PROBE_INTERVAL_S):
        self.node, self.registry, self.interval_s = node, registry, interval_s
        super().__init__("link-monitor", PROBE_TIMEOUT_S * PROBES_PER_ROUND + 1)

    def rtt_ms(self, peer: str) -> float | None:
        """The least of a few round trips of a Ping on an open stream. Only the Ping and its Ack are
        timed: opening the stream (yamux, then multistream-select's protocol negotiation) takes
        round trips of its own that a stage's long-lived stream pays once, not every step; timed
        with them, the round trip came out 4-8x the link's (bench/distance.json, 20 ms links)."""
        best = None
        for _ in range(PROBES_PER_ROUND):
            try:
                with self.node.open_stream(peer, PROTO_ASSIGN, timeout_s=PROBE_TIMEOUT_S) as stream:
                    t0 = time.perf_counter()
                    stream.send(Ping().to_frame(), timeout_s=PROBE_TIMEOUT_S)
                    reply = decode(stream.recv(timeout_s=PROBE_TIMEOUT_S))
                    ms = (time.perf_counter() - t0) * 1e3
            except (TransportError, MessageError) as exc:
                log.debug("link probe of %s: %s", peer, exc)
                return best
            if isinstance(reply, Ack):
                best = ms if best is None else min(best, ms)
        return best

    def probe_all(self) -> None:
        for record in self.registry.records():
            if record.state in LIVE_STATES and not self._stop.is_set():
                rtt = self.rtt_ms(record.peer)
                if rtt is not None:
                    self.registry.set_rtt(record.peer, rtt)

    def links(self) -> Links:
        records = [r for r in self.registry.records() if r.state in LIVE_STATES]
        return measured_links(DATACENTRE_LINK, {r.peer: r.rtt_ms for r in records if r.rtt_ms is not None},
                              [r.peer for r in records if r.reachability == "relayed"])

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.probe_all()
            except Exception:  # keep measuring whatever one round met
                log.exception("link probe round failed")
            self._stop.wait(self.interval_s)

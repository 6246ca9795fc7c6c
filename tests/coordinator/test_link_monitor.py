"""The coordinator's link probe times a Ping on an open stream (coordinator/reachability.py)."""

from __future__ import annotations

from coordinator.reachability import LinkMonitor
from node.transport import P2PNode
from wire.messages import PROTO_ASSIGN, Ack, Ping, decode


def test_link_probe_times_pings_on_open_streams_and_gives_up_on_a_silent_peer(tmp_path):
    seen = []

    def answer(frame, peer):
        seen.append(decode(frame))
        return Ack().to_frame()

    with P2PNode() as provider, P2PNode() as coordinator:
        provider.set_handler(PROTO_ASSIGN, answer)
        coordinator.connect(provider.addr)
        monitor = LinkMonitor(coordinator, registry=None)
        rtt = monitor.rtt_ms(provider.peer_id)
        assert rtt is not None and rtt > 0
        assert len(seen) == 3 and all(isinstance(m, Ping) for m in seen)  # the least of three
        with P2PNode() as silent:  # no handler for the protocol: no round trip to report
            coordinator.connect(silent.addr)
            assert monitor.rtt_ms(silent.peer_id) is None

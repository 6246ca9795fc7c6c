"""Reachability (node/transport/reach.py) and the bulk channel's reverse direction, with real
libp2p hosts on 127.0.0.1 in this process: a relay, a peer reached only through it, a dialer."""

from __future__ import annotations

import contextlib
import time

import pytest
import torch
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import MAX_HOLE_PUNCH_ATTEMPTS

from node.transport import Frame, P2PNode, TransportConfig, TransportError, protocol_id, reach
from node.transport.channel import FrameStream
from node.transport.reach import circuit_addr, is_circuit

ECHO = protocol_id("echo", 1)
BIG_ELEMS = 1 << 20  # 4 MiB of float32: over the bulk threshold


def echo(frame: Frame, peer: str) -> Frame:
    return Frame("test.echo", 1, {**frame.fields, "peer": peer}, frame.tensors)


@pytest.fixture
def relayed():
    with relayed_nodes() as nodes:
        yield nodes


@contextlib.contextmanager
def relayed_nodes():
    """(relay, hidden, dialer, hidden's relayed address); hidden serves ECHO."""
    relay = P2PNode(config=TransportConfig(relay_hop=True))
    hidden, dialer = P2PNode(), P2PNode()
    hidden.set_handler(ECHO, echo)
    nodes = [relay, hidden, dialer]
    try:
        relay_addr = relay.start()
        hidden.start()
        dialer.start()
        yield relay, hidden, dialer, hidden.reserve_relay(relay_addr)
    finally:
        for node in nodes:
            node.close()


def test_a_peer_reached_only_through_the_relay_serves_frames_bit_exact(relayed) -> None:
    relay, hidden, dialer, addr = relayed
    assert is_circuit(addr) and addr.startswith(relay.addr) and addr.endswith(hidden.peer_id)
    assert dialer.connect(addr) == hidden.peer_id
    assert dialer.connection_kind(hidden.peer_id) == "relayed"
    small = torch.arange(10, dtype=torch.float32)
    big = torch.randn(BIG_ELEMS)
    for tensor in (small, big):
        reply = dialer.request(hidden.peer_id, ECHO, Frame("test.echo", 1, {"n": 1}, [tensor]))
        assert reply.fields["peer"] == dialer.peer_id and torch.equal(reply.tensors[0], tensor)
    # the large frame went over the relayed libp2p stream: no bulk socket to the relay's IP
    assert dialer.stats["bulk_frames_sent"] == 0 and hidden.stats["bulk_frames_sent"] == 0


def test_a_node_without_the_hop_role_refuses_to_relay() -> None:
    plain, hidden = P2PNode(), P2PNode()
    try:
        addr = plain.start()
        hidden.start()
        with pytest.raises(TransportError, match="relay"):
            hidden.reserve_relay(addr)
        assert hidden.relayed_addr is None
    finally:
        hidden.close()
        plain.close()


def test_circuit_addresses_need_a_direct_relay_address() -> None:
    with pytest.raises(ValueError):
        circuit_addr("/ip4/127.0.0.1/tcp/1", "QmPeer")
    with pytest.raises(ValueError):
        circuit_addr("/ip4/127.0.0.1/tcp/1/p2p/QmR/p2p-circuit/p2p/QmB", "QmPeer")


def test_autonat_dial_back_says_a_loopback_peer_is_reachable(relayed) -> None:
    relay, hidden, _, _ = relayed
    assert hidden.publicly_reachable(relay.peer_id) is True


def test_bulk_channel_reverses_when_the_receiver_cannot_dial_the_sender(monkeypatch) -> None:
    """The receiver's dial to the sender's bulk port fails (a NAT in front of the sender): the
    sender dials the receiver's port instead, and large frames still go over the bulk channel."""
    sender, receiver = P2PNode(), P2PNode()
    receiver.set_handler(ECHO, echo)
    real_dial = FrameStream._bulk_dial
    refused: list[int] = []

    async def blocked_towards_sender(self, remote, port, token):
        if port == sender.bulk_port:
            refused.append(port)
            return None
        return await real_dial(self, remote, port, token)

    monkeypatch.setattr(FrameStream, "_bulk_dial", blocked_towards_sender)
    try:
        sender.start()
        addr = receiver.start()
        big = torch.randn(BIG_ELEMS)
        for _ in range(2):
            reply = sender.request(addr, ECHO, Frame("test.echo", 1, {}, [big]))
            assert torch.equal(reply.tensors[0], big)
        assert refused and sender.stats["bulk_frames_sent"] >= 2 and receiver.stats["bulk_frames_received"] >= 2
    finally:
        sender.close()
        receiver.close()


def test_no_bulk_either_way_falls_back_to_the_libp2p_stream(monkeypatch) -> None:
    async def nothing_dials(self, remote, port, token):
        return None

    monkeypatch.setattr(FrameStream, "_bulk_dial", nothing_dials)
    a, b = P2PNode(), P2PNode()
    b.set_handler(ECHO, echo)
    try:
        a.start()
        addr = b.start()
        big = torch.randn(BIG_ELEMS)
        reply = a.request(addr, ECHO, Frame("test.echo", 1, {}, [big]))
        assert torch.equal(reply.tensors[0], big)
        assert a.stats["bulk_frames_sent"] == 0 and b.stats["bulk_frames_received"] == 0
    finally:
        a.close()
        b.close()


def test_a_relayed_peer_whose_hole_punch_tries_ran_out_gets_more(monkeypatch) -> None:
    """py-libp2p's DCUtR tries a relayed peer three times, then never again while the connection
    lasts; Reach renews the tries of a peer still only relayed every PUNCH_RETRY_S."""
    monkeypatch.setattr(reach, "PUNCH_RETRY_S", 1.0)
    with relayed_nodes() as (relay, hidden, dialer, addr):
        for node, peer in ((dialer, hidden), (hidden, dialer)):  # as if both sides had missed three times
            node._reach.dcutr._hole_punch_attempts[ID.from_base58(peer.peer_id)] = MAX_HOLE_PUNCH_ATTEMPTS
        assert dialer.connect(addr) == hidden.peer_id
        assert dialer.connection_kind(hidden.peer_id) == "relayed"
        deadline = time.monotonic() + 30
        while dialer.connection_kind(hidden.peer_id) != "hole-punched" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert dialer.connection_kind(hidden.peer_id) == "hole-punched"

"""The frame link (node/transport/link.py): pipeline frames over a raw-TCP socket beside the libp2p
stream, with real P2PNodes on 127.0.0.1 in this process."""

from __future__ import annotations

import logging
import struct
import threading
import time

import pytest
import torch

from node.transport import Frame, P2PNode, StreamClosed, TransportConfig, TransportTimeout, protocol_id
from node.transport.aio import AsyncP2PNode
from node.transport.link import LinkReceiver, LinkSender
from wire.frames import FrameError, FrameLimits, encode_frame_parts, frame_nbytes

PIPE = protocol_id("linkpipe", 1)


class Collector:
    """A stream handler (threaded, as a stage's) that keeps what it reads and how the stream ended."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.ended: str | None = None
        self.done = threading.Event()

    def __call__(self, stream) -> None:
        while True:
            try:
                self.frames.append(stream.recv(timeout_s=20))
            except (StreamClosed, TransportTimeout) as e:
                self.ended = f"{type(e).__name__}: {e}"
                self.done.set()
                return

    def wait_for(self, n: int, timeout_s: float = 10.0) -> None:
        end = time.monotonic() + timeout_s
        while len(self.frames) < n and time.monotonic() < end and not self.done.is_set():
            time.sleep(0.01)


@pytest.fixture
def nodes():
    started: list[P2PNode] = []

    def make(**cfg) -> P2PNode:
        node = P2PNode(config=TransportConfig(bulk_setup_timeout_s=2.0, **cfg))
        started.append(node)
        return node

    yield make
    for node in reversed(started):
        node.close()


def _pair(make, handler, receiver_cfg: dict | None = None, sender_cfg: dict | None = None):
    receiver, sender = make(**(receiver_cfg or {})), make(**(sender_cfg or {}))
    receiver.set_stream_handler(PIPE, handler)
    addr = receiver.start()
    sender.start()
    sender.connect(addr)
    return receiver, sender


def _wait_link(stream, timeout_s: float = 5.0) -> None:
    end = time.monotonic() + timeout_s
    while stream._fs.link_ready is None and stream._fs.link_out is None and time.monotonic() < end:
        time.sleep(0.01)


def _on_link(make, got, receiver_cfg: dict | None = None):
    """A receiver handing frames to `got` and a stream to it on the link, its first frame ({"n": 1}) in."""
    receiver, sender = _pair(make, got, receiver_cfg)
    stream = sender.open_stream(receiver.peer_id, PIPE, link=True)
    _wait_link(stream)
    stream.send(Frame("test.n", 1, {"n": 1}))
    got.wait_for(1)
    return receiver, stream


def test_frames_keep_their_order_across_the_switch_and_the_end(nodes):
    got = Collector()
    receiver, sender = _pair(nodes, got)
    stream = sender.open_stream(receiver.peer_id, PIPE, link=True)
    for n in range(200):  # the first ones go over libp2p while the link is set up
        stream.send(Frame("test.n", 1, {"n": n}, [torch.full((1, 64), float(n))]))
        if n == 100:
            _wait_link(stream)
    stream.close()
    assert got.done.wait(10)
    assert [f.fields["n"] for f in got.frames] == list(range(200))
    assert all(float(f.tensors[0][0, 0]) == f.fields["n"] for f in got.frames)
    assert "StreamClosed" in got.ended
    assert sender.stats["link_frames_sent"] >= 99 and receiver.stats["link_frames_received"] >= 99


def test_a_large_frame_goes_in_records_and_arrives_whole(nodes):
    got = Collector()
    receiver, sender = _pair(nodes, got)
    with sender.open_stream(receiver.peer_id, PIPE, link=True) as stream:
        _wait_link(stream)
        big = torch.arange(3 * 1024 * 1024 // 4 + 5, dtype=torch.float32)  # ~3 MiB: four records
        stream.send(Frame("test.big", 1, {}, [big, torch.ones(2, 3)]))
        got.wait_for(1)
    assert receiver.stats["link_frames_received"] == 1
    assert torch.equal(got.frames[0].tensors[0], big) and torch.equal(got.frames[0].tensors[1], torch.ones(2, 3))


def test_tampered_or_garbage_bytes_on_the_link_drop_the_stream_with_a_clear_reason(nodes, caplog):
    got = Collector()
    receiver, stream = _on_link(nodes, got)
    with caplog.at_level(logging.WARNING, logger="meshpool.transport"):
        # a record that does not authenticate: what an injected or altered TCP segment looks like
        stream._fs.link_out.sock.sendall(struct.pack(">I", 40) + bytes(40))
        assert got.done.wait(10)
    assert "failed authentication" in got.ended
    assert receiver.stats["streams_dropped"] == 1
    assert "bad frame on the link" in caplog.text
    assert [f.fields["n"] for f in got.frames] == [1]


def test_an_oversized_frame_is_refused_before_it_is_read(nodes):
    got = Collector()
    _, stream = _on_link(nodes, got, receiver_cfg={"limits": FrameLimits(max_frame_bytes=200 * 1024)})
    stream.send(Frame("test.big", 1, {}, [torch.zeros(100_000)]))
    assert got.done.wait(10)
    assert [f.fields["n"] for f in got.frames] == [1]
    assert "bad frame" in got.ended and "exceeds" in got.ended


def test_the_reader_wakes_when_its_own_node_drops_the_stream(nodes):
    got = Collector()
    receiver, _ = _on_link(nodes, got)
    receiver.close()  # the reader is blocked on the link socket: the node's end must reach it
    assert got.done.wait(10)
    assert "StreamClosed" in got.ended


def test_no_link_for_an_asyncio_reader_or_when_switched_off(nodes):
    import asyncio

    # the serving side reads through its inbox on an event loop: it refuses the link, frames stay on libp2p
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    seen: list[int] = []
    ended = threading.Event()

    async def collect(stream) -> None:
        while True:
            try:
                seen.append((await stream.recv(timeout_s=20)).fields["n"])
            except (StreamClosed, TransportTimeout):
                ended.set()
                return

    receiver = nodes()
    asyncio.run_coroutine_threadsafe(_set_async_handler(AsyncP2PNode(receiver), collect), loop).result(5)
    addr = receiver.start()
    sender = nodes()
    sender.start()
    sender.connect(addr)
    with sender.open_stream(receiver.peer_id, PIPE, link=True) as stream:
        time.sleep(0.5)  # the offer is answered by now
        for n in range(5):
            stream.send(Frame("test.n", 1, {"n": n}))
        end = time.monotonic() + 10
        while len(seen) < 5 and time.monotonic() < end:
            time.sleep(0.01)
    assert seen == list(range(5)) and sender.stats["link_frames_sent"] == 0
    assert ended.wait(10)
    loop.call_soon_threadsafe(loop.stop)

    got = Collector()
    receiver, sender = _pair(nodes, got, sender_cfg={"frame_link": False})
    with sender.open_stream(receiver.peer_id, PIPE, link=True) as stream:
        for n in range(5):
            stream.send(Frame("test.n", 1, {"n": n}))
        got.wait_for(5)
    assert [f.fields["n"] for f in got.frames] == list(range(5)) and receiver.stats["link_frames_received"] == 0


async def _set_async_handler(anode: AsyncP2PNode, fn) -> None:
    anode.set_stream_handler(PIPE, fn)


def test_link_records_round_trip_and_refuse_a_replayed_record():
    import socket

    a, b = socket.socketpair()
    key = bytes(range(32))
    sender, receiver = LinkSender(a, key, "aes-256-gcm"), LinkReceiver(b, key, "aes-256-gcm", FrameLimits(), 5.0)
    frame = Frame("test.n", 1, {"n": 7}, [torch.ones(3)])
    parts = encode_frame_parts(frame)
    sender.send_parts(parts, frame_nbytes(parts), 5.0)
    assert receiver.recv(5.0).fields["n"] == 7
    sender._counter -= 1  # the same nonce again: a replayed record
    sender.send_parts(parts, frame_nbytes(parts), 5.0)
    with pytest.raises(FrameError, match="authentication"):
        receiver.recv(5.0)


@pytest.mark.parametrize("dials", ["opener only", "nobody"])
def test_the_link_is_dialed_the_other_way_or_not_at_all(nodes, monkeypatch, dials):
    """The serving side cannot dial the opener (a NAT in front of the opener): the opener dials it;
    if neither can, frames stay on the libp2p stream, in order."""
    from node.transport.channel import FrameStream

    real_dial = FrameStream._bulk_dial
    refused: list[int] = []
    got = Collector()
    receiver, sender = _pair(nodes, got)

    async def blocked(self, remote, port, token):
        if port == sender.bulk_port or dials == "nobody":
            refused.append(port)
            return None
        return await real_dial(self, remote, port, token)

    monkeypatch.setattr(FrameStream, "_bulk_dial", blocked)
    stream = sender.open_stream(receiver.peer_id, PIPE, link=True)
    for n in range(60):
        stream.send(Frame("test.n", 1, {"n": n}))
        if n == 10:
            time.sleep(0.5)  # the link is up by now, if it can be
    stream.close()
    assert got.done.wait(10)
    assert [f.fields["n"] for f in got.frames] == list(range(60)) and refused
    if dials == "opener only":
        assert receiver.stats["link_frames_received"] >= 49
    else:
        assert receiver.stats["link_frames_received"] == 0


def test_a_relayed_stream_keeps_the_libp2p_path(nodes):
    relay = nodes(relay_hop=True)
    got = Collector()
    hidden, dialer = nodes(), nodes()
    hidden.set_stream_handler(PIPE, got)
    relay_addr = relay.start()
    hidden.start()
    dialer.start()
    dialer.connect(hidden.reserve_relay(relay_addr))
    with dialer.open_stream(hidden.peer_id, PIPE, link=True) as stream:
        for n in range(5):
            stream.send(Frame("test.n", 1, {"n": n}, [torch.ones(4)]))
        got.wait_for(5)
    assert [f.fields["n"] for f in got.frames] == list(range(5))
    assert dialer.stats["link_frames_sent"] == 0 and not stream._fs.link_wanted

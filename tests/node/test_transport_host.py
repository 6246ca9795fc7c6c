"""P2PNode: two real libp2p hosts on 127.0.0.1 in this process."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time

import msgpack
import multiaddr
import pytest
import torch
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from node.transport import (
    Frame,
    FrameError,
    Identity,
    MessageSpec,
    P2PNode,
    RemoteError,
    StreamClosed,
    TransportConfig,
    TransportError,
    TransportTimeout,
    encode_frame,
    protocol_id,
    register_message,
)
from node.transport.aio import AsyncP2PNode
from node.transport.bulk import BulkReceiver, BulkSender, new_secrets
from wire.frames import DTYPES, MAGIC, PREFIX

ECHO = protocol_id("echo", 1)
PIPE = protocol_id("pipe", 1)
LOGGER = "meshpool.transport"

register_message(MessageSpec("test.strict", 1, {"n": int}))


def echo(frame: Frame, peer: str) -> Frame:
    if frame.type == "test.raise":
        raise ValueError("handler says no")
    if frame.type == "test.bad_reply":
        return "not a frame"  # type: ignore[return-value]
    if frame.type == "test.slow":
        time.sleep(2.0)
    return Frame("test.echo", 1, {**frame.fields, "peer": peer}, frame.tensors)


def pipe(stream) -> None:
    """Long-lived stream: add 1 to every tensor, until the peer closes."""
    while True:
        try:
            f = stream.recv(timeout_s=30)
        except StreamClosed:
            return
        stream.send(Frame("test.piped", 1, f.fields, [t + 1 if t.is_floating_point() else t for t in f.tensors]))


@pytest.fixture
def pair():
    server = P2PNode(config=TransportConfig(bulk_setup_timeout_s=2.0))
    server.set_handler(ECHO, echo)
    server.set_stream_handler(PIPE, pipe)
    addr = server.start()
    client = P2PNode(config=TransportConfig(bulk_setup_timeout_s=2.0))
    client.start()
    assert client.connect(addr) == server.peer_id
    yield server, client
    client.close()
    server.close()


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def rand(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = int(torch.tensor(shape).prod().item())
    size = torch.empty((), dtype=dtype).element_size()
    return torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)


def send_raw(node: P2PNode, peer: str, protocol: str, chunks: list[bytes], *, half_close: bool = True) -> bytes:
    """Write raw bytes on a fresh libp2p stream, (half-close,) read until the server ends it."""

    async def go() -> bytes:
        ns = await node._host.new_stream(ID.from_base58(peer), [TProtocol(protocol)])
        for c in chunks:
            await ns.write(c)
        if half_close:
            await ns.close()
        out = b""
        try:
            while True:
                d = await ns.read(65536)
                if not d:
                    break
                out += d
        except Exception:  # reset or EOF: the server dropped us
            pass
        return out

    return node.call(10, go)


def header_frame(header: dict, payload: bytes, payload_len: int | None = None) -> bytes:
    hb = msgpack.packb(header, use_bin_type=True)
    n = len(payload) if payload_len is None else payload_len
    return PREFIX.pack(MAGIC, len(hb), n) + hb + bytes((-len(hb)) % 8) + payload


# ---------------------------------------------------------------- round trips
def test_request_round_trip_every_dtype_bit_exact(pair) -> None:
    server, client = pair
    tensors = [rand(dt, (3, 17), i) for i, (dt, _) in enumerate(DTYPES.values())]
    reply = client.request(server.peer_id, ECHO, Frame("test.req", 1, {"k": "v"}, tensors))
    assert reply.type == "test.echo" and reply.fields == {"k": "v", "peer": client.peer_id}
    for a, b in zip(tensors, reply.tensors):
        assert a.dtype == b.dtype and a.shape == b.shape and bits(a) == bits(b)


@pytest.mark.parametrize("bulk", [True, False], ids=["bulk", "libp2p"])
def test_large_frames_bit_exact_with_and_without_bulk_channel(bulk: bool) -> None:
    cfg = TransportConfig(bulk_threshold_bytes=256 * 1024 if bulk else 0)
    with P2PNode(config=cfg) as server, P2PNode(config=cfg) as client:
        server.set_handler(ECHO, echo)
        client.connect(server.addr)
        tensors = [rand(torch.bfloat16, (1024, 1024), 1), rand(torch.int64, (3, 5), 2), rand(torch.float32, (7,), 3)]
        for _ in range(2):
            reply = client.request(server.addr, ECHO, Frame("test.big", 1, {}, tensors))
            assert [bits(t) for t in reply.tensors] == [bits(t) for t in tensors]
        assert (client.stats["bulk_frames_sent"] > 0) == bulk
        assert (server.stats["bulk_frames_sent"] > 0) == bulk


def test_long_lived_stream_in_order_with_mixed_sizes(pair) -> None:
    server, client = pair
    with client.open_stream(server.peer_id, PIPE) as s:
        sizes = [4, 300_000, 8, 1_000_000, 16, 4]  # crosses the bulk threshold both ways
        for i, n in enumerate(sizes):
            s.send(Frame("test.stream_hop", 1, {"i": i}, [torch.full((n,), float(i))]))
        for i, n in enumerate(sizes):
            f = s.recv(timeout_s=10)
            assert f.fields["i"] == i and f.tensors[0].shape == (n,)
            assert torch.all(f.tensors[0] == i + 1)
    assert server.stats["bulk_frames_received"] == 2 and client.stats["bulk_frames_received"] == 2


def test_send_nowait_overlaps_and_keeps_order(pair) -> None:
    server, client = pair
    with client.open_stream(server.peer_id, PIPE) as s:
        chunks = [torch.full((400_000,), float(i)) for i in range(4)]  # 1.6 MB each: bulk channel
        futures = [s.send_nowait(Frame("test.chunk", 1, {"i": i}, [c])) for i, c in enumerate(chunks)]
        for f in futures:
            f.result(timeout=30)
        for i in range(4):
            f = s.recv(timeout_s=30)
            assert f.fields["i"] == i and torch.all(f.tensors[0] == i + 1)
        with pytest.raises(TransportTimeout):
            s.recv(timeout_s=0.2)  # nothing more is coming


def test_parallel_requests_from_threads(pair) -> None:
    server, client = pair
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for j in range(4):
                r = client.request(server.peer_id, ECHO, Frame("test.req", 1, {"k": k, "j": j}, [torch.tensor([k, j])]))
                assert r.fields["k"] == k and r.tensors[0].tolist() == [k, j]
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


# ---------------------------------------------------------------- handler failures
def test_handler_errors_reach_the_caller_and_the_server_keeps_serving(pair) -> None:
    server, client = pair
    with pytest.raises(RemoteError, match="handler says no"):
        client.request(server.peer_id, ECHO, Frame("test.raise"))
    with pytest.raises(RemoteError, match="TypeError"):
        client.request(server.peer_id, ECHO, Frame("test.bad_reply"))
    with pytest.raises(TransportTimeout):
        client.request(server.peer_id, ECHO, Frame("test.slow"), timeout_s=0.3)
    assert client.request(server.peer_id, ECHO, Frame("test.ok")).type == "test.echo"


def test_local_misuse_raises_frame_error_and_changes_nothing(pair) -> None:
    server, client = pair
    with pytest.raises(FrameError, match="reserved"):
        client.request(server.peer_id, ECHO, Frame("transport.bulk_ref", 1, {"nbytes": 5}))
    with pytest.raises(FrameError, match="dtype"):
        client.request(server.peer_id, ECHO, Frame("test.x", 1, {}, [torch.zeros(2, dtype=torch.float64)]))
    with pytest.raises(ValueError, match="/meshpool/"):
        server.set_handler("/other/1", echo)
    assert client.request(server.peer_id, ECHO, Frame("test.ok")).type == "test.echo"


# ---------------------------------------------------------------- hostile peers
GOOD = {"t": "x", "v": 1, "f": {}, "x": [["float32", [2, 2]]]}
BAD_INPUTS = {
    "garbage": ([os.urandom(5000)], "bad magic"),
    "oversized": ([PREFIX.pack(MAGIC, 10, 1 << 40)], "exceeds the limit"),
    "wrong shape": ([header_frame({**GOOD, "x": [["float32", [2, 3]]]}, bytes(16))], "needs 24 bytes"),
    "wrong dtype": ([header_frame({**GOOD, "x": [["complex64", [2, 2]]]}, bytes(16))], "complex64"),
    "truncated payload": ([header_frame(GOOD, bytes(10), payload_len=16)], "truncated frame"),
    "truncated prefix": ([MAGIC + b"\x00"], "truncated frame"),
    "schema": ([encode_frame(Frame("test.strict", 1, {"n": "x"}))], "field 'n'"),
    "bulk_ref without channel": ([encode_frame(Frame("transport.bulk_ref", 1, {"nbytes": 100}))], "without a bulk channel"),
    "unknown control": ([encode_frame(Frame("transport.nope", 1, {}))], "unknown message"),
    "plaintext bulk offer": ([encode_frame(Frame("transport.bulk_offer", 1, {
        "port": 9, "token": bytes(32), "key": bytes(32), "cipher": "none"}))], "plaintext"),
    "bad json-ish header": ([PREFIX.pack(MAGIC, 4, 0) + b'{"a"' + bytes(4)], "msgpack"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_frames_drop_the_stream_with_a_logged_reason(pair, caplog, case: str) -> None:
    server, client = pair
    chunks, reason = BAD_INPUTS[case]
    caplog.set_level(logging.WARNING, logger=LOGGER)
    reply = send_raw(client, server.peer_id, ECHO, chunks)
    assert reply == b""  # no answer: the stream was reset
    assert any(reason in r.getMessage() and "dropping stream" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]
    assert server.stats["streams_dropped"] == 1
    # the same client, and the node as a whole, are still served
    assert client.request(server.peer_id, ECHO, Frame("test.ok", 1, {"n": 1})).fields["n"] == 1


def test_disconnect_on_bad_frame_closes_only_the_offenders_connection(caplog) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with P2PNode(config=TransportConfig(disconnect_on_bad_frame=True)) as server, P2PNode() as good, P2PNode() as bad:
        server.set_handler(ECHO, echo)
        good.connect(server.addr)
        bad.connect(server.addr)
        send_raw(bad, server.peer_id, ECHO, [b"\xff" * 100])
        assert any("disconnecting peer " + bad.peer_id in r.getMessage() for r in caplog.records)

        async def connected(peer: str) -> bool:
            for _ in range(400):  # the disconnect runs in the background; wait for it (20 s at most)
                if not server._host.is_peer_connected(ID.from_base58(peer)) or peer == good.peer_id:
                    break
                await trio.sleep(0.05)
            return server._host.is_peer_connected(ID.from_base58(peer))

        assert not server.call(10, connected, bad.peer_id)
        assert server.call(10, connected, good.peer_id)
        assert good.request(server.peer_id, ECHO, Frame("test.ok")).type == "test.echo"
        assert server.stats["peers_disconnected"] == 1


def test_bad_frame_on_a_long_lived_stream_ends_only_that_stream(pair, caplog) -> None:
    server, client = pair
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with client.open_stream(server.peer_id, PIPE) as good:
        good.send(Frame("test.stream_hop", 1, {"i": 0}, [torch.zeros(3)]))
        assert good.recv(timeout_s=10).fields["i"] == 0
        send_raw(client, server.peer_id, PIPE, [b"\x00" * 64])
        good.send(Frame("test.stream_hop", 1, {"i": 1}, [torch.zeros(3)]))
        assert good.recv(timeout_s=10).fields["i"] == 1
    assert any("bad magic" in r.getMessage() for r in caplog.records)


def test_stalled_frame_is_dropped_after_frame_timeout(caplog) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with P2PNode(config=TransportConfig(frame_timeout_s=0.3)) as server, P2PNode() as client:
        server.set_handler(ECHO, echo)
        client.connect(server.addr)
        stalled = header_frame(GOOD, bytes(16))[:20]  # prefix and part of the header, then nothing
        assert send_raw(client, server.peer_id, ECHO, [stalled], half_close=False) == b""
        assert any("not completed within" in r.getMessage() for r in caplog.records)
        assert client.request(server.peer_id, ECHO, Frame("test.ok")).type == "test.echo"


def test_streams_per_peer_are_bounded(caplog) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with P2PNode(config=TransportConfig(max_streams_per_peer=2)) as server, P2PNode() as client:
        server.set_stream_handler(PIPE, pipe)
        client.connect(server.addr)
        kept = [client.open_stream(server.peer_id, PIPE) for _ in range(2)]
        for i, s in enumerate(kept):  # make sure both are being served before the third
            s.send(Frame("test.stream_hop", 1, {"i": i}))
            assert s.recv(timeout_s=10).fields["i"] == i
        with pytest.raises(TransportError):  # refused: at negotiation or at the first read
            extra = client.open_stream(server.peer_id, PIPE)
            extra.send(Frame("test.stream_hop", 1, {"i": 9}))
            extra.recv(timeout_s=10)
        assert any("refusing stream" in r.getMessage() for r in caplog.records)
        for s in kept:
            s.close()


def test_unknown_protocol_is_refused(pair) -> None:
    server, client = pair
    with pytest.raises(TransportError, match="could not open"):
        client.request(server.peer_id, protocol_id("nothing", 1), Frame("test.x"), timeout_s=5)
    assert client.request(server.peer_id, ECHO, Frame("test.ok")).type == "test.echo"


def test_bulk_port_refuses_unknown_tokens(pair, caplog) -> None:
    server, client = pair
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with socket.create_connection(("127.0.0.1", server.bulk_port), timeout=10) as s:
        s.sendall(os.urandom(32))
        assert s.recv(10) == b""  # closed by the node
    assert any("unknown token" in r.getMessage() for r in caplog.records)
    assert client.request(server.peer_id, ECHO, Frame("test.ok")).type == "test.echo"


def test_plaintext_bulk_sender_against_default_receiver_fails_cleanly() -> None:
    cfg = TransportConfig(bulk_cipher="none", bulk_setup_timeout_s=1.0)
    with P2PNode() as server, P2PNode(config=cfg) as client:
        server.set_handler(ECHO, echo)
        with pytest.raises((StreamClosed, TransportTimeout)):
            client.request(server.addr, ECHO, Frame("test.big", 1, {}, [torch.zeros(1 << 20)]), timeout_s=10)
        assert server.stats["streams_dropped"] == 1
        assert client.request(server.addr, ECHO, Frame("test.ok")).type == "test.echo"


def test_bulk_records_are_authenticated() -> None:
    token, key = new_secrets()

    async def main() -> None:
        a, b = trio.socket.socketpair()
        sender, receiver = BulkSender(a, key, "aes-256-gcm"), BulkReceiver(b, key, "aes-256-gcm")
        data = os.urandom(3000)
        await sender.send_parts([data])
        out = memoryview(bytearray(3000))
        await receiver.recv_into(out)
        assert bytes(out) == data
        # a tampered record fails authentication
        ct = bytearray(sender._aead.encrypt(b"\0" * 4 + (1).to_bytes(8, "big"), data, None))
        ct[100] ^= 1
        await a.send(len(ct).to_bytes(4, "big") + bytes(ct))
        with pytest.raises(FrameError, match="authentication"):
            await receiver.recv_into(memoryview(bytearray(3000)))
        # a replayed record (old counter) fails too
        a2, b2 = trio.socket.socketpair()
        s2, r2 = BulkSender(a2, key, "aes-256-gcm"), BulkReceiver(b2, key, "aes-256-gcm")
        rec = s2._aead.encrypt(b"\0" * 12, data, None)
        await a2.send(len(rec).to_bytes(4, "big") + rec + len(rec).to_bytes(4, "big") + rec)
        await r2.recv_into(memoryview(bytearray(3000)))
        with pytest.raises(FrameError, match="authentication"):
            await r2.recv_into(memoryview(bytearray(3000)))
        for s in (a, b, a2, b2):
            s.close()

    trio.run(main)


# ---------------------------------------------------------------- asyncio face
def test_asyncio_api_with_async_handlers() -> None:
    async def main() -> None:
        server = AsyncP2PNode(P2PNode())
        client = AsyncP2PNode(P2PNode())

        async def handler(frame: Frame, peer: str) -> Frame:
            await asyncio.sleep(0)
            return Frame("test.async", 1, {"peer": peer}, [frame.tensors[0] * 2])

        async def stream_handler(stream) -> None:
            while True:
                try:
                    f = await stream.recv(timeout_s=30)
                except StreamClosed:
                    return
                await stream.send(Frame("test.astream", 1, f.fields))

        server.set_handler(ECHO, handler)
        server.set_stream_handler(PIPE, stream_handler)
        addr = await server.start()
        await client.start()
        try:
            assert await client.connect(addr) == server.peer_id
            replies = await asyncio.gather(*[
                client.request(server.peer_id, ECHO, Frame("test.q", 1, {}, [torch.tensor([i])])) for i in range(5)
            ])
            assert [r.tensors[0].item() for r in replies] == [0, 2, 4, 6, 8]
            assert replies[0].fields["peer"] == client.peer_id
            s = await client.open_stream(server.peer_id, PIPE)
            for i in range(3):
                await s.send(Frame("test.q", 1, {"i": i}))
                assert (await s.recv(timeout_s=10)).fields == {"i": i}
            await s.close()
        finally:
            await client.close()
            await server.close()

    asyncio.run(main())


def test_closed_node_refuses_calls() -> None:
    node = P2PNode()
    node.start()
    node.close()
    with pytest.raises(Exception):
        node.request(node.peer_id, ECHO, Frame("test.x"), timeout_s=2)


def test_a_peer_restarted_on_a_new_port_is_dialed_there():
    """kill -9 and start again with the same key: the port changes, the peer id does not. A dial to
    the new address must reach it, not the remembered old one (nor be refused for the old one's failure)."""
    identity = Identity.generate()
    first, dialer = P2PNode(identity), P2PNode()
    first.set_handler(ECHO, echo)
    dialer.start()
    try:
        dialer.connect(first.start())
        assert dialer.request(identity.peer_id_str, ECHO, Frame("test.ping", 1, {})).type == "test.echo"
        first.close()
        with pytest.raises(TransportError):  # the old address is gone
            dialer.request(identity.peer_id_str, ECHO, Frame("test.ping", 1, {}), timeout_s=5)
        again = P2PNode(identity)
        again.set_handler(ECHO, echo)
        try:
            new_addr = again.start()
            dialer.connect(new_addr)
            assert dialer.request(identity.peer_id_str, ECHO, Frame("test.ping", 1, {})).type == "test.echo"
        finally:
            again.close()
    finally:
        dialer.close()


def test_bulk_channel_goes_through_the_shaper_when_links_are_shaped(monkeypatch) -> None:
    """Benchmarks over emulated distance shape the libp2p streams with proxies in front of each node;
    MESHPOOL_SHAPE_BULK puts the same shaper in front of a node's bulk listener, so large frames are
    not carried past the emulated link. The shaper's own accounts say it carried them."""
    frame = Frame("test.big", 1, {}, [torch.zeros(2 * 1024 * 1024, dtype=torch.float32)])  # 8 MiB
    monkeypatch.setenv("MESHPOOL_SHAPE_BULK", "5,1000")
    with P2PNode() as shaped, P2PNode() as receiver:
        monkeypatch.delenv("MESHPOOL_SHAPE_BULK")
        with P2PNode() as plain:
            receiver.set_handler(ECHO, lambda f, peer: Frame("test.ok", 1, {}))
            for sender in (shaped, plain):
                sender.connect(receiver.addr)
                assert sender.request(receiver.peer_id, ECHO, frame).type == "test.ok"
                assert sender.stats["bulk_frames_sent"] == 1
            accounts = shaped._bulk.shaped
            assert accounts.bytes >= 8 * 2**20  # the frame's records, all through the shaper
            # 1 Gbit/s: the link time it scheduled is the frame's serialisation plus a delay per chunk
            assert accounts.serialisation_s >= 8 * 2**20 * 8 / 1e9 and accounts.delay_s >= 0.005
            assert plain._bulk.shaped.bytes == 0 and plain._bulk.shape is None


def test_addresses_of_a_peer_whose_record_expired_are_forgotten_without_an_error():
    """py-libp2p's clear_addrs raises once a peer's signed record outlived its addresses' TTL (a
    coordinator connected to more than 120 s before it restarted); forget_addrs clears them all the same,
    so the redial that follows can go on."""
    from libp2p.crypto.secp256k1 import create_new_key_pair
    from libp2p.peer.peerstore import PeerStore, PeerStoreError

    from node.transport.host import forget_addrs

    def aged_store():
        store = PeerStore()
        peer = ID.from_pubkey(create_new_key_pair().public_key)
        store.add_addrs(peer, [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/4001")], 120)
        store.peer_record_map[peer] = None  # a signed record is held (identify leaves one)
        store.peer_data_map[peer].last_identified -= 121
        return store, peer

    store, peer = aged_store()
    with pytest.raises(PeerStoreError, match="expired"):
        store.clear_addrs(peer)
    store, peer = aged_store()
    forget_addrs(store, peer)
    assert store.peer_data_map[peer].get_addrs() == []
    store.add_addrs(peer, [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/4002")], 120)  # as host.connect does
    assert [str(a) for a in store.addrs(peer)] == ["/ip4/127.0.0.1/tcp/4002"]

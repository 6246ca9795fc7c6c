"""P2PNode across two processes: a child serves, this process calls it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from node.transport import Frame, P2PNode, protocol_id
from wire.frames import DTYPES

REPO = Path(__file__).resolve().parents[2]
ECHO = protocol_id("echo", 1)

CHILD = r"""
import logging, sys, torch
from node.transport import Frame, P2PNode, load_or_create, protocol_id
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
node = P2PNode(identity=load_or_create(sys.argv[1]))
node.set_handler(protocol_id("echo", 1),
                 lambda f, peer: Frame("test.echo", 1, {**f.fields, "pid": __import__("os").getpid()}, f.tensors))
print(node.start(), flush=True)
sys.stdin.read()  # serve until the parent closes our stdin
node.close()
"""


def start_child(data_dir: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(data_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    addr = proc.stdout.readline().strip()
    assert "/p2p/" in addr, proc.stderr.read()
    return proc, addr


def stop_child(proc: subprocess.Popen) -> str:
    proc.stdin.close()
    proc.wait(20)
    return proc.stderr.read()


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_two_processes_round_trip_garbage_and_restart(tmp_path) -> None:
    proc, addr = start_child(tmp_path / "child")
    try:
        with P2PNode() as client:
            peer = client.connect(addr)
            g = torch.Generator().manual_seed(0)
            tensors = [torch.randint(0, 256, (8 * 33,), dtype=torch.uint8, generator=g).view(dt).reshape(-1)[:33]
                       for dt, _ in DTYPES.values()]
            tensors.append(torch.randn(1 << 20, generator=g))  # 4 MB: goes over the bulk channel
            reply = client.request(peer, ECHO, Frame("test.req", 1, {"a": 1}, tensors), timeout_s=30)
            assert reply.fields["pid"] == proc.pid
            assert [bits(t) for t in reply.tensors] == [bits(t) for t in tensors]
            assert client.stats["bulk_frames_sent"] == 1

            async def garbage() -> None:
                from libp2p.custom_types import TProtocol
                from libp2p.peer.id import ID

                ns = await client._host.new_stream(ID.from_base58(peer), [TProtocol(ECHO)])
                await ns.write(b"GET / HTTP/1.1\r\n\r\n")
                await ns.close()
                try:
                    while await ns.read(100):
                        pass
                except Exception:
                    pass

            client.call(10, garbage)
            assert client.request(peer, ECHO, Frame("test.after", 1, {"b": 2})).fields["b"] == 2
    finally:
        log = stop_child(proc)
    assert "dropping stream /meshpool/echo/1" in log and "bad magic" in log

    # same data dir -> same key file -> same peer id
    proc2, addr2 = start_child(tmp_path / "child")
    try:
        assert addr2.rsplit("/p2p/", 1)[1] == addr.rsplit("/p2p/", 1)[1]
        with P2PNode() as client:
            assert client.request(addr2, ECHO, Frame("test.again")).fields["pid"] == proc2.pid
    finally:
        stop_child(proc2)


def test_a_killed_peer_is_reported_lost_by_its_connection(tmp_path) -> None:
    """kill -9 leaves no goodbye; the closed connection is the news, long before any heartbeat."""
    import threading

    proc, addr = start_child(tmp_path / "victim")
    lost: list[str] = []
    news = threading.Event()
    with P2PNode() as client:
        client.on_peer_lost(lambda peer: (lost.append(peer), news.set()))
        peer = client.connect(addr)
        assert client.request(peer, ECHO, Frame("test.req", 1, {"a": 1}), timeout_s=30).fields["a"] == 1
        assert not news.wait(0.5), "a live peer was reported lost"
        proc.kill()
        proc.wait(10)
        assert news.wait(30), "the killed peer was never reported lost"
        assert lost == [peer]

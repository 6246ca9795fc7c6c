"""The seeded frame-fault layer (node/transport/faults.py): off unless asked, replayable from its seed,
and on real libp2p streams drops, duplicates and delays what arrives."""

from __future__ import annotations

import time

import pytest

from node.transport import Frame, P2PNode, StreamClosed, TransportConfig, TransportTimeout, protocol_id
from node.transport.faults import DROP, DUP, ENV_VAR, PASS, FaultSpec, FaultSpecError, FrameFaults

PIPE = protocol_id("faultpipe", 1)
FRAMES = 40


def test_off_unless_the_environment_asks(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert TransportConfig().faults is None
    monkeypatch.setenv(ENV_VAR, "7:dup=0.5")
    assert TransportConfig().faults.spec == FaultSpec(7, dup=0.5)


def test_spec_parses_back_and_refuses_nonsense():
    spec = FaultSpec(7, drop=0.01, dup=0.02, delay=0.1, delay_ms=50, protocols=("stage", "result"))
    assert FaultSpec.parse(spec.format()) == spec
    assert FaultSpec.parse("3:delay_ms=20") == FaultSpec(3, delay=1.0, delay_ms=20)
    for bad in ("x:drop=0.1", "7:drop=2", "7:drop=0.6,dup=0.6", "7:lose=0.1", "7:drop=a", "7:delay_ms=-1",
                "7:drop=0.1,drop=0.2"):
        with pytest.raises(FaultSpecError):
            FaultSpec.parse(bad)


def test_one_seed_gives_each_stream_the_same_faults():
    spec = FaultSpec(11, drop=0.2, dup=0.2, delay=0.3, delay_ms=100)

    def draws(faults: FrameFaults, protocol: str) -> list:
        stream = faults.for_stream(protocol)
        return [stream.next() for _ in range(200)]

    a, b = FrameFaults(spec), FrameFaults(spec)
    first = draws(a, "/meshpool/stage/1")
    assert first == draws(b, "/meshpool/stage/1")
    assert draws(a, "/meshpool/stage/1") != first  # the node's second stage stream has its own draws
    assert first != draws(FrameFaults(FaultSpec(12, drop=0.2, dup=0.2, delay=0.3, delay_ms=100)), "/meshpool/stage/1")
    assert {action for action, _ in first} == {PASS, DROP, DUP}
    assert all(0 <= delay_s <= 0.1 for _, delay_s in first) and any(delay_s for _, delay_s in first)
    assert FrameFaults(FaultSpec(1, drop=1.0, protocols=("result",))).for_stream("/meshpool/stage/1") is None


def _received(spec: FaultSpec, link: bool = False) -> tuple[list[int], dict]:
    """FRAMES frames sent over one real stream to a node with these faults; the numbers it read."""
    got: list[int] = []

    def collect(stream) -> None:
        while True:
            try:
                got.append(stream.recv(timeout_s=5).fields["n"])
            except (StreamClosed, TransportTimeout):
                return

    receiver, sender = P2PNode(config=TransportConfig(faults=FrameFaults(spec))), P2PNode()
    receiver.set_stream_handler(PIPE, collect)
    try:
        addr = receiver.start()
        sender.start()
        sender.connect(addr)
        with sender.open_stream(receiver.peer_id, PIPE, link=link) as stream:
            for n in range(FRAMES):
                stream.send(Frame("test.n", 1, {"n": n}))
            stream.send(Frame("test.n", 1, {"n": -1}))  # a marker: the stream carried everything before it
            end_s = time.monotonic() + 20  # the marker itself may be dropped: then wait out the time
            while -1 not in got and time.monotonic() < end_s:
                time.sleep(0.05)
        stats = dict(receiver.stats)
    finally:
        sender.close()
        receiver.close()
    return got, stats


def test_frames_on_a_real_stream_are_dropped_duplicated_and_delayed_in_order():
    got, stats = _received(FaultSpec(3, drop=0.2, dup=0.2, delay=0.2, delay_ms=20))
    body = [n for n in got if n >= 0]
    assert body == sorted(body)  # a delay holds back what follows: the order stays
    dropped, duplicated = set(range(FRAMES)) - set(body), [n for n in set(body) if body.count(n) == 2]
    assert dropped and duplicated and stats["faults_delayed"] > 0
    assert stats["faults_dropped"] == len(dropped) + (-1 not in got)
    assert stats["faults_duplicated"] == len(duplicated) + (got.count(-1) == 2)
    again, _ = _received(FaultSpec(3, drop=0.2, dup=0.2, delay=0.2, delay_ms=20))
    assert again == got  # the same seed, the same faults at the same frames


def test_faults_apply_to_frames_on_the_frame_link():
    """Pipeline hops send over the frame link (link.py): the same faults at the same frames as on
    libp2p, whichever path each frame took."""
    got, stats = _received(FaultSpec(3, drop=0.2, dup=0.2, delay=0.2, delay_ms=20), link=True)
    assert stats["link_frames_received"] > 0
    plain, _ = _received(FaultSpec(3, drop=0.2, dup=0.2, delay=0.2, delay_ms=20))
    assert got == plain


def test_no_faults_nothing_changes():
    got, stats = _received(FaultSpec(3))
    assert got == [*range(FRAMES), -1]
    assert not any(k.startswith("faults_") for k in stats)

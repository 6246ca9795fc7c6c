"""Where a pipeline hop's time goes: a ring of relay processes with no compute, over the real
transport and the real messages, measured for both paths in one run.

    python bench/hop_ring.py [--relays 3] [--steps 400] [--hidden 576]

The driver (this process, as the coordinator) sends a batch-1 decode Step with a (1, hidden)
float32 activation to relay 1; each relay decodes it strictly (wire/messages.py), forwards it
(Step.forward: the next stage's input, no copy) to the next relay, and the last one answers with a
Result, as a last stage does. Each relay is a process of its own with a P2PNode and a threaded
stream handler, as a provider serves its upstream. Per hop = median round trip / (relays + 1).
Each path is a fresh ring: "libp2p" (MESHPOOL_FRAME_LINK=off: every frame over py-libp2p streams,
as before the frame link) and "link" (frames over link.py). Beside them, in the same run, the parts
a hop is made of, measured alone in this process (see `parts_us`).
Also used by bench/pipeline_overhead.py.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from node.transport import P2PNode, StreamClosed, TransportConfig, TransportTimeout  # noqa: E402
from node.transport.config import FRAME_LINK_ENV  # noqa: E402
from wire.frames import decode_frame, encode_frame_parts  # noqa: E402
from wire.messages import PROTO_RESULT, PROTO_STAGE, Result, SamplingParams, Step, decode  # noqa: E402


# ---------------------------------------------------------------- a relay (one process per stage)
def relay(next_addr: str, last: bool) -> None:
    torch.set_num_threads(1)
    node = P2PNode()
    addr = node.start()
    out: list = []

    def serve(stream) -> None:
        while True:
            try:
                frame = stream.recv(timeout_s=600)
            except (StreamClosed, TransportTimeout):
                return
            step = decode(frame, Step)
            if last:
                message = Result(step.pipeline, step.step, step.sessions, (5,) * len(step.sessions),
                                 step.stage_ms + (0.0,))
            else:
                message = step.forward(step.x, 0.0)
            out[0].send(message.to_frame(), timeout_s=30)

    node.set_stream_handler(PROTO_STAGE, serve)
    peer = node.connect(next_addr)
    out.append(node.open_stream(peer, PROTO_RESULT if last else PROTO_STAGE, link=True))
    print(f"relay ready {addr}", flush=True)
    sys.stdin.read()  # until the driver closes our stdin
    node.close()


# ---------------------------------------------------------------- the driver
def ring_us(path: str, relays: int, steps: int, hidden: int) -> dict:
    """Median round trip of a decode step through `relays` relay processes, and per hop."""
    node = P2PNode(config=TransportConfig(frame_link=path == "link"))
    addr = node.start()
    results: dict[int, float] = {}
    arrived = threading.Event()

    def on_results(stream) -> None:
        while True:
            try:
                frame = stream.recv(timeout_s=600)
            except (StreamClosed, TransportTimeout):
                return
            results[decode(frame, Result).step] = time.perf_counter()
            arrived.set()

    node.set_stream_handler(PROTO_RESULT, on_results)
    env = {**os.environ, FRAME_LINK_ENV: "on" if path == "link" else "off", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    procs, nxt = [], addr
    try:
        for i in reversed(range(relays)):
            p = subprocess.Popen([sys.executable, __file__, "--relay-to", nxt] + (["--last"] if i == relays - 1 else []),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            procs.append(p)
            line = p.stdout.readline()
            assert line.startswith("relay ready "), line
            nxt = line.split()[-1]
        first = node.connect(nxt)
        stream = node.open_stream(first, PROTO_STAGE, link=True)
        x = torch.randn(1, hidden)
        rtts = []
        for n in range(steps + 50):  # the first 50: warm-up, and the link set up meanwhile
            step = Step("0" * 16, n, "decode", ("s0",), (100 + n,), (SamplingParams(),), (), x)
            arrived.clear()
            start = time.perf_counter()
            stream.send(step.to_frame(), timeout_s=30)
            while n not in results:
                arrived.wait(30)
                arrived.clear()
            if n >= 50:
                rtts.append((results[n] - start) * 1e6)
            if n == 20:
                time.sleep(0.3)
        stream.close()
        rtt = statistics.median(rtts)
        return {"path": path, "relays": relays, "hops": relays + 1, "round_trip_us": round(rtt, 1),
                "per_hop_us": round(rtt / (relays + 1), 1),
                "p90_per_hop_us": round(statistics.quantiles(rtts, n=10)[-1] / (relays + 1), 1),
                "link_frames_sent": node.stats["link_frames_sent"]}
    finally:
        for p in procs:
            p.stdin.close()
        for p in procs:
            p.wait(10)
        node.close()


# ---------------------------------------------------------------- the parts of a hop, alone
def _median_us(fn, n: int = 2000) -> float:
    for _ in range(50):
        fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n // 5):
            fn()
        times.append((time.perf_counter() - start) / (n // 5) * 1e6)
    return round(statistics.median(times), 1)


def parts_us(hidden: int) -> dict:
    """One-way costs, each measured alone in this process (thread to thread)."""
    x = torch.randn(1, hidden)
    step = Step("0" * 16, 1, "decode", ("s0",), (100,), (SamplingParams(),), (), x)
    data = bytearray(b"".join(encode_frame_parts(step.to_frame())))
    out = {"encode_us": _median_us(lambda: encode_frame_parts(step.to_frame())),
           "decode_us": _median_us(lambda: decode(decode_frame(data), Step)),
           "forward_us": _median_us(lambda: step.forward(x, 0.0))}

    # a thread hand-off (what the Inbox's condition does): ping-pong between two threads / 2
    a, b = threading.Event(), threading.Event()
    stop = False

    def bounce() -> None:
        while not stop:
            if a.wait(1):
                a.clear()
                b.set()

    t = threading.Thread(target=bounce, daemon=True)
    t.start()

    def handoff() -> None:
        a.set()
        b.wait()
        b.clear()

    out["thread_handoff_us"] = round(_median_us(handoff, 1000) / 2, 1)
    stop = True

    # plain TCP between two threads, blocking sockets, one frame's bytes: ping-pong / 2
    server = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(server.getsockname())
    s, _ = server.accept()
    for sk in (c, s):
        sk.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    size = len(data)

    def echo() -> None:
        buf = bytearray(size)
        while True:
            got = 0
            while got < size:
                k = s.recv_into(memoryview(buf)[got:])
                if k == 0:
                    return
                got += k
            s.sendall(buf)

    threading.Thread(target=echo, daemon=True).start()
    rbuf = bytearray(size)

    def tcp() -> None:
        c.sendall(data)
        got = 0
        while got < size:
            got += c.recv_into(memoryview(rbuf)[got:])

    out["plain_tcp_us"] = round(_median_us(tcp, 1000) / 2, 1)
    c.close()
    s.close()
    server.close()

    # the trio crossing a libp2p send pays before any byte moves: thread -> trio -> thread
    node = P2PNode()
    node.start()

    async def nothing() -> None:
        return None

    out["trio_crossing_us"] = round(_median_us(lambda: node.submit(nothing).result(), 500) / 2, 1)
    node.close()
    out["frame_bytes"] = size
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--relays", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--relay-to", help=argparse.SUPPRESS)
    parser.add_argument("--last", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.relay_to:
        relay(args.relay_to, args.last)
        return
    torch.set_num_threads(1)
    rows = [ring_us(path, args.relays, args.steps, args.hidden) for path in ("libp2p", "link")]
    for r in rows:
        print(f"{r['path']:>7}: round trip {r['round_trip_us']:.0f} us over {r['hops']} hops = "
              f"{r['per_hop_us']:.0f} us per hop (p90 {r['p90_per_hop_us']:.0f})")
    print(json.dumps(parts_us(args.hidden)))


if __name__ == "__main__":
    main()

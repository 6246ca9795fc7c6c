"""Transport benchmark: 16 KB round trip and 8 MB activation hop.

Compares, in one run, on 127.0.0.1, each path with its server in a second
process (as two providers are) and then in a thread of the same process:
  plain TCP        trio sockets, length-prefixed bytes (the baseline)
  libp2p stream    py-libp2p 0.8.1, TCP + Noise + yamux (or mplex), no meshpool code;
                   yamux starting at a 16 MiB receive window on both ends; py-libp2p's QUIC
                   transport (needs aioquic, not a meshpool dependency: the row is skipped
                   without it; `pip install --target DIR aioquic` and PYTHONPATH=DIR to run it)
  P2PNode          node.transport (frames, thread bridge, handler in a worker
                   thread) with the bulk side channel off (frames over the
                   libp2p stream), on with AES-256-GCM (default), on unencrypted

8 MB hop = from the sender starting to write an 8 MB float32 tensor until it
has the receiver's small ack, sent after the receiver decoded the frame.
Run: .venv/bin/python bench/transport.py [--reps N] [--rows a,b] [--out NAME]
(writes bench/transport.json; bench/transport_quic_yamux.json holds the QUIC / window run)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import multiaddr
import torch
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.transport import Frame, P2PNode, TransportConfig, protocol_id  # noqa: E402

SMALL_BYTES = 16 * 1024
BIG_BYTES = 8 * 1024 * 1024
MB = 1e6
WARMUP_SMALL = 20
LISTEN = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
RAW_PROTO = "/meshpool/bench-raw/1"
NODE_PROTO = protocol_id("bench", 1)
NODE_CONFIGS = {
    "node-off": dict(bulk_threshold_bytes=0),
    "node-aes": dict(),
    "node-plain": dict(bulk_cipher="none", bulk_accept_plaintext=True),
}
ROWS = [
    ("tcp", "plain TCP (trio)"),
    ("libp2p-yamux", "libp2p stream, yamux (before)"),
    ("libp2p-yamux16m", "libp2p stream, yamux 16 MiB window"),
    ("libp2p-quic", "libp2p stream, QUIC (aioquic)"),
    ("libp2p-mplex", "libp2p stream, mplex"),
    ("node-off", "P2PNode, bulk channel off"),
    ("node-aes", "P2PNode, bulk AES-GCM (after)"),
    ("node-plain", "P2PNode, bulk unencrypted"),
]


# ---------------------------------------------------------------- servers
# A server puts its dialable address through addr_out, then serves until stop.
def _rx_sock(sock):
    async def rx(n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = await sock.recv_into(view[got:], n - got)
            if k == 0:
                raise EOFError
            got += k
        return buf

    return rx


async def _read_exact(s, n: int) -> bytearray:
    buf = bytearray()
    while len(buf) < n:
        chunk = await s.read(n - len(buf))  # py-libp2p quirk: returns up to n bytes
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


QUIC_LISTEN = [multiaddr.Multiaddr("/ip4/127.0.0.1/udp/0/quic-v1")]
YAMUX_BIG_WINDOW_BYTES = 16 * 1024 * 1024  # yamux's own cap (MAX_WINDOW_SIZE); the default start is 256 KiB


def _listen(variant: str) -> list:
    return QUIC_LISTEN if variant == "quic" else LISTEN


def _libp2p_host(variant: str):
    """variant: "yamux", "mplex", "yamux16m" (yamux starting at a 16 MiB window on
    both ends) or "quic" (py-libp2p's QUIC transport, aioquic, its own TLS and streams)."""
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.x25519 import create_new_key_pair as x25519
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
    from libp2p.security.noise.transport import Transport as Noise

    kp = create_new_key_pair()
    if variant == "quic":
        return new_host(key_pair=kp, enable_quic=True, listen_addrs=QUIC_LISTEN)
    if variant == "yamux16m":
        # Both peers must start at the larger window: yamux assumes the peer's initial
        # window is the default, and only WINDOW_UPDATE frames raise it past that.
        import libp2p.stream_muxer.yamux.yamux as ymx

        ymx.DEFAULT_WINDOW_SIZE = YAMUX_BIG_WINDOW_BYTES
        variant = "yamux"
    return new_host(key_pair=kp, sec_opt={NOISE_ID: Noise(kp, noise_privkey=x25519().private_key)},
                    muxer_preference=variant.upper(), listen_addrs=LISTEN)


def serve_tcp(addr_out, stop: threading.Event) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        rx = _rx_sock(stream.socket)
        try:
            while True:
                n = int.from_bytes(await rx(8), "big")
                data = await rx(n)
                await stream.send_all(data if n <= SMALL_BYTES else b"k")
        except (EOFError, trio.BrokenResourceError, OSError):
            pass

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, handler, 0)
            addr_out(str(listeners[0].socket.getsockname()[1]))
            while not stop.is_set():
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    trio.run(run)


def serve_libp2p(muxer: str, addr_out, stop: threading.Event) -> None:
    async def echo(s) -> None:
        try:
            while True:
                n = int.from_bytes(await _read_exact(s, 8), "big")
                data = await _read_exact(s, n)
                await s.write(bytes(data) if n <= SMALL_BYTES else b"k")
        except Exception:
            pass

    async def run() -> None:
        h = _libp2p_host(muxer)
        async with h.run(_listen(muxer)):
            h.set_stream_handler(RAW_PROTO, echo)
            addr_out(str(h.get_addrs()[0]))
            while not stop.is_set():
                await trio.sleep(0.05)
            await h.close()

    trio.run(run)


def serve_node(kind: str, addr_out, stop: threading.Event) -> None:
    def handler(stream) -> None:
        while True:
            f = stream.recv(timeout_s=120)
            if f.tensors and f.tensors[0].numel() * 4 > SMALL_BYTES:
                stream.send(Frame("bench.ack", 1, {}))
            else:
                stream.send(f)

    node = P2PNode(config=TransportConfig(**NODE_CONFIGS[kind]))
    node.set_stream_handler(NODE_PROTO, handler)
    addr_out(node.start())
    stop.wait()
    node.close()


def serve(kind: str, addr_out, stop: threading.Event) -> None:
    if kind == "tcp":
        serve_tcp(addr_out, stop)
    elif kind.startswith("libp2p-"):
        serve_libp2p(kind.split("-")[1], addr_out, stop)
    else:
        serve_node(kind, addr_out, stop)


# ---------------------------------------------------------------- clients
def client_tcp(addr: str, reps_small: int, reps_big: int) -> dict:
    out: dict = {}

    async def run() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", int(addr))
        stream.socket.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
        rx = _rx_sock(stream.socket)
        small = bytes(SMALL_BYTES)
        rtts, hops = [], []
        for _ in range(reps_small + WARMUP_SMALL):
            t0 = time.perf_counter()
            await stream.send_all(len(small).to_bytes(8, "big") + small)
            await rx(SMALL_BYTES)
            rtts.append(time.perf_counter() - t0)
        big = memoryview(bytes(BIG_BYTES))
        for _ in range(reps_big + 1):
            t0 = time.perf_counter()
            await stream.send_all(BIG_BYTES.to_bytes(8, "big"))
            await stream.send_all(big)
            await rx(1)
            hops.append(time.perf_counter() - t0)
        out.update(_summ(rtts, hops))
        await stream.aclose()

    trio.run(run)
    return out


def client_libp2p(muxer: str, addr: str, reps_small: int, reps_big: int) -> dict:
    from libp2p.peer.peerinfo import info_from_p2p_addr

    out: dict = {}

    async def run() -> None:
        a = _libp2p_host(muxer)
        async with a.run(_listen(muxer)):
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
            await a.connect(info)
            s = await a.new_stream(info.peer_id, [RAW_PROTO])
            small = bytes(SMALL_BYTES)
            rtts, hops = [], []
            for _ in range(reps_small + WARMUP_SMALL):
                t0 = time.perf_counter()
                await s.write(len(small).to_bytes(8, "big") + small)
                await _read_exact(s, SMALL_BYTES)
                rtts.append(time.perf_counter() - t0)
            big = bytes(BIG_BYTES)
            for _ in range(reps_big + 1):
                t0 = time.perf_counter()
                await s.write(BIG_BYTES.to_bytes(8, "big") + big)
                await _read_exact(s, 1)
                hops.append(time.perf_counter() - t0)
            out.update(_summ(rtts, hops))
            await s.close()
            await a.close()

    trio.run(run)
    return out


def client_node(kind: str, addr: str, reps_small: int, reps_big: int) -> dict:
    a = P2PNode(config=TransportConfig(**NODE_CONFIGS[kind]))
    a.start()
    try:
        s = a.open_stream(addr, NODE_PROTO)  # a /p2p/ multiaddr: dials first
        small = Frame("bench.small", 1, {"seq": 0}, [torch.zeros(SMALL_BYTES // 4)])
        big = Frame("bench.big", 1, {"seq": 0}, [torch.randn(BIG_BYTES // 4)])
        rtts, hops = [], []
        for _ in range(reps_small + WARMUP_SMALL):
            t0 = time.perf_counter()
            s.send(small)
            s.recv()
            rtts.append(time.perf_counter() - t0)
        for _ in range(reps_big + 1):
            t0 = time.perf_counter()
            s.send(big)
            s.recv()
            hops.append(time.perf_counter() - t0)
        s.close()
        return _summ(rtts, hops)
    finally:
        a.close()


def client(kind: str, addr: str, reps_small: int, reps_big: int) -> dict:
    if kind == "tcp":
        return client_tcp(addr, reps_small, reps_big)
    if kind.startswith("libp2p-"):
        return client_libp2p(kind.split("-")[1], addr, reps_small, reps_big)
    return client_node(kind, addr, reps_small, reps_big)


def _summ(rtts: list[float], hops: list[float]) -> dict:
    hop_s = statistics.median(hops[1:])  # first 8 MB hop warms up (windows, bulk channel setup)
    return {
        "rtt_16k_ms": round(statistics.median(rtts[WARMUP_SMALL:]) * 1e3, 3),
        "hop_8m_ms": round(hop_s * 1e3, 2),
        "hop_8m_mb_s": round(BIG_BYTES / hop_s / MB, 1),
        "first_hop_8m_ms": round(hops[0] * 1e3, 2),
    }


def run_row(kind: str, procs: bool, reps_small: int, reps_big: int) -> dict:
    """Server in a subprocess (procs) or in a thread of this process; client here."""
    if procs:
        proc = subprocess.Popen([sys.executable, __file__, "--serve", kind],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            addr = proc.stdout.readline().strip()
            return client(kind, addr, reps_small, reps_big)
        finally:
            proc.stdin.close()
            proc.wait(15)
    box: list[str] = []
    got = threading.Event()
    stop = threading.Event()
    t = threading.Thread(target=serve, args=(kind, lambda a: (box.append(a), got.set()), stop), daemon=True)
    t.start()
    got.wait(15)
    try:
        return client(kind, box[0], reps_small, reps_big)
    finally:
        stop.set()
        t.join(15)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7, help="8 MB hops per row and round (median taken)")
    ap.add_argument("--small-reps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3, help="all rows are run this many times, interleaved")
    ap.add_argument("--rows", help="comma-separated row kinds to run (tcp is always run first); default all")
    ap.add_argument("--out", default="transport.json", help="file name beside this script")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    if args.serve:  # child process: serve until stdin closes
        stop = threading.Event()
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
        serve(args.serve, lambda a: print(a, flush=True), stop)
        return

    # Other work on a shared machine makes single runs noisy, so rows are interleaved
    # over rounds; each ratio to TCP is taken within a round, then the median over rounds.
    rows_run = ROWS
    if args.rows:
        wanted = set(args.rows.split(","))
        rows_run = [ROWS[0]] + [r for r in ROWS[1:] if r[0] in wanted]
    try:
        import aioquic  # noqa: F401
    except ImportError:
        print("aioquic is not installed: the QUIC row is skipped")
        rows_run = [r for r in rows_run if r[0] != "libp2p-quic"]
    results: dict[str, dict] = {}
    for procs, where in ((True, "server in a 2nd process"), (False, "server in a thread, 1 process")):
        rounds: list[dict[str, dict]] = []
        for _ in range(args.rounds):
            rows: dict[str, dict] = {}
            for kind, name in rows_run:
                reps = args.reps if kind != "libp2p-mplex" else 3  # mplex is slow
                rows[name] = run_row(kind, procs, args.small_reps, reps)
            base = rows[ROWS[0][1]]
            for r in rows.values():
                r["hop_vs_tcp"] = r["hop_8m_mb_s"] / base["hop_8m_mb_s"]
                r["rtt_vs_tcp"] = r["rtt_16k_ms"] / base["rtt_16k_ms"]
            rounds.append(rows)
        summary = {}
        for _, name in rows_run:
            summary[name] = {k: round(statistics.median(rd[name][k] for rd in rounds), 3)
                             for k in rounds[0][name]}
            summary[name]["per_round"] = [rd[name] for rd in rounds]
        results[where] = summary
        print(f"\n== {where}, 127.0.0.1, {os.cpu_count()} cores, median of {args.rounds} rounds ==")
        print(f"{'path':32} {'16KB RTT ms':>11} {'x TCP':>6} {'8MB hop ms':>10} {'MB/s':>7} {'of TCP':>6}")
        for name, r in summary.items():
            print(f"{name:32} {r['rtt_16k_ms']:>11.3f} {r['rtt_vs_tcp']:>6.1f} {r['hop_8m_ms']:>10.2f} "
                  f"{r['hop_8m_mb_s']:>7.1f} {r['hop_vs_tcp'] * 100:>5.0f}%")
    out = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "libp2p": importlib.metadata.version("libp2p"), "torch": torch.__version__,
                    "loadavg_at_end": os.getloadavg()},
        "small_bytes": SMALL_BYTES, "big_bytes": BIG_BYTES, "reps_big": args.reps,
        "small_reps": args.small_reps, "rounds": args.rounds, "results": results,
    }
    out_path = Path(args.out) if "/" in args.out else Path(__file__).with_name(args.out)
    out_path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Per-hop latency and 8 MB transfer rate: direct, relayed (Circuit Relay v2 through a third
node), each on bare loopback and through the shaper (node/transport/shaper.py) at 5 / 20 / 50 ms
one-way and 100 Mbit/s / 1 Gbit/s, with the planner's link model's prediction beside each.

Every row is P2PNode to P2PNode in this process (meshpool's transport, real libp2p hosts):
  small RTT  = a 1 KB frame and its echo on one long-lived stream, as stages use (median)
  8 MB hop   = an 8 MB frame until its small ack comes back (median), i.e. one hop's transfer
               plus one round trip; predicted = Link(delay, rate).time_s(8 MB) + one delay back.
Shaped rows run over the libp2p stream, and at 20 ms also over the bulk side channel, whose socket
goes to the sender's own port: MESHPOOL_SHAPE_BULK puts a shaper of the same shape in front of it
(without it the bulk rows would measure loopback).
Relayed through the shaper = two shaped legs (dialer -> relay -> destination).
Across address translation (as root, scripts/netns.sh; bench/netns_peer.py in each namespace, veth
links, no shaper): direct = a home dialing a public peer through its NAT; relayed = a public peer
reaching a home through the relay in mp-pub, hole punching off; hole-punched = the same with DCUtR
on, measured once the connection turned direct (new streams take the direct connection).
Run: .venv/bin/python bench/reach.py [--reps N] [--quick] [--no-netns]   (writes bench/reach.json)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.planner import Link  # noqa: E402
from coordinator.planner.reach import RELAY_FORWARD_MS, RELAYED_BANDWIDTH_GBPS  # noqa: E402
from node.transport import Frame, P2PNode, TransportConfig, protocol_id  # noqa: E402
from node.transport.shaper import Shape, ShaperThread  # noqa: E402

ECHO = protocol_id("bench-reach", 1)
BIG_BYTES = 8 * 1024 * 1024
SMALL_BYTES = 1024
MB = 1e6


def ack(stream) -> None:
    """One long-lived stream, as stages use: echo small frames, ack large ones."""
    while True:
        frame = stream.recv(timeout_s=600)
        big = frame.tensors and frame.tensors[0].numel() * 4 > SMALL_BYTES
        stream.send(Frame("bench.ack", 1, {}) if big else frame)


def port_of(addr: str) -> int:
    return int(addr.split("/tcp/")[1].split("/")[0])


def measure(client: P2PNode, peer: str, reps: int, small_reps: int) -> dict:
    small = Frame("bench.small", 1, {}, [torch.zeros(SMALL_BYTES // 4)])
    big = Frame("bench.big", 1, {}, [torch.zeros(BIG_BYTES // 4)])
    stream = client.open_stream(peer, ECHO, timeout_s=60)

    def round_trip(frame: Frame) -> float:
        t0 = time.perf_counter()
        stream.send(frame)
        stream.recv(timeout_s=600)
        return time.perf_counter() - t0

    round_trip(small)  # warm up the stream path
    rtts = [round_trip(small) for _ in range(small_reps)]
    hops = [round_trip(big) for _ in range(reps + 1)]
    stream.close()
    hop_s = statistics.median(hops[1:])
    return {"rtt_ms": round(statistics.median(rtts) * 1e3, 2), "hop_8m_ms": round(hop_s * 1e3, 1),
            "mb_s": round(BIG_BYTES / hop_s / MB, 2)}


def run_row(relayed: bool, shape: Shape | None, bulk: bool, reps: int, small_reps: int) -> dict:
    if bulk and shape is not None:  # read by each node's bulk listener as it starts
        os.environ["MESHPOOL_SHAPE_BULK"] = f"{shape.delay_ms},{shape.rate_mbit}"
    try:
        return _run_row(relayed, shape, bulk, reps, small_reps)
    finally:
        os.environ.pop("MESHPOOL_SHAPE_BULK", None)


def _run_row(relayed: bool, shape: Shape | None, bulk: bool, reps: int, small_reps: int) -> dict:
    cfg = TransportConfig() if bulk else TransportConfig(bulk_threshold_bytes=0)
    relay = P2PNode(config=TransportConfig(relay_hop=True, bulk_threshold_bytes=cfg.bulk_threshold_bytes))
    server, client = P2PNode(config=cfg), P2PNode(config=cfg)
    server.set_stream_handler(ECHO, ack)
    shapers: list[ShaperThread] = []
    try:
        server_addr = server.start()
        client.start()
        if relayed:
            relay_addr = relay.start()
            if shape is not None:
                s = ShaperThread(("127.0.0.1", port_of(relay_addr)), shape)
                shapers.append(s)
                relay_addr = f"/ip4/127.0.0.1/tcp/{s.start()}/p2p/{relay.peer_id}"
            target = server.reserve_relay(relay_addr)
        else:
            target = server_addr
            if shape is not None:
                s = ShaperThread(("127.0.0.1", port_of(server_addr)), shape)
                shapers.append(s)
                target = f"/ip4/127.0.0.1/tcp/{s.start()}/p2p/{server.peer_id}"
        client.connect(target, timeout_s=60)
        out = measure(client, server.peer_id, reps, small_reps)
        out["connection"] = client.connection_kind(server.peer_id)
        return out
    finally:
        for node in (client, server, relay):
            node.close()
        for s in shapers:
            s.close()


ROOT = Path(__file__).resolve().parents[1]
NETNS = ROOT / "scripts" / "netns.sh"
PUBLIC_IP, HOME1_IP, HOME2_IP = "10.77.0.1", "192.168.71.2", "192.168.72.2"


def _in_netns(netns: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, str(ROOT / "bench" / "netns_peer.py"),
                             *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def netns_rows(reps: int, small_reps: int) -> dict:
    """Direct, relayed and hole-punched hops across nftables NAT (scripts/netns.sh), as root."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        print("netns rows skipped: needs root and iproute2", flush=True)
        return {}
    subprocess.run(["bash", str(NETNS), "up"], check=True, capture_output=True, timeout=180)
    servers: list[subprocess.Popen] = []

    def server(netns: str, *args: str) -> str:
        servers.append(_in_netns(netns, *args))
        return servers[-1].stdout.readline().strip()

    def dial(netns: str, listen: str, addr: str, punch: bool, kind: str, bulk: bool) -> dict:
        proc = _in_netns(netns, "measure", listen, addr, str(int(punch)), kind, str(reps), str(small_reps),
                         str(int(bulk)))
        out, _ = proc.communicate(timeout=600)
        return json.loads(out.strip().splitlines()[-1])

    try:
        relay = server("mp-pub", "relay", PUBLIC_IP)
        public = server("mp-pub", "serve", PUBLIC_IP, "-", "0")
        home_relayed = server("mp-home2", "serve", HOME2_IP, relay, "0")
        home_punch = server("mp-home2", "serve", HOME2_IP, relay, "1")
        return {
            "netns direct, home -> public through its NAT": dial("mp-home1", HOME1_IP, public, False, "direct", False),
            "netns direct, bulk channel": dial("mp-home1", HOME1_IP, public, False, "direct", True),
            "netns relayed, public -> home": dial("mp-pub", PUBLIC_IP, home_relayed, False, "relayed", False),
            "netns hole-punched, public -> home": dial("mp-pub", PUBLIC_IP, home_punch, True, "hole-punched", False),
            "netns hole-punched, bulk channel": dial("mp-pub", PUBLIC_IP, home_punch, True, "hole-punched", True),
        }
    finally:
        for proc in servers:
            proc.stdin.close()
        for proc in servers:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        subprocess.run(["bash", str(NETNS), "down"], capture_output=True, timeout=60)


def predicted(relayed: bool, shape: Shape | None) -> dict:
    """The planner's link model for the same hop (Link.time_s), plus the ack's way back."""
    delay_ms = shape.delay_ms if shape else 0.0
    rate_gbps = shape.rate_mbit / 1e3 if shape and shape.rate_mbit != float("inf") else 100.0
    if relayed:  # two legs through the relay, at the relay's measured forwarding rate
        link = Link(2 * delay_ms + RELAY_FORWARD_MS, min(rate_gbps, RELAYED_BANDWIDTH_GBPS))
    else:
        link = Link(delay_ms, rate_gbps)
    back_ms = link.latency_ms
    return {"rtt_ms": round(2 * link.latency_ms, 2), "hop_8m_ms": round(link.time_s(BIG_BYTES) * 1e3 + back_ms, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--small-reps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="20 ms rows only, besides the bare ones")
    ap.add_argument("--no-netns", action="store_true", help="skip the rows across address translation")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    delays = (20.0,) if args.quick else (5.0, 20.0, 50.0)
    rows: list[tuple[str, bool, Shape | None, bool]] = [
        ("direct, bulk channel", False, None, True),
        ("direct, libp2p stream", False, None, False),
        ("relayed", True, None, False),
    ]
    for d in delays:
        for rate in (100.0, 1000.0):
            rows.append((f"direct {d:g} ms {rate:g} Mbit/s", False, Shape(d, rate), False))
            if d == 20.0:
                rows.append((f"direct {d:g} ms {rate:g} Mbit/s, bulk", False, Shape(d, rate), True))
        rows.append((f"relayed {d:g} ms/leg 100 Mbit/s", True, Shape(d, 100.0), False))
    results = {}
    print(f"{'hop':34} {'RTT ms':>8} {'pred':>7} {'8MB hop ms':>11} {'pred':>8} {'MB/s':>7} {'meas/pred':>9}")
    for name, relayed, shape, bulk in rows:
        got = run_row(relayed, shape, bulk, args.reps, args.small_reps)
        want = predicted(relayed, shape)
        ratio = got["hop_8m_ms"] / want["hop_8m_ms"] if shape else None
        results[name] = {**got, "predicted": want, "hop_measured_over_predicted": ratio and round(ratio, 3)}
        print(f"{name:34} {got['rtt_ms']:>8.2f} {want['rtt_ms']:>7.2f} {got['hop_8m_ms']:>11.1f} "
              f"{want['hop_8m_ms']:>8.1f} {got['mb_s']:>7.2f} {('%.2f' % ratio) if ratio else '-':>9}", flush=True)
    if not args.no_netns:
        for name, got in netns_rows(args.reps, args.small_reps).items():
            results[name] = got
            print(f"{name:34} {got['rtt_ms']:>8.2f} {'-':>7} {got['hop_8m_ms']:>11.1f} {'-':>8} {got['mb_s']:>7.2f} "
                  f"{'-':>9}  ({got['connection']}, after {got['waited_for_kind_s']} s)", flush=True)
    out = {"machine": {"cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg(),
                       "note": "2 shared cores, other work running: figures under contention"},
           "big_bytes": BIG_BYTES, "reps": args.reps, "results": results}
    Path(__file__).with_name("reach.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""One P2PNode in a network namespace, for bench/reach.py's rows across address translation
(scripts/netns.sh). Started with `ip netns exec NS python bench/netns_peer.py …`:

    relay  LISTEN_IP                       prints its address; relays until stdin closes
    serve  LISTEN_IP RELAY_ADDR|- PUNCH    prints its address (relayed if RELAY_ADDR), serves the
                                           bench stream (echo small frames, ack large) until stdin closes
    measure LISTEN_IP ADDR PUNCH KIND REPS SMALL_REPS BULK
                                           dials ADDR, waits (up to 60 s) until the connection is of
                                           KIND (direct, relayed, hole-punched), measures as
                                           bench/reach.py's rows do, prints one JSON line
PUNCH is 1 or 0: DCUtR on or off in this node. BULK 1: the bulk side channel on.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.reach import ECHO, ack, measure  # noqa: E402
from node.transport import P2PNode, TransportConfig  # noqa: E402

WAIT_FOR_KIND_S = 60.0


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    role, listen = sys.argv[1], sys.argv[2]
    punch = role == "relay" or sys.argv[4] == "1"
    bulk = role != "measure" or sys.argv[8] == "1"  # a server only acks: its side may stay on
    node = P2PNode(config=TransportConfig(listen_host=listen, relay_hop=role == "relay", hole_punch=punch,
                                          bulk_threshold_bytes=256 * 1024 if bulk else 0))
    node.set_stream_handler(ECHO, ack)
    addr = node.start()
    try:
        if role == "relay":
            print(addr, flush=True)
            sys.stdin.read()
        elif role == "serve":
            print(node.reserve_relay(sys.argv[3]) if sys.argv[3] != "-" else addr, flush=True)
            sys.stdin.read()
        else:
            target, kind, reps, small_reps = sys.argv[3], sys.argv[5], int(sys.argv[6]), int(sys.argv[7])
            peer = node.connect(target, timeout_s=30)
            t0 = time.monotonic()
            while node.connection_kind(peer) != kind and time.monotonic() - t0 < WAIT_FOR_KIND_S:
                time.sleep(0.5)
            waited_s = time.monotonic() - t0
            out = measure(node, peer, reps, small_reps)
            out |= {"connection": node.connection_kind(peer), "waited_for_kind_s": round(waited_s, 1)}
            print(json.dumps(out), flush=True)
    finally:
        node.close()


if __name__ == "__main__":
    main()

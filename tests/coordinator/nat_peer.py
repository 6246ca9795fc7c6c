"""One P2PNode in a network namespace, for tests/coordinator/test_nat_topology.py.

    python nat_peer.py relay LISTEN_IP             prints its address, relays until stdin closes
    python nat_peer.py home LISTEN_IP RELAY_ADDR   reserves a relay slot, prints its relayed address, serves echo
    python nat_peer.py dial LISTEN_IP ADDR SECONDS dials ADDR, then each second sends an echo and prints
                                                   the connection kind ("relayed" or "direct") as a line
"""

from __future__ import annotations

import sys
import time

from node.transport import Frame, P2PNode, TransportConfig, protocol_id

ECHO = protocol_id("nat-echo", 1)


def main() -> None:
    role, listen = sys.argv[1], sys.argv[2]
    node = P2PNode(config=TransportConfig(listen_host=listen, relay_hop=role == "relay"))
    node.set_handler(ECHO, lambda frame, peer: frame)
    addr = node.start()
    try:
        if role == "relay":
            print(addr, flush=True)
            sys.stdin.read()
        elif role == "home":
            print(node.reserve_relay(sys.argv[3]), flush=True)
            sys.stdin.read()
        else:
            peer = node.connect(sys.argv[3], timeout_s=30)
            for i in range(int(sys.argv[4])):
                node.request(peer, ECHO, Frame("test.echo", 1, {"i": i}), timeout_s=10)
                print(node.connection_kind(peer), flush=True)
                time.sleep(1.0)
    finally:
        node.close()


if __name__ == "__main__":
    main()

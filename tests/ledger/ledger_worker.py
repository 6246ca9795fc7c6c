"""A separate writer process for the crash and concurrency tests (run as a script, not collected).

    python ledger_worker.py hold URL            hold 'crash-hold', print HELD, then wait to be killed
    python ledger_worker.py churn URL NAME N    N rounds of transfer + hold + settle, printing each round
"""

from __future__ import annotations

import sys
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger.chain import public_key_hex
from ledger.db import make_engine, resolve_url
from ledger.receipts import sign_receipt
from ledger.service import LedgerService

KEY_SEED = bytes(range(32))  # the coordinator key of tests/ledger/conftest.py
PROVIDER_KEY = Ed25519PrivateKey.from_private_bytes(bytes([1]) * 32)  # conftest's peerA


def main() -> None:
    mode, url = sys.argv[1], sys.argv[2]
    svc = LedgerService(make_engine(resolve_url(url)), Ed25519PrivateKey.from_private_bytes(KEY_SEED),
                        checkpoint_every_entries=8)
    svc.open_account("peerA", "provider", public_key_hex(PROVIDER_KEY))
    if mode == "hold":
        svc.open_account("consumer:alice", "consumer")
        svc.mint("fund:alice", "consumer:alice", 10_000_000)
        svc.hold("crash-hold", "consumer:alice", 123_456, "crash-request")
        print("HELD", flush=True)
        time.sleep(600)
    elif mode == "churn":
        name, rounds = sys.argv[3], int(sys.argv[4])
        me = f"consumer:{name}"
        svc.open_account(me, "consumer")
        svc.mint(f"fund:{name}", me, 10_000_000)
        for i in range(rounds):
            svc.transfer(f"{name}:t{i}", me, "consumer:shared", 3)
            svc.hold(f"{name}:h{i}", me, 50_000, f"{name}:r{i}")
            receipt = sign_receipt(PROVIDER_KEY, request_id=f"{name}:r{i}", model="tiny", layer_start=0, layer_end=3,
                                   token_count=1 + i % 50, input_hash="", output_hash="", provider_id="peerA")
            svc.settle(f"{name}:s{i}", f"{name}:h{i}", [receipt])
            print(f"ROUND {i}", flush=True)
        print("DONE", flush=True)


if __name__ == "__main__":
    main()

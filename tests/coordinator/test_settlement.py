"""Settlements that fail: retried under the same operation id until they land, never paid twice,
voided when the ledger refuses them, never left open silently (coordinator/settlement.py)."""

from __future__ import annotations

import logging
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.exc import OperationalError

from coordinator.settlement import PENDING, STUCK, Settler
from ledger.chain import public_key_hex
from ledger.db import make_engine
from ledger.reader import LedgerReader
from ledger.receipts import sign_receipt
from ledger.service import LedgerService
from ledger.verify import verify

PROVIDER_KEY = Ed25519PrivateKey.from_private_bytes(bytes([9]) * 32)
HOLD_UNITS = 100_000


class FlakyLedger:
    """The real ledger behind a switch: the next `fail_before` calls raise before writing (the
    database unreachable), the next `fail_after` calls raise after their write committed (the
    answer lost on the way back)."""

    def __init__(self, ledger: LedgerService):
        self.ledger, self.fail_before, self.fail_after, self.calls = ledger, 0, 0, []

    def _flaky(self, name: str, *args):
        self.calls.append(name)
        if self.fail_before:
            self.fail_before -= 1
            raise OperationalError("settle", {}, Exception("connection refused"))
        result = getattr(self.ledger, name)(*args)
        if self.fail_after:
            self.fail_after -= 1
            raise OperationalError("settle", {}, Exception("server closed the connection unexpectedly"))
        return result

    def settle(self, *args):
        return self._flaky("settle", *args)

    def void(self, *args):
        return self._flaky("void", *args)


@pytest.fixture
def ledger(tmp_path):
    svc = LedgerService(make_engine(f"sqlite:///{tmp_path / 'ledger.db'}"), Ed25519PrivateKey.generate())
    svc.open_account("consumer:c", "consumer")
    svc.open_account("peerA", "provider", public_key_hex(PROVIDER_KEY))
    svc.mint("fund", "consumer:c", 10 * HOLD_UNITS)
    yield svc
    svc.close()


def held(ledger: LedgerService, request_id: str, tokens: int = 7):
    ledger.hold(f"hold:{request_id}", "consumer:c", HOLD_UNITS, request_id)
    return [sign_receipt(PROVIDER_KEY, request_id=request_id, model="m", layer_start=0, layer_end=4,
                         token_count=tokens, input_hash="00" * 32, output_hash="11" * 32, provider_id="peerA")]


def settler(ledger, flaky, posted, **kwargs) -> Settler:
    return Settler(flaky, LedgerReader(ledger.engine), lambda ctx, receipts: posted.append((ctx, len(receipts))),
                   retry_base_s=0.01, retry_max_s=0.05, **kwargs)


def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert predicate()


def balance(ledger: LedgerService, account: str) -> int:
    return LedgerReader(ledger.engine).balance_units(account)


def test_a_lost_answer_is_retried_and_pays_once(ledger):
    flaky, posted = FlakyLedger(ledger), []
    s = settler(ledger, flaky, posted)
    receipts = held(ledger, "r1")
    flaky.fail_before, flaky.fail_after = 2, 1  # down twice, then the write lands but its answer is lost
    assert s.resolve("r1", receipts, "unused", context="request r1") == PENDING
    wait_for(lambda: posted)
    s.stop()
    assert flaky.calls == ["settle"] * 4 and posted == [("request r1", 1)]  # the callback once, on landing
    assert LedgerReader(ledger.engine).hold("hold:r1")["status"] == "posted"
    gas = 7 * 4 * ledger.params.gas_price_units_per_layer_token
    assert balance(ledger, "peerA") == gas  # paid once: the retry of a committed settlement answered "exists"
    report = verify(ledger.engine)
    assert report.ok and report.open_holds == 0, report


def test_a_refused_settlement_is_voided_and_a_closed_hold_is_resolved(ledger, caplog):
    flaky, posted = FlakyLedger(ledger), []
    s = settler(ledger, flaky, posted)
    receipts = held(ledger, "r2", tokens=10**6)  # claims more work than the hold covers: refused
    with caplog.at_level(logging.ERROR, "meshpool.settlement"):
        assert s.resolve("r2", receipts, "unused") == "voided"
    assert "refunding the consumer" in caplog.text and "Traceback" in caplog.text
    assert posted == [] and balance(ledger, "consumer:c") == 10 * HOLD_UNITS
    receipts = held(ledger, "r3")
    ledger.recover()  # a restart voided it first
    assert s.resolve("r3", receipts, "unused") == "voided"
    assert s.resolve("r-none", [], "no receipt") == STUCK  # no such hold: said, not retried
    s.stop()
    assert s.pending == 0 and verify(ledger.engine).ok


def test_a_settlement_that_keeps_failing_refunds_the_consumer(ledger):
    flaky, posted = FlakyLedger(ledger), []
    s = settler(ledger, flaky, posted, settle_attempts=3)
    receipts = held(ledger, "r4")
    flaky.fail_before = 4  # three settlements and the first void fail
    assert s.resolve("r4", receipts, "unused") == PENDING
    wait_for(lambda: LedgerReader(ledger.engine).hold("hold:r4")["status"] != "open")
    s.stop()
    assert flaky.calls == ["settle"] * 3 + ["void"] * 2 and posted == []
    assert LedgerReader(ledger.engine).hold("hold:r4")["status"] == "voided"
    assert balance(ledger, "consumer:c") == 10 * HOLD_UNITS


def test_backoff_doubles_up_to_its_cap(ledger):
    s = Settler(ledger, LedgerReader(ledger.engine), retry_base_s=0.25, retry_max_s=30.0)
    assert [s._delay_s(n) for n in (1, 2, 3, 8, 9, 50)] == [0.25, 0.5, 1.0, 30.0, 30.0, 30.0]

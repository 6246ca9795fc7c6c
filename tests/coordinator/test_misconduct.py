"""The coordinator's misconduct record: one ledger entry per contradicted signed profile, whatever
number of times that profile is probed again (a restarted coordinator probes everyone again)."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from contracts import DEFAULT_PARAMS
from coordinator.misconduct import MisconductRecorder, claim_op_id
from ledger.db import make_engine
from ledger.reader import LedgerReader
from ledger.service import LedgerService
from ledger.verify import verify

FORGED = {"devices": [{"kind": "cpu", "mem_bandwidth_gb_per_s": 10_000.0}]}


def test_one_penalty_per_contradicted_profile_and_replay_agrees(tmp_path):
    ledger = LedgerService(make_engine(f"sqlite:///{tmp_path / 'ledger.db'}"), Ed25519PrivateKey.generate())
    ledger.open_account("forger", "provider", "ab" * 32)
    ledger.open_account("honest", "provider", "cd" * 32)
    recorder = MisconductRecorder(ledger, LedgerReader(ledger.engine))
    penalty = DEFAULT_PARAMS.reputation_penalty_per_misconduct
    first = recorder.contradicted_claim("forger", FORGED, 4408.7, "its probe took 4409x")
    again = recorder.contradicted_claim("forger", FORGED, 3900.2, "its probe took 3900x")  # same claim, re-probed
    assert first.reputation == again.reputation == -penalty and again.misconduct_count == 1
    other = {"devices": [{"kind": "cpu", "mem_bandwidth_gb_per_s": 20_000.0}]}
    third = recorder.contradicted_claim("forger", other, 9000.0, "its probe took 9000x")  # a new forged claim
    assert third.reputation == -2 * penalty and third.misconduct_count == 2
    assert claim_op_id("forger", FORGED) != claim_op_id("forger", other)
    assert recorder.contradicted_claim("nobody", FORGED, 4408.0, "no account") is None
    honest = LedgerReader(ledger.engine).account("honest", 0)
    assert honest["reputation"] == 0 and honest["misconduct_count"] == 0
    assert verify(ledger.engine).ok
    ledger.close()

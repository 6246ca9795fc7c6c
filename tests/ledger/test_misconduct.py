"""Misconduct in the ledger: a signed claim the coordinator's measurement contradicted costs reputation
once per recorded op, replay reproduces it, and a ledger written before the entry kind existed opens."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from contracts import DEFAULT_PARAMS
from contracts.audits import may_serve
from ledger.db import make_engine, resolve_url
from ledger.errors import IdempotencyConflict, InvalidTransfer, UnknownAccount
from ledger.reader import LedgerReader
from ledger.service import LedgerService
from ledger.verify import verify
from tests.ledger.test_service import snapshot

EVIDENCE = {"claim_ratio": 4408, "threshold_ratio": 100, "source": "admission probe"}


def test_a_contradicted_claim_costs_reputation_once_and_replays(pool):
    svc = pool.svc
    reader = LedgerReader(svc.engine)
    before = reader.account("peerA", 0)
    first = svc.record_misconduct("misconduct:peerA:r1", "peerA", "profile contradicted by its probe", EVIDENCE)
    again = svc.record_misconduct("misconduct:peerA:r1", "peerA", "profile contradicted by its probe", EVIDENCE)
    assert (first.status, again.status) == ("created", "exists")
    after = reader.account("peerA", 5)
    assert after["reputation"] == before["reputation"] - DEFAULT_PARAMS.reputation_penalty_per_misconduct
    assert after["misconduct_count"] == 1 and after["balance_units"] == before["balance_units"]
    assert after["recent_entries"][0]["kind"] == "misconduct"
    assert reader.account("peerB", 0)["reputation"] == before["reputation"]  # nobody else's
    with pytest.raises(IdempotencyConflict):
        svc.record_misconduct("misconduct:peerA:r1", "peerA", "another reason", EVIDENCE)
    report = verify(svc.engine)
    assert report.ok, report


def test_misconduct_without_evidence_past_the_threshold_is_refused_and_changes_nothing(pool):
    svc = pool.svc
    before = snapshot(svc)
    threshold = DEFAULT_PARAMS.misconduct_claim_ratio
    for evidence in ({"claim_ratio": threshold}, {"claim_ratio": 18}, {"claim_ratio": 4408.0}, {}, "slow"):
        with pytest.raises(InvalidTransfer):
            svc.record_misconduct("misconduct:bad", "peerA", "contradicted", evidence)
    with pytest.raises(InvalidTransfer):
        svc.record_misconduct("misconduct:bad", "peerA", "", EVIDENCE)
    with pytest.raises(UnknownAccount):
        svc.record_misconduct("misconduct:bad", "peerZ", "contradicted", EVIDENCE)
    with pytest.raises(InvalidTransfer):  # consumers make no claims
        svc.record_misconduct("misconduct:bad", "consumer:alice", "contradicted", EVIDENCE)
    assert snapshot(svc) == before


def test_misconduct_does_not_bench_until_it_repeats():
    """A vouched provider at reputation 0 keeps serving after one contradicted claim (it is planned at its
    measured speed); one caught `bench_after_misconducts` times does not serve."""
    from contracts.audits import Standing, after_misconduct, after_slash
    from contracts.stakes import required_stake_units
    params = DEFAULT_PARAMS
    standing = Standing(stake_units=required_stake_units(params))
    once = after_misconduct(standing, params)
    assert once.reputation < 0 and may_serve(once, params, vouched=True)
    assert not may_serve(after_slash(once, params), params, vouched=True)  # slashes still count in full
    repeated = once
    for _ in range(params.bench_after_misconducts - 1):
        repeated = after_misconduct(repeated, params)
    assert not may_serve(repeated, params, vouched=True)
    promoted = Standing(reputation=params.promotion_agreements, audits_agreed=params.promotion_agreements,
                        stake_units=standing.stake_units)
    assert may_serve(promoted, params) and may_serve(after_misconduct(promoted, params), params)


def test_a_ledger_from_before_misconduct_opens_and_verifies(db_url, coordinator_key):
    """Its accounts table lacks the column and its genesis the new parameters: the service adds the
    column, its genesis digest still matches, and replay agrees with the rows."""
    svc = LedgerService(make_engine(resolve_url(db_url)), coordinator_key)
    svc.open_account("peerA", "provider", "ab" * 32)
    with svc.engine.begin() as conn:
        conn.execute(text("ALTER TABLE accounts DROP COLUMN misconduct_count"))
    svc.close()
    old = make_engine(resolve_url(db_url), writer=False)  # an auditor's tools read it as it is
    assert verify(old).ok and LedgerReader(old).account("peerA", 0)["misconduct_count"] == 0
    old.dispose()
    reopened = LedgerService(make_engine(resolve_url(db_url)), coordinator_key)
    reopened.record_misconduct("misconduct:peerA:r1", "peerA", "contradicted", EVIDENCE)
    assert LedgerReader(reopened.engine).account("peerA", 0)["misconduct_count"] == 1
    assert verify(reopened.engine).ok
    reopened.close()

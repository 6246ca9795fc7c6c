"""Settling a hold on the coordinator's recorded plan (a crash kept the stages from signing): paid
exactly as receipts of that work would be, once, and re-derived from the plan by `ledger verify`,
which catches a settlement that pays otherwise even when the coordinator signed it."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from contracts.pricing import gas_units
from contracts.settlement import StageWork
from ledger import legs
from ledger.errors import IdempotencyConflict, InvalidTransfer
from ledger.reader import LedgerReader
from ledger.verify import verify

PLAN = [StageWork("peerA", 0, 6, 40), StageWork("peerB", 6, 12, 40)]


def balance(svc, account_id: str) -> int:
    return LedgerReader(svc.engine).balance_units(account_id)


def test_a_plan_pays_like_the_receipts_of_that_work(pool):
    svc = pool.svc
    svc.hold("h-plan", "consumer:alice", 200_000, "r-plan")
    svc.hold("h-receipts", "consumer:alice", 200_000, "r-receipts")
    assert svc.settle_on_plan("p", "h-plan", PLAN).status == "created"
    svc.settle("s", "h-receipts", [pool.receipt("peerA", "r-receipts", (0, 6), 40),
                                   pool.receipt("peerB", "r-receipts", (6, 12), 40)])
    with svc.engine.connect() as conn:
        paid = dict(conn.execute(text("SELECT id, paid_units FROM holds")).all())
    assert paid["h-plan"] == paid["h-receipts"] > 0
    assert balance(svc, "peerA") == 2 * gas_units(40, 6, svc.params)
    assert svc.settle_on_plan("p", "h-plan", PLAN).status == "exists"  # a resend pays nothing more
    with pytest.raises(IdempotencyConflict):
        svc.settle_on_plan("p", "h-plan", [StageWork("peerA", 0, 12, 40)])
    report = verify(svc.engine)
    assert report.ok, report.error


def test_bad_plans_are_refused_and_write_nothing(pool):
    svc = pool.svc
    svc.hold("h", "consumer:alice", 1_000, "r")
    before = verify(svc.engine).entry_count
    for plan in ([StageWork("peerA", 0, 12, 10_000)],  # worth more than the hold
                 [], [StageWork("peerA", 6, 6, 4)],  # no stage; an empty layer range
                 [StageWork("consumer:alice", 0, 12, 1)]):  # pays no provider
        with pytest.raises(InvalidTransfer):
            svc.settle_on_plan("p", "h", plan)
    assert verify(svc.engine).entry_count == before


def test_verify_catches_a_signed_settlement_that_pays_other_than_its_plan(pool, monkeypatch):
    svc = pool.svc
    svc.hold("h", "consumer:alice", 200_000, "r")
    honest = legs.plan_settlement_legs

    def overpaying(hold, plan, params):  # a coordinator that pays peerA one token more than it records
        paid = honest(hold, [StageWork(w.provider_id, w.layer_start, w.layer_end, w.tokens_processed + (i == 0))
                             for i, w in enumerate(plan)], params)
        return paid[:-1] + honest(hold, plan, params)[-1:]

    monkeypatch.setattr(legs, "plan_settlement_legs", overpaying)
    svc.settle_on_plan("p", "h", PLAN)
    report = verify(svc.engine)
    assert not report.ok and "plan" in report.error, report.error

"""Money flow and refusals of the ledger service (each test on SQLite and on PostgreSQL)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select

from contracts import MAX_AMOUNT_UNITS
from contracts.pricing import hold_amount_units
from contracts.stakes import required_stake_units
from ledger.errors import (AccountExists, HoldNotOpen, IdempotencyConflict, InsufficientFunds, InvalidTransfer,
                           KeyMismatch, ReceiptError, UnknownAccount, UnknownHold)
from ledger.models import accounts, entries, holds
from ledger.reader import LedgerReader
from ledger.service import LedgerService
from ledger.verify import verify


def snapshot(svc):
    """Everything a refused operation must leave unchanged."""
    with svc.engine.connect() as conn:
        return (conn.execute(select(func.count()).select_from(entries)).scalar(),
                sorted(map(tuple, conn.execute(select(accounts)).all())),
                sorted(map(tuple, conn.execute(select(holds)).all())))


def balance(svc, account_id):
    return LedgerReader(svc.engine).account(account_id, 0)["balance_units"]


def test_request_flow_hold_settle_refund(pool):
    svc, p = pool.svc, pool.svc.params
    hold_units = hold_amount_units(prompt_tokens=20, max_new_tokens=80, n_layers=24, params=p)
    svc.hold("hold:r1", "consumer:alice", hold_units, "r1")
    assert balance(svc, "escrow:requests") == hold_units
    receipts = [pool.receipt("peerA", "r1", (0, 10), 60), pool.receipt("peerB", "r1", (10, 24), 60)]
    result = svc.settle("settle:r1", "hold:r1", receipts)
    assert result.status == "created"
    gas_a, gas_b = 60 * 10 * p.gas_price_units_per_layer_token, 60 * 14 * p.gas_price_units_per_layer_token
    assert balance(svc, "peerA") == gas_a and balance(svc, "peerB") == gas_b
    fee_c = (gas_a + gas_b) * p.coordinator_fee_bps // 10_000
    fee_v = (gas_a + gas_b) * p.verification_fee_bps // 10_000
    assert balance(svc, "fees:coordinator") == fee_c and balance(svc, "fees:verification") == fee_v
    assert balance(svc, "escrow:requests") == 0
    assert balance(svc, "consumer:alice") == 10_000_000 - gas_a - gas_b - fee_c - fee_v
    report = verify(svc.engine)
    assert report.ok, report.error
    assert report.minted_units == 10_000_000 and report.open_holds == 0


def test_retried_settlement_pays_once_and_changed_one_is_refused(pool):
    svc = pool.svc
    svc.hold("h", "consumer:alice", 100_000, "r")
    receipts = [pool.receipt("peerA", "r", (0, 4), 100)]
    first = svc.settle("s", "h", receipts)
    before = snapshot(svc)
    again = svc.settle("s", "h", receipts)
    assert again.status == "exists" and again.first_seq == first.first_seq and snapshot(svc) == before
    with pytest.raises(IdempotencyConflict):
        svc.settle("s", "h", [pool.receipt("peerA", "r", (0, 4), 99)])
    with pytest.raises(HoldNotOpen):  # another op id cannot resolve the hold a second time
        svc.settle("s2", "h", receipts)
    with pytest.raises(HoldNotOpen):
        svc.void("v", "h", "late")
    assert snapshot(svc) == before and verify(svc.engine).ok


def test_failed_request_settles_only_work_done_and_void_refunds_all(pool):
    svc = pool.svc
    svc.hold("h1", "consumer:alice", 50_000, "r1")
    svc.settle("s1", "h1", [pool.receipt("peerA", "r1", (0, 4), 7)])  # died after 7 tokens, one stage
    assert balance(svc, "peerA") == 7 * 4 * svc.params.gas_price_units_per_layer_token
    svc.hold("h2", "consumer:alice", 50_000, "r2")
    svc.void("v2", "h2", "consumer went away before the first token")
    assert balance(svc, "escrow:requests") == 0
    spent = 280 + 280 * 1500 // 10_000
    assert balance(svc, "consumer:alice") == 10_000_000 - spent
    assert verify(svc.engine).ok


@pytest.mark.parametrize("amount", [-1, 0, MAX_AMOUNT_UNITS + 1, 2**64, 1.5, "10", True])
def test_bad_amounts_are_refused_and_change_nothing(pool, amount):
    svc = pool.svc
    before = snapshot(svc)
    for call in (lambda: svc.transfer("t", "consumer:alice", "peerA", amount),
                 lambda: svc.mint("m", "consumer:alice", amount),
                 lambda: svc.hold("h", "consumer:alice", amount, "r"),
                 lambda: svc.lock_stake("st", "peerA", amount)):
        with pytest.raises(InvalidTransfer):
            call()
    assert snapshot(svc) == before


def test_overdraft_overflow_and_unknown_accounts_are_refused(pool):
    svc = pool.svc
    before = snapshot(svc)
    with pytest.raises(InsufficientFunds):
        svc.transfer("t1", "consumer:alice", "peerA", 10_000_001)
    with pytest.raises(InsufficientFunds):
        svc.hold("h1", "consumer:alice", 10_000_001, "r1")
    with pytest.raises(InvalidTransfer):  # total supply would pass 2**63 - 1
        svc.mint("m1", "peerA", MAX_AMOUNT_UNITS - 5)
    with pytest.raises(UnknownAccount):
        svc.transfer("t2", "consumer:alice", "nobody", 5)
    with pytest.raises(InvalidTransfer):  # escrow moves only through holds
        svc.transfer("t3", "escrow:requests", "consumer:alice", 1)
    with pytest.raises(InvalidTransfer):
        svc.transfer("t4", "consumer:alice", "consumer:alice", 1)
    with pytest.raises(InvalidTransfer):
        svc.transfer("bad id with spaces", "consumer:alice", "peerA", 1)
    with pytest.raises(UnknownHold):
        svc.void("v", "no-such-hold", "x")
    assert snapshot(svc) == before
    svc.mint("m2", "peerA", MAX_AMOUNT_UNITS - 10_000_000)  # exactly up to the limit is fine
    assert verify(svc.engine).ok


def test_replayed_transfer_is_exists_and_changed_replay_refused(pool):
    svc = pool.svc
    assert svc.transfer("pay-1", "consumer:alice", "peerA", 500).status == "created"
    before = snapshot(svc)
    assert svc.transfer("pay-1", "consumer:alice", "peerA", 500).status == "exists"
    for changed in ((600, "peerA"), (500, "peerB")):
        with pytest.raises(IdempotencyConflict):
            svc.transfer("pay-1", "consumer:alice", changed[1], changed[0])
    assert snapshot(svc) == before


def test_receipts_must_be_signed_by_the_paid_provider_for_this_request(pool):
    svc = pool.svc
    svc.hold("h", "consumer:alice", 1_000_000, "r")
    before = snapshot(svc)
    good = pool.receipt("peerA", "r", (0, 4), 10)
    forged = good.__class__(**{**good.to_dict(), "token_count": 11})
    other_key = Ed25519PrivateKey.generate()
    from ledger.receipts import sign_receipt
    impostor = sign_receipt(other_key, request_id="r", model="tiny", layer_start=0, layer_end=4, token_count=10,
                            input_hash="", output_hash="", provider_id="peerA")
    for bad in (forged, impostor, pool.receipt("peerA", "other-request", (0, 4), 10),
                pool.receipt("peerB", "r", (0, 4), 10, provider_id="consumer:alice")):
        with pytest.raises(ReceiptError):
            svc.settle("s", "h", [bad])
    with pytest.raises(InvalidTransfer):  # worth more than the hold
        svc.settle("s", "h", [pool.receipt("peerA", "r", (0, 4), 10**6)])
    assert snapshot(svc) == before


def test_stake_slash_takes_stake_first_then_balance(pool):
    svc = pool.svc
    svc.transfer("pay", "consumer:alice", "peerA", 5_000)
    svc.lock_stake("stake", "peerA", 3_000)
    with pytest.raises(InsufficientFunds):
        svc.unlock_stake("unstake-too-much", "peerA", 3_001)
    svc.slash("slash-1", "peerA", 4_000, "output differs from referee", {"audit_id": "a1"})
    view = LedgerReader(svc.engine).account("peerA")
    assert (view["stake_units"], view["balance_units"], view["slashed_units"]) == (0, 1_000, 4_000)
    assert view["slash_count"] == 1 and not view["may_serve"]
    svc.slash("slash-2", "peerA", 9_000, "again", {})  # only 1_000 left: takes it, records the shortfall
    assert LedgerReader(svc.engine).account("peerA", 0)["slashed_units"] == 5_000
    assert balance(svc, "treasury") == 5_000
    report = verify(svc.engine)
    assert report.ok, report.error


def test_audits_promote_newcomers_and_pay_verifiers(pool):
    svc = pool.svc
    svc.hold("h", "consumer:alice", 1_000_000, "r")
    svc.settle("s", "h", [pool.receipt("peerA", "r", (0, 8), 500)])
    pool_units = balance(svc, "fees:verification")
    k = svc.params.promotion_agreements
    for i in range(k):
        assert not LedgerReader(svc.engine).account("peerB", 0)["may_serve"]
        svc.record_audit(f"audit-{i}", audit_id=f"a{i}", verifier_id="peerB", subject_id="peerA",
                         verifier_agreed=True, subject_passed=True, fee_units=10)
    view = LedgerReader(svc.engine).account("peerB", 0)
    assert view["audits_agreed"] == k and view["balance_units"] == 10 * k
    assert not view["may_serve"]  # promoted, but serving needs the stake locked
    stake = required_stake_units(svc.params)
    svc.mint("earned", "peerB", stake)  # as if its fees had covered it
    svc.lock_stake("stake:peerB", "peerB", stake)
    assert LedgerReader(svc.engine).account("peerB", 0)["may_serve"]
    assert balance(svc, "fees:verification") == pool_units - 10 * k
    with pytest.raises(InsufficientFunds):
        svc.record_audit("audit-big", audit_id="ab", verifier_id="peerB", subject_id="peerA",
                         verifier_agreed=True, subject_passed=True, fee_units=pool_units)
    assert verify(svc.engine).ok


def test_accounts_open_once_and_providers_need_keys(service):
    service.open_account("consumer:bob", "consumer")
    assert service.open_account("consumer:bob", "consumer").status == "exists"
    with pytest.raises(IdempotencyConflict):
        service.open_account("consumer:bob", "provider", "ab" * 32)
    with pytest.raises(AccountExists):
        service.open_account("consumer:bob", "consumer", op_id="another-op")
    with pytest.raises(InvalidTransfer):
        service.open_account("peerX", "provider")
    with pytest.raises(InvalidTransfer):
        service.open_account("treasury2", "treasury")


def test_reopening_needs_the_same_key_and_params(db_url, service):
    from ledger.db import make_engine, resolve_url
    again = LedgerService(make_engine(resolve_url(db_url)), service._key)
    again.close()
    with pytest.raises(KeyMismatch):
        LedgerService(make_engine(resolve_url(db_url)), Ed25519PrivateKey.generate())
    from contracts import MoneyParams
    with pytest.raises(KeyMismatch):  # money rules are fixed at genesis
        LedgerService(make_engine(resolve_url(db_url)), service._key, params=MoneyParams(coordinator_fee_bps=1))
    custom = MoneyParams(gas_price_units_per_layer_token=3)
    other = LedgerService(make_engine(resolve_url(db_url.replace("ledger.db", "other.db"))), service._key,
                          params=custom) if db_url.startswith("sqlite") else None
    if other is not None:  # reopened without params, it keeps the ones of its genesis
        reopened = LedgerService(other.engine, service._key)
        assert reopened.params == custom
        other.close()


def test_provider_keys_must_be_canonical(service):
    for bad in ("zz" * 32, "AB" * 32, "ab" * 31, 5):
        with pytest.raises(InvalidTransfer):
            service.open_account("peerQ", "provider", bad)


def test_default_stake_covers_a_slash(pool):
    assert required_stake_units(pool.svc.params) > 0


def test_a_funded_stake_locks_once_and_slashes_take_it_first(pool):
    svc, reader = pool.svc, LedgerReader(pool.svc.engine)
    stake = required_stake_units(svc.params)
    supply = reader.supply()["minted_units"]
    assert svc.fund_stake("stake:vouch:peerA", "peerA", stake, "vouch").status == "created"
    assert svc.fund_stake("stake:vouch:peerA", "peerA", stake, "vouch").status == "exists"  # vouched twice
    with pytest.raises(IdempotencyConflict):
        svc.fund_stake("stake:vouch:peerA", "peerA", stake + 1, "vouch")
    view = reader.account("peerA", 0)
    assert (view["stake_units"], view["balance_units"], view["required_stake_units"]) == (stake, 0, stake)
    assert reader.standing("peerA").stake_units == stake
    assert reader.supply()["minted_units"] == supply + stake and balance(svc, "escrow:stakes") == stake
    # no account yet, or not a provider: nothing is minted, nothing locked
    before = snapshot(svc)
    for bad in (lambda: svc.fund_stake("stake:vouch:nobody", "nobody", stake, "vouch"),
                lambda: svc.fund_stake("stake:vouch:alice", "consumer:alice", stake, "vouch")):
        with pytest.raises((UnknownAccount, InvalidTransfer)):
            bad()
    with pytest.raises(InvalidTransfer):
        svc.fund_stake("stake:vouch:peerB", "peerB", 0, "vouch")
    assert snapshot(svc) == before
    # a slash comes out of the stake first; what is left is short of the requirement
    svc.transfer("pay", "consumer:alice", "peerA", 1_000)
    svc.slash("slash-1", "peerA", 600, "output differs from referee", {"audit_id": "a1"})
    view = reader.account("peerA", 0)
    assert (view["stake_units"], view["balance_units"], view["slashed_units"]) == (stake - 600, 1_000, 600)
    assert reader.standing("peerA").stake_units == stake - 600
    # conservation: balances sum to supply; escrow:stakes holds exactly the stakes
    s = reader.supply()
    assert s["sum_of_balances_units"] == s["supply_units"] and s["escrow_stakes_units"] == stake - 600
    report = verify(svc.engine)
    assert report.ok, report.error


def test_batch_group_commits_and_isolates_refusals(pool):
    svc = pool.svc
    with svc.batch():
        for i in range(5):
            svc.hold(f"bh{i}", "consumer:alice", 10_000, f"br{i}")
            svc.settle(f"bs{i}", f"bh{i}", [pool.receipt("peerA", f"br{i}", (0, 2), 5)])
        with pytest.raises(InsufficientFunds):  # refused alone; the batch goes on
            svc.transfer("too-much", "consumer:alice", "peerB", 10**12)
        assert svc.transfer("bt", "consumer:alice", "peerB", 1).status == "created"
        assert svc.transfer("bt", "consumer:alice", "peerB", 1).status == "exists"
    assert balance(svc, "peerA") == 5 * 5 * 2 * svc.params.gas_price_units_per_layer_token
    before = snapshot(svc)
    with pytest.raises(RuntimeError):
        with svc.batch():
            svc.transfer("lost", "consumer:alice", "peerB", 1)
            raise RuntimeError("the caller changed its mind")
    assert snapshot(svc) == before
    report = verify(svc.engine)
    assert report.ok, report.error


def test_burn_lowers_supply(pool):
    svc = pool.svc
    svc.burn("burn-1", "consumer:alice", 1_000)
    with pytest.raises(InsufficientFunds):
        svc.burn("burn-2", "consumer:alice", 10**9)
    report = verify(svc.engine)
    assert report.ok and report.minted_units - report.burned_units == 10_000_000 - 1_000


def test_recover_refuses_a_head_that_contradicts_the_log(pool):
    from sqlalchemy import text

    from ledger.errors import LedgerCorrupt
    with pool.svc.engine.begin() as conn:
        conn.execute(text("UPDATE chain_head SET entry_count = entry_count - 1"))
    with pytest.raises(LedgerCorrupt):
        pool.svc.recover()


def test_database_refuses_a_negative_balance_written_behind_the_service(pool):
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError
    with pytest.raises(IntegrityError):
        with pool.svc.engine.begin() as conn:
            conn.execute(text("UPDATE accounts SET balance_units = -1 WHERE id = 'peerA'"))

"""Quotes and settlements: exact small cases, then randomized properties with fixed seeds."""

from __future__ import annotations

import random

import pytest

from contracts import DEFAULT_PARAMS, MAX_AMOUNT_UNITS, ContractError, MoneyParams
from contracts.pricing import gas_units, hold_amount_units, quote
from contracts.settlement import MAX_STAGES, StageWork, settle

P = MoneyParams(gas_price_units_per_layer_token=10, coordinator_fee_bps=500, verification_fee_bps=1000)


def test_quote_by_hand():
    q = quote(prompt_tokens=10, max_new_tokens=90, n_layers=30, params=P)
    assert q.gas_units == 100 * 30 * 10 == 30_000
    assert (q.coordinator_fee_units, q.verification_fee_units) == (1_500, 3_000)
    assert q.total_units == hold_amount_units(10, 90, 30, P) == 34_500


def test_settlement_by_hand():
    hold = quote(10, 90, 30, P).total_units
    stages = [StageWork("a", 0, 12, 60), StageWork("b", 12, 30, 60)]  # 60 tokens done of 100
    s = settle(hold, stages, P)
    assert [p.amount_units for p in s.stage_payments] == [60 * 12 * 10, 60 * 18 * 10]
    assert s.gas_units == 18_000
    assert (s.coordinator_fee_units, s.verification_fee_units) == (900, 1_800)
    assert s.refund_units == 34_500 - 18_000 - 2_700
    assert s.total_units == hold


def test_full_request_pays_the_whole_quote_back_to_nothing():
    hold = quote(10, 90, 30, P).total_units
    s = settle(hold, [StageWork("a", 0, 30, 100)], P)
    assert s.refund_units == 0


def test_failed_request_without_receipts_refunds_everything():
    s = settle(1_000, [], P)
    assert (s.gas_units, s.coordinator_fee_units, s.verification_fee_units, s.refund_units) == (0, 0, 0, 1_000)


@pytest.mark.parametrize("bad", [
    dict(prompt_tokens=-1, max_new_tokens=1, n_layers=1),
    dict(prompt_tokens=0, max_new_tokens=0, n_layers=1),
    dict(prompt_tokens=1, max_new_tokens=1, n_layers=0),
    dict(prompt_tokens=1.5, max_new_tokens=1, n_layers=1),
    dict(prompt_tokens=2**62, max_new_tokens=2**62, n_layers=2),
])
def test_bad_quotes_are_refused(bad):
    with pytest.raises(ContractError):
        quote(params=P, **bad)


def test_bad_settlements_are_refused():
    with pytest.raises(ContractError, match="more than the hold"):
        settle(100, [StageWork("a", 0, 30, 100)], P)
    with pytest.raises(ContractError, match="empty layer range"):
        settle(10_000, [StageWork("a", 5, 5, 1)], P)
    with pytest.raises(ContractError):
        settle(10_000, [StageWork("a", 0, 2, -1)], P)
    with pytest.raises(ContractError):
        settle(0, [], P)
    with pytest.raises(ContractError):
        settle(10**9, [StageWork("a", 0, 1, 1)] * (MAX_STAGES + 1), P)
    with pytest.raises(ContractError):
        gas_units(2**40, 2**40, P)


def test_params_are_integers_and_checked():
    with pytest.raises(ContractError):
        MoneyParams(coordinator_fee_bps=0.5)
    with pytest.raises(ContractError):
        MoneyParams(coordinator_fee_bps=6_000, verification_fee_bps=6_000)
    with pytest.raises(ContractError):
        MoneyParams(audit_probability_ppm=0)
    assert MoneyParams.from_dict(DEFAULT_PARAMS.to_dict()) == DEFAULT_PARAMS
    with pytest.raises(ContractError):
        MoneyParams.from_dict({**DEFAULT_PARAMS.to_dict(), "extra": 1})


def test_random_settlements_conserve_the_hold_and_never_exceed_it():
    rng = random.Random(1234)
    for _ in range(3_000):
        params = MoneyParams(gas_price_units_per_layer_token=rng.randint(1, 1_000),
                             coordinator_fee_bps=rng.randint(0, 3_000), verification_fee_bps=rng.randint(0, 3_000))
        n_layers = rng.randint(1, 128)
        prompt, max_new = rng.randint(0, 4_096), rng.randint(1, 4_096)
        hold = quote(prompt, max_new, n_layers, params).total_units
        # Cut the layers into stages; each stage processed at most every token.
        cuts = sorted(rng.sample(range(1, n_layers), k=min(n_layers - 1, rng.randint(0, 6)))) if n_layers > 1 else []
        bounds = [0, *cuts, n_layers]
        stages = [StageWork(f"p{i}", lo, hi, rng.randint(0, prompt + max_new))
                  for i, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False))]
        s = settle(hold, stages, params)
        assert s.total_units == hold
        assert min(s.refund_units, s.coordinator_fee_units, s.verification_fee_units) >= 0
        assert all(p.amount_units == st.tokens_processed * st.layers * params.gas_price_units_per_layer_token
                   for p, st in zip(s.stage_payments, stages, strict=True))
        assert settle(hold, stages, params) == s  # deterministic
        assert s.total_units <= MAX_AMOUNT_UNITS

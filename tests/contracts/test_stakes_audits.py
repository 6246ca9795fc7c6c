"""Stakes, slashes, deterrence, audit selection, reputation and promotion."""

from __future__ import annotations

import random

import pytest

from contracts import DEFAULT_PARAMS, ContractError, MoneyParams
from contracts.audits import (Standing, after_audited, after_slash, after_verifying, deters_cheating,
                              min_audit_probability_ppm, may_serve, should_audit)
from contracts.stakes import (check_unstake, min_deterring_slash_units, plan_slash, required_stake_units,
                              slash_units_for)


def test_slash_plan_takes_stake_first():
    assert plan_slash(100, stake_units=150, balance_units=50).from_stake_units == 100
    plan = plan_slash(100, stake_units=30, balance_units=50)
    assert (plan.from_stake_units, plan.from_balance_units, plan.shortfall_units) == (30, 50, 20)
    assert plan.taken_units == 80
    with pytest.raises(ContractError):
        plan_slash(0, 1, 1)
    with pytest.raises(ContractError):
        plan_slash(-5, 1, 1)


def test_unstake_cannot_exceed_stake():
    assert check_unstake(5, 5) == 5
    with pytest.raises(ContractError):
        check_unstake(6, 5)


def test_deterrence_rule_by_hand():
    # p = 5 %: a gain of 100 needs a slash above 95/0.05 = 1900.
    assert min_deterring_slash_units(100, 50_000) == 1_901
    assert deters_cheating(50_000, 1_901, 100) and not deters_cheating(50_000, 1_900, 100)
    assert min_audit_probability_ppm(1_900, 100) == 50_001


def test_deterrence_properties_random():
    rng = random.Random(99)
    for _ in range(20_000):
        p = rng.randint(1, 999_999)
        gain = rng.randint(0, 10**9)
        slash = min_deterring_slash_units(gain, p)
        assert deters_cheating(p, slash, gain)
        assert slash == 1 or not deters_cheating(p, slash - 1, gain)
        if gain and slash:
            q = min_audit_probability_ppm(slash, gain)
            assert deters_cheating(q, slash, gain) and (q == 1 or not deters_cheating(q - 1, slash, gain))


def test_default_slash_and_stake_deter_the_largest_gain():
    params = DEFAULT_PARAMS
    gain = params.max_request_layer_tokens * params.gas_price_units_per_layer_token
    stake = required_stake_units(params)
    assert deters_cheating(params.audit_probability_ppm, stake, gain)
    assert slash_units_for(gain, params) == stake
    assert stake >= params.slash_safety_factor * (min_deterring_slash_units(gain, params.audit_probability_ppm))


def test_should_audit_is_deterministic_and_has_the_right_rate():
    seed = b"s" * 32
    picks = [should_audit(seed, f"req{i}", i % 4, 50_000) for i in range(40_000)]
    assert picks == [should_audit(seed, f"req{i}", i % 4, 50_000) for i in range(40_000)]
    rate_ppm = sum(picks) * 1_000_000 // len(picks)
    assert 40_000 < rate_ppm < 60_000  # 5 % +- about 9 standard deviations
    assert picks != [should_audit(b"t" * 32, f"req{i}", i % 4, 50_000) for i in range(40_000)]
    with pytest.raises(ContractError):
        should_audit(b"short", "r", 0, 50_000)


def test_promotion_after_k_agreements_and_demotion_by_slash():
    params = MoneyParams(promotion_agreements=3, ban_after_slashes=2)
    s = Standing()
    for _ in range(2):
        s = after_verifying(s, True, params)
        assert not may_serve(s, params)
    s = after_verifying(s, True, params)
    assert may_serve(s, params)
    s = after_verifying(s, False, params)  # a wrong verdict costs 5 > 3 earned
    assert s.audits_disagreed == 1 and not may_serve(s, params)
    s = Standing(reputation=100, audits_agreed=10)
    s = after_slash(s, params)
    assert may_serve(s, params) and s.slash_count == 1
    s = after_slash(s, params)
    assert s.banned and not may_serve(s, params)
    assert after_audited(Standing(), True, params).audits_passed == 1
    assert after_audited(Standing(), False, params) == Standing()

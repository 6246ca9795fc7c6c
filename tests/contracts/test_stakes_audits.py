"""Stakes, slashes, deterrence, audit selection, reputation and promotion."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from contracts import DEFAULT_PARAMS, ContractError, MoneyParams
from contracts.audits import (Standing, after_audited, after_slash, after_verifying, deters_cheating,
                              min_audit_probability_ppm, may_serve, may_serve_but_for_stake, should_audit)
from contracts.params import MAX_AMOUNT_UNITS
from contracts.stakes import (check_unstake, max_context_tokens, max_stage_gain_units, min_deterring_slash_units,
                              plan_slash, required_stake_units, slash_units_for, stake_shortfall_units)


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


def test_default_stake_by_hand():
    # G = 131_072 layer-tokens x 10 = 1_310_720; S(G) = (950_000 x G // 50_000 + 1) x 2
    assert max_stage_gain_units(DEFAULT_PARAMS) == 1_310_720
    assert required_stake_units(DEFAULT_PARAMS) == 49_807_362
    assert max_context_tokens(30, DEFAULT_PARAMS) == 4_369  # the default model has 30 layers
    assert stake_shortfall_units(0, DEFAULT_PARAMS) == 49_807_362
    assert stake_shortfall_units(49_807_362 + 5, DEFAULT_PARAMS) == 0
    # p close to 1: almost every cheat is caught, a small stake deters
    assert required_stake_units(MoneyParams(audit_probability_ppm=999_999)) == 4


def random_params(rng: random.Random) -> MoneyParams:
    return MoneyParams(gas_price_units_per_layer_token=rng.choice([1, 2, 10, 997, rng.randint(1, 10**6)]),
                       audit_probability_ppm=rng.choice([1, 2, 50_000, 500_000, 999_999, rng.randint(1, 999_999)]),
                       slash_safety_factor=rng.choice([1, 2, 3, rng.randint(1, 100)]),
                       max_request_layer_tokens=rng.choice([0, 1, 22 * 512, 32 * 4096, rng.randint(0, 10**9)]))


def test_required_stake_covers_every_slash_a_stage_or_verifier_can_get():
    """Property over params: the stake pays any one slash in full, and that slash deters."""
    rng = random.Random(7)
    checked = refused = 0
    for _ in range(20_000):
        params = random_params(rng)
        try:
            stake = required_stake_units(params)
        except ContractError:  # G or S(G) past 2**63 - 1: such params cannot be staked for
            refused += 1
            big = params.max_request_layer_tokens * params.gas_price_units_per_layer_token
            assert big > MAX_AMOUNT_UNITS or min_deterring_slash_units(
                big, params.audit_probability_ppm) * params.slash_safety_factor > MAX_AMOUNT_UNITS
            continue
        checked += 1
        p, top = params.audit_probability_ppm, max_stage_gain_units(params)
        assert deters_cheating(p, stake, top)
        # the smallest deterring slash for G times the factor, no more
        assert stake % params.slash_safety_factor == 0
        assert not deters_cheating(p, stake // params.slash_safety_factor - 1, top)
        for gain in {0, min(1, top), top, max(top - 1, 0), rng.randint(0, top), top // 2}:
            # a stage's slash for its gas; a wrong verifier's for the fee it would have had (>= 1)
            for slash in (slash_units_for(gain, params), slash_units_for(max(gain, 1), params) if top else 0):
                if not slash:
                    continue
                assert slash <= stake and deters_cheating(p, slash, gain)
                plan = plan_slash(slash, stake_units=stake, balance_units=0)
                assert plan.from_stake_units == slash and plan.shortfall_units == 0
        assert stake_shortfall_units(stake, params) == 0 and stake_shortfall_units(stake - 1, params) == 1
    assert checked > 15_000 and refused > 0


def test_serving_needs_the_stake_locked():
    params = MoneyParams(promotion_agreements=3)
    stake = required_stake_units(params)
    promoted = Standing(reputation=3, audits_agreed=3)
    assert may_serve_but_for_stake(promoted, params) and not may_serve(promoted, params)
    assert not may_serve(replace(promoted, stake_units=stake - 1), params)
    assert may_serve(replace(promoted, stake_units=stake), params)
    assert not may_serve(Standing(), params, vouched=True) and may_serve(Standing(stake_units=stake), params, True)
    assert not may_serve(Standing(stake_units=stake, banned=True), params, vouched=True)
    assert not may_serve_but_for_stake(Standing(stake_units=stake, banned=True), params, vouched=True)
    assert not may_serve(Standing(stake_units=10 * stake), params)  # stake buys no promotion


def test_promotion_after_k_agreements_and_demotion_by_slash():
    params = MoneyParams(promotion_agreements=3, ban_after_slashes=2)
    s = Standing(stake_units=required_stake_units(params))
    for _ in range(2):
        s = after_verifying(s, True, params)
        assert not may_serve(s, params)
    s = after_verifying(s, True, params)
    assert may_serve(s, params)
    s = after_verifying(s, False, params)  # a wrong verdict costs 5 > 3 earned
    assert s.audits_disagreed == 1 and not may_serve(s, params)
    s = Standing(reputation=100, audits_agreed=10, stake_units=required_stake_units(params))
    s = after_slash(s, params)
    assert may_serve(s, params) and s.slash_count == 1
    s = after_slash(s, params)
    assert s.banned and not may_serve(s, params)
    assert after_audited(Standing(), True, params).audits_passed == 1
    assert after_audited(Standing(), False, params) == Standing()


def test_parameters_added_later_stay_out_of_genesis_at_their_default():
    """Ledgers written before a parameter existed keep their genesis digest; a changed one is recorded."""
    from contracts import DEFAULT_PARAMS, MoneyParams
    from contracts.params import LATER_FIELDS
    assert not set(LATER_FIELDS) & set(DEFAULT_PARAMS.to_dict())
    assert MoneyParams.from_dict(DEFAULT_PARAMS.to_dict()) == DEFAULT_PARAMS
    custom = MoneyParams(reputation_penalty_per_misconduct=3)
    assert custom.to_dict()["reputation_penalty_per_misconduct"] == 3 and MoneyParams.from_dict(custom.to_dict()) == custom

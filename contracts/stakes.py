"""Stakes and slashes: how much a provider locks, how much a caught cheat loses, and from where.

Deterrence (DESIGN decision 6): with audit probability p and gain g from cheating on one
(request, stage), cheating loses money in expectation when p * slash > (1 - p) * g. With p in
parts per million that is p_ppm * slash > (1_000_000 - p_ppm) * g, all in integers.
"""

from __future__ import annotations

from dataclasses import dataclass

from contracts.params import MAX_AMOUNT_UNITS, PPM_DENOMINATOR, ContractError, MoneyParams, check_units


def check_probability_ppm(p_ppm: int) -> int:
    if type(p_ppm) is not int or not 0 < p_ppm < PPM_DENOMINATOR:
        raise ContractError(f"probability {p_ppm!r} ppm must be an int in (0, {PPM_DENOMINATOR})")
    return p_ppm


def min_deterring_slash_units(gain_units: int, p_ppm: int) -> int:
    """Smallest slash s with p * s > (1 - p) * gain."""
    check_units("gain_units", gain_units)
    check_probability_ppm(p_ppm)
    return (PPM_DENOMINATOR - p_ppm) * gain_units // p_ppm + 1


def slash_units_for(gain_units: int, params: MoneyParams) -> int:
    """The slash for a caught cheat that gained `gain_units`: the deterring minimum x safety factor."""
    slash = min_deterring_slash_units(gain_units, params.audit_probability_ppm) * params.slash_safety_factor
    return min(slash, MAX_AMOUNT_UNITS)


def required_stake_units(params: MoneyParams) -> int:
    """Stake a serving provider keeps locked: the slash for cheating on the largest stage of a request."""
    max_gain = params.max_request_layer_tokens * params.gas_price_units_per_layer_token
    return slash_units_for(max_gain, params)


@dataclass(frozen=True)
class SlashPlan:
    """Where a slash comes from: stake first, then the free balance; what neither covers is unpaid."""

    from_stake_units: int
    from_balance_units: int
    shortfall_units: int

    @property
    def taken_units(self) -> int:
        return self.from_stake_units + self.from_balance_units


def plan_slash(amount_units: int, stake_units: int, balance_units: int) -> SlashPlan:
    check_units("slash amount_units", amount_units, allow_zero=False)
    check_units("stake_units", stake_units)
    check_units("balance_units", balance_units)
    from_stake = min(amount_units, stake_units)
    from_balance = min(amount_units - from_stake, balance_units)
    return SlashPlan(from_stake, from_balance, amount_units - from_stake - from_balance)


def check_unstake(amount_units: int, stake_units: int) -> int:
    check_units("unstake amount_units", amount_units, allow_zero=False)
    if amount_units > stake_units:
        raise ContractError(f"cannot unlock {amount_units} units: only {stake_units} staked")
    return amount_units

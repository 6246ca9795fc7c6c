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


def max_stage_gain_units(params: MoneyParams) -> int:
    """The most gas one stage can earn on one request: the per-request cap of layer-tokens x gas price.

    A stage earns tokens processed x layers run x gas price (contracts.pricing), and no stage runs
    more layer-tokens than the whole request: (prompt + max_tokens) x n_layers. The coordinator
    keeps every request within `params.max_request_layer_tokens` (`max_context_tokens`), so this
    bounds the gain of any (request, stage)."""
    return check_units("max_stage_gain_units",
                       params.max_request_layer_tokens * params.gas_price_units_per_layer_token)


def max_context_tokens(n_layers: int, params: MoneyParams) -> int:
    """The longest request (prompt + max_tokens) whose stages' gain the required stake covers.

    (prompt + max_tokens) x n_layers <= max_request_layer_tokens; 0 means no request fits."""
    check_units("n_layers", n_layers, allow_zero=False)
    return params.max_request_layer_tokens // n_layers


def required_stake_units(params: MoneyParams) -> int:
    """Stake a provider keeps locked to serve: the slash for cheating on the largest stage of a request.

    Derivation. Let G = max_request_layer_tokens x gas price (`max_stage_gain_units`): no stage
    earns more on one request. A stage caught cheating on a request where it earned g <= G is
    slashed S(g) = (floor((1 - p) g / p) + 1) x f (`slash_units_for`, f = slash_safety_factor >= 1),
    the smallest amount with p S > (1 - p) g, times f. S is non-decreasing in g, so
    S(g) <= S(G) for every stage of every request. With

        required = S(G) = (floor((1_000_000 - p_ppm) x G / p_ppm) + 1) x f

    locked, `plan_slash` takes any one slash wholly from the stake (slashes take stake first), so
    p x slash > (1 - p) x gain is paid by locked credits, not by a balance the cheat may have spent.
    The verifier's slash for a wrong verdict is S(max(gain, 1)) <= S(G) too (G >= 1 when the cap is).

    At the defaults (p = 50_000 ppm, gas 10, cap 32 x 4096 = 131_072 layer-tokens, f = 2):
    G = 1_310_720, S(G) = (floor(950_000 x 1_310_720 / 50_000) + 1) x 2 = 49_807_362 units.

    Raises ContractError where G or S(G) overflows 2**63 - 1 (such params cannot be staked for)."""
    max_gain = max_stage_gain_units(params)
    stake = min_deterring_slash_units(max_gain, params.audit_probability_ppm) * params.slash_safety_factor
    return check_units("required_stake_units", stake)


def stake_shortfall_units(stake_units: int, params: MoneyParams) -> int:
    """What must still be locked before a provider holding `stake_units` may serve (0: enough)."""
    check_units("stake_units", stake_units)
    return max(0, required_stake_units(params) - stake_units)


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

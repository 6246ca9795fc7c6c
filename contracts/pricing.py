"""The quote: the most a request can cost, which escrow holds at admission.

A stage that runs L layers over T tokens (prompt + generated) earns T x L x gas price. The quote
assumes every token of the prompt and of max_new_tokens passes every layer of the model once.
Fees are basis points of gas, rounded down; since they are monotone in gas, the fees of any
settlement whose gas is within the quoted gas are within the quoted fees.
"""

from __future__ import annotations

from dataclasses import dataclass

from contracts.params import BPS_DENOMINATOR, ContractError, MoneyParams, check_units


@dataclass(frozen=True)
class Quote:
    gas_units: int
    coordinator_fee_units: int
    verification_fee_units: int

    @property
    def total_units(self) -> int:
        return self.gas_units + self.coordinator_fee_units + self.verification_fee_units


def gas_units(tokens: int, layers: int, params: MoneyParams) -> int:
    """Gas for `tokens` tokens through `layers` layers."""
    check_units("tokens", tokens)
    check_units("layers", layers)
    return check_units("gas_units", tokens * layers * params.gas_price_units_per_layer_token)


def fees_for_gas(gas: int, params: MoneyParams) -> tuple[int, int]:
    """(coordinator fee, verification fee) for this much gas, each rounded down."""
    check_units("gas_units", gas)
    return (
        gas * params.coordinator_fee_bps // BPS_DENOMINATOR,
        gas * params.verification_fee_bps // BPS_DENOMINATOR,
    )


def quote(prompt_tokens: int, max_new_tokens: int, n_layers: int, params: MoneyParams) -> Quote:
    """Maximum price of a request: every token through every layer, plus the fees on that gas."""
    check_units("prompt_tokens", prompt_tokens)
    check_units("max_new_tokens", max_new_tokens)
    check_units("n_layers", n_layers, allow_zero=False)
    tokens = prompt_tokens + max_new_tokens
    if tokens == 0:
        raise ContractError("a request must process at least one token")
    gas = gas_units(tokens, n_layers, params)
    coordinator_fee, verification_fee = fees_for_gas(gas, params)
    result = Quote(gas, coordinator_fee, verification_fee)
    check_units("quote total_units", result.total_units)
    return result


def hold_amount_units(prompt_tokens: int, max_new_tokens: int, n_layers: int, params: MoneyParams) -> int:
    """What escrow holds at admission: the quote's total."""
    return quote(prompt_tokens, max_new_tokens, n_layers, params).total_units

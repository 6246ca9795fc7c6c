"""Settlement: how a hold divides once a request ends (finished, failed or abandoned).

Each stage is paid gas for what its receipt says it did; the coordinator fee and the
verification fee are basis points of the gas actually paid; the rest goes back to the consumer.
A failed request settles only the receipts it has, so the consumer pays for work done, no more.
"""

from __future__ import annotations

from dataclasses import dataclass

from contracts.params import ContractError, MoneyParams, check_units
from contracts.pricing import fees_for_gas, gas_units

MAX_STAGES = 64


@dataclass(frozen=True)
class StageWork:
    """What one stage did, as its signed receipt states it."""

    provider_id: str
    layer_start: int
    layer_end: int  # exclusive
    tokens_processed: int

    @property
    def layers(self) -> int:
        return self.layer_end - self.layer_start


@dataclass(frozen=True)
class StagePayment:
    provider_id: str
    stage_index: int
    amount_units: int


@dataclass(frozen=True)
class Settlement:
    hold_units: int
    stage_payments: tuple[StagePayment, ...]
    coordinator_fee_units: int
    verification_fee_units: int
    refund_units: int

    @property
    def gas_units(self) -> int:
        return sum(p.amount_units for p in self.stage_payments)

    @property
    def total_units(self) -> int:
        return self.gas_units + self.coordinator_fee_units + self.verification_fee_units + self.refund_units


def settle(hold_units: int, stages: list[StageWork] | tuple[StageWork, ...], params: MoneyParams) -> Settlement:
    """Split `hold_units` between stages, fees and refund. Refuses work worth more than the hold."""
    check_units("hold_units", hold_units, allow_zero=False)
    if len(stages) > MAX_STAGES:
        raise ContractError(f"{len(stages)} stages, at most {MAX_STAGES}")
    payments = []
    for index, stage in enumerate(stages):
        if not isinstance(stage.provider_id, str) or not stage.provider_id:
            raise ContractError(f"stage {index}: provider_id must be a non-empty string")
        check_units(f"stage {index} layer_start", stage.layer_start)
        check_units(f"stage {index} layer_end", stage.layer_end)
        if stage.layer_end <= stage.layer_start:
            raise ContractError(f"stage {index}: empty layer range [{stage.layer_start}, {stage.layer_end})")
        gas = gas_units(stage.tokens_processed, stage.layers, params)
        payments.append(StagePayment(stage.provider_id, index, gas))
    total_gas = sum(p.amount_units for p in payments)
    check_units("total gas_units", total_gas)
    coordinator_fee, verification_fee = fees_for_gas(total_gas, params)
    spent = total_gas + coordinator_fee + verification_fee
    if spent > hold_units:
        raise ContractError(f"receipts claim {spent} units (gas {total_gas} + fees), more than the hold of {hold_units}")
    return Settlement(hold_units, tuple(payments), coordinator_fee, verification_fee, hold_units - spent)

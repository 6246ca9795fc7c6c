"""The rules of money: pure, deterministic functions of their inputs (no I/O, no clock, no floats).

- `params`     — `MoneyParams`, every tunable number with its unit, and the hard amount limit.
- `pricing`    — the quote: maximum price of a request, which is what escrow holds.
- `settlement` — the split of a hold given what each stage did: gas, fees, refund.
- `stakes`     — required stake, slash size, and how a slash divides between stake and balance.
- `audits`     — audit probability and the deterrence rule, audit selection, reputation, promotion.
"""

from contracts.params import DEFAULT_PARAMS, MAX_AMOUNT_UNITS, ContractError, MoneyParams

__all__ = ["DEFAULT_PARAMS", "MAX_AMOUNT_UNITS", "ContractError", "MoneyParams"]

"""Money parameters: one frozen value, recorded in the ledger's genesis entry so that replay uses them.

Every amount is an integer number of credit units. Ratios are integers too: fees in basis points
(1 bps = 1/10_000), probabilities in parts per million (1 ppm = 1/1_000_000).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

# Amounts, balances and totals fit a signed 64-bit column (PostgreSQL BIGINT, SQLite INTEGER).
MAX_AMOUNT_UNITS = 2**63 - 1
BPS_DENOMINATOR = 10_000
PPM_DENOMINATOR = 1_000_000


class ContractError(ValueError):
    """An input that the rules of money refuse (negative size, overflow, inconsistent receipts...)."""


@dataclass(frozen=True)
class MoneyParams:
    # Pricing: a stage earns tokens processed x layers run x this price.
    gas_price_units_per_layer_token: int = 10
    # Fees, as a share of the gas actually paid (and, in the quote, of the maximum gas).
    coordinator_fee_bps: int = 500  # 5 %: pays the coordinator's work
    verification_fee_bps: int = 1_000  # 10 %: held back in the audit pool, paid to verifiers
    # Audits: each (request, stage) pair is re-executed with this probability.
    audit_probability_ppm: int = 50_000  # 5 %
    # A caught cheat is slashed this many times the minimal deterring amount (>= 1).
    slash_safety_factor: int = 2
    # Promotion: a newcomer may serve after agreeing with the referee on this many audits
    # (and while its reputation stays above zero).
    promotion_agreements: int = 5
    # Reputation points: + per correct audit or passed audit, - per slash or wrong audit.
    reputation_per_agreement: int = 1
    reputation_penalty_per_disagreement: int = 5
    reputation_penalty_per_slash: int = 20
    # Repeat offenders: banned by peer id after this many slashes.
    ban_after_slashes: int = 3
    # Stake: a serving provider must lock enough to cover the slash of a request this large.
    max_request_layer_tokens: int = 32 * 4096
    # Misconduct: a signed profile that the coordinator's own timing contradicts (its admission probe
    # on real layers took more than `misconduct_claim_ratio` x the time the claimed figures predict).
    # Honest providers measured 4.5-18.5x on a shared 2-core CPU (tiny layers are per-op overhead the
    # roofline leaves out) and 1.35x on an H200; a 1000x inflated profile 4,408x. Recorded once per
    # contradicted signed profile (the same profile registered again costs nothing more; a new one that
    # is contradicted again does), never from step times (the stages report those, and contention
    # moves them). It costs reputation but does not by itself stop the provider serving:
    # it is planned at its measured speed, which already takes away all the claim would have gained,
    # and an honest provider whose probe met an extreme stall must not lose its income for it. The
    # serving tests of `contracts.audits.may_serve` judge the reputation earned by audits (penalties
    # for misconduct added back); a provider caught with `bench_after_misconducts` different contradicted
    # profiles does not serve.
    reputation_penalty_per_misconduct: int = 10
    misconduct_claim_ratio: int = 100
    bench_after_misconducts: int = 3

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if type(value) is not int:
                raise ContractError(f"MoneyParams.{f.name} must be an int, got {type(value).__name__}")
            if value < 0:
                raise ContractError(f"MoneyParams.{f.name} must be >= 0, got {value}")
        if self.gas_price_units_per_layer_token < 1:
            raise ContractError("gas_price_units_per_layer_token must be >= 1")
        if self.coordinator_fee_bps + self.verification_fee_bps > BPS_DENOMINATOR:
            raise ContractError("fees above 100 % of gas")
        if not 0 < self.audit_probability_ppm < PPM_DENOMINATOR:
            raise ContractError("audit_probability_ppm must be in (0, 1_000_000)")
        if self.slash_safety_factor < 1:
            raise ContractError("slash_safety_factor must be >= 1")
        if self.ban_after_slashes < 1:
            raise ContractError("ban_after_slashes must be >= 1")
        if self.misconduct_claim_ratio < 2:
            raise ContractError("misconduct_claim_ratio must be >= 2: honest hardware runs below its roofline")
        if self.bench_after_misconducts < 1:
            raise ContractError("bench_after_misconducts must be >= 1")

    def to_dict(self) -> dict[str, int]:
        """As the genesis entry records them. A parameter added after the first ledgers were written is
        left out while it has its default: those ledgers' genesis entries (and the digest a reopening
        service checks them by) stay what they were, and `from_dict` gives it its default again."""
        return {k: v for k, v in asdict(self).items()
                if not (k in LATER_FIELDS and v == LATER_FIELDS[k])}

    @classmethod
    def from_dict(cls, data: dict) -> "MoneyParams":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ContractError(f"unknown money parameters: {sorted(unknown)}")
        return cls(**data)


DEFAULT_PARAMS = MoneyParams()
# fields added after ledgers existed, with their defaults (see MoneyParams.to_dict)
LATER_FIELDS = {name: getattr(DEFAULT_PARAMS, name) for name in
                ("reputation_penalty_per_misconduct", "misconduct_claim_ratio", "bench_after_misconducts")}


def check_units(name: str, value: int, *, allow_zero: bool = True) -> int:
    """An amount must be a plain int in [0 or 1, MAX_AMOUNT_UNITS]."""
    if type(value) is not int:
        raise ContractError(f"{name} must be an int, got {type(value).__name__}")
    low = 0 if allow_zero else 1
    if not low <= value <= MAX_AMOUNT_UNITS:
        raise ContractError(f"{name} = {value} is outside [{low}, 2**63 - 1]")
    return value

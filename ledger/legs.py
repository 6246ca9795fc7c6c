"""The legs (entries) each ledger operation appends: pure functions of the operation and the state.

The service calls them inside the writing transaction; `ledger verify` calls `settlement_legs`
again while replaying, to check that every settlement paid exactly what its receipts justify.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from contracts import ContractError, MoneyParams
from contracts import settlement as settlement_rules
from contracts.settlement import StageWork
from contracts import stakes as stake_rules
from ledger.errors import InvalidTransfer, ReceiptError
from ledger.receipts import StageReceipt, receipts_digest
from ledger.state import (ESCROW_REQUESTS, ESCROW_STAKES, FEES_COORDINATOR, FEES_VERIFICATION, POSTED, PROVIDER,
                          SYSTEM_ACCOUNTS, TREASURY_ID, VOIDED, HoldState, View)


@dataclass(frozen=True)
class Leg:
    kind: str
    debit_id: str | None
    credit_id: str | None
    amount_units: int
    ref_id: str | None = None
    meta: dict = field(default_factory=dict)


def genesis_legs(public_key: str, params: MoneyParams) -> list[Leg]:
    legs = [Leg("genesis", None, None, 0, meta={"public_key": public_key, "params": params.to_dict(),
                                                "log": "meshpool-ledger/1"})]
    for account_id, kind in SYSTEM_ACCOUNTS.items():
        legs.append(Leg("open", None, account_id, 0, meta={"kind": kind, "public_key": None}))
    return legs


def check_receipts(view: View, hold: HoldState, receipts: list[StageReceipt]) -> None:
    """Every receipt is well formed, signed by the provider whose account it names, for this request."""
    if len(receipts) > settlement_rules.MAX_STAGES:
        raise ReceiptError(f"{len(receipts)} receipts, at most {settlement_rules.MAX_STAGES}")
    for index, receipt in enumerate(receipts):
        if not isinstance(receipt, StageReceipt):
            raise ReceiptError(f"receipt {index} is a {type(receipt).__name__}, not a StageReceipt")
        receipt.check_shape()
        if receipt.request_id != hold.request_id:
            raise ReceiptError(f"receipt {index} is for request {receipt.request_id!r}, the hold for {hold.request_id!r}")
        account = view.account(receipt.provider_id)
        if account is None or account.kind != PROVIDER:
            raise ReceiptError(f"receipt {index}: no provider account {receipt.provider_id!r}")
        if account.public_key != receipt.public_key:
            raise ReceiptError(f"receipt {index}: key is not the one registered for {receipt.provider_id!r}")
        if not receipt.signature_valid():
            raise ReceiptError(f"receipt {index}: bad signature from {receipt.provider_id!r}")


def settlement_legs(hold: HoldState, receipts: list[StageReceipt], params: MoneyParams) -> list[Leg]:
    """Pay each stage its gas, the two fees, refund the rest, close the hold as posted."""
    return _split_legs(hold, [r.stage_work() for r in receipts], params,
                       {"receipts": len(receipts), "receipts_sha256": receipts_digest(receipts)})


def plan_settlement_legs(hold: HoldState, plan: list[StageWork], params: MoneyParams) -> list[Leg]:
    """The same split on the work the coordinator attests instead of signed receipts: after a crash,
    the tokens it had delivered through the stages of the pipeline it recorded (the plan is in the
    close entry, so `ledger verify` re-derives the payments from it)."""
    return _split_legs(hold, plan, params, {"basis": "plan", "plan": [plan_item(w) for w in plan]})


def plan_item(work: StageWork) -> list:
    return [work.provider_id, work.layer_start, work.layer_end, work.tokens_processed]


def plan_from_items(items: object) -> list[StageWork]:
    """A plan as a close entry stores it; raises InvalidTransfer unless well formed."""
    if not isinstance(items, list) or not 0 < len(items) <= settlement_rules.MAX_STAGES:
        raise InvalidTransfer(f"a plan is a list of 1-{settlement_rules.MAX_STAGES} stages")
    plan = []
    for item in items:
        if (not isinstance(item, list) or len(item) != 4 or not isinstance(item[0], str)
                or any(type(v) is not int or v < 0 for v in item[1:])):
            raise InvalidTransfer("a plan stage is [provider id, layer start, layer end, tokens processed]")
        plan.append(StageWork(*item))
    return plan


def _split_legs(hold: HoldState, work: list[StageWork], params: MoneyParams, close_meta: dict) -> list[Leg]:
    try:
        split = settlement_rules.settle(hold.amount_units, work, params)
    except ContractError as exc:
        raise InvalidTransfer(str(exc)) from exc
    legs = [Leg("release", ESCROW_REQUESTS, p.provider_id, p.amount_units, hold.id,
                {"role": "stage", "stage_index": p.stage_index})
            for p in split.stage_payments if p.amount_units]
    for role, account_id, amount in (("coordinator_fee", FEES_COORDINATOR, split.coordinator_fee_units),
                                     ("verification_fee", FEES_VERIFICATION, split.verification_fee_units),
                                     ("refund", hold.account_id, split.refund_units)):
        if amount:
            legs.append(Leg("release", ESCROW_REQUESTS, account_id, amount, hold.id, {"role": role}))
    legs.append(Leg("close", None, None, 0, hold.id, {"outcome": POSTED, "request_id": hold.request_id, **close_meta}))
    return legs


def void_legs(hold: HoldState, reason: str) -> list[Leg]:
    """Refund whatever the hold still holds and close it as voided."""
    if not isinstance(reason, str) or not 0 < len(reason) <= 200:
        raise InvalidTransfer("a void needs a reason of 1-200 characters")
    legs = []
    if hold.amount_units - hold.released_units:
        legs.append(Leg("release", ESCROW_REQUESTS, hold.account_id, hold.amount_units - hold.released_units,
                        hold.id, {"role": "refund"}))
    legs.append(Leg("close", None, None, 0, hold.id, {"outcome": VOIDED, "request_id": hold.request_id,
                                                      "reason": reason}))
    return legs


def slash_legs(peer_id: str, stake_units: int, balance_units: int, amount_units: int, reason: str,
               evidence: object) -> list[Leg]:
    """Take from stake first, then from the free balance, then record the penalty (reputation, ban)."""
    try:
        plan = stake_rules.plan_slash(amount_units, stake_units, balance_units)
    except ContractError as exc:
        raise InvalidTransfer(str(exc)) from exc
    legs = []
    if plan.from_stake_units:
        legs.append(Leg("slash", ESCROW_STAKES, TREASURY_ID, plan.from_stake_units, meta={"peer": peer_id, "from": "stake"}))
    if plan.from_balance_units:
        legs.append(Leg("slash", peer_id, TREASURY_ID, plan.from_balance_units, meta={"peer": peer_id, "from": "balance"}))
    legs.append(Leg("penalty", None, peer_id, 0, meta={
        "reason": reason, "evidence": evidence, "requested_units": amount_units,
        "taken_units": plan.taken_units, "shortfall_units": plan.shortfall_units}))
    return legs

"""The one state-transition function of the ledger, shared by the service and by `ledger verify`.

`apply(entry, view, params)` checks an entry against the current state and applies it, or raises
without changing anything. The service runs it on rows it loaded in the writing transaction; the
verifier runs it on dictionaries while replaying from genesis. Same code, same rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

from contracts import MAX_AMOUNT_UNITS, MoneyParams
from contracts import audits
from ledger.chain import Entry, public_key_from_hex, public_key_hex
from ledger.errors import (AccountExists, HoldNotOpen, InsufficientFunds, InvalidTransfer, UnknownAccount,
                           UnknownHold)

CONSUMER, PROVIDER, VERIFIER, ESCROW, TREASURY, FEES = "consumer", "provider", "verifier", "escrow", "treasury", "fees"
USER_KINDS = (CONSUMER, PROVIDER, VERIFIER)
ESCROW_REQUESTS, ESCROW_STAKES = "escrow:requests", "escrow:stakes"
TREASURY_ID, FEES_COORDINATOR, FEES_VERIFICATION = "treasury", "fees:coordinator", "fees:verification"
SYSTEM_ACCOUNTS = {ESCROW_REQUESTS: ESCROW, ESCROW_STAKES: ESCROW, TREASURY_ID: TREASURY,
                   FEES_COORDINATOR: FEES, FEES_VERIFICATION: FEES}

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9:._/+=@-]{0,127}")
KINDS = ("genesis", "open", "mint", "burn", "transfer", "hold", "release", "close", "stake", "unstake",
         "slash", "penalty", "audit", "misconduct")
RELEASE_ROLES = ("stage", "coordinator_fee", "verification_fee", "refund")
OPEN, POSTED, VOIDED = "open", "posted", "voided"


def check_id(name: str, value: object) -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise InvalidTransfer(f"{name} {value!r} must be 1-128 characters of [A-Za-z0-9:._/+=@-]")
    return value


def check_amount(value: object, *, allow_zero: bool = False) -> int:
    if type(value) is not int:
        raise InvalidTransfer(f"amount_units must be an int, got {type(value).__name__}")
    if value < 0:
        raise InvalidTransfer(f"amount_units {value} is negative")
    if value == 0 and not allow_zero:
        raise InvalidTransfer("amount_units is zero: empty transfers are refused")
    if value > MAX_AMOUNT_UNITS:
        raise InvalidTransfer(f"amount_units {value} overflows the 2**63 - 1 limit")
    return value


@dataclass
class AccountState:
    id: str
    kind: str
    public_key: str | None = None
    balance_units: int = 0
    stake_units: int = 0
    slashed_units: int = 0
    standing: audits.Standing = field(default_factory=audits.Standing)
    opened_seq: int = 0


@dataclass
class HoldState:
    id: str
    account_id: str
    request_id: str
    amount_units: int
    released_units: int = 0
    paid_units: int = 0  # released to anyone but the consumer
    status: str = OPEN
    opened_seq: int = 0
    closed_seq: int | None = None


@dataclass
class Totals:
    minted_units: int = 0
    burned_units: int = 0


class View(Protocol):
    totals: Totals

    def account(self, account_id: str) -> AccountState | None: ...
    def add_account(self, account: AccountState) -> None: ...
    def hold(self, hold_id: str) -> HoldState | None: ...
    def add_hold(self, hold: HoldState) -> None: ...
    def touch(self, obj: AccountState | HoldState) -> None: ...


def _need(view: View, account_id: str | None, *kinds: str) -> AccountState:
    if account_id is None:
        raise InvalidTransfer("missing account")
    account = view.account(account_id)
    if account is None:
        raise UnknownAccount(f"no account {account_id!r}")
    if kinds and account.kind not in kinds:
        raise InvalidTransfer(f"account {account_id!r} is a {account.kind}, wanted {' or '.join(kinds)}")
    return account


def _move(view: View, debit: AccountState | None, credit: AccountState | None, amount: int) -> None:
    if debit is not None and credit is not None and debit.id == credit.id:
        raise InvalidTransfer(f"debit and credit are the same account {debit.id!r}")
    if debit is not None:
        if debit.balance_units < amount:
            raise InsufficientFunds(f"{debit.id} holds {debit.balance_units} units, cannot pay {amount}")
    if credit is not None and credit.balance_units + amount > MAX_AMOUNT_UNITS:
        raise InvalidTransfer(f"crediting {amount} units to {credit.id} overflows its balance")
    if debit is not None:
        debit.balance_units -= amount
        view.touch(debit)
    if credit is not None:
        credit.balance_units += amount
        view.touch(credit)


def _open_hold(view: View, hold_id: str | None) -> HoldState:
    hold = view.hold(hold_id) if hold_id else None
    if hold is None:
        raise UnknownHold(f"no hold {hold_id!r}")
    if hold.status != OPEN:
        raise HoldNotOpen(f"hold {hold_id!r} is already {hold.status}")
    return hold


def apply(e: Entry, view: View, params: MoneyParams) -> None:
    """Check entry `e` against the state in `view` and apply it; raise and change nothing if refused."""
    if e.kind not in KINDS:
        raise InvalidTransfer(f"unknown entry kind {e.kind!r}")
    zero_ok = e.kind in ("genesis", "open", "close", "penalty", "audit", "misconduct")
    check_amount(e.amount_units, allow_zero=zero_ok)
    if zero_ok and e.kind != "audit" and e.amount_units != 0:
        raise InvalidTransfer(f"a {e.kind} entry moves no units")
    handler = _HANDLERS.get(e.kind)
    if handler is not None:
        handler(e, view, params)


def _genesis(e: Entry, view: View, params: MoneyParams) -> None:
    if e.seq != 0 or e.debit_id or e.credit_id:
        raise InvalidTransfer("genesis must be entry 0 and touch no account")


def _open(e: Entry, view: View, params: MoneyParams) -> None:
    account_id = check_id("account id", e.credit_id)
    kind = e.meta.get("kind")
    if SYSTEM_ACCOUNTS.get(account_id, kind) != kind or (kind not in USER_KINDS and account_id not in SYSTEM_ACCOUNTS):
        raise InvalidTransfer(f"account {account_id!r} cannot be opened as kind {kind!r}")
    if view.account(account_id) is not None:
        raise AccountExists(f"account {account_id!r} exists")
    public_key = e.meta.get("public_key")
    if public_key is not None:
        if not isinstance(public_key, str) or public_key_hex(public_key_from_hex(public_key)) != public_key:
            raise InvalidTransfer(f"public key of {account_id!r} must be a raw Ed25519 key in lowercase hex")
    elif kind == PROVIDER:
        raise InvalidTransfer("a provider account needs its Ed25519 public key (64 hex characters)")
    view.add_account(AccountState(account_id, kind, public_key, opened_seq=e.seq))


def _mint(e: Entry, view: View, params: MoneyParams) -> None:
    credit = _need(view, e.credit_id, *USER_KINDS, TREASURY)
    if e.debit_id is not None or view.totals.minted_units + e.amount_units > MAX_AMOUNT_UNITS:
        raise InvalidTransfer("mint has no debit side and total supply stays below 2**63")
    _move(view, None, credit, e.amount_units)
    view.totals.minted_units += e.amount_units


def _burn(e: Entry, view: View, params: MoneyParams) -> None:
    debit = _need(view, e.debit_id, *USER_KINDS, TREASURY, FEES)
    if e.credit_id is not None:
        raise InvalidTransfer("burn has no credit side")
    _move(view, debit, None, e.amount_units)
    view.totals.burned_units += e.amount_units


def _transfer(e: Entry, view: View, params: MoneyParams) -> None:
    # Escrow moves only through holds and stakes; everything else may pay anyone but escrow.
    debit = _need(view, e.debit_id, *USER_KINDS, TREASURY, FEES)
    credit = _need(view, e.credit_id, *USER_KINDS, TREASURY, FEES)
    _move(view, debit, credit, e.amount_units)


def _hold(e: Entry, view: View, params: MoneyParams) -> None:
    debit = _need(view, e.debit_id, *USER_KINDS)
    escrow = _need(view, e.credit_id, ESCROW)
    request_id = check_id("request id", e.meta.get("request_id"))
    if escrow.id != ESCROW_REQUESTS or e.ref_id is not None:
        raise InvalidTransfer("a hold credits escrow:requests and refers to nothing")
    if view.hold(e.op_id) is not None:
        raise InvalidTransfer(f"hold {e.op_id!r} exists")
    _move(view, debit, escrow, e.amount_units)
    view.add_hold(HoldState(e.op_id, debit.id, request_id, e.amount_units, opened_seq=e.seq))


def _release(e: Entry, view: View, params: MoneyParams) -> None:
    hold = _open_hold(view, e.ref_id)
    role = e.meta.get("role")
    if role not in RELEASE_ROLES or e.debit_id != ESCROW_REQUESTS:
        raise InvalidTransfer(f"a release pays from escrow:requests in a role of {RELEASE_ROLES}")
    expected = {"refund": hold.account_id, "coordinator_fee": FEES_COORDINATOR,
                "verification_fee": FEES_VERIFICATION}.get(role)
    if expected is not None and e.credit_id != expected:
        raise InvalidTransfer(f"a {role} release must credit {expected!r}, not {e.credit_id!r}")
    credit = _need(view, e.credit_id, PROVIDER) if role == "stage" else _need(view, e.credit_id)
    if hold.released_units + e.amount_units > hold.amount_units:
        raise InsufficientFunds(f"hold {hold.id!r} has {hold.amount_units - hold.released_units} units left")
    _move(view, _need(view, ESCROW_REQUESTS), credit, e.amount_units)
    hold.released_units += e.amount_units
    if role != "refund":
        hold.paid_units += e.amount_units
    view.touch(hold)


def _close(e: Entry, view: View, params: MoneyParams) -> None:
    hold = _open_hold(view, e.ref_id)
    outcome = e.meta.get("outcome")
    if outcome not in (POSTED, VOIDED):
        raise InvalidTransfer(f"close outcome {outcome!r} is neither posted nor voided")
    if hold.released_units != hold.amount_units:
        raise InvalidTransfer(f"hold {hold.id!r} still holds {hold.amount_units - hold.released_units} units")
    if outcome == VOIDED and hold.paid_units:
        raise InvalidTransfer(f"voided hold {hold.id!r} paid {hold.paid_units} units to others")
    hold.status, hold.closed_seq = outcome, e.seq
    view.touch(hold)


def _stake(e: Entry, view: View, params: MoneyParams) -> None:
    provider = _need(view, e.debit_id, PROVIDER)
    if e.credit_id != ESCROW_STAKES:
        raise InvalidTransfer("stake credits escrow:stakes")
    _move(view, provider, _need(view, ESCROW_STAKES), e.amount_units)
    provider.stake_units += e.amount_units


def _unstake(e: Entry, view: View, params: MoneyParams) -> None:
    provider = _need(view, e.credit_id, PROVIDER)
    if e.debit_id != ESCROW_STAKES:
        raise InvalidTransfer("unstake debits escrow:stakes")
    if e.amount_units > provider.stake_units:
        raise InsufficientFunds(f"{provider.id} has {provider.stake_units} units staked, cannot unlock {e.amount_units}")
    _move(view, _need(view, ESCROW_STAKES), provider, e.amount_units)
    provider.stake_units -= e.amount_units


def _slash(e: Entry, view: View, params: MoneyParams) -> None:
    peer = _need(view, e.meta.get("peer"), PROVIDER, VERIFIER)
    if e.credit_id != TREASURY_ID:
        raise InvalidTransfer("slashed units go to the treasury")
    if e.debit_id == ESCROW_STAKES:
        if e.amount_units > peer.stake_units:
            raise InsufficientFunds(f"{peer.id} has {peer.stake_units} units staked, cannot slash {e.amount_units}")
    elif e.debit_id != peer.id:
        raise InvalidTransfer("a slash debits the peer's stake (escrow:stakes) or the peer itself")
    _move(view, _need(view, e.debit_id), _need(view, TREASURY_ID), e.amount_units)
    if e.debit_id == ESCROW_STAKES:
        peer.stake_units -= e.amount_units
    peer.slashed_units += e.amount_units
    view.touch(peer)


def _penalty(e: Entry, view: View, params: MoneyParams) -> None:
    peer = _need(view, e.credit_id, PROVIDER, VERIFIER)
    reason = e.meta.get("reason")
    if not isinstance(reason, str) or not 0 < len(reason) <= 200:
        raise InvalidTransfer("a slash needs a reason of 1-200 characters")
    peer.standing = audits.after_slash(peer.standing, params)
    view.touch(peer)


def _audit(e: Entry, view: View, params: MoneyParams) -> None:
    verifier = _need(view, e.credit_id, PROVIDER, VERIFIER)
    subject = _need(view, e.meta.get("subject"), PROVIDER, VERIFIER)
    check_id("audit id", e.meta.get("audit_id"))
    agreed, passed = e.meta.get("verifier_agreed"), e.meta.get("subject_passed")
    if type(agreed) is not bool or type(passed) is not bool or subject.id == verifier.id:
        raise InvalidTransfer("an audit names a subject other than the verifier and two booleans")
    if e.amount_units:
        if e.debit_id != FEES_VERIFICATION:
            raise InvalidTransfer("audit fees come from fees:verification")
        _move(view, _need(view, FEES_VERIFICATION), verifier, e.amount_units)
    elif e.debit_id is not None:
        raise InvalidTransfer("an unpaid audit has no debit side")
    verifier.standing = audits.after_verifying(verifier.standing, agreed, params)
    subject.standing = audits.after_audited(subject.standing, passed, params)
    view.touch(verifier)
    view.touch(subject)


def _misconduct(e: Entry, view: View, params: MoneyParams) -> None:
    """A signed claim the coordinator's measurement contradicted: the evidence must show a ratio past
    the ledger's threshold, so an auditor replaying the log sees what each penalty rests on."""
    peer = _need(view, e.credit_id, PROVIDER, VERIFIER)
    reason, evidence = e.meta.get("reason"), e.meta.get("evidence")
    if e.debit_id is not None or e.ref_id is not None:
        raise InvalidTransfer("a misconduct entry names only the peer (credit side)")
    if not isinstance(reason, str) or not 0 < len(reason) <= 200:
        raise InvalidTransfer("misconduct needs a reason of 1-200 characters")
    ratio = evidence.get("claim_ratio") if isinstance(evidence, dict) else None
    if type(ratio) is not int or ratio <= params.misconduct_claim_ratio:
        raise InvalidTransfer(f"misconduct needs evidence of a claim_ratio above {params.misconduct_claim_ratio} "
                              f"(the measured time over the time the claim predicts), got {ratio!r}")
    peer.standing = audits.after_misconduct(peer.standing, params)
    view.touch(peer)


_HANDLERS = {
    "genesis": _genesis, "open": _open, "mint": _mint, "burn": _burn, "transfer": _transfer, "hold": _hold,
    "release": _release, "close": _close, "stake": _stake, "unstake": _unstake, "slash": _slash,
    "penalty": _penalty, "audit": _audit, "misconduct": _misconduct,
}


class MemoryView:
    """A View over dictionaries: what the verifier replays into."""

    def __init__(self) -> None:
        self.accounts: dict[str, AccountState] = {}
        self.holds: dict[str, HoldState] = {}
        self.totals = Totals()

    def account(self, account_id: str) -> AccountState | None:
        return self.accounts.get(account_id)

    def add_account(self, account: AccountState) -> None:
        self.accounts[account.id] = account

    def hold(self, hold_id: str) -> HoldState | None:
        return self.holds.get(hold_id)

    def add_hold(self, hold: HoldState) -> None:
        self.holds[hold.id] = hold

    def touch(self, obj: AccountState | HoldState) -> None:
        pass

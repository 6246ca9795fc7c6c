"""Ledger exceptions: each names what was refused and why. A refused operation changes nothing."""


class LedgerError(Exception):
    """Base of every ledger refusal."""


class InvalidTransfer(LedgerError):
    """Malformed operation: bad id, negative, zero or overflowing amount, wrong account kinds."""


class InsufficientFunds(LedgerError):
    """The debit would make a balance (or a stake, or a hold) negative."""


class UnknownAccount(LedgerError):
    pass


class AccountExists(LedgerError):
    pass


class IdempotencyConflict(LedgerError):
    """An operation id reused with different fields: refused, the first one stands."""


class UnknownHold(LedgerError):
    pass


class HoldNotOpen(LedgerError):
    """The hold was already posted or voided: a hold resolves exactly once."""


class ReceiptError(LedgerError):
    """A stage receipt with a bad signature, another request id, or an unknown or mismatched provider."""


class KeyMismatch(LedgerError):
    """The coordinator key given to the service is not the one recorded in the genesis entry."""


class LedgerCorrupt(LedgerError):
    """Stored state contradicts the chain (found by `recover` or the service's own checks)."""

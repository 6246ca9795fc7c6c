"""Stakes: the coordinator locks the stake a provider needs to serve (contracts.stakes), or says why not.

Two ways in, both idempotent ledger operations the coordinator re-derives from durable state, so a
crash at any point only delays a lock and never doubles one:
- Vouched: `coordinator vouch PEER` writes DATA_DIR/vouched (fsync'd) and nothing else. When the
  coordinator sees a vouched peer that has a ledger account (opened at registration, with the key
  that signs its receipts), it mints the required stake into the account and locks it, in one
  operation with op id `stake:vouch:PEER`: whenever it runs again (next planner round, after a
  restart, after a second vouch) the ledger answers "exists" and locks nothing more.
- Earned: a provider allowed to serve but for its stake (promoted by audits, or vouched and
  slashed since) locks the shortfall from its own balance (verification fees, gas) as soon as the
  balance covers it, with op id `stake:topup:PEER:SLASHED` (its slashed units so far: a stake
  falls only by a slash, so each fall gets one top-up). Until then it keeps verifying.
Slashes take stake first (ledger.service.slash); one that leaves the stake short stops the
provider serving (contracts.audits.may_serve) until a top-up.
"""

from __future__ import annotations

import logging
import threading

from contracts.audits import Standing, may_serve_but_for_stake
from contracts.stakes import required_stake_units, stake_shortfall_units
from ledger.errors import IdempotencyConflict, LedgerError
from ledger.reader import LedgerReader
from ledger.service import LedgerService
from ledger.state import PROVIDER

log = logging.getLogger("meshpool.stakes")

MAX_FUNDED_PEERS = 100_000  # bound on the memo of vouch stakes already in the ledger


def vouch_op_id(peer: str) -> str:
    return f"stake:vouch:{peer}"


class StakeKeeper:
    """Thread-safe: ledger operations serialise in the ledger; `_funded` changes under `_lock`."""

    def __init__(self, ledger: LedgerService, reader: LedgerReader):
        self.ledger, self.reader, self.params = ledger, reader, ledger.params
        self.required_units = required_stake_units(self.params)
        self._funded: set[str] = set()  # vouch stakes known to be in the ledger
        self._lock = threading.Lock()

    def ensure(self, peer: str, vouched: bool) -> Standing | None:
        """Lock what `peer` needs to serve where that is possible now; return its standing (with stake)
        as the ledger has it afterwards, or None while it has no provider account."""
        account = self.reader.account_state(peer)
        if account is None or account.kind != PROVIDER:
            return None
        if account.standing.banned:  # no stake for a peer that may never serve again
            return account.standing
        if vouched and not self._vouch_funded(peer):
            self._fund_vouch(peer)
            account = self.reader.account_state(peer)
        shortfall = stake_shortfall_units(account.stake_units, self.params)
        if (shortfall and account.balance_units >= shortfall
                and may_serve_but_for_stake(account.standing, self.params, vouched)):
            try:
                self.ledger.lock_stake(f"stake:topup:{peer}:{account.slashed_units}", peer, shortfall)
                log.info("provider %s locked %d units of its balance as stake", peer, shortfall)
            except IdempotencyConflict:  # the same state was topped up already, by another amount
                pass
            except LedgerError as exc:  # e.g. its balance moved since it was read: next round
                log.info("stake top-up of %s not taken: %s", peer, exc)
            account = self.reader.account_state(peer)
        return account.standing

    def may_lock(self, peer: str, standing: Standing, vouched: bool) -> bool:
        """Whether `ensure` may lock something for `peer` now: vouched and not yet funded, or short of
        stake while allowed to serve but for it (cheap: no database read, so the planner asks every round)."""
        if vouched and not self._vouch_funded(peer):
            return True
        return standing.stake_units < self.required_units and may_serve_but_for_stake(standing, self.params, vouched)

    def _vouch_funded(self, peer: str) -> bool:
        with self._lock:
            return peer in self._funded

    def _fund_vouch(self, peer: str) -> None:
        try:
            result = self.ledger.fund_stake(vouch_op_id(peer), peer, self.required_units,
                                            "operator-funded stake for a vouched provider")
            if result.status == "created":
                log.info("vouched provider %s: %d units of stake locked, funded by the operator",
                         peer, self.required_units)
        except IdempotencyConflict:  # the op id holds another funding already: it stands
            pass
        except LedgerError as exc:
            log.warning("vouched provider %s: its stake could not be locked: %s", peer, exc)
            return
        with self._lock:
            if len(self._funded) >= MAX_FUNDED_PEERS:
                self._funded.clear()  # only a cache: the ledger's op ids keep it idempotent
            self._funded.add(peer)


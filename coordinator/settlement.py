"""Resolving a request's hold: settled on the receipts that checked out, or voided; never left open.

`Settler.resolve` makes the first attempt on the caller's thread. An attempt the database did not
take (unreachable, a lock that timed out, anything unexpected: logged with its traceback) goes to
one retry thread, which tries again after RETRY_BASE_S, doubling up to RETRY_MAX_S, always under
the same operation id with the same receipts: an attempt that committed but whose answer was lost
returns "exists", so nothing is paid twice. A settlement the ledger refuses (a receipt it will not
pay), or one that failed SETTLE_ATTEMPTS times, is voided instead, refunding the consumer in full;
a void is retried the same way until it lands. A hold that another operation closed first (the
`recover()` of a restarted coordinator) is resolved already. Holds still pending when the
coordinator stops are logged; its next start settles them for the tokens they delivered, or
refunds them (coordinator/recovery.py).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ledger.errors import HoldNotOpen, IdempotencyConflict, LedgerCorrupt, LedgerError
from ledger.reader import LedgerReader
from ledger.receipts import StageReceipt
from ledger.service import LedgerService
from ledger.state import POSTED, VOIDED

log = logging.getLogger("meshpool.settlement")

RETRY_BASE_S = 0.25
RETRY_MAX_S = 30.0
SETTLE_ATTEMPTS = 12  # about 4 minutes of retries before the consumer is refunded instead
MAX_PENDING = 10_000
STOP_TIMEOUT_S = 10.0

# outcomes of `resolve`: landed (POSTED, VOIDED), left to the retry thread (PENDING), or left open for
# the next start's recover() after an error that retrying cannot mend (STUCK, logged with its traceback)
PENDING, STUCK = "pending", "stuck"
_RETRY = "retry"


@dataclass
class _Job:
    request_id: str
    receipts: tuple[StageReceipt, ...]
    void_reason: str
    context: object  # handed to on_posted with the receipts
    attempts: int = 0
    voiding: bool = False

    @property
    def hold_id(self) -> str:
        return f"hold:{self.request_id}"


class Settler:
    def __init__(self, ledger: LedgerService, reader: LedgerReader,
                 on_posted: Callable[[object, list[StageReceipt]], None] = lambda context, receipts: None,
                 retry_base_s: float = RETRY_BASE_S, retry_max_s: float = RETRY_MAX_S,
                 settle_attempts: int = SETTLE_ATTEMPTS, max_pending: int = MAX_PENDING):
        """`on_posted(context, receipts)`: called once a settlement has landed (never for a void)."""
        self.ledger, self.reader, self.on_posted = ledger, reader, on_posted
        self.retry_base_s, self.retry_max_s = retry_base_s, retry_max_s
        self.settle_attempts, self.max_pending = settle_attempts, max_pending
        self._queue: list[tuple[float, int, _Job]] = []  # (due, tiebreak, job), a heap
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def resolve(self, request_id: str, receipts: Sequence[StageReceipt], void_reason: str,
                context: object = None) -> str:
        """Settle `hold:<request_id>` on `receipts`, or void it (no receipts) with `void_reason`.
        Returns POSTED or VOIDED once it has landed, PENDING when the retry thread has it, STUCK."""
        job = _Job(request_id, tuple(receipts), void_reason, context, voiding=not receipts)
        outcome = self._attempt(job)
        if outcome != _RETRY:
            return outcome
        return PENDING if self._schedule(job) else STUCK

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
        with self._cond:
            left = [job.hold_id for _, _, job in self._queue]
            self._queue.clear()
        if left:
            log.error("%d holds still unresolved at shutdown, refunded at the next start: %s", len(left),
                      ", ".join(left[:20]))

    # -- one attempt ----------------------------------------------------------------------

    def _attempt(self, job: _Job) -> str:
        job.attempts += 1
        try:
            if job.voiding:
                self.ledger.void(f"void:{job.request_id}", job.hold_id, job.void_reason)
                return VOIDED
            self.ledger.settle(f"settle:{job.request_id}", job.hold_id, job.receipts)
        except (HoldNotOpen, IdempotencyConflict):
            return self._closed_elsewhere(job)
        except LedgerCorrupt:
            log.critical("hold %s: the ledger is corrupt; nothing more is written for it", job.hold_id, exc_info=True)
            return STUCK
        except LedgerError:
            if job.voiding:  # a refused void is a bug: the hold stays for recover() to refund
                log.error("hold %s: the void was refused", job.hold_id, exc_info=True)
                return STUCK
            log.error("hold %s: the settlement was refused; refunding the consumer instead", job.hold_id,
                      exc_info=True)
            job.voiding, job.void_reason = True, "settlement refused by the ledger"
            return self._attempt(job)
        except Exception:  # the database unreachable, a lock timed out, or a bug: retried, and said so
            log.warning("hold %s: %s attempt %d failed; retrying", job.hold_id,
                        "void" if job.voiding else "settlement", job.attempts, exc_info=True)
            if not job.voiding and job.attempts >= self.settle_attempts:
                log.error("hold %s: not settled after %d attempts; refunding the consumer instead", job.hold_id,
                          job.attempts)
                job.voiding, job.void_reason = True, "settlement failed repeatedly"
            return _RETRY
        try:
            self.on_posted(job.context, list(job.receipts))
        except Exception:  # the settlement stands; what follows it (audits) must not undo it
            log.exception("hold %s: after-settlement callback failed", job.hold_id)
        return POSTED

    def _closed_elsewhere(self, job: _Job) -> str:
        hold = self.reader.hold(job.hold_id)
        status = hold["status"] if hold else None
        if status in (POSTED, VOIDED):
            log.info("hold %s was already %s", job.hold_id, status)
            return status
        log.error("hold %s: refused as closed but found %s", job.hold_id, status, exc_info=True)
        return STUCK

    # -- retries --------------------------------------------------------------------------

    def _delay_s(self, attempts: int) -> float:
        return min(self.retry_max_s, self.retry_base_s * 2 ** min(attempts - 1, 30))

    def _schedule(self, job: _Job) -> bool:
        with self._cond:
            if self._stopping:
                log.error("hold %s unresolved at shutdown, refunded at the next start", job.hold_id)
                return False
            if len(self._queue) >= self.max_pending:
                log.error("hold %s: %d settlements already wait for a retry; this one waits for the next start",
                          job.hold_id, len(self._queue))
                return False
            heapq.heappush(self._queue, (time.monotonic() + self._delay_s(job.attempts), next(self._order), job))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="settle-retry", daemon=True)
                self._thread.start()
            self._cond.notify_all()
            return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (not self._queue or self._queue[0][0] > time.monotonic()):
                    self._cond.wait(self._queue[0][0] - time.monotonic() if self._queue else None)
                if self._stopping:
                    return
                _, _, job = heapq.heappop(self._queue)
            if self._attempt(job) == _RETRY:
                self._schedule(job)

"""Settlements that run on after their stream has ended, kept by consumer.

A stream sends its end (the finish chunk, usage, `data: [DONE]`) as soon as its last token is out;
its hold is resolved afterwards on the API's settle threads (`Accounts.finish` waits for the
stages' receipts, up to `RECEIPT_WAIT_S` when a stage died, then writes the ledger). Those
settlements are kept here under the consumer's ledger account until they land, so that:
- the consumer's own reads (`/v1/account`, `/ledger/me`) wait for them first: a request whose
  stream ended is never shown as still held (read-your-writes), and
- at shutdown the app waits for all of them while the providers can still send receipts; one that
  does not land in time is left to the next start, whose recovery settles each hold for what the
  in-flight journal says it delivered (coordinator/recovery.py).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Executor, Future

from coordinator.receipts import RECEIPT_WAIT_S

# A settlement waits at most RECEIPT_WAIT_S for receipts, then makes one ledger write (its retries,
# if the database refuses, go to coordinator/settlement.py's thread and are not waited for): a read
# waits this long at most, then shows the account as it stands
SETTLE_WAIT_S = RECEIPT_WAIT_S + 5.0
# Settlements that may run behind their streams at once; past that a stream settles before its end,
# as a body does, so a pool whose stages do not answer slows its clients instead of piling up work
MAX_BEHIND = 4096


class PendingSettlements:
    """Futures of settlements in flight, by consumer account id; each removed once done."""

    def __init__(self, max_behind: int = MAX_BEHIND):
        self.max_behind = max_behind
        self._lock = threading.Lock()  # futures finish on settle threads
        self._by_account: dict[str, set[Future]] = {}

    def __len__(self) -> int:
        with self._lock:
            return sum(map(len, self._by_account.values()))

    def full(self) -> bool:
        return len(self) >= self.max_behind

    def submit(self, executor: Executor, account_id: str, fn, *args) -> Future:
        """`fn(*args)` on `executor`, kept under `account_id` until it is done."""
        future = executor.submit(fn, *args)
        with self._lock:
            self._by_account.setdefault(account_id, set()).add(future)
        # added after the entry: a future already done calls it at once and removes the entry
        future.add_done_callback(lambda f: self._done(account_id, f))
        return future

    def _done(self, account_id: str, future: Future) -> None:
        with self._lock:
            futures = self._by_account.get(account_id, set())
            futures.discard(future)
            if not futures:
                self._by_account.pop(account_id, None)

    def of(self, account_id: str) -> list[Future]:
        with self._lock:
            return list(self._by_account.get(account_id, ()))

    async def wait(self, account_id: str, timeout_s: float = SETTLE_WAIT_S) -> bool:
        """Wait for the settlements of `account_id` in flight now; False if some ran past `timeout_s`."""
        return await _wait(self.of(account_id), timeout_s)

    async def drain(self, timeout_s: float = SETTLE_WAIT_S) -> int:
        """Wait for every settlement in flight now; how many ran past `timeout_s`."""
        with self._lock:
            futures = [f for fs in self._by_account.values() for f in fs]
        if await _wait(futures, timeout_s):
            return 0
        return sum(not f.done() for f in futures)


async def _wait(futures: list[Future], timeout_s: float) -> bool:
    if not futures:
        return True
    # asyncio.wait never cancels what it waits on, so a reader that goes away (its task cancelled)
    # cannot cancel a settlement still queued behind the wrapper
    _, pending = await asyncio.wait([asyncio.wrap_future(f) for f in futures], timeout=timeout_s)
    return not pending

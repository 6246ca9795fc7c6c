"""Group commit: many threads' writes in one database transaction, each caller back only once its
write is durable.

Every streamed chunk records its delivered-token count before it leaves (coordinator/inflight.py);
with one transaction per chunk, 32 streams queue for SQLite's single writer lock and a commit each,
and the coordinator spends its time waiting on that lock. Here the first caller to find no
transaction running writes everything pending in one; the callers that arrive meanwhile wait for
the next one, which writes all of theirs. Nothing returns before its own write committed, so what
a restart settles on is what it was before, in a few commits instead of one per chunk.
"""

from __future__ import annotations

import threading
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class _Slot(Generic[T]):
    __slots__ = ("item", "done", "error")

    def __init__(self, item: T):
        self.item, self.done, self.error = item, False, None


class GroupCommit(Generic[T]):
    def __init__(self, write_many: Callable[[list[T]], None]):
        """`write_many(items)`: writes all of them in one transaction, or raises (then every caller
        of that batch gets the error: none of their writes happened)."""
        self._write_many = write_many
        self._cond = threading.Condition()
        self._pending: list[_Slot[T]] = []
        self._writing = False

    def write(self, item: T) -> None:
        """Returns once `item` is committed; raises what its batch's write raised."""
        slot = _Slot(item)
        with self._cond:
            self._pending.append(slot)
            while not slot.done and self._writing:
                self._cond.wait()
            if slot.done:
                return self._result(slot)
            self._writing = True  # this caller leads: it writes every write pending now, its own among them
            batch, self._pending = self._pending, []
        error = None
        try:
            self._write_many([s.item for s in batch])
        except BaseException as exc:  # handed to every caller of the batch
            error = exc
        with self._cond:
            for s in batch:
                s.done, s.error = True, error
            self._writing = False
            self._cond.notify_all()
        return self._result(slot)

    @staticmethod
    def _result(slot: _Slot) -> None:
        if slot.error is not None:
            raise slot.error

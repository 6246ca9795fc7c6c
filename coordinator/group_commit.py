"""Group commit: many callers' writes in one database transaction, each caller back only once its
write is durable.

Every streamed chunk records its delivered-token count before it leaves (coordinator/inflight.py);
with one transaction per chunk, 32 streams queue for SQLite's single writer lock and a commit each,
and the coordinator spends its time waiting on that lock. Here whoever finds no transaction running
leads: it writes everything pending in one, then whatever arrived meanwhile in the next, until
nothing is left. Nothing returns before its own write committed, so what a restart settles on is
what it was before, in a few commits instead of one per chunk.

Callers on an event loop (`write_async`) take no thread while they wait: their leader runs on the
committer's own thread, so a step that gives 32 streams a chunk costs one transaction, not 32
executor slots, and nobody else's executor (the API's ledger calls) queues behind it.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class _Slot(Generic[T]):
    __slots__ = ("item", "done", "error", "future")

    def __init__(self, item: T, future: asyncio.Future | None = None):
        self.item, self.done, self.error, self.future = item, False, None, future


class GroupCommit(Generic[T]):
    def __init__(self, write_many: Callable[[list[T]], None]):
        """`write_many(items)`: writes all of them in one transaction, or raises (then every caller
        of that batch gets the error: none of their writes happened)."""
        self._write_many = write_many
        self._cond = threading.Condition()
        self._pending: list[_Slot[T]] = []
        self._writing = False
        self._leader: ThreadPoolExecutor | None = None  # leads for callers on event loops

    def write(self, item: T) -> None:
        """Returns once `item` is committed; raises what its batch's write raised."""
        slot = _Slot(item)
        if self._enqueue(slot):
            self._lead()
        with self._cond:
            while not slot.done:
                self._cond.wait()
        if slot.error is not None:
            raise slot.error

    async def write_async(self, item: T) -> None:
        """`write` for a caller on an event loop, which goes on serving while the write commits."""
        slot = _Slot(item, asyncio.get_running_loop().create_future())
        if self._enqueue(slot):
            if self._leader is None:
                self._leader = ThreadPoolExecutor(1, thread_name_prefix="group-commit")
            self._leader.submit(self._lead)
        await slot.future

    def _enqueue(self, slot: _Slot[T]) -> bool:
        """Whether the caller must lead (no write is running)."""
        with self._cond:
            self._pending.append(slot)
            lead, self._writing = not self._writing, True
        return lead

    def _lead(self) -> None:
        while True:
            with self._cond:
                if not self._pending:
                    self._writing = False
                    return
                batch, self._pending = self._pending, []
            error = None
            try:
                self._write_many([s.item for s in batch])
            except BaseException as exc:  # handed to every caller of the batch
                error = exc
            waiting: dict[asyncio.AbstractEventLoop, list[_Slot]] = {}
            with self._cond:
                for s in batch:
                    s.done, s.error = True, error
                    if s.future is not None:
                        waiting.setdefault(s.future.get_loop(), []).append(s)
                self._cond.notify_all()
            for loop, slots in waiting.items():  # one wake of each loop for all its callers
                try:
                    loop.call_soon_threadsafe(_resolve, slots)
                except RuntimeError:  # that loop has closed: nobody waits there any more
                    pass


def _resolve(slots: list[_Slot]) -> None:
    for s in slots:
        if s.future.done():  # its caller was cancelled meanwhile
            continue
        if s.error is None:
            s.future.set_result(None)
        else:
            s.future.set_exception(s.error)

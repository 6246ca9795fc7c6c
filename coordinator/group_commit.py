"""Group commit: many callers' writes in one database transaction, each caller back only once its
write is durable.

Every streamed chunk records its delivered-token count before it leaves (coordinator/inflight.py);
with one transaction per chunk, 32 streams queue for SQLite's single writer lock and a commit each,
and the coordinator spends its time waiting on that lock. Here whoever finds no transaction running
leads: it writes everything pending in one, then whatever arrived meanwhile in the next, until
nothing is left. Nothing returns before its own write committed, so what a restart settles on is
what it was before, in a few commits instead of one per chunk.

Callers are on an event loop and take no thread while they wait: their leader runs on the
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
    __slots__ = ("item", "future")

    def __init__(self, item: T, future: asyncio.Future):
        self.item, self.future = item, future


class GroupCommit(Generic[T]):
    def __init__(self, write_many: Callable[[list[T]], None]):
        """`write_many(items)`: writes all of them in one transaction, or raises (then every caller
        of that batch gets the error: none of their writes happened)."""
        self._write_many = write_many
        self._lock = threading.Lock()  # callers of several loops may write at once
        self._pending: list[_Slot[T]] = []
        self._writing = False
        self._leader: ThreadPoolExecutor | None = None

    async def write_async(self, item: T) -> None:
        """Returns once `item` is committed, the caller's loop serving meanwhile; raises what its
        batch's write raised."""
        slot = _Slot(item, asyncio.get_running_loop().create_future())
        with self._lock:
            self._pending.append(slot)
            lead, self._writing = not self._writing, True
            if lead and self._leader is None:
                self._leader = ThreadPoolExecutor(1, thread_name_prefix="group-commit")
        if lead:
            self._leader.submit(self._lead)
        await slot.future

    def _lead(self) -> None:
        while True:
            with self._lock:
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
            for s in batch:
                waiting.setdefault(s.future.get_loop(), []).append(s)
            for loop, slots in waiting.items():  # one wake of each loop for all its callers
                try:
                    loop.call_soon_threadsafe(_resolve, slots, error)
                except RuntimeError:  # that loop has closed: nobody waits there any more
                    pass


def _resolve(slots: list[_Slot], error: BaseException | None) -> None:
    for s in slots:
        if s.future.done():  # its caller was cancelled meanwhile
            continue
        if error is None:
            s.future.set_result(None)
        else:
            s.future.set_exception(error)

"""Settlements kept by consumer while they run behind their streams (coordinator/settle_behind.py),
on a real thread pool: each consumer waits for its own, entries go once done, a bound, a drain
that says what it left, and a reader that goes away cancels nothing."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from coordinator.settle_behind import PendingSettlements


def test_a_consumer_waits_for_its_own_settlements_only_and_entries_go_when_done():
    pending = PendingSettlements(max_behind=3)
    gates = {name: threading.Event() for name in ("a1", "a2", "b")}
    with ThreadPoolExecutor(4) as executor:
        for name, gate in gates.items():
            pending.submit(executor, name[0], gate.wait, 30)
        assert len(pending) == 3 and pending.full()
        assert len(pending.of("a")) == 2 and len(pending.of("b")) == 1 and not pending.of("c")

        async def scenario():
            assert await pending.wait("c", 0.01)  # nothing of its own: no wait
            assert not await pending.wait("a", 0.05)  # still running: bounded
            gates["a1"].set()
            gates["a2"].set()
            assert await pending.wait("a", 30)  # b's settlement is still running
            assert not pending.of("a") and len(pending.of("b")) == 1
            assert await pending.drain(0.05) == 1  # left to the next start's recovery
            gates["b"].set()
            assert await pending.drain(30) == 0

        asyncio.run(scenario())
    assert len(pending) == 0 and not pending.full()


def test_a_reader_that_goes_away_does_not_cancel_a_queued_settlement():
    pending = PendingSettlements()
    busy, ran = threading.Event(), threading.Event()
    with ThreadPoolExecutor(1) as executor:
        pending.submit(executor, "a", busy.wait, 30)  # takes the only thread
        queued = pending.submit(executor, "a", ran.set)

        async def reader_leaves():
            reader = asyncio.create_task(pending.wait("a", 30))
            await asyncio.sleep(0.05)
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

        asyncio.run(reader_leaves())
        busy.set()
        queued.result(30)
    assert ran.is_set() and not queued.cancelled()

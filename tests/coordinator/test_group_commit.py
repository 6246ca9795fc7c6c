"""Group commit of the streams' delivery records (coordinator/group_commit.py): many coroutines'
writes (of one loop or several) share transactions, nobody returns before its own write committed, an error
reaches exactly the callers whose writes it lost, and the delivered counts in a real database (SQLite
and PostgreSQL) end as the largest each stream wrote."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from sqlalchemy import create_engine

from ledger.db import resolve_url
from tests.postgres import empty_schema_url

from coordinator import inflight
from coordinator.group_commit import GroupCommit
from wire.messages import Stage


def test_writes_share_transactions_and_return_only_once_committed():
    """32 streams of one event loop commit in a few transactions, each back only once its own write is
    in; the loop runs other work meanwhile."""
    committed: list[int] = []
    batches: list[list[int]] = []

    def write_many(items):
        time.sleep(0.02)  # a commit's fsync: others arrive meanwhile
        batches.append(list(items))
        committed.extend(items)

    group = GroupCommit(write_many)

    async def main():
        ticks = 0

        async def ticker():  # the loop stays free while writes commit
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        async def write(i):
            await group.write_async(i)
            assert i in committed  # back only after its own write is in

        tick = asyncio.create_task(ticker())
        assert await asyncio.gather(*(write(i) for i in range(32))) == [None] * 32
        tick.cancel()
        return ticks

    assert asyncio.run(main()) > 10
    assert sorted(committed) == list(range(32))
    assert len(batches) <= 8 and max(len(b) for b in batches) > 8


def test_a_failed_transaction_fails_every_write_it_held_and_no_other():
    lost: set[int] = set()

    def write_many(items):
        time.sleep(0.01)
        if 3 in items:
            lost.update(items)
            raise OSError("disk full")

    group = GroupCommit(write_many)

    async def main():
        errors = await asyncio.gather(*(group.write_async(i) for i in range(16)), return_exceptions=True)
        await group.write_async(99)  # the next transaction goes on
        return errors

    errors = asyncio.run(main())
    failed = {i for i, e in enumerate(errors) if e is not None}
    assert 3 in failed and failed == lost
    assert all(isinstance(errors[i], OSError) for i in failed)


def test_two_loops_share_the_transactions():
    """Streams of two event loops (two threads) write through one group: every write lands, in
    fewer transactions than writes."""
    committed: list[int] = []
    batches: list[list[int]] = []

    def write_many(items):
        time.sleep(0.02)
        batches.append(list(items))
        committed.extend(items)

    group = GroupCommit(write_many)

    def loop(first: int):
        async def main():
            await asyncio.gather(*(group.write_async(i) for i in range(first, first + 16)))
        asyncio.run(main())

    threads = [threading.Thread(target=loop, args=(first,)) for first in (0, 16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(committed) == list(range(32)) and len(batches) < 32


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    if request.param == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path / 'c.db'}")
        yield engine
    else:
        with empty_schema_url(f"{request.node.name} on PostgreSQL") as url:
            engine = create_engine(resolve_url(url))
            yield engine
    engine.dispose()


def test_delivered_counts_in_a_database_are_the_largest_each_stream_wrote(engine):
    inflight.metadata.create_all(engine)
    store = inflight.InflightStore(engine, engine)
    plan = (Stage("12D3KooWpeer", 0, 30),)
    counts = {f"r{i}": list(range(1, 9)) for i in range(12)}

    async def stream(i):
        rid = f"r{i % 12}"
        for n in counts[rid][i // 12::2]:  # two writers per request, interleaved, out of order between them
            await store.delivered_async(rid, f"hold:{rid}", "m", 5, n, plan)

    async def main():
        await asyncio.gather(*(stream(i) for i in range(24)))

    asyncio.run(main())
    rows = store.all()
    assert {rid: r.delivered_tokens for rid, r in rows.items()} == {rid: 8 for rid in counts}
    assert all(r.hold_id == f"hold:{rid}" and r.plan[0].peer_id == "12D3KooWpeer" for rid, r in rows.items())


def test_streams_record_the_largest_count_in_one_batch(engine):
    """Records of one request in the same transaction (a stream's two chunks, another writer's older
    count) leave its largest count; a new request's row is inserted with everything it carries."""
    inflight.metadata.create_all(engine)
    store = inflight.InflightStore(engine, engine)
    plan = (Stage("12D3KooWpeer", 0, 30, "bfloat16"),)

    async def main():
        writes = [store.delivered_async(f"r{i % 4}", f"hold:r{i % 4}", "m", 5, n, plan)
                  for i, n in enumerate([3, 9, 1, 4, 7, 2, 8, 6, 5, 1, 2, 3, 2])]
        await asyncio.gather(*writes)

    asyncio.run(main())
    rows = store.all()
    assert {rid: r.delivered_tokens for rid, r in rows.items()} == {"r0": 7, "r1": 9, "r2": 8, "r3": 6}
    assert [(s.peer_id, s.start, s.end, s.dtype) for s in rows["r1"].plan] == [("12D3KooWpeer", 0, 30, "bfloat16")]
    assert rows["r1"].prompt_tokens == 5 and rows["r1"].hold_id == "hold:r1" and rows["r1"].model == "m"

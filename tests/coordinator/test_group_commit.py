"""Group commit of the streams' delivery records (coordinator/group_commit.py): many threads' writes
share transactions, nobody returns before its own write committed, an error reaches exactly the
callers whose writes it lost, and the delivered counts in a real database end as the largest each
stream wrote."""

from __future__ import annotations

import threading
import time

from sqlalchemy import create_engine

from coordinator import inflight
from coordinator.group_commit import GroupCommit
from wire.messages import Stage


def run_threads(n: int, fn) -> list[BaseException | None]:
    errors: list[BaseException | None] = [None] * n
    start = threading.Barrier(n)

    def one(i: int):
        start.wait()
        try:
            fn(i)
        except BaseException as exc:
            errors[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_writes_share_transactions_and_return_only_once_committed():
    committed: list[int] = []
    batches: list[list[int]] = []

    def write_many(items):
        time.sleep(0.02)  # a commit's fsync: others arrive meanwhile
        batches.append(list(items))
        committed.extend(items)

    group = GroupCommit(write_many)

    def write(i):
        group.write(i)
        assert i in committed  # back only after its own write is in

    assert run_threads(32, write) == [None] * 32
    assert sorted(committed) == list(range(32))
    assert len(batches) < 32 and max(len(b) for b in batches) > 1


def test_a_failed_transaction_fails_every_write_it_held_and_no_other():
    lost: set[int] = set()

    def write_many(items):
        time.sleep(0.01)
        if 3 in items:
            lost.update(items)
            raise OSError("disk full")

    group = GroupCommit(write_many)
    errors = run_threads(16, group.write)
    failed = {i for i, e in enumerate(errors) if e is not None}
    assert 3 in failed and failed == lost
    assert all(isinstance(errors[i], OSError) for i in failed)
    group.write(99)  # the next transaction goes on


def test_delivered_counts_in_a_database_are_the_largest_each_stream_wrote(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'c.db'}")
    inflight.metadata.create_all(engine)
    store = inflight.InflightStore(engine, engine)
    plan = (Stage("12D3KooWpeer", 0, 30),)
    counts = {f"r{i}": list(range(1, 9)) for i in range(12)}

    def stream(i):
        rid = f"r{i % 12}"
        for n in counts[rid][i // 12::2]:  # two writers per request, interleaved, out of order between them
            store.delivered(rid, f"hold:{rid}", "m", 5, n, plan)

    assert run_threads(24, stream) == [None] * 24
    rows = store.all()
    assert {rid: r.delivered_tokens for rid, r in rows.items()} == {rid: 8 for rid in counts}
    assert all(r.hold_id == f"hold:{rid}" and r.plan[0].peer_id == "12D3KooWpeer" for rid, r in rows.items())



"""Crashes (kill -9 of a writer) and concurrent writers (threads, processes) keep the ledger valid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ledger.db import make_engine, resolve_url
from ledger.reader import LedgerReader
from ledger.service import LedgerService
from ledger.verify import verify

WORKER = str(Path(__file__).with_name("ledger_worker.py"))


def start_worker(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WORKER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(proc: subprocess.Popen, prefix: str) -> str:
    for line in proc.stdout:
        if line.startswith(prefix):
            return line
    raise AssertionError(f"worker exited before printing {prefix!r}: {proc.stderr.read()}")


def restart(db_url, coordinator_key) -> LedgerService:
    return LedgerService(make_engine(resolve_url(db_url)), coordinator_key)


def test_kill_between_hold_and_settle_then_recover(service, db_url, coordinator_key):
    proc = start_worker("hold", db_url)
    try:
        wait_for_line(proc, "HELD")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    report = verify(service.engine)
    assert report.ok, report.error
    assert report.open_holds == 1
    reader = LedgerReader(service.engine)
    assert reader.account("escrow:requests", 0)["balance_units"] == 123_456

    svc = restart(db_url, coordinator_key)  # the coordinator comes back
    recovered = svc.recover()
    assert recovered.voided_holds == ("crash-hold",) and recovered.settled_holds == ()
    assert reader.account("consumer:alice", 0)["balance_units"] == 10_000_000
    assert reader.account("escrow:requests", 0)["balance_units"] == 0
    assert svc.recover().voided_holds == ()  # nothing left open: recover is idempotent
    report = verify(svc.engine)
    assert report.ok and report.open_holds == 0
    svc.close()


def test_recover_settles_holds_whose_receipts_survived(pool, db_url, coordinator_key):
    pool.svc.hold("h", "consumer:alice", 100_000, "r")
    receipt = pool.receipt("peerA", "r", (0, 2), 10)
    svc = restart(db_url, coordinator_key)
    recovered = svc.recover(lambda hold_id, request_id: [receipt] if request_id == "r" else None)
    assert recovered.settled_holds == ("h",)
    assert LedgerReader(svc.engine).account("peerA", 0)["balance_units"] == 10 * 2 * svc.params.gas_price_units_per_layer_token
    assert verify(svc.engine).ok
    svc.close()


def test_kill_mid_stream_of_writes(service, db_url, coordinator_key):
    service.open_account("consumer:shared", "consumer")
    proc = start_worker("churn", db_url, "w", "100000")
    try:
        wait_for_line(proc, "ROUND 20")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    report = verify(service.engine)
    assert report.ok, report.error
    svc = restart(db_url, coordinator_key)
    svc.recover()
    report = verify(svc.engine)
    assert report.ok and report.open_holds == 0, report.error
    svc.close()


def test_concurrent_threads(pool):
    svc = pool.svc
    svc.open_account("consumer:shared", "consumer")
    errors = []

    def work(name: str) -> None:
        try:
            svc.open_account(f"consumer:{name}", "consumer")
            svc.transfer(f"{name}:fund", "consumer:alice", f"consumer:{name}", 100_000)
            for i in range(15):
                svc.transfer(f"{name}:t{i}", f"consumer:{name}", "consumer:shared", 7)
                svc.hold(f"{name}:h{i}", f"consumer:{name}", 5_000, f"{name}:r{i}")
                svc.settle(f"{name}:s{i}", f"{name}:h{i}", [pool.receipt("peerA", f"{name}:r{i}", (0, 2), 3)])
                # A duplicate of the same settlement, racing with the others, pays nothing more.
                assert svc.settle(f"{name}:s{i}", f"{name}:h{i}",
                                  [pool.receipt("peerA", f"{name}:r{i}", (0, 2), 3)]).status == "exists"
        except Exception as exc:  # noqa: BLE001 - collected and re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"th{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    reader = LedgerReader(svc.engine)
    assert reader.account("consumer:shared", 0)["balance_units"] == 4 * 15 * 7
    assert reader.account("peerA", 0)["balance_units"] == 4 * 15 * 3 * 2 * svc.params.gas_price_units_per_layer_token
    report = verify(svc.engine)
    assert report.ok, report.error


def test_same_op_from_many_threads_is_created_once(pool):
    svc = pool.svc
    results, barrier = [], threading.Barrier(6)

    def send() -> None:
        barrier.wait()
        results.append(svc.transfer("the-one", "consumer:alice", "peerB", 1_000).status)

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == ["created"] + ["exists"] * 5
    assert LedgerReader(svc.engine).account("peerB", 0)["balance_units"] == 1_000


@pytest.mark.parametrize("workers", [3])
def test_concurrent_processes(service, db_url, workers):
    service.open_account("consumer:shared", "consumer")
    procs = [start_worker("churn", db_url, f"p{i}", "12") for i in range(workers)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "DONE" in out
    reader = LedgerReader(service.engine)
    assert reader.account("consumer:shared", 0)["balance_units"] == workers * 12 * 3
    report = verify(service.engine)
    assert report.ok, report.error
    assert report.open_holds == 0

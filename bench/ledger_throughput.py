"""Ledger throughput: settlements per second on SQLite and PostgreSQL, and the cost of `ledger verify`.

    python bench/ledger_throughput.py [--postgres URL] [--requests N] [--verify-entries N]

A "settled request" is what the coordinator does per request: hold the quote in escrow, then
settle on two signed stage receipts (stage pay x2, two fees, refund, close): 7 signed entries in
two transactions. The baseline, run in the same process on the same database, is a plain
transfer (1 entry, 1 transaction). Modes: one writer thread, four writer threads, and one writer
grouping 32 requests per commit (`LedgerService.batch()`). PostgreSQL comes from --postgres or $MESHPOOL_TEST_POSTGRES_URL
(scripts/postgres.sh prints one); without it the PostgreSQL rows are skipped. `verify` is timed on
a SQLite ledger of --verify-entries entries (built with group commit) and reported per 100k entries. Writes
bench/ledger_throughput.json next to this file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import threading
import time
import uuid
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine, text

from ledger.chain import public_key_hex
from ledger.db import make_engine, resolve_url
from ledger.receipts import sign_receipt
from ledger.service import LedgerService
from ledger.verify import verify

PROVIDERS = {name: Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32) for i, name in enumerate(["pA", "pB"])}


def fresh_service(url: str, **kwargs) -> LedgerService:
    svc = LedgerService(make_engine(url, **kwargs), Ed25519PrivateKey.generate(), checkpoint_every_entries=1000)
    for name, key in PROVIDERS.items():
        svc.open_account(name, "provider", public_key_hex(key))
    return svc


def consumer(svc: LedgerService, name: str) -> str:
    account = f"consumer:{name}"
    svc.open_account(account, "consumer")
    svc.mint(f"fund:{name}", account, 10**15)
    svc.open_account(f"consumer:{name}-sink", "consumer")
    return account


def receipts_for(request_id: str, tokens: int):
    return [sign_receipt(PROVIDERS["pA"], request_id=request_id, model="bench", layer_start=0, layer_end=12,
                         token_count=tokens, input_hash="aa" * 32, output_hash="bb" * 32, provider_id="pA"),
            sign_receipt(PROVIDERS["pB"], request_id=request_id, model="bench", layer_start=12, layer_end=24,
                         token_count=tokens, input_hash="bb" * 32, output_hash="cc" * 32, provider_id="pB")]


def run_requests(svc: LedgerService, name: str, n: int, batch: int = 1) -> None:
    """n requests: hold, then settle on two receipts; `batch` requests share one commit."""
    account = consumer(svc, name)
    for start in range(0, n, batch):
        with svc.batch() if batch > 1 else _nothing():
            for i in range(start, min(start + batch, n)):
                rid = f"{name}-r{i}"
                svc.hold(f"h:{rid}", account, 1_000_000, rid)
                svc.settle(f"s:{rid}", f"h:{rid}", receipts_for(rid, 100 + i % 100))


def run_transfers(svc: LedgerService, name: str, n: int, batch: int = 1) -> None:
    account = consumer(svc, name)
    for start in range(0, n, batch):
        with svc.batch() if batch > 1 else _nothing():
            for i in range(start, min(start + batch, n)):
                svc.transfer(f"{name}-t{i}", account, f"{account}-sink", 1)


@contextlib.contextmanager
def _nothing():
    yield


def timed(fn, svc: LedgerService, n: int, threads: int, batch: int) -> float:
    """Operations per second of `fn` with `threads` writers, each doing n // threads."""
    per = n // threads
    workers = [threading.Thread(target=fn, args=(svc, f"w{uuid.uuid4().hex[:8]}", per, batch)) for _ in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return per * threads / (time.perf_counter() - start)


MODES = [("1 writer", 1, 1), ("4 threads", 4, 1), ("1 writer, 32/commit", 1, 32)]


def bench_backend(label: str, url: str, n: int) -> list[dict]:
    svc = fresh_service(url)
    rows = []
    for mode, threads, batch in MODES:
        base = timed(run_transfers, svc, n, threads, batch)
        settled = timed(run_requests, svc, n, threads, batch)
        rows.append({"backend": label, "mode": mode, "transfers_per_s": round(base, 1),
                     "settled_requests_per_s": round(settled, 1), "entries_per_s": round(settled * 7, 1),
                     "ratio_vs_transfer": round(settled / base, 3)})
    started = time.perf_counter()
    report = verify(svc.engine)
    elapsed = time.perf_counter() - started
    assert report.ok, report.error
    rows[-1]["verify_s_per_100k_entries"] = round(elapsed * 100_000 / report.entry_count, 2)
    rows[-1]["verify_entries"] = report.entry_count
    svc.close()
    return rows


def bench_verify(entries: int, workdir: Path) -> dict:
    url = resolve_url(str(workdir / "verify.db"))
    svc = fresh_service(url, sqlite_synchronous="NORMAL")  # build fast; verify only reads
    account = consumer(svc, "v")
    i = 0
    while svc_entries(svc) < entries:
        with svc.batch():
            for _ in range(64):
                rid = f"v-r{i}"
                svc.hold(f"h:{rid}", account, 1_000_000, rid)
                svc.settle(f"s:{rid}", f"h:{rid}", receipts_for(rid, 100))
                i += 1
    svc.close()
    reader_engine = make_engine(url, writer=False)
    started = time.perf_counter()
    report = verify(reader_engine)
    elapsed = time.perf_counter() - started
    assert report.ok, report.error
    return {"backend": "sqlite", "verify_entries": report.entry_count, "verify_s": round(elapsed, 2),
            "verify_s_per_100k_entries": round(elapsed * 100_000 / report.entry_count, 2),
            "verify_entries_per_s": round(report.entry_count / elapsed, 1)}


def svc_entries(svc: LedgerService) -> int:
    with svc.engine.connect() as conn:
        return conn.execute(text("SELECT entry_count FROM chain_head")).scalar()


def pg_schema_url(base: str) -> tuple[str, str]:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(resolve_url(base))
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    admin.dispose()
    sep = "&" if "?" in base else "?"
    return resolve_url(f"{base}{sep}options=-csearch_path%3D{schema}"), schema


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default=os.environ.get("MESHPOOL_TEST_POSTGRES_URL"))
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--verify-entries", type=int, default=100_000)
    args = parser.parse_args()
    rows = []
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        rows += bench_backend("sqlite (WAL, synchronous=FULL)", resolve_url(str(Path(tmp) / "bench.db")), args.requests)
        if args.postgres:
            url, schema = pg_schema_url(args.postgres)
            try:
                rows += bench_backend("postgresql (127.0.0.1)", url, args.requests)
            finally:
                admin = create_engine(resolve_url(args.postgres))
                with admin.begin() as conn:
                    conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        verify_row = bench_verify(args.verify_entries, Path(tmp))
    head = f"{'backend':32} {'mode':20} {'transfers/s':>12} {'settled req/s':>14} {'entries/s':>10} {'ratio':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['backend']:32} {r['mode']:20} {r['transfers_per_s']:>12} {r['settled_requests_per_s']:>14} "
              f"{r['entries_per_s']:>10} {r['ratio_vs_transfer']:>6}")
    v = verify_row
    print(f"\nledger verify (SQLite, {v['verify_entries']} entries of settled requests): {v['verify_s']} s = "
          f"{v['verify_s_per_100k_entries']} s per 100k entries ({v['verify_entries_per_s']} entries/s)")
    for r in rows:
        if "verify_s_per_100k_entries" in r:
            print(f"ledger verify ({r['backend']}, {r['verify_entries']} entries, half transfers): "
                  f"{r['verify_s_per_100k_entries']} s per 100k entries")
    load_end = os.getloadavg()[0]
    print(f"(1-minute load average {load_start:.1f} at start, {load_end:.1f} at end, on {os.cpu_count()} CPUs: "
          "other work on the machine skews these figures)")
    out = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                       "load_avg_1m_start": round(load_start, 2), "load_avg_1m_end": round(load_end, 2)},
           "requests_per_row": args.requests, "throughput": rows, "verify": verify_row,
           "notes": ("settled request = hold + settle on 2 receipts = 7 signed entries; ratio = settled req/s / "
                     "transfers/s (the baseline: same process, database and mode); "
                     "32/commit = LedgerService.batch() group commit")}
    Path(__file__).with_name("ledger_throughput.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

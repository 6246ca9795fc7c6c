"""The cost of writing delivered tokens down before they are sent (coordinator/inflight.py).

    python bench/durable_delivery.py [--postgres URL] [--writes N] [--clients N] [--tokens N]

1. Per write, on the ledger's database: `Accounts.delivered` (one row updated in one transaction,
   the same durability as the ledger's: SQLite WAL with synchronous=FULL) against the baseline
   measured in the same run on the same database, the ledger work every request already does
   (hold the quote, then settle on two signed receipts).
2. End to end: the real HTTP app, ledger and tokenizer over a scripted pool that produces a token
   every --token-interval-ms on its own thread (as a driver does), --clients streaming requests
   of --tokens tokens at once; aggregate tokens/s and time to last token with the delivery record
   on, and off (`Accounts.delivered` a no-op) in the same run; and how many writes a request made
   (tokens that arrive together while a write is in flight leave in one chunk, after one write).
PostgreSQL rows need --postgres or $MESHPOOL_TEST_POSTGRES_URL. Writes bench/durable_delivery.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import httpx
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine, text

from coordinator.accounts import Accounts
from coordinator.api import create_app
from ledger.chain import public_key_hex
from ledger.receipts import sign_receipt
from node.models import default_model_dir
from wire.messages import Stage

N_LAYERS = 30
MODEL = "smollm2-135m-instruct"
STAGE_KEYS = [Ed25519PrivateKey.from_private_bytes(bytes([i + 7]) * 32) for i in range(2)]
STAGES = (Stage("pA", 0, 12), Stage("pB", 12, N_LAYERS))


class _Request:
    stages = STAGES


SCHEMAS: list[str] = []  # PostgreSQL schemas made here, dropped at the end


def fresh_url(db: str | None) -> str | None:
    """A new ledger each time (a new coordinator key each time): on PostgreSQL, an empty schema."""
    if not db:
        return None
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with create_engine(db).begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    SCHEMAS.append(schema)
    return f"{db}{'&' if '?' in db else '?'}options={quote(f'-csearch_path={schema}')}"


def drop_schemas(db: str | None) -> None:
    if db and SCHEMAS:
        with create_engine(db).begin() as conn:
            for schema in SCHEMAS:
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))


def open_accounts(root: Path, db: str | None) -> Accounts:
    accounts = Accounts(root / uuid.uuid4().hex[:8], N_LAYERS, db=fresh_url(db))
    for stage, key in zip(STAGES, STAGE_KEYS):
        accounts.ledger.open_account(stage.peer_id, "provider", public_key=public_key_hex(key))
    return accounts


def per_write(root: Path, db: str | None, writes: int) -> dict:
    accounts = open_accounts(root, db)
    try:
        who = accounts.lookup(accounts.add_consumer(f"bench-{uuid.uuid4().hex[:6]}", 10**15))
        n_requests = max(4, writes // 32)
        started = time.perf_counter()
        for i in range(n_requests):  # the baseline: what each request already writes
            charge = accounts.admit(who, f"base-{i}", MODEL, 16, 32)
            receipts = [sign_receipt(key, request_id=charge.request_id, model=MODEL, layer_start=s.start,
                                     layer_end=s.end, token_count=47, input_hash="a" * 64, output_hash="b" * 64,
                                     provider_id=s.peer_id) for s, key in zip(STAGES, STAGE_KEYS)]
            accounts.ledger.settle(f"settle:{charge.request_id}", f"hold:{charge.request_id}", receipts)
        request_ms = (time.perf_counter() - started) * 1000 / n_requests
        charge = accounts.admit(who, "journal", MODEL, 16, writes + 1)
        samples = []

        async def one_stream() -> None:  # each write awaited before the next, as one stream's are
            for n in range(1, writes + 1):
                t = time.perf_counter()
                await accounts.delivered_async(charge, _Request(), n)
                samples.append((time.perf_counter() - t) * 1000)

        asyncio.run(one_stream())
        return {"baseline_request_ledger_ms": round(request_ms, 3), "write_ms_median": round(statistics.median(samples), 3),
                "write_ms_p90": round(sorted(samples)[int(0.9 * len(samples))], 3),
                "write_vs_request_ratio": round(statistics.median(samples) / request_ms, 3), "writes": writes}
    finally:
        accounts.close()


class ScriptedPool:
    """Tokens from a thread, one every `interval_s`, then the stages' receipts (as a driver and its stages do)."""

    def __init__(self, accounts: Accounts, interval_s: float):
        self.accounts, self.interval_s = accounts, interval_s

    def submit(self, request) -> None:
        request.start_attempt(STAGES)
        threading.Thread(target=self._run, args=(request,), daemon=True).start()

    def _run(self, request) -> None:
        for i in range(request.max_new_tokens):
            if request.done.is_set():
                break
            time.sleep(self.interval_s)
            request.add_token(100 + i % 50)
        request.finish()

    def snapshot(self) -> dict:
        return {"providers": [], "pipelines": [], "pending_requests": 0, "plan_error": ""}


def end_to_end(root: Path, db: str | None, tokenizer, clients: int, tokens: int, interval_s: float,
               record: bool) -> dict:
    accounts = open_accounts(root, db)
    writes = [0]
    real = accounts.inflight.delivered

    def counted(*args):
        writes[0] += 1
        real(*args)

    accounts.inflight.delivered = counted if record else (lambda *args: None)
    accounts.receipts.collect = lambda request, model, timeout_s=0: []  # no receipts: the holds void at once
    app = create_app(ScriptedPool(accounts, interval_s), tokenizer, MODEL, 4096, (), accounts, rate_limit_rps=0)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    key = accounts.add_consumer(f"bench-{uuid.uuid4().hex[:6]}", 10**15)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/completions"

    async def one(client: httpx.AsyncClient) -> float:
        body = {"model": MODEL, "prompt": "Hello there", "max_tokens": tokens, "stream": True}
        async with client.stream("POST", url, json=body, headers={"Authorization": f"Bearer {key}"}) as r:
            async for _ in r.aiter_lines():
                pass
        return time.perf_counter()

    async def run() -> tuple[float, list[float]]:
        async with httpx.AsyncClient(timeout=300) as client:
            started = time.perf_counter()
            ends = await asyncio.gather(*[one(client) for _ in range(clients)])
        return started, [e - started for e in ends]

    try:
        started, ends = asyncio.run(run())
        wall = max(ends)
        return {"record": record, "tokens_per_s": round(clients * tokens / wall, 1),
                "time_to_last_token_s": round(statistics.median(ends), 3),
                "writes_per_request": round(writes[0] / clients, 1)}
    finally:
        server.should_exit = True
        thread.join(10)
        accounts.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default=os.environ.get("MESHPOOL_TEST_POSTGRES_URL"))
    parser.add_argument("--writes", type=int, default=400)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--token-interval-ms", type=float, default=20.0)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    dbs = {"sqlite": None, **({"postgresql": args.postgres} if args.postgres else {})}
    out = {"host": platform.node(), "cpus": os.cpu_count(), "note": "measured on a shared machine, under contention",
           "per_write": {}, "end_to_end": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, db in dbs.items():
            out["per_write"][name] = w = per_write(root, db, args.writes)
            print(f"{name:10} per request (hold + settle) {w['baseline_request_ledger_ms']:8.2f} ms | delivery write "
                  f"median {w['write_ms_median']:.2f} ms, p90 {w['write_ms_p90']:.2f} ms "
                  f"(x{w['write_vs_request_ratio']} of a request's ledger work)")
            for interval_ms in (args.token_interval_ms, 0.0):
                rows = [end_to_end(root, db, tokenizer, args.clients, args.tokens, interval_ms / 1000, record)
                        for record in (False, True)]
                off, on = rows
                key = f"{name}_interval_{interval_ms:g}ms"
                out["end_to_end"][key] = {"off": off, "on": on,
                                          "tokens_per_s_ratio": round(on["tokens_per_s"] / off["tokens_per_s"], 3)}
                print(f"{name:10} {args.clients} streams x {args.tokens} tokens, a token every {interval_ms:g} ms: "
                      f"{off['tokens_per_s']:8.1f} tok/s without the record, {on['tokens_per_s']:8.1f} with "
                      f"(x{out['end_to_end'][key]['tokens_per_s_ratio']}), {on['writes_per_request']} writes a request")
    drop_schemas(args.postgres)
    Path(__file__).with_name("durable_delivery.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

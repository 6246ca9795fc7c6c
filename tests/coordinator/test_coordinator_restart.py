"""`kill -9` of the coordinator mid-stream, then `coordinator serve` again on the same data directory
(SQLite, and PostgreSQL through `--db` when the test server is set): the consumer is charged
exactly the tokens it had been sent, each stage is paid its gas for them, credits are conserved,
`ledger verify` passes, and a second restart changes nothing. The public ledger names the
consumer only by its pseudonym; with its key it sees its own request."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor


from contracts import DEFAULT_PARAMS
from contracts.pricing import gas_units, quote
from coordinator.inflight import InflightStore
from coordinator.local_pool import LocalPool
from ledger.db import make_engine, resolve_url

MODEL = "smollm2-135m-instruct"
N_LAYERS = 30
CREDITS = 10**12
NAME = "alice-the-consumer"
TWO_STAGE_CAP_MB = 500  # neither provider holds the whole model: one pipeline of two stages
CHUNKS_BEFORE_KILL = 4


def get(pool: LocalPool, path: str, key: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(pool.api + path, headers=headers), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def stream_until_killed(pool: LocalPool, key: str) -> tuple[str, int]:
    """Stream a long completion; kill -9 the coordinator after a few chunks; read what still comes.
    Returns the request id and the number of content chunks the client got."""
    url = urllib.parse.urlparse(pool.api)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    body = {"model": MODEL, "prompt": "Count from one to a thousand: one, two, three,", "max_tokens": 300,
            "temperature": 0, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    response = conn.getresponse()
    assert response.status == 200
    request_id, chunks = "", 0
    try:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            request_id = chunk["id"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                chunks += 1
                if chunks == CHUNKS_BEFORE_KILL:
                    pool.coordinator.popen.kill()  # kill -9: no settlement, no goodbye
                    pool.coordinator.popen.wait(timeout=30)
            assert chunk["choices"] == [] or chunk["choices"][0]["finish_reason"] is None, "it ended before the kill"
    except (http.client.HTTPException, OSError):
        pass  # the connection died with the coordinator
    conn.close()
    assert chunks >= CHUNKS_BEFORE_KILL and pool.coordinator.popen.poll() is not None
    return request_id, chunks


def restart(pool: LocalPool) -> None:
    if pool.coordinator.popen.poll() is None:
        pool.coordinator.popen.kill()
        pool.coordinator.popen.wait(timeout=30)
    pool.start_coordinator()  # the same command, the same data directory


def money(pool: LocalPool, key: str, peers: list[str]) -> dict:
    _, me = get(pool, "/v1/account", key)
    me = json.loads(me)
    return {"consumer": (me["balance_units"], me["held_units"], me["spent_units"]),
            **{p: json.loads(get(pool, f"/ledger/accounts/{p}")[1])["balance_units"] for p in peers},
            "entries": json.loads(get(pool, "/ledger/supply")[1])["entry_count"]}


def test_a_killed_coordinator_settles_what_it_delivered_at_its_next_start(tmp_path, db, default_model_dir):
    pool = LocalPool(tmp_path / "pool", coordinator_args=["--rate-limit-rps", "0", *(["--db", db] if db else [])])
    data_dir = pool.root / "coordinator"
    try:
        pool.start_coordinator()
        with ThreadPoolExecutor(3) as starting:  # the processes start side by side: the test waits less
            providers = [starting.submit(pool.add_provider, f"provider{i}", max_memory_mb=TWO_STAGE_CAP_MB)
                         for i in range(2)]
            consumer = starting.submit(pool.add_consumer, NAME, CREDITS)
            peers, key = [p.result() for p in providers], consumer.result()
        pool.wait_for(lambda s: s["pipelines"] and len(s["pipelines"][0]["stages"]) == 2, 180, "2 stages")
        request_id, chunks = stream_until_killed(pool, key)

        engine = make_engine(resolve_url(db, data_dir), writer=False)
        row = InflightStore(engine, engine).get(request_id)  # what the dead coordinator had written down
        engine.dispose()
        assert row is not None and chunks <= row.delivered_tokens < 300
        assert sorted(s.peer_id for s in row.plan) == sorted(peers)

        restart(pool)
        n = row.prompt_tokens + row.delivered_tokens - 1  # what each stage processed for them
        status, op = get(pool, f"/ledger/ops/recover:hold:{request_id}")
        assert status == 200 and json.loads(op)["entries"][-1]["meta"]["basis"] == "plan"
        after = money(pool, key, peers)
        balance, held, spent = after["consumer"]
        assert spent == quote(n, 0, N_LAYERS, DEFAULT_PARAMS).total_units  # exactly the delivered tokens
        assert held == 0 and balance + held + spent == CREDITS  # conserved
        for stage in row.plan:  # each stage paid its gas for them (they had earned nothing before)
            assert after[stage.peer_id] == gas_units(n, stage.end - stage.start, DEFAULT_PARAMS)
        _, me = get(pool, "/v1/account", key)
        [usage] = json.loads(me)["recent_usage"]
        assert (usage["request_id"], usage["completion_tokens"], usage["cost_units"]) == (
            request_id, row.delivered_tokens, spent)

        # auditors see money, not people: no public ledger route names the consumer
        account_id = json.loads(me)["account_id"]
        assert NAME not in account_id
        for path in ("/ledger/entries?limit=1000", f"/ledger/accounts/{account_id}", "/ledger/supply",
                     f"/ledger/ops/hold:{request_id}", f"/ledger/ops/recover:hold:{request_id}",
                     "/ledger/checkpoints", "/dashboard/state", "/pool"):
            status, body = get(pool, path)
            assert status == 200 and NAME.encode() not in body, path
        assert get(pool, "/ledger/me")[0] == 401
        status, mine = get(pool, "/ledger/me", key)
        mine = json.loads(mine)
        assert status == 200 and mine["id"] == account_id and mine["name"] == NAME
        assert any(e["op_id"] == f"hold:{request_id}" for e in mine["recent_entries"])

        restart(pool)  # a second start: nothing left to settle, nothing moves
        assert money(pool, key, peers) == after
    finally:
        pool.stop()
    done = subprocess.run([sys.executable, "-m", "ledger.cli", "verify", "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ledger verify: OK" in done.stdout, done.stdout + done.stderr

"""The bank test: many consumers paying a real pool while providers die, then an offline audit.

50 consumers send 40 requests each, all at once, to `coordinator serve` with four `provider join`
processes; twice during the run a random provider is killed with SIGKILL (and a fresh one joins).
Afterwards every hold is resolved, `ledger verify` replays the log from genesis and passes, supply
is exactly what was minted, each consumer's credits are balance + spent, and the stages that did
the work were paid on their signed receipts.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import subprocess
import sys
import threading
import time
import urllib.request

from contracts import DEFAULT_PARAMS
from contracts.stakes import required_stake_units
from coordinator.accounts import Accounts
from coordinator.local_pool import LocalPool

MODEL = "smollm2-135m-instruct"
CONSUMERS, REQUESTS_EACH, CREDITS = 50, 40, 10**8
HALF_MODEL_MB = 480


def test_bank(tmp_path):
    pool = LocalPool(tmp_path / "pool", coordinator_args=["--rate-limit-rps", "0"])
    rng = random.Random(7)
    try:
        pool.start_coordinator()
        for i in range(4):
            pool.add_provider(f"p{i}", HALF_MODEL_MB)
        pool.wait_for_pipelines(2)
        accounts = Accounts(pool.root / "coordinator")  # as `coordinator consumer add` does, 50 times
        try:
            keys = [accounts.add_consumer(f"c{i}", CREDITS) for i in range(CONSUMERS)]
        finally:
            accounts.close()

        done, statuses, lock = [0], [], threading.Lock()

        def consumer(key: str, index: int) -> None:
            for j in range(REQUESTS_EACH):
                body = {"model": MODEL, "prompt": f"Count to {index + j}:", "max_tokens": 1 + (index + j) % 4}
                if j % 3 == 0:
                    body |= {"temperature": 0.7, "seed": index * 100 + j}
                status, _ = pool.post("/v1/completions", body, api_key=key, timeout_s=600)
                with lock:
                    done[0] += 1
                    statuses.append(status)

        with concurrent.futures.ThreadPoolExecutor(CONSUMERS) as executor:
            futures = [executor.submit(consumer, key, i) for i, key in enumerate(keys)]
            for n, at in enumerate((0.25, 0.6)):
                while done[0] < at * CONSUMERS * REQUESTS_EACH and not all(f.done() for f in futures):
                    time.sleep(0.2)
                victim = rng.choice(sorted(pool.providers))
                pool.kill(victim)  # kill -9, mid-traffic
                pool.add_provider(f"fresh{n}", HALF_MODEL_MB)
            for f in futures:
                f.result()
        assert len(statuses) == CONSUMERS * REQUESTS_EACH
        assert set(statuses) <= {200, 503} and statuses.count(200) >= 0.95 * len(statuses), \
            {s: statuses.count(s) for s in set(statuses)}

        deadline = time.monotonic() + 120  # settlements finish after the responses
        while pool.get("/ledger/supply")["open_holds"] and time.monotonic() < deadline:
            time.sleep(0.5)
        supply = pool.get("/ledger/supply")
        assert supply["open_holds"] == 0 and supply["escrow_requests_units"] == 0
        # minted: the consumers' credits and the operator-funded stake of each of the 6 vouched providers
        minted = CONSUMERS * CREDITS + 6 * required_stake_units(DEFAULT_PARAMS)
        assert supply["minted_units"] == minted and supply["burned_units"] == 0
        assert supply["sum_of_balances_units"] == supply["supply_units"] == minted
        spent = 0
        for key in keys:
            request = urllib.request.Request(pool.api + "/v1/account", headers={"Authorization": f"Bearer {key}"})
            with urllib.request.urlopen(request, timeout=30) as response:
                a = json.loads(response.read())
            assert a["held_units"] == 0 and a["balance_units"] + a["spent_units"] == CREDITS, a
            assert a["requests"] == REQUESTS_EACH
            spent += a["spent_units"]
        assert spent > 0
        paid = [e for e in _entries(pool) if e["kind"] == "release" and e["meta"].get("role") == "stage"]
        assert len({e["credit"] for e in paid}) >= 4  # the stages that worked, the killed ones included
        assert sum(e["amount_units"] for e in paid) < spent  # fees and gas, out of what consumers paid
    finally:
        pool.stop()
    verify = subprocess.run([sys.executable, "-m", "ledger.cli", "verify", "--data-dir", str(pool.root / "coordinator")],
                            capture_output=True, text=True, timeout=600)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "OK" in verify.stdout


def _entries(pool) -> list[dict]:
    found, after = [], -1
    while True:
        page = pool.get(f"/ledger/entries?after={after}&limit=1000")
        if not page["entries"]:
            return found
        found += page["entries"]
        after = page["next_after"]

"""The pool on PostgreSQL, run the way an operator runs it: `coordinator serve --db URL`, consumers
added with `coordinator consumer add` (relying on the URL the data directory remembers, and once
with `--db`), completions served and paid through /v1/completions, `ledger verify` on that database.
Nothing of the money lands in a SQLite file of the data directory."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
import urllib.request

import pytest

from contracts import DEFAULT_PARAMS
from contracts.stakes import required_stake_units
from coordinator.local_pool import LocalPool
from ledger.db import URL_FILE
from tests.postgres import empty_schema_url

MODEL = "smollm2-135m-instruct"
CREDITS = 10**9


@pytest.fixture
def pg_url():
    """A URL for an empty schema of the test server (search_path in the URL), dropped afterwards."""
    with empty_schema_url("a pool on PostgreSQL") as url:
        yield url


def account(pool: LocalPool, key: str) -> dict:
    request = urllib.request.Request(pool.api + "/v1/account", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_a_pool_on_postgresql_takes_consumers_serves_and_pays(tmp_path, pg_url, default_model_dir):
    pool = LocalPool(tmp_path / "pool", coordinator_args=["--db", pg_url, "--rate-limit-rps", "0"])
    data_dir = pool.root / "coordinator"
    try:
        pool.start_coordinator()
        assert stat.S_IMODE((data_dir / URL_FILE).stat().st_mode) == 0o600
        pool.add_provider("provider0")  # the whole model: one stage
        pool.wait_for_pipelines(1)
        keys = {"bar": pool.add_consumer("bar", CREDITS),  # no --db: the data directory's URL
                "baz": pool.add_consumer("baz", CREDITS, db=pg_url)}
        for name, key in keys.items():
            status, body = pool.post("/v1/completions", {"model": MODEL, "prompt": f"Hello {name},",
                                                         "max_tokens": 6, "temperature": 0}, api_key=key)
            assert status == 200, body
            assert body["usage"]["completion_tokens"] == 6
        deadline = time.monotonic() + 60
        while pool.get("/ledger/supply")["open_holds"] and time.monotonic() < deadline:
            time.sleep(0.2)
        supply = pool.get("/ledger/supply")
        # the consumers' credits and the stake the coordinator locked for the vouched provider
        assert supply["open_holds"] == 0 and supply["supply_units"] == 2 * CREDITS + required_stake_units(DEFAULT_PARAMS)
        bar_account = account(pool, keys["bar"])["account_id"]  # a pseudonym: the ledger never holds "bar"
        assert "bar" not in bar_account
        for key in keys.values():
            a = account(pool, key)
            assert a["held_units"] == 0 and 0 < a["spent_units"] and a["balance_units"] + a["spent_units"] == CREDITS
            assert [u["cost_units"] for u in a["recent_usage"]] == [a["spent_units"]]
        # the money is all in PostgreSQL: no SQLite ledger, no key file in the data directory
        assert not (data_dir / "ledger.db").exists() and not (data_dir / "api_keys.db").exists()
    finally:
        pool.stop()
    done = subprocess.run([sys.executable, "-m", "ledger.cli", "verify", "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ledger verify: OK" in done.stdout, done.stdout + done.stderr
    done = subprocess.run([sys.executable, "-m", "ledger.cli", "account", bar_account, "--json", "--db", pg_url],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and '"balance_units"' in done.stdout, done.stderr

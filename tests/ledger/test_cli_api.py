"""Auditor interfaces: the `ledger` CLI subcommands and the read-only HTTP router."""

from __future__ import annotations

import json
import subprocess
import sys

from fastapi import FastAPI
from fastapi.testclient import TestClient

from ledger import cli, merkle
from ledger.api import make_router
from ledger.reader import LedgerReader


def funded(pool):
    svc = pool.svc
    svc.hold("h1", "consumer:alice", 100_000, "r1")
    svc.settle("s1", "h1", [pool.receipt("peerA", "r1", (0, 4), 20)])
    svc.slash("sl1", "peerA", 50, "late and wrong", {"audit_id": "a9"})
    svc.checkpoint()
    return svc


def test_cli_commands(pool, db_url, capsys):
    funded(pool)
    assert cli.main(["account", "peerA", "--db", db_url, "--json"]) == 0
    account = json.loads(capsys.readouterr().out)
    assert account["balance_units"] == 800 - 50 and account["slashed_units"] == 50 and account["may_serve"] is False
    assert cli.main(["tx", "s1", "--db", db_url, "--json"]) == 0
    op = json.loads(capsys.readouterr().out)
    assert op["entries"][-1]["kind"] == "close" and op["receipts"][0]["token_count"] == 20
    assert cli.main(["tx", "nope", "--db", db_url]) == 1
    capsys.readouterr()
    assert cli.main(["supply", "--db", db_url, "--json"]) == 0
    supply = json.loads(capsys.readouterr().out)
    assert supply["supply_units"] == supply["sum_of_balances_units"] == 10_000_000
    assert cli.main(["export", "--db", db_url]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    kinds = {r["type"] for r in records}
    assert kinds == {"entry", "receipt", "checkpoint"}
    assert [r["seq"] for r in records if r["type"] == "entry"] == list(range(supply["entry_count"]))
    assert cli.main(["checkpoints", "--db", db_url, "--json"]) == 0
    checkpoints = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert checkpoints and checkpoints[-1]["entry_count"] == supply["entry_count"]
    assert cli.main(["verify", "--db", db_url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_cli_tables_by_default(pool, db_url, capsys):
    """Without --json an auditor reads tables: the same figures, aligned, nothing to parse."""
    funded(pool)
    assert cli.main(["account", "peerA", "--db", db_url]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["account", "peerA"] and "slashed" in out and "may serve" in out
    assert [line.split()[:2] for line in lines if line.startswith(("balance", "slashed "))] == [["balance", "750"],
                                                                                             ["slashed", "50"]]
    header = next(line for line in lines if line.startswith("seq"))
    assert header.split()[:4] == ["seq", "time", "(UTC)", "op"] and "penalty" in out
    assert cli.main(["tx", "s1", "--db", db_url]) == 0
    out = capsys.readouterr().out
    assert out.startswith("operation s1:") and "receipts (1)" in out and "[0, 4)" in out and "close" in out
    assert cli.main(["supply", "--db", db_url]) == 0
    out = capsys.readouterr().out
    assert "10,000,000" in out and "head hash" in out and not out.lstrip().startswith("{")
    assert cli.main(["checkpoints", "--db", db_url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["entries", "time"] and set(out[1]) <= {"-", " "} and len(out) >= 3


def test_cli_data_dir_and_console_script(tmp_path, coordinator_key):
    from ledger.service import LedgerService
    svc = LedgerService.open(coordinator_key, data_dir=tmp_path)
    svc.open_account("consumer:c", "consumer")
    svc.close()
    assert (tmp_path / "ledger.db").exists()
    out = subprocess.run([sys.executable, "-m", "ledger.cli", "verify", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "OK" in out.stdout
    missing = subprocess.run([sys.executable, "-m", "ledger.cli", "verify", "--data-dir", str(tmp_path / "none")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2


def test_http_router(pool):
    svc = funded(pool)
    app = FastAPI()
    app.include_router(make_router(LedgerReader(svc.engine)))
    client = TestClient(app)
    account = client.get("/ledger/accounts/peerA").json()
    assert {"balance_units", "stake_units", "reputation", "slashed_units", "may_serve", "recent_entries"} <= set(account)
    assert account["slashed_units"] == 50 and account["recent_entries"][0]["kind"] == "penalty"
    assert client.get("/ledger/accounts/nobody").status_code == 404
    page = client.get("/ledger/entries", params={"after": 3, "limit": 2}).json()
    assert [e["seq"] for e in page["entries"]] == [4, 5] and page["next_after"] == 5
    assert client.get("/ledger/entries", params={"limit": 5000}).status_code == 422
    cps = client.get("/ledger/checkpoints").json()["checkpoints"]
    assert cps and cps[-1]["entry_count"] == client.get("/ledger/supply").json()["entry_count"]
    assert client.get("/ledger/ops/s1").json()["receipts"]
    # An auditor checks one entry against a signed checkpoint without replaying the log.
    size = cps[-1]["entry_count"]
    proof = client.get("/ledger/proofs/inclusion", params={"seq": 7, "tree_size": size}).json()
    assert proof["tree_root"] == cps[-1]["tree_root"]
    assert merkle.verify_inclusion(bytes.fromhex(proof["leaf_hash"]), 7, size,
                                   [bytes.fromhex(p) for p in proof["proof"]], bytes.fromhex(cps[-1]["tree_root"]))
    first = cps[0]
    cons = client.get("/ledger/proofs/consistency", params={"first": first["entry_count"], "second": size}).json()
    assert merkle.verify_consistency(first["entry_count"], size, bytes.fromhex(first["tree_root"]),
                                     bytes.fromhex(cps[-1]["tree_root"]), [bytes.fromhex(p) for p in cons["proof"]])
    assert client.get("/ledger/proofs/inclusion", params={"seq": size, "tree_size": size}).status_code == 400

"""Tamper evidence: any change to the stored log or state makes `ledger verify` fail, naming the entry."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text

from ledger import cli
from ledger.chain import sign_hash
from ledger.reader import LedgerReader
from ledger.verify import verify


@pytest.fixture
def busy(pool):
    """A ledger with settlements, a void, a stake, a slash and an audit; returns (service, op seqs)."""
    svc = pool.svc
    for i in range(3):
        svc.hold(f"h{i}", "consumer:alice", 200_000, f"r{i}")
        svc.settle(f"s{i}", f"h{i}", [pool.receipt("peerA", f"r{i}", (0, 6), 40 + i),
                                      pool.receipt("peerB", f"r{i}", (6, 12), 40 + i)])
    svc.hold("h9", "consumer:alice", 1_000, "r9")
    svc.void("v9", "h9", "abandoned")
    svc.transfer("t1", "consumer:alice", "peerC", 777)
    svc.lock_stake("st", "peerC", 700)
    svc.slash("sl", "peerC", 100, "bad output", {"audit": "x"})
    svc.record_audit("au", audit_id="a1", verifier_id="peerB", subject_id="peerA", verifier_agreed=True,
                     subject_passed=True, fee_units=5)
    svc.hold("h-open", "consumer:alice", 3_000, "r-open")  # left open
    report = verify(svc.engine)
    assert report.ok, report.error
    return svc


def sql(svc, statement: str, **params) -> None:
    with svc.engine.begin() as conn:
        conn.execute(text(statement), params)


def seq_of(svc, op_id: str, leg: int = 0) -> int:
    with svc.engine.connect() as conn:
        return conn.execute(text("SELECT seq FROM entries WHERE op_id = :o AND leg = :l"), {"o": op_id, "l": leg}).scalar()


def close_seq(svc, op_id: str) -> int:
    with svc.engine.connect() as conn:
        return conn.execute(text("SELECT seq FROM entries WHERE op_id = :o AND kind = 'close'"), {"o": op_id}).scalar()


def assert_fails_at(svc, seq: int | None, needle: str = "") -> None:
    report = verify(svc.engine)
    assert not report.ok
    assert report.first_bad_seq == seq, report.error
    assert needle in report.error


def test_altered_amount(busy):
    seq = seq_of(busy, "t1")
    sql(busy, "UPDATE entries SET amount_units = amount_units + 1 WHERE seq = :s", s=seq)
    assert_fails_at(busy, seq, "hash")


def test_altered_amount_with_matching_state_rows(busy):
    """Changing the entry and the balances together still breaks the entry hash."""
    seq = seq_of(busy, "t1")
    sql(busy, "UPDATE entries SET amount_units = 707 WHERE seq = :s", s=seq)
    sql(busy, "UPDATE accounts SET balance_units = balance_units + 70 WHERE id = 'consumer:alice'")
    sql(busy, "UPDATE accounts SET balance_units = balance_units - 70 WHERE id = 'peerC'")
    assert_fails_at(busy, seq)


def test_altered_account(busy):
    seq = seq_of(busy, "s1", 1)
    sql(busy, "UPDATE entries SET credit_id = 'peerC' WHERE seq = :s", s=seq)
    assert_fails_at(busy, seq)


def test_rehashed_but_unsigned_change_fails_on_signature(busy):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from ledger.chain import Entry
    seq = seq_of(busy, "t1")
    row = LedgerReader(busy.engine).entries(after=seq - 1, limit=1)[0]
    forged = Entry(seq, row["op_id"], row["leg"], row["kind"], row["debit"], row["credit"], 1, row["ref"],
                   row["meta"], row["ts_ms"], row["prev_hash"])
    h = forged.hash()
    sql(busy, "UPDATE entries SET amount_units = 1, entry_hash = :h, signature = :sig WHERE seq = :s",
        h=h.hex(), sig=sign_hash(Ed25519PrivateKey.generate(), h).hex(), s=seq)
    assert_fails_at(busy, seq, "signature")


def test_swapped_entries(busy):
    a, b = seq_of(busy, "t1"), seq_of(busy, "st")
    sql(busy, "UPDATE entries SET seq = -1 WHERE seq = :a", a=a)
    sql(busy, "UPDATE entries SET seq = :a WHERE seq = :b", a=a, b=b)
    sql(busy, "UPDATE entries SET seq = :b WHERE seq = -1", b=b)
    assert_fails_at(busy, a, "previous-hash")


def test_deleted_entry(busy):
    seq = seq_of(busy, "t1")
    sql(busy, "DELETE FROM entries WHERE seq = :s", s=seq)
    assert_fails_at(busy, seq, "missing")


def test_truncated_tail_is_caught_by_checkpoints_and_head(busy):
    busy.checkpoint()
    sql(busy, "DELETE FROM entries WHERE seq >= (SELECT MAX(seq) FROM entries) - 1")
    report = verify(busy.engine)
    assert not report.ok and ("removed" in report.error or "differs" in report.error)


def test_altered_meta(busy):
    seq = seq_of(busy, "sl", 0)
    with busy.engine.connect() as conn:
        meta = json.loads(conn.execute(text("SELECT meta_json FROM entries WHERE seq = :s"), {"s": seq}).scalar())
    meta["peer"] = "peerB"
    sql(busy, "UPDATE entries SET meta_json = :m WHERE seq = :s", m=json.dumps(meta, sort_keys=True, separators=(",", ":")), s=seq)
    assert_fails_at(busy, seq, "hash")


def test_altered_balance_row(busy):
    sql(busy, "UPDATE accounts SET balance_units = balance_units + 1 WHERE id = 'peerA'")
    assert_fails_at(busy, None, "accounts table")


def test_altered_hold_row(busy):
    sql(busy, "UPDATE holds SET status = 'voided' WHERE id = 'h-open'")
    assert_fails_at(busy, None, "holds table")


def test_altered_receipt(busy):
    with busy.engine.connect() as conn:
        body = json.loads(conn.execute(text("SELECT body_json FROM receipts WHERE op_id = 's1' AND stage_index = 0")).scalar())
    body["token_count"] += 1
    sql(busy, "UPDATE receipts SET body_json = :b WHERE op_id = 's1' AND stage_index = 0", b=json.dumps(body))
    assert_fails_at(busy, close_seq(busy, "s1"), "receipts")


def test_deleted_receipt(busy):
    sql(busy, "DELETE FROM receipts WHERE op_id = 's2' AND stage_index = 1")
    assert_fails_at(busy, close_seq(busy, "s2"), "receipts")


def test_altered_checkpoint(busy):
    sql(busy, "UPDATE checkpoints SET tree_root = :r WHERE entry_count = (SELECT MIN(entry_count) FROM checkpoints)",
        r="ab" * 32)
    report = verify(busy.engine)
    assert not report.ok and "checkpoint" in report.error


def test_pinned_key(busy):
    assert verify(busy.engine, expected_public_key=busy.public_key).ok
    report = verify(busy.engine, expected_public_key="00" * 32)
    assert not report.ok and report.first_bad_seq == 0


def test_cli_verify_exit_codes(busy, db_url, capsys):
    assert cli.main(["verify", "--db", db_url]) == 0
    assert "OK" in capsys.readouterr().out
    seq = seq_of(busy, "t1")
    sql(busy, "UPDATE entries SET debit_id = 'peerB' WHERE seq = :s", s=seq)
    assert cli.main(["verify", "--db", db_url]) == 1
    assert f"FAILED at entry {seq}" in capsys.readouterr().err


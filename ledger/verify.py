"""`ledger verify`: replay the log from genesis, offline, and check everything.

Checked, in log order: contiguous sequence numbers; canonical meta; each entry's hash and its link
to the previous one; the coordinator's signature (key from the genesis entry, or pinned); op legs
numbered 0..n-1 with the op's digest on leg 0 and no op id used twice; every rule of `state.apply`
(no negative balance, no zero or overflowing amount...); every settlement re-derived from its
stored, signed receipts (or, for one settled on the coordinator's recorded plan after a crash, from
that plan); every checkpoint's signature and tree head. At the end: the stored
accounts, holds and chain head equal the replay, sum of balances = minted - burned, escrow holds
exactly the open holds and the stakes. The first failure is reported with its entry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.engine import Engine

from contracts import MoneyParams
from ledger import merkle
from ledger.chain import (ZERO_HASH, CheckpointBody, Entry, canonical_json, public_key_from_hex,
                          verify_hash_signature)
from ledger.errors import LedgerError
from ledger.legs import check_receipts, plan_from_items, plan_settlement_legs, settlement_legs
from ledger.models import chain_head, checkpoints, entries, holds, receipts
from ledger.receipts import StageReceipt, receipts_digest
from ledger.state import ESCROW_REQUESTS, ESCROW_STAKES, OPEN, POSTED, HoldState, MemoryView, apply
from ledger.store import account_columns, account_from_row, hold_from_row

CHUNK_ROWS = 5000


class Bad(Exception):
    def __init__(self, message: str, seq: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq


@dataclass
class VerifyReport:
    ok: bool
    entry_count: int = 0
    first_bad_seq: int | None = None
    error: str | None = None
    head_hash: str = ZERO_HASH
    tree_root: str = merkle.EMPTY_ROOT.hex()
    minted_units: int = 0
    burned_units: int = 0
    accounts: int = 0
    open_holds: int = 0
    checkpoints_checked: int = 0
    public_key: str | None = None
    warnings: list[str] = field(default_factory=list)


def verify(engine: Engine, *, expected_public_key: str | None = None) -> VerifyReport:
    """Replay the whole ledger in `engine` in one read snapshot; never raises for bad data, reports it."""
    report = VerifyReport(ok=False)
    replay = _Replay(report, expected_public_key)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                replay.run(conn)
        report.ok = True
    except Bad as bad:
        report.error, report.first_bad_seq = str(bad), bad.seq
    return report


class _Replay:
    def __init__(self, report: VerifyReport, expected_public_key: str | None) -> None:
        self.report = report
        self.pinned = expected_public_key
        self.view = MemoryView()
        self.params: MoneyParams | None = None
        self.public_key = None
        self.frontier: list[bytes] = []
        self.seen_ops: set[str] = set()
        self.op: list[Entry] = []

    def run(self, conn) -> None:
        cps = {row["entry_count"]: row for row in conn.execute(select(checkpoints)).mappings()}
        # Receipts are inserted under the append lock, so their ids follow the order of the settlements.
        self.receipt_rows = iter(conn.execution_options(stream_results=True, yield_per=CHUNK_ROWS).execute(
            select(receipts).order_by(receipts.c.id)).mappings())
        self.pending_receipt = next(self.receipt_rows, None)
        prev, seq = ZERO_HASH, 0
        if 0 in cps:
            self._checkpoint(cps.pop(0), 0, prev)
        result = conn.execution_options(stream_results=True, yield_per=CHUNK_ROWS).execute(
            select(entries).order_by(entries.c.seq))
        for row in result.mappings():
            prev = self._entry(row, seq, prev)
            seq += 1
            if seq in cps:
                self._checkpoint(cps.pop(seq), seq, prev)
        self._finish_op()
        self.report.entry_count, self.report.head_hash = seq, prev
        self.report.tree_root = merkle.frontier_root(self.frontier).hex()
        if seq == 0:
            raise Bad("the ledger is empty: no genesis entry")
        if cps:
            raise Bad(f"checkpoint at {min(cps)} entries but the log has only {seq}: entries were removed")
        if self.pending_receipt is not None:
            raise Bad(f"receipt row {self.pending_receipt['id']} (op {self.pending_receipt['op_id']!r}) "
                      "belongs to no settlement")
        self._final_state(conn)

    def _entry(self, row, seq: int, prev: str) -> str:
        if row["seq"] != seq:
            raise Bad(f"entry {seq} is missing (next stored entry is {row['seq']})", seq)
        where = f"entry {seq} (op {row['op_id']!r} leg {row['leg']})"
        try:
            meta = json.loads(row["meta_json"])
            if canonical_json(meta).decode() != row["meta_json"]:
                raise ValueError("not canonical")
        except (ValueError, LedgerError) as exc:
            raise Bad(f"{where}: meta is not canonical JSON ({exc})", seq) from exc
        entry = Entry(row["seq"], row["op_id"], row["leg"], row["kind"], row["debit_id"], row["credit_id"],
                      row["amount_units"], row["ref_id"], meta, row["ts_ms"], row["prev_hash"])
        if entry.prev_hash != prev:
            raise Bad(f"{where}: previous-hash link broken (entries altered, removed or reordered)", seq)
        digest = entry.hash()
        if digest.hex() != row["entry_hash"]:
            raise Bad(f"{where}: content does not match its hash (amount, account or fields altered)", seq)
        if seq == 0:
            self._genesis(entry)
        try:
            signature = bytes.fromhex(row["signature"])
        except ValueError:
            signature = b""
        if not verify_hash_signature(self.public_key, digest, signature):
            raise Bad(f"{where}: bad coordinator signature", seq)
        self._op_structure(entry, where)
        try:
            apply(entry, self.view, self.params)
        except LedgerError as exc:
            raise Bad(f"{where}: refused by the ledger rules: {exc}", seq) from exc
        self.frontier = merkle.frontier_append(self.frontier, seq, digest)
        return row["entry_hash"]

    def _genesis(self, entry: Entry) -> None:
        if entry.kind != "genesis":
            raise Bad("entry 0 is not a genesis entry", 0)
        try:
            self.public_key = public_key_from_hex(entry.meta["public_key"])
            self.params = MoneyParams.from_dict(entry.meta["params"])
        except (KeyError, ValueError, TypeError, LedgerError) as exc:
            raise Bad(f"entry 0: unreadable genesis ({exc})", 0) from exc
        self.report.public_key = entry.meta["public_key"]
        if self.pinned is not None and self.pinned != entry.meta["public_key"]:
            raise Bad(f"entry 0: coordinator key {entry.meta['public_key']} is not the pinned {self.pinned}", 0)

    def _op_structure(self, entry: Entry, where: str) -> None:
        if entry.leg == 0:
            self._finish_op()
            if entry.op_id in self.seen_ops:
                raise Bad(f"{where}: op id used twice", entry.seq)
            if not isinstance(entry.meta.get("op_digest"), str):
                raise Bad(f"{where}: first leg lacks the op digest", entry.seq)
            self.seen_ops.add(entry.op_id)
        elif not self.op or self.op[-1].op_id != entry.op_id or self.op[-1].leg + 1 != entry.leg:
            raise Bad(f"{where}: legs of an op are not contiguous", entry.seq)
        elif "op_digest" in entry.meta:
            raise Bad(f"{where}: op digest on a later leg", entry.seq)
        self.op.append(entry)

    def _finish_op(self) -> None:
        """After the last leg of an op: a posted settlement must match its receipts exactly."""
        op, self.op = self.op, []
        if not op or op[-1].kind != "close" or op[-1].meta.get("outcome") != POSTED:
            return
        close = op[-1]
        rows = []
        while self.pending_receipt is not None and self.pending_receipt["op_id"] == close.op_id:
            rows.append(self.pending_receipt)
            self.pending_receipt = next(self.receipt_rows, None)
        where = f"entry {close.seq} (settlement {close.op_id!r})"
        if close.meta.get("basis") == "plan":
            expected = self._plan_legs(close, rows, where)
        else:
            expected = self._receipt_legs(close, rows, where)
        actual = [(e.kind, e.debit_id, e.credit_id, e.amount_units, e.ref_id,
                   {k: v for k, v in e.meta.items() if k != "op_digest"}) for e in op]
        if actual != [(g.kind, g.debit_id, g.credit_id, g.amount_units, g.ref_id, g.meta) for g in expected]:
            basis = "plan" if close.meta.get("basis") == "plan" else "receipts"
            raise Bad(f"{where}: paid differently from what its {basis} justify", close.seq)

    def _original_hold(self, close: Entry) -> HoldState:
        hold = self.view.holds[close.ref_id]
        return HoldState(hold.id, hold.account_id, hold.request_id, hold.amount_units)

    def _plan_legs(self, close: Entry, rows: list, where: str) -> list:
        """A settlement on the coordinator's recorded plan (after a crash): no receipts, the plan in the close."""
        try:
            if rows:
                raise LedgerError("a settlement on a plan has no receipts")
            return plan_settlement_legs(self._original_hold(close), plan_from_items(close.meta.get("plan")), self.params)
        except (LedgerError, ValueError, KeyError, TypeError) as exc:
            raise Bad(f"{where}: its plan does not justify it: {exc}", close.seq) from exc

    def _receipt_legs(self, close: Entry, rows: list, where: str) -> list:
        try:
            stored = [StageReceipt.from_dict(json.loads(r["body_json"])) for r in rows]
            if [r["stage_index"] for r in rows] != list(range(len(rows))):
                raise LedgerError("receipt rows out of order")
            if receipts_digest(stored) != close.meta.get("receipts_sha256"):
                raise LedgerError("stored receipts differ from the ones the settlement signed")
            original = self._original_hold(close)
            check_receipts(self.view, original, stored)
            return settlement_legs(original, stored, self.params)
        except (LedgerError, ValueError, KeyError, TypeError) as exc:
            raise Bad(f"{where}: receipts do not justify it: {exc}", close.seq) from exc

    def _checkpoint(self, row, count: int, head_hash: str) -> None:
        body = CheckpointBody(row["entry_count"], row["head_hash"], row["tree_root"], row["ts_ms"])
        if self.public_key is None or not body.verify(self.public_key, bytes.fromhex(row["signature"])):
            raise Bad(f"checkpoint at {count} entries: bad signature", count - 1)
        if body.head_hash != head_hash or body.tree_root != merkle.frontier_root(self.frontier).hex():
            raise Bad(f"checkpoint at {count} entries: signed head differs from the log", count - 1)
        self.report.checkpoints_checked += 1

    def _final_state(self, conn) -> None:
        view, report = self.view, self.report
        stored_accounts = {r["id"]: account_from_row(r) for r in conn.execute(select(*account_columns(conn))).mappings()}
        if stored_accounts != view.accounts:
            bad = sorted(set(stored_accounts) ^ set(view.accounts)) or sorted(
                a for a in view.accounts if stored_accounts[a] != view.accounts[a])
            raise Bad(f"accounts table differs from the replayed log for {bad[:5]}")
        stored_holds = {r["id"]: hold_from_row(r) for r in conn.execute(select(holds)).mappings()}
        if stored_holds != view.holds:
            bad = sorted(set(stored_holds) ^ set(view.holds)) or sorted(
                h for h in view.holds if stored_holds[h] != view.holds[h])
            raise Bad(f"holds table differs from the replayed log for {bad[:5]}")
        head = conn.execute(select(chain_head)).mappings().all()
        frontier = [h.hex() for h in self.frontier]
        if len(head) != 1 or (head[0]["entry_count"], head[0]["head_hash"], json.loads(head[0]["frontier_json"]),
                              head[0]["minted_units"], head[0]["burned_units"]) != (
                report.entry_count, report.head_hash, frontier, view.totals.minted_units, view.totals.burned_units):
            raise Bad("chain_head row differs from the replayed log (entries removed or head altered)")
        balances = sum(a.balance_units for a in view.accounts.values())
        if any(a.balance_units < 0 or a.stake_units < 0 for a in view.accounts.values()):
            raise Bad("a negative balance or stake after replay")
        if balances != view.totals.minted_units - view.totals.burned_units:
            raise Bad(f"sum of balances {balances} != minted {view.totals.minted_units} - burned {view.totals.burned_units}")
        open_holds = [h for h in view.holds.values() if h.status == OPEN]
        held = sum(h.amount_units - h.released_units for h in open_holds)
        if view.accounts[ESCROW_REQUESTS].balance_units != held:
            raise Bad(f"escrow:requests holds {view.accounts[ESCROW_REQUESTS].balance_units}, open holds {held}")
        staked = sum(a.stake_units for a in view.accounts.values())
        if view.accounts[ESCROW_STAKES].balance_units != staked:
            raise Bad(f"escrow:stakes holds {view.accounts[ESCROW_STAKES].balance_units}, stakes sum to {staked}")
        report.minted_units, report.burned_units = view.totals.minted_units, view.totals.burned_units
        report.accounts, report.open_holds = len(view.accounts), len(open_holds)

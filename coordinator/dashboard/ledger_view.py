"""What the dashboard and /metrics read from the ledger, without rescanning the log every second.

`LedgerView` tails the log: each refresh reads only entries appended since the last one (at most
TAIL_CHUNK of them, so a long log is caught up over a few refreshes instead of one long stall)
and keeps running totals: audits by verdict, slashes, credits earned per provider, and the latest
audits and slashes. Supply, head, the last checkpoint and the standing of the providers on the
dashboard are read fresh, at most once per CACHE_S. Read-only: it opens a reader engine.

Nothing about consumers leaves here: only provider/verifier accounts are looked up, and audit
and slash rows carry peer ids, verdicts, amounts and the coordinator's stated reason.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque

from sqlalchemy import select

from ledger.models import accounts, chain_head, checkpoints, entries
from ledger.reader import LedgerReader

TAIL_CHUNK = 20_000  # log entries scanned per refresh at most
RECENT = 20  # audits and slashes kept for the page
CACHE_S = 1.0
MAX_EARNERS = 10_000  # accounts whose earnings are tracked
MAX_LOOKUP = 1024  # provider accounts looked up per refresh
MAX_REASON_CHARS = 200


class LedgerView:
    def __init__(self, reader: LedgerReader, clock=time.monotonic):
        self.reader, self.clock = reader, clock
        self._lock = threading.Lock()
        self._cursor = -1  # every entry with seq <= cursor has been counted
        self.audits_by_verdict = {"pass": 0, "fail": 0}
        self.slash_count = 0
        self.slashed_units = 0
        self.earned_units: dict[str, int] = {}
        self.audits: deque[dict] = deque(maxlen=RECENT)
        self.slashes: deque[dict] = deque(maxlen=RECENT)
        self._summary: dict | None = None
        self._summary_at = -1e9

    def summary(self) -> dict:
        """Totals, latest audits and slashes, supply and the last checkpoint (cached CACHE_S)."""
        with self._lock:
            if self._summary is not None and self.clock() - self._summary_at < CACHE_S:
                return self._summary
            with self.reader.engine.connect() as conn:
                self._tail(conn)
                last_cp = conn.execute(select(checkpoints.c.entry_count, checkpoints.c.tree_root, checkpoints.c.ts_ms)
                                       .order_by(checkpoints.c.entry_count.desc()).limit(1)).mappings().first()
            self._summary = {
                "supply": self.reader.supply(),
                "last_checkpoint": dict(last_cp) if last_cp else None,
                "audits_by_verdict": dict(self.audits_by_verdict), "slash_count": self.slash_count,
                "slashed_units": self.slashed_units,
                "audits": list(reversed(self.audits)), "slashes": list(reversed(self.slashes)),
            }
            self._summary_at = self.clock()
            return self._summary

    def standings(self, peers: list[str]) -> dict[str, dict]:
        """Ledger standing of each peer that has a provider or verifier account (by peer id)."""
        peers = peers[:MAX_LOOKUP]
        if not peers:
            return {}
        candidates = {peer: peer for peer in peers} | {f"provider:{peer}": peer for peer in peers}
        with self.reader.engine.connect() as conn:
            rows = conn.execute(select(accounts).where(accounts.c.id.in_(list(candidates)))).mappings().all()
        with self._lock:
            earned = dict(self.earned_units)
        out = {}
        for row in rows:
            if row["kind"] not in ("provider", "verifier"):
                continue
            out[candidates[row["id"]]] = {
                "account": row["id"], "balance_units": row["balance_units"], "stake_units": row["stake_units"],
                "slashed_units": row["slashed_units"], "reputation": row["reputation"],
                "audits_passed": row["audits_passed"], "slash_count": row["slash_count"], "banned": bool(row["banned"]),
                "misconduct_count": row["misconduct_count"],
                "earned_units": earned.get(row["id"], 0)}
        return out

    def _tail(self, conn) -> None:
        count = conn.execute(select(chain_head.c.entry_count)).scalar()
        if count is None:
            return
        upper = min(count - 1, self._cursor + TAIL_CHUNK)
        if upper <= self._cursor:
            return
        rows = conn.execute(select(entries.c.seq, entries.c.kind, entries.c.debit_id, entries.c.credit_id,
                                   entries.c.amount_units, entries.c.meta_json, entries.c.ts_ms)
                            .where(entries.c.seq > self._cursor, entries.c.seq <= upper,
                                   entries.c.kind.in_(("audit", "penalty", "slash", "release")))
                            .order_by(entries.c.seq)).mappings().all()
        for row in rows:
            self._count(row)
        self._cursor = upper

    def _count(self, row) -> None:
        kind = row["kind"]
        meta = json.loads(row["meta_json"])
        if kind == "release":
            if meta.get("role") == "stage":
                self._earn(row["credit_id"], row["amount_units"])
        elif kind == "audit":
            verdict = "pass" if meta.get("subject_passed") else "fail"
            self.audits_by_verdict[verdict] += 1
            self._earn(row["credit_id"], row["amount_units"])
            self.audits.append({"seq": row["seq"], "ts_ms": row["ts_ms"], "audit_id": str(meta.get("audit_id", "")),
                                "verifier": row["credit_id"], "subject": str(meta.get("subject", "")),
                                "verdict": verdict, "verifier_agreed": bool(meta.get("verifier_agreed")),
                                "fee_units": row["amount_units"]})
        elif kind == "slash":
            self.slashed_units += row["amount_units"]
        elif kind == "penalty":
            self.slash_count += 1
            self.slashes.append({"seq": row["seq"], "ts_ms": row["ts_ms"], "peer": row["credit_id"],
                                 "reason": str(meta.get("reason", ""))[:MAX_REASON_CHARS],
                                 "taken_units": int(meta.get("taken_units", 0) or 0),
                                 "requested_units": int(meta.get("requested_units", 0) or 0)})

    def _earn(self, account_id: str | None, amount_units: int) -> None:
        if not account_id or not amount_units:
            return
        if account_id in self.earned_units or len(self.earned_units) < MAX_EARNERS:
            self.earned_units[account_id] = self.earned_units.get(account_id, 0) + amount_units

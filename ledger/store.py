"""Database side of a write: the locked chain head, and a `View` over account and hold rows.

A write loads only the rows it touches (in one query), lets `state.apply` change them in memory,
and writes back what changed with one executemany per table, all inside the writer's transaction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sqlalchemy import bindparam, insert, inspect, select, update
from sqlalchemy.engine import Connection

from contracts import audits
from ledger.models import accounts, chain_head, holds
from ledger.state import AccountState, HoldState, Totals

_ACCOUNT_FIELDS = ("balance_units", "stake_units", "slashed_units")
_STANDING_FIELDS = ("reputation", "audits_agreed", "audits_disagreed", "audits_passed", "slash_count", "banned",
                    "misconduct_count")
_HOLD_FIELDS = ("released_units", "paid_units", "status", "closed_seq")


@dataclass
class Head:
    entry_count: int
    head_hash: str
    frontier: list[bytes]
    totals: Totals
    last_checkpoint_count: int


def lock_head(conn: Connection) -> Head | None:
    """Take the global append lock (FOR UPDATE on PostgreSQL; SQLite holds it since BEGIN IMMEDIATE)."""
    row = conn.execute(select(chain_head).where(chain_head.c.id == 1).with_for_update()).mappings().first()
    if row is None:
        return None
    return Head(row["entry_count"], row["head_hash"], [bytes.fromhex(h) for h in json.loads(row["frontier_json"])],
                Totals(row["minted_units"], row["burned_units"]), row["last_checkpoint_count"])


def head_values(head: Head) -> dict:
    return {"entry_count": head.entry_count, "head_hash": head.head_hash,
            "frontier_json": json.dumps([h.hex() for h in head.frontier]),
            "minted_units": head.totals.minted_units, "burned_units": head.totals.burned_units,
            "last_checkpoint_count": head.last_checkpoint_count}


def save_head(conn: Connection, head: Head, *, create: bool = False) -> None:
    if create:
        conn.execute(insert(chain_head).values(id=1, **head_values(head)))
    else:
        conn.execute(update(chain_head).where(chain_head.c.id == 1).values(**head_values(head)))


def account_columns(conn: Connection) -> list:
    """The accounts table's columns as this database has them. A ledger written before a column was
    added, and not opened by a service since (which adds it: ledger/service.py), lacks it; readers and
    `ledger verify` still read it, and `account_from_row` gives the missing field its default, which is
    what the replay of such a log gives too."""
    present = {c["name"] for c in inspect(conn).get_columns(accounts.name)}
    return [c for c in accounts.c if c.name in present]


def account_from_row(row) -> AccountState:
    standing = audits.Standing(**{f: row[f] for f in _STANDING_FIELDS if f in row})
    return AccountState(row["id"], row["kind"], row["public_key"], row["balance_units"], row["stake_units"],
                        row["slashed_units"], standing, row["opened_seq"])


def account_values(a: AccountState) -> dict:
    return {"id": a.id, "kind": a.kind, "public_key": a.public_key, "opened_seq": a.opened_seq,
            **{f: getattr(a, f) for f in _ACCOUNT_FIELDS},
            **{f: getattr(a.standing, f) for f in _STANDING_FIELDS}}


def hold_from_row(row) -> HoldState:
    return HoldState(row["id"], row["account_id"], row["request_id"], row["amount_units"], row["released_units"],
                     row["paid_units"], row["status"], row["opened_seq"], row["closed_seq"])


def hold_values(h: HoldState) -> dict:
    return {"id": h.id, "account_id": h.account_id, "request_id": h.request_id, "amount_units": h.amount_units,
            "opened_seq": h.opened_seq, **{f: getattr(h, f) for f in _HOLD_FIELDS}}


class DbView:
    """`state.View` over rows read in the current transaction; `flush()` writes the changes back."""

    def __init__(self, conn: Connection, totals: Totals) -> None:
        self.conn = conn
        self.totals = totals
        self._accounts: dict[str, AccountState | None] = {}
        self._holds: dict[str, HoldState | None] = {}
        self._new: set[str] = set()
        self._new_holds: set[str] = set()
        self._dirty: set[str] = set()
        self._dirty_holds: set[str] = set()

    def prefetch(self, account_ids) -> None:
        wanted = sorted({a for a in account_ids if a and a not in self._accounts})
        if not wanted:
            return
        for row in self.conn.execute(select(accounts).where(accounts.c.id.in_(wanted))).mappings():
            self._accounts[row["id"]] = account_from_row(row)
        for account_id in wanted:
            self._accounts.setdefault(account_id, None)

    def account(self, account_id: str) -> AccountState | None:
        if account_id not in self._accounts:
            self.prefetch([account_id])
        return self._accounts[account_id]

    def add_account(self, account: AccountState) -> None:
        self._accounts[account.id] = account
        self._new.add(account.id)

    def hold(self, hold_id: str) -> HoldState | None:
        if hold_id not in self._holds:
            row = self.conn.execute(select(holds).where(holds.c.id == hold_id)).mappings().first()
            self._holds[hold_id] = hold_from_row(row) if row else None
        return self._holds[hold_id]

    def add_hold(self, hold: HoldState) -> None:
        self._holds[hold.id] = hold
        self._new_holds.add(hold.id)

    def touch(self, obj: AccountState | HoldState) -> None:
        (self._dirty if isinstance(obj, AccountState) else self._dirty_holds).add(obj.id)

    def flush(self) -> None:
        if self._new:
            self.conn.execute(insert(accounts), [account_values(self._accounts[i]) for i in sorted(self._new)])
        changed = sorted(self._dirty - self._new)
        if changed:
            fields = _ACCOUNT_FIELDS + _STANDING_FIELDS
            stmt = update(accounts).where(accounts.c.id == bindparam("b_id")).values(
                {f: bindparam(f) for f in fields})
            rows = [{"b_id": i, **{f: v for f, v in account_values(self._accounts[i]).items() if f in fields}}
                    for i in changed]
            self.conn.execute(stmt, rows)
        if self._new_holds:
            self.conn.execute(insert(holds), [hold_values(self._holds[i]) for i in sorted(self._new_holds)])
        changed_holds = sorted(self._dirty_holds - self._new_holds)
        if changed_holds:
            stmt = update(holds).where(holds.c.id == bindparam("b_id")).values({f: bindparam(f) for f in _HOLD_FIELDS})
            self.conn.execute(stmt, [{"b_id": i, **{f: getattr(self._holds[i], f) for f in _HOLD_FIELDS}}
                                     for i in changed_holds])

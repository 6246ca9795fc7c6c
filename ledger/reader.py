"""Read-only queries for auditors (CLI and HTTP): accounts, entries, ops, checkpoints, supply, proofs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace

from sqlalchemy import func, or_, select
from sqlalchemy.engine import Engine

from contracts import MoneyParams, audits
from contracts.stakes import required_stake_units
from ledger import merkle
from ledger.db import make_engine, resolve_url
from ledger.errors import LedgerError, UnknownAccount
from ledger.models import accounts, chain_head, checkpoints, entries, holds, receipts
from ledger.state import ESCROW_REQUESTS, ESCROW_STAKES, OPEN, PROVIDER, VERIFIER, AccountState
from ledger.store import account_columns, account_from_row

MAX_PAGE = 1000


def entry_dict(row) -> dict:
    return {"seq": row["seq"], "op_id": row["op_id"], "leg": row["leg"], "kind": row["kind"],
            "debit": row["debit_id"], "credit": row["credit_id"], "amount_units": row["amount_units"],
            "ref": row["ref_id"], "meta": json.loads(row["meta_json"]), "ts_ms": row["ts_ms"],
            "prev_hash": row["prev_hash"], "entry_hash": row["entry_hash"], "signature": row["signature"]}


def _with_stake(a: AccountState) -> audits.Standing:
    """The account's standing carrying its locked stake, as `contracts.audits.may_serve` reads it."""
    return replace(a.standing, stake_units=a.stake_units)


class LedgerReader:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._params: MoneyParams | None = None
        self._account_columns: list | None = None  # as the database has them (ledger/store.py)

    @classmethod
    def open(cls, db: str | None = None, data_dir=None) -> "LedgerReader":
        return cls(make_engine(resolve_url(db, data_dir), writer=False))

    @property
    def params(self) -> MoneyParams:
        if self._params is None:
            with self.engine.connect() as conn:
                meta = conn.execute(select(entries.c.meta_json).where(entries.c.seq == 0)).scalar()
            if meta is None:
                raise LedgerError("the ledger has no genesis entry")
            self._params = MoneyParams.from_dict(json.loads(meta)["params"])
        return self._params

    def _columns(self, conn) -> list:
        if self._account_columns is not None:
            return self._account_columns
        columns = account_columns(conn)
        if len(columns) == len(accounts.c):  # kept once complete: a service may add a column meanwhile
            self._account_columns = columns
        return columns

    def account(self, account_id: str, recent: int = 20) -> dict:
        recent = max(0, min(recent, MAX_PAGE))
        with self.engine.connect() as conn:
            row = conn.execute(select(*self._columns(conn)).where(accounts.c.id == account_id)).mappings().first()
            if row is None:
                raise UnknownAccount(f"no account {account_id!r}")
            rows = conn.execute(select(entries).where(or_(entries.c.debit_id == account_id,
                                                          entries.c.credit_id == account_id, entries.c.ref_id == account_id))
                                .order_by(entries.c.seq.desc()).limit(recent)).mappings().all()
        a = account_from_row(row)
        standing = _with_stake(a)
        return {"id": a.id, "kind": a.kind, "public_key": a.public_key, "balance_units": a.balance_units,
                "stake_units": a.stake_units, "required_stake_units": required_stake_units(self.params),
                "slashed_units": a.slashed_units,
                "reputation": a.standing.reputation, "audits_agreed": a.standing.audits_agreed,
                "audits_disagreed": a.standing.audits_disagreed, "audits_passed": a.standing.audits_passed,
                "slash_count": a.standing.slash_count, "banned": a.standing.banned,
                "misconduct_count": a.standing.misconduct_count,
                "may_serve": a.kind in (PROVIDER, VERIFIER) and audits.may_serve(standing, self.params),
                "recent_entries": [entry_dict(r) for r in rows]}

    def standing(self, account_id: str) -> audits.Standing | None:
        """A provider's record as the ledger derives it, with its locked stake; None for an unknown account."""
        with self.engine.connect() as conn:
            row = conn.execute(select(*self._columns(conn)).where(accounts.c.id == account_id)).mappings().first()
        return None if row is None else _with_stake(account_from_row(row))

    def account_state(self, account_id: str) -> AccountState | None:
        """An account's row (balance, stake, slashed units; its standing with the stake); None if unknown."""
        with self.engine.connect() as conn:
            row = conn.execute(select(*self._columns(conn)).where(accounts.c.id == account_id)).mappings().first()
        if row is None:
            return None
        a = account_from_row(row)
        return replace(a, standing=_with_stake(a))

    def balance_units(self, account_id: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(accounts.c.balance_units).where(accounts.c.id == account_id)).scalar() or 0)

    def spending(self, account_id: str) -> dict:
        """A consumer's credits as the ledger holds them: free, held by open holds, paid by closed ones
        (to stages and fees; refunds went back to the balance)."""
        with self.engine.connect() as conn:
            balance = conn.execute(select(accounts.c.balance_units).where(accounts.c.id == account_id)).scalar()
            held = conn.execute(select(func.coalesce(func.sum(holds.c.amount_units - holds.c.released_units), 0))
                                .where(holds.c.account_id == account_id, holds.c.status == OPEN)).scalar()
            paid = conn.execute(select(func.coalesce(func.sum(holds.c.paid_units), 0))
                                .where(holds.c.account_id == account_id)).scalar()
        return {"balance_units": int(balance or 0), "held_units": int(held), "paid_units": int(paid)}

    def hold(self, hold_id: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(holds).where(holds.c.id == hold_id)).mappings().first()
        return dict(row) if row else None

    def paid_units(self, hold_ids: list[str]) -> dict[str, int]:
        """What each of these holds paid (0 while open or once voided); unknown ids are left out."""
        wanted = sorted(set(hold_ids))[:MAX_PAGE]
        if not wanted:
            return {}
        with self.engine.connect() as conn:
            return dict(conn.execute(select(holds.c.id, holds.c.paid_units).where(holds.c.id.in_(wanted))).all())

    def entries(self, after: int = -1, limit: int = 100) -> list[dict]:
        limit = max(1, min(limit, MAX_PAGE))
        with self.engine.connect() as conn:
            rows = conn.execute(select(entries).where(entries.c.seq > after).order_by(entries.c.seq).limit(limit))
            return [entry_dict(r) for r in rows.mappings()]

    def op(self, op_id: str) -> dict | None:
        """An operation (`ledger tx <id>`): its legs, its receipts, and its hold if it is one."""
        with self.engine.connect() as conn:
            legs = conn.execute(select(entries).where(entries.c.op_id == op_id).order_by(entries.c.seq)).mappings().all()
            if not legs:
                return None
            stored = conn.execute(select(receipts).where(receipts.c.op_id == op_id)
                                  .order_by(receipts.c.stage_index)).mappings().all()
            hold = conn.execute(select(holds).where(holds.c.id == op_id)).mappings().first()
        return {"op_id": op_id, "entries": [entry_dict(r) for r in legs],
                "receipts": [json.loads(r["body_json"]) for r in stored], "hold": dict(hold) if hold else None}

    def checkpoints(self, after: int = -1, limit: int = 100) -> list[dict]:
        limit = max(1, min(limit, MAX_PAGE))
        with self.engine.connect() as conn:
            rows = conn.execute(select(checkpoints).where(checkpoints.c.entry_count > after)
                                .order_by(checkpoints.c.entry_count).limit(limit)).mappings().all()
        return [dict(r) for r in rows]

    def supply(self) -> dict:
        with self.engine.connect() as conn:
            head = conn.execute(select(chain_head)).mappings().first()
            total = conn.execute(select(func.coalesce(func.sum(accounts.c.balance_units), 0))).scalar()
            escrow = dict(conn.execute(select(accounts.c.id, accounts.c.balance_units).where(
                accounts.c.id.in_([ESCROW_REQUESTS, ESCROW_STAKES]))).all())
            n_open = conn.execute(select(func.count()).select_from(holds).where(holds.c.status == OPEN)).scalar()
        if head is None:
            raise LedgerError("the ledger has no genesis entry")
        frontier = [bytes.fromhex(h) for h in json.loads(head["frontier_json"])]
        return {"minted_units": head["minted_units"], "burned_units": head["burned_units"],
                "supply_units": head["minted_units"] - head["burned_units"], "sum_of_balances_units": int(total),
                "escrow_requests_units": escrow.get(ESCROW_REQUESTS, 0), "escrow_stakes_units": escrow.get(ESCROW_STAKES, 0),
                "open_holds": n_open, "entry_count": head["entry_count"], "head_hash": head["head_hash"],
                "tree_root": merkle.frontier_root(frontier).hex()}

    def export(self) -> Iterator[dict]:
        """Every entry, receipt and checkpoint as JSON-ready records (`ledger export`, JSON lines)."""
        with self.engine.connect() as conn:
            for row in conn.execution_options(stream_results=True, yield_per=5000).execute(
                    select(entries).order_by(entries.c.seq)).mappings():
                yield {"type": "entry", **entry_dict(row)}
            for row in conn.execute(select(receipts).order_by(receipts.c.id)).mappings():
                yield {"type": "receipt", "op_id": row["op_id"], "stage_index": row["stage_index"],
                       "receipt": json.loads(row["body_json"])}
            for row in conn.execute(select(checkpoints).order_by(checkpoints.c.entry_count)).mappings():
                yield {"type": "checkpoint", **dict(row)}

    def _leaf_hashes(self, size: int) -> list[bytes]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(entries.c.entry_hash).where(entries.c.seq < size).order_by(entries.c.seq)).scalars()
            leaves = [bytes.fromhex(h) for h in rows]
        if len(leaves) != size:
            raise LedgerError(f"the log has {len(leaves)} entries, not {size}")
        return leaves

    def inclusion_proof(self, seq: int, tree_size: int) -> dict:
        """Audit path of entry `seq` in the tree of the first `tree_size` entries (a checkpoint's size)."""
        leaves = self._leaf_hashes(tree_size)
        proof = merkle.inclusion_proof(leaves, seq)
        return {"seq": seq, "tree_size": tree_size, "leaf_hash": leaves[seq].hex(),
                "tree_root": merkle.root(leaves).hex(), "proof": [p.hex() for p in proof]}

    def consistency_proof(self, first_size: int, second_size: int) -> dict:
        leaves = self._leaf_hashes(second_size)
        proof = merkle.consistency_proof(leaves, first_size)
        return {"first_size": first_size, "second_size": second_size, "first_root": merkle.root(leaves[:first_size]).hex(),
                "second_root": merkle.root(leaves).hex(), "proof": [p.hex() for p in proof]}

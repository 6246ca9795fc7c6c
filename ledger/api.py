"""Read-only HTTP for auditors: a FastAPI router that the coordinator mounts.

    GET /ledger/accounts/{id}            balance, stake, reputation, slashed_units, may_serve, recent entries
    GET /ledger/entries?after=N&limit=M  entries with seq > N, oldest first (M <= 1000)
    GET /ledger/ops/{op_id}              one operation: its legs, receipts, hold
    GET /ledger/checkpoints?after=N      signed tree heads
    GET /ledger/supply                   minted, burned, balances, escrow, head
    GET /ledger/proofs/inclusion?seq=S&tree_size=N       RFC 9162 audit path
    GET /ledger/proofs/consistency?first=M&second=N      RFC 9162 consistency proof

Every integer in a query is bounded here, at the route, to what the database holds (a signed 64-bit
integer): a larger one is a 422, never an overflow inside the driver.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query

from ledger.errors import LedgerError, UnknownAccount
from ledger.merkle import ProofError
from ledger.reader import MAX_PAGE, LedgerReader

INT64_END = 2**63  # sequence numbers and tree sizes are stored as signed 64-bit integers: [0, 2**63)


def make_router(reader: LedgerReader) -> APIRouter:
    router = APIRouter(prefix="/ledger", tags=["ledger"])

    @router.get("/accounts/{account_id:path}")
    def get_account(account_id: str, recent: int = Query(20, ge=0, le=MAX_PAGE)) -> dict:
        try:
            return reader.account(account_id, recent)
        except UnknownAccount as exc:
            raise HTTPException(404, str(exc)) from exc

    @router.get("/entries")
    def get_entries(after: int = Query(-1, ge=-1, lt=INT64_END, description="-1: from the start"),
                    limit: int = Query(100, ge=1, le=MAX_PAGE)) -> dict:
        found = reader.entries(after, limit)
        return {"entries": found, "next_after": found[-1]["seq"] if found else after}

    @router.get("/ops/{op_id:path}")
    def get_op(op_id: str) -> dict:
        found = reader.op(op_id)
        if found is None:
            raise HTTPException(404, f"no operation {op_id!r}")
        return found

    @router.get("/checkpoints")
    def get_checkpoints(after: int = Query(-1, ge=-1, lt=INT64_END, description="-1: from the start"),
                        limit: int = Query(100, ge=1, le=MAX_PAGE)) -> dict:
        return {"checkpoints": reader.checkpoints(after, limit)}

    @router.get("/supply")
    def get_supply() -> dict:
        return reader.supply()

    @router.get("/proofs/inclusion")
    def get_inclusion(seq: int = Query(ge=0, lt=INT64_END), tree_size: int = Query(ge=1, lt=INT64_END)) -> dict:
        try:
            return reader.inclusion_proof(seq, tree_size)
        except (ProofError, LedgerError) as exc:
            raise HTTPException(400, str(exc)) from exc

    @router.get("/proofs/consistency")
    def get_consistency(first: int = Query(ge=0, lt=INT64_END), second: int = Query(ge=0, lt=INT64_END)) -> dict:
        try:
            return reader.consistency_proof(first, second)
        except (ProofError, LedgerError) as exc:
            raise HTTPException(400, str(exc)) from exc

    return router

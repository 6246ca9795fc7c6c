"""`GET /ledger/me`: a consumer's own account in the auditors' ledger, with its API key.

The public `/ledger/*` routes (ledger/api.py) name a consumer only by its pseudonymous account id
(coordinator/accounts.py draws it at random when the consumer is added): they show money, not
people. Here a consumer, and only with its key, sees which account is its own, the ledger's
entries on it (holds, settlements, refunds) and its requests as billed.
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from ledger.reader import MAX_PAGE, LedgerReader


def make_router(svc, reader: LedgerReader) -> APIRouter:
    """`svc`: the consumer API's Service (authentication, accounts)."""
    router = APIRouter(prefix="/ledger", tags=["ledger"])

    @router.get("/me", summary="your own ledger account and requests (Authorization: Bearer <key>)")
    async def me(http: Request, recent: int = Query(20, ge=0, le=MAX_PAGE)) -> dict:
        who = await svc.authenticate(http.headers.get("authorization"), http.client.host if http.client else None)
        await svc.wait_settled(who)  # its streams that ended are settled before its balance and entries are read
        ledger = await svc.call(reader.account, who.account_id, recent)
        usage = await svc.call(svc.accounts.account, who)
        return {**ledger, "name": who.name, "held_units": usage["held_units"], "spent_units": usage["spent_units"],
                "requests": usage["requests"], "recent_usage": usage["recent_usage"]}

    return router

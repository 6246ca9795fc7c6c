"""The recovery routine on a real database (SQLite, and PostgreSQL when the test server is set):
holds a coordinator left open when it died, with what it had recorded of their delivery, are
settled for exactly the delivered tokens (on the stages' receipts when they match, else on the
recorded pipeline), the others refunded; `ledger verify` passes; a second start changes nothing."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from sqlalchemy import func, select

from contracts.pricing import gas_units, quote
from coordinator import inflight
from coordinator.accounts import Accounts
from ledger.receipts import StageReceipt
from ledger.verify import verify
from node.transport.identity import Identity
from wire.messages import Stage

N_LAYERS = 30
MODEL = "smollm2-135m-instruct"
CREDITS = 10**9
PROMPT = 7


@dataclass
class Request:  # what Accounts.delivered_async reads of a GenerationRequest
    stages: tuple = field(default_factory=tuple)


def receipt(identity: Identity, request_id: str, start: int, end: int, tokens: int, input_hash: str,
            output_hash: str) -> StageReceipt:
    body = StageReceipt(request_id, MODEL, start, end, tokens, input_hash, output_hash, identity.peer_id_str,
                        identity.public_key_bytes.hex())
    return StageReceipt(**{**body.to_dict(), "signature": identity.sign(body.signed_bytes()).hex()})


def snapshot(accounts: Accounts, ids: list[str]) -> dict:
    return {a: accounts.reader.balance_units(a) for a in ids} | {"supply": accounts.reader.supply()["entry_count"]}


def test_recovery_settles_what_was_delivered_and_refunds_the_rest(tmp_path, db):
    data_dir = tmp_path / "coordinator"
    stages = (Identity.generate(), Identity.generate())
    plan = (Stage(stages[0].peer_id_str, 0, 12), Stage(stages[1].peer_id_str, 12, N_LAYERS))
    accounts = Accounts(data_dir, N_LAYERS, db=db)
    for s in stages:
        accounts.open_provider(s.peer_id_str, s.public_key_bytes)
    key = accounts.add_consumer("alice", CREDITS)
    alice = accounts.lookup(key)
    charges = {name: accounts.admit(alice, name, MODEL, PROMPT, 64) for name in ("plan", "none", "signed", "more")}
    asyncio.run(accounts.delivered_async(charges["plan"], Request(plan), 3))
    asyncio.run(accounts.delivered_async(charges["plan"], Request(plan), 5))  # a later chunk: the count grows
    asyncio.run(accounts.delivered_async(charges["plan"], Request(plan), 4))  # an older write never lowers it
    asyncio.run(accounts.delivered_async(charges["signed"], Request(plan), 6))
    asyncio.run(accounts.delivered_async(charges["more"], Request(plan), 2))
    n_signed, n_more = PROMPT + 6 - 1, PROMPT + 2 - 1
    for name, n in (("signed", n_signed), ("more", n_more + 5)):  # "more": receipts for tokens never sent
        accounts.receipts.add(receipt(stages[0], name, 0, 12, n, "a" * 64, "b" * 64), stages[0].peer_id_str)
        accounts.receipts.add(receipt(stages[1], name, 12, N_LAYERS, n, "b" * 64, "c" * 64), stages[1].peer_id_str)
    accounts.close()  # the process dies here: nothing settled, four holds open

    accounts = Accounts(data_dir, N_LAYERS, db=db)
    try:
        report = accounts.recover()
        assert sorted(report.settled_holds) == ["hold:more", "hold:plan", "hold:signed"]
        assert report.voided_holds == ("hold:none",)
        params = accounts.ledger.params
        delivered = {"plan": PROMPT + 5 - 1, "signed": n_signed, "more": n_more}
        for name, n in delivered.items():  # the consumer pays exactly the delivered tokens' work
            assert accounts.reader.hold(f"hold:{name}")["paid_units"] == quote(n, 0, N_LAYERS, params).total_units
        for s, layers in zip(stages, (12, N_LAYERS - 12)):  # each stage paid its gas for them
            assert accounts.reader.balance_units(s.peer_id_str) == sum(gas_units(n, layers, params)
                                                                      for n in delivered.values())
        assert len(accounts.reader.op("recover:hold:signed")["receipts"]) == 2
        assert accounts.reader.op("recover:hold:plan")["receipts"] == []
        money = accounts.reader.spending(alice.account_id)
        assert money["held_units"] == 0 and money["balance_units"] + money["paid_units"] == CREDITS
        assert verify(accounts.ledger.engine).ok
        usage = {u["request_id"]: u for u in accounts.account(alice)["recent_usage"]}
        assert sorted(usage) == ["more", "plan", "signed"]  # the consumer's own history lists them, priced
        assert usage["plan"]["completion_tokens"] == 5 and usage["plan"]["finish_reason"] == "interrupted"
        assert usage["plan"]["cost_units"] == quote(delivered["plan"], 0, N_LAYERS, params).total_units
        with accounts.reader_engine.connect() as conn:  # what was journaled is gone once resolved
            assert conn.execute(select(func.count()).select_from(inflight.requests)).scalar() == 0
            assert conn.execute(select(func.count()).select_from(inflight.receipts)).scalar() == 0
        before = snapshot(accounts, [alice.account_id, *(s.peer_id_str for s in stages)])
    finally:
        accounts.close()

    accounts = Accounts(data_dir, N_LAYERS, db=db)  # a second start: nothing is open, nothing moves
    try:
        again = accounts.recover()
        assert again.settled_holds == () and again.voided_holds == ()
        assert snapshot(accounts, [alice.account_id, *(s.peer_id_str for s in stages)]) == before
        assert verify(accounts.ledger.engine).ok
    finally:
        accounts.close()


def test_a_refused_plan_refunds_instead_of_stopping_the_start(tmp_path):
    """A recorded plan the ledger will not pay (here: a stage with no provider account) must not
    keep the coordinator from starting: that hold is refunded, the others still settle."""
    data_dir = tmp_path / "coordinator"
    accounts = Accounts(data_dir, N_LAYERS)
    key = accounts.add_consumer("bob", CREDITS)
    bob = accounts.lookup(key)
    charge = accounts.admit(bob, "r1", MODEL, PROMPT, 16)
    asyncio.run(accounts.delivered_async(charge, Request((Stage(Identity.generate().peer_id_str, 0, N_LAYERS),)), 3))
    accounts.close()
    accounts = Accounts(data_dir, N_LAYERS)
    try:
        report = accounts.recover()
        assert report.voided_holds == ("hold:r1",) and report.settled_holds == ()
        assert accounts.reader.balance_units(bob.account_id) == CREDITS
        assert verify(accounts.ledger.engine).ok
    finally:
        accounts.close()

"""What the coordinator knows of requests in flight, written down before it matters.

Two tables beside the ledger's, in its database (like coordinator/consumers.py), so that a
coordinator killed mid-stream and started again on the same database can settle every request
that delivered tokens for exactly those tokens (coordinator/recovery.py):

- `inflight_requests`: one row per streamed request, written before each chunk of tokens leaves
  for the client (`Generation.chunks`): its hold, prompt length, how many generated tokens the
  client has been sent so far and the stages of the pipeline attempt that computed them. A
  request that never streams (the whole answer in one body) has no row: its body is sent only
  after its hold has settled, so until then nothing was delivered and a crash refunds it.
- `inflight_receipts`: each stage receipt of a request still in flight, as the provider sent it,
  stored before the coordinator acknowledges it.

Both rows go once the request's hold has resolved; a start removes what a crash left behind
after recovery has used it. Neither carries money: what was paid is what the ledger says.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, Text, delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from coordinator.group_commit import GroupCommit
from ledger.errors import ReceiptError
from ledger.receipts import StageReceipt

metadata = MetaData()

requests = Table(
    "inflight_requests", metadata,
    Column("request_id", String(128), primary_key=True),
    Column("hold_id", String(160), nullable=False),
    Column("model", String(128), nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("delivered_tokens", Integer, nullable=False),
    # the attempt that computed them: [[peer id, layer start, layer end, dtype], ...] in stage order
    Column("plan_json", Text, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
)

receipts = Table(
    "inflight_receipts", metadata,
    Column("request_id", String(128), primary_key=True),
    Column("provider_id", String(128), primary_key=True),
    Column("body_json", Text, nullable=False),
    Column("received_ms", BigInteger, nullable=False),
)


@dataclass(frozen=True)
class PlanStage:
    peer_id: str
    start: int
    end: int  # exclusive
    dtype: str = ""


@dataclass(frozen=True)
class Inflight:
    request_id: str
    hold_id: str
    model: str
    prompt_tokens: int
    delivered_tokens: int
    plan: tuple[PlanStage, ...]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _plan_json(stages) -> str:
    return json.dumps([[s.peer_id, s.start, s.end, getattr(s, "dtype", "") or ""] for s in stages])


def _delivery(request_id: str, hold_id: str, model: str, prompt_tokens: int, delivered_tokens: int,
              stages) -> dict:
    return dict(request_id=request_id, hold_id=hold_id, model=model, prompt_tokens=prompt_tokens,
                delivered_tokens=delivered_tokens, plan_json=_plan_json(stages), updated_ms=_now_ms())


_UPSERTS = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}


def _upsert_deliveries(dialect: str):
    """INSERT ... ON CONFLICT DO UPDATE (SQLite and PostgreSQL alike), updating only to a larger count."""
    if dialect not in _UPSERTS:
        raise ValueError(f"no upsert for the {dialect} dialect")
    stmt = _UPSERTS[dialect](requests)
    return stmt.on_conflict_do_update(
        index_elements=[requests.c.request_id],
        set_={c: stmt.excluded[c] for c in ("delivered_tokens", "plan_json", "updated_ms")},
        where=requests.c.delivered_tokens < stmt.excluded.delivered_tokens)


class InflightStore:
    """Writes through `writer`, reads through `reader`: the ledger's engines."""

    def __init__(self, writer: Engine, reader: Engine):
        self.writer, self.reader = writer, reader
        self._deliveries = GroupCommit(self._write_deliveries)  # the streams' records share transactions
        self._upsert = None  # the writer's dialect's statement, built at the first write

    async def delivered_async(self, request_id: str, hold_id: str, model: str, prompt_tokens: int,
                              delivered_tokens: int, stages) -> None:
        """Record, durably, that the client has been sent `delivered_tokens` generated tokens, computed by
        `stages` (Stage values of the attempt). The count only grows: an older write never lowers it.
        Returns once committed, in one transaction with other streams' records of the moment; the
        caller's event loop serves meanwhile (no thread waits)."""
        await self._deliveries.write_async(_delivery(request_id, hold_id, model, prompt_tokens, delivered_tokens,
                                                     stages))

    def _write_deliveries(self, records: list[dict]) -> None:
        """One statement for the batch: insert each request's row, or raise its count if this one is larger."""
        largest: dict[str, dict] = {}
        for r in records:  # one row a request (a statement may not touch a row twice)
            if r["request_id"] not in largest or r["delivered_tokens"] > largest[r["request_id"]]["delivered_tokens"]:
                largest[r["request_id"]] = r
        if self._upsert is None:
            self._upsert = _upsert_deliveries(self.writer.dialect.name)
        with self.writer.begin() as conn:
            conn.execute(self._upsert, list(largest.values()))

    def add_receipt(self, receipt: StageReceipt) -> None:
        """Keep a checked receipt until its request settles; a resend replaces the one before."""
        body, now = json.dumps(receipt.to_dict(), sort_keys=True), _now_ms()
        key = (receipts.c.request_id == receipt.request_id) & (receipts.c.provider_id == receipt.provider_id)
        try:
            with self.writer.begin() as conn:
                conn.execute(insert(receipts).values(request_id=receipt.request_id, provider_id=receipt.provider_id,
                                                     body_json=body, received_ms=now))
        except IntegrityError:
            with self.writer.begin() as conn:
                conn.execute(update(receipts).where(key).values(body_json=body, received_ms=now))

    def get(self, request_id: str) -> Inflight | None:
        with self.reader.connect() as conn:
            row = conn.execute(select(requests).where(requests.c.request_id == request_id)).mappings().first()
        return _inflight(row) if row else None

    def all(self) -> dict[str, Inflight]:
        with self.reader.connect() as conn:
            return {r["request_id"]: _inflight(r) for r in conn.execute(select(requests)).mappings()}

    def receipts_for(self, request_id: str) -> dict[str, StageReceipt]:
        """The stored receipts of a request, by provider; any that no longer parses is left out."""
        with self.reader.connect() as conn:
            rows = conn.execute(select(receipts.c.provider_id, receipts.c.body_json)
                                .where(receipts.c.request_id == request_id)).all()
        found = {}
        for provider_id, body in rows:
            try:
                found[provider_id] = StageReceipt.from_dict(json.loads(body))
            except (ReceiptError, ValueError, TypeError):
                continue
        return found

    def forget(self, request_ids) -> None:
        """Drop the rows of requests whose holds have resolved."""
        ids = list(request_ids)
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            with self.writer.begin() as conn:
                conn.execute(delete(requests).where(requests.c.request_id.in_(chunk)))
                conn.execute(delete(receipts).where(receipts.c.request_id.in_(chunk)))

    def request_ids(self) -> set[str]:
        """Every request id either table names (recovery's clean-up reads it)."""
        with self.reader.connect() as conn:
            return ({r for (r,) in conn.execute(select(requests.c.request_id))}
                    | {r for (r,) in conn.execute(select(receipts.c.request_id).distinct())})


def _inflight(row) -> Inflight:
    plan = tuple(PlanStage(str(p), int(s), int(e), str(d)) for p, s, e, d in json.loads(row["plan_json"]))
    return Inflight(row["request_id"], row["hold_id"], row["model"], int(row["prompt_tokens"]),
                    int(row["delivered_tokens"]), plan)

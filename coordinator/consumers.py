"""Consumers' API keys and usage: two tables beside the ledger's, in the ledger's own database.

`LedgerService(beside=[metadata])` creates them with the ledger's tables, so a PostgreSQL ledger
holds keys and usage too, and every process that opens the ledger sees the same keys. A key is
stored only as SHA-256. A usage row says what a request was (model, tokens, why it ended) and
names its hold; it carries no money: what the request cost is what the ledger settled on that hold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import BigInteger, Column, Index, Integer, MetaData, String, Table, func, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

metadata = MetaData()

api_keys = Table(
    "consumer_keys", metadata,
    Column("key_sha256", String(64), primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("account_id", String(128), nullable=False),
    Column("created_ms", BigInteger, nullable=False),
)

usage = Table(
    "consumer_usage", metadata,
    Column("request_id", String(128), primary_key=True),
    Column("account_id", String(128), nullable=False),
    Column("hold_id", String(160), nullable=False),
    Column("model", String(128), nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("finish_reason", String(16), nullable=False),
    Column("ts_ms", BigInteger, nullable=False),
    Index("ix_consumer_usage_account_ts", "account_id", "ts_ms"),
)


class ConsumerExists(ValueError):
    pass


@dataclass(frozen=True)
class Consumer:
    name: str
    account_id: str


@dataclass(frozen=True)
class UsageRow:
    request_id: str
    hold_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    ts_ms: int


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class ConsumerStore:
    """Reads go through `reader` (snapshot reads on SQLite), writes through `writer`: the ledger's engines."""

    def __init__(self, writer: Engine, reader: Engine):
        self.writer, self.reader = writer, reader

    def has_key(self, account_id: str) -> bool:
        with self.reader.connect() as conn:
            return conn.execute(select(api_keys.c.name).where(api_keys.c.account_id == account_id)).first() is not None

    def has_name(self, name: str) -> bool:
        with self.reader.connect() as conn:
            return conn.execute(select(api_keys.c.name).where(api_keys.c.name == name)).first() is not None

    def add_key(self, key_sha256: str, name: str, account_id: str) -> None:
        """Raises ConsumerExists if `name` has a key already (one key a consumer)."""
        try:
            with self.writer.begin() as conn:
                conn.execute(insert(api_keys).values(key_sha256=key_sha256, name=name, account_id=account_id,
                                                     created_ms=_now_ms()))
        except IntegrityError as exc:
            raise ConsumerExists(f"consumer {name!r} exists") from exc

    def find_key(self, key_sha256: str) -> Consumer | None:
        with self.reader.connect() as conn:
            row = conn.execute(select(api_keys.c.name, api_keys.c.account_id)
                               .where(api_keys.c.key_sha256 == key_sha256)).first()
        return Consumer(row.name, row.account_id) if row else None

    def record(self, account_id: str, row: UsageRow) -> None:
        """Idempotent: a request is recorded once."""
        try:
            with self.writer.begin() as conn:
                conn.execute(insert(usage).values(account_id=account_id, **row.__dict__))
        except IntegrityError:
            pass  # recorded already: the first row stands

    def recent(self, account_id: str, limit: int) -> tuple[int, list[UsageRow]]:
        """How many requests the account made, and its latest `limit`, newest first."""
        with self.reader.connect() as conn:
            count = conn.execute(select(func.count()).select_from(usage).where(usage.c.account_id == account_id)).scalar()
            rows = conn.execute(select(*[usage.c[f] for f in UsageRow.__dataclass_fields__])
                                .where(usage.c.account_id == account_id)
                                .order_by(usage.c.ts_ms.desc()).limit(limit)).all()
        return int(count), [UsageRow(*r) for r in rows]

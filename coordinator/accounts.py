"""Consumer accounts: API keys (stored hashed) in front of the ledger, which holds the credits.

- The ledger (`DATA_DIR/ledger.db`) is opened with the coordinator's own Ed25519 key, the 32-byte
  seed in `DATA_DIR/node_ed25519.key` (its libp2p identity), so the log's signer is the peer id.
- `DATA_DIR/api_keys.db` (SQLite) maps SHA-256(key) to a consumer account and records usage.
- Money per request: `admit` holds the quote for prompt + max_tokens in escrow (InsufficientFunds
  -> 402); `finish` settles the hold on the stage receipts of the request's last attempt (see
  coordinator/receipts.py): each stage is paid gas for the tokens it processed times its layers,
  the fees go to their pools, the rest is refunded. Work without a receipt that checks out is not
  charged: with no receipt at all the hold is voided. Work of attempts a failover abandoned is not
  charged either; the consumer pays once for each token.
- Provider accounts are opened, with the provider's public key, when it registers.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select

from contracts import MoneyParams
from contracts.pricing import quote
from contracts.settlement import settle
from ledger.db import make_engine, resolve_url
from ledger.errors import InsufficientFunds
from ledger.models import accounts as account_rows
from ledger.models import holds as hold_rows
from ledger.service import LedgerService
from ledger.receipts import StageReceipt
from ledger.state import CONSUMER, OPEN, PROVIDER
from coordinator.receipts import ReceiptBoard
from node.transport.identity import KEY_FILE, load_or_create

KEYS_DB = "api_keys.db"
KEY_PREFIX = "mp-"
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
KEY_CACHE_S = 5.0
MAX_CACHED_KEYS = 10_000
RECENT_USAGE = 20

__all__ = ["Accounts", "Charge", "Consumer", "ConsumerExists", "InsufficientFunds", "RateLimiter"]


class ConsumerExists(ValueError):
    pass


@dataclass(frozen=True)
class Consumer:
    name: str
    account_id: str


@dataclass(frozen=True)
class Charge:
    """An admitted request's hold."""
    consumer: Consumer
    request_id: str
    model: str
    prompt_tokens: int
    max_tokens: int
    hold_units: int


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def coordinator_ledger_key(data_dir: Path) -> Ed25519PrivateKey:
    load_or_create(data_dir)  # creates the identity if the coordinator has never run here
    return Ed25519PrivateKey.from_private_bytes((Path(data_dir) / KEY_FILE).read_bytes())


class Accounts:
    def __init__(self, data_dir: Path, n_layers: int = 0, db: str | None = None, params: MoneyParams | None = None):
        """`n_layers`: the served model's, for prices (0 where only accounts are managed).
        `params`: the money parameters of a new ledger (an existing one keeps those of its genesis)."""
        self.data_dir, self.n_layers = Path(data_dir), n_layers
        self.ledger = LedgerService.open(coordinator_ledger_key(self.data_dir), db=db, data_dir=self.data_dir,
                                         **({"params": params} if params else {}))
        self.reader_engine = make_engine(resolve_url(db, self.data_dir), writer=False)
        self._keys_path = self.data_dir / KEYS_DB
        self._cache: dict[str, tuple[Consumer, float]] = {}
        self._cache_lock = threading.Lock()
        self.receipts = ReceiptBoard()
        # called with (request, paid receipts) after each settlement: the auditor's entry point
        self.on_settled = lambda request, receipts: None
        with self._keys() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS api_keys (key_sha256 TEXT PRIMARY KEY, name TEXT NOT NULL, "
                         "account_id TEXT NOT NULL, created_ms INTEGER NOT NULL)")
            conn.execute("CREATE TABLE IF NOT EXISTS usage (request_id TEXT PRIMARY KEY, account_id TEXT NOT NULL, "
                         "model TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, "
                         "cost_units INTEGER NOT NULL, finish_reason TEXT NOT NULL, ts_ms INTEGER NOT NULL)")
            conn.execute("CREATE INDEX IF NOT EXISTS usage_account ON usage (account_id, ts_ms)")

    def close(self) -> None:
        self.ledger.close()
        self.reader_engine.dispose()

    def _keys(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._keys_path, timeout=30.0, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        return _Closing(conn)

    # -- consumers ------------------------------------------------------------------------

    def add_consumer(self, name: str, credits_units: int) -> str:
        """Open the account, mint its credits, return a new API key (only its hash is kept)."""
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(f"consumer name {name!r} must be 1-64 characters of [A-Za-z0-9._-]")
        if type(credits_units) is not int or credits_units < 0:
            raise ValueError("credits must be a non-negative integer")
        account_id = f"consumer:{name}"
        with self._keys() as conn:
            if conn.execute("SELECT 1 FROM api_keys WHERE account_id = ?", (account_id,)).fetchone():
                raise ConsumerExists(f"consumer {name!r} exists")
        self.ledger.open_account(account_id, CONSUMER)
        if credits_units:
            self.ledger.mint(f"mint:{account_id}:initial", account_id, credits_units, memo="consumer add")
        api_key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._keys() as conn:
            conn.execute("INSERT INTO api_keys VALUES (?, ?, ?, ?)",
                         (hash_key(api_key), name, account_id, time.time_ns() // 1_000_000))
        return api_key

    def lookup(self, api_key: str) -> Consumer | None:
        if not api_key.startswith(KEY_PREFIX) or len(api_key) > 128:
            return None
        digest, now = hash_key(api_key), time.monotonic()
        with self._cache_lock:
            hit = self._cache.get(digest)
            if hit and hit[1] > now:
                return hit[0]
        with self._keys() as conn:
            row = conn.execute("SELECT name, account_id FROM api_keys WHERE key_sha256 = ?", (digest,)).fetchone()
        if row is None:
            return None
        consumer = Consumer(*row)
        with self._cache_lock:
            if len(self._cache) >= MAX_CACHED_KEYS:
                self._cache.clear()
            self._cache[digest] = (consumer, now + KEY_CACHE_S)
        return consumer

    # -- money ----------------------------------------------------------------------------

    def open_provider(self, peer_id: str, public_key: bytes) -> None:
        """The provider's ledger account, keyed to the key that signs its receipts (idempotent)."""
        self.ledger.open_account(peer_id, PROVIDER, public_key=public_key.hex())

    def price_units(self, prompt_tokens: int, new_tokens: int) -> int:
        """The quote: every token of the prompt and of `new_tokens` through every layer, plus fees."""
        return quote(prompt_tokens, new_tokens, self.n_layers, self.ledger.params).total_units

    def cost_units(self, tokens_processed: int) -> int:
        """What a request whose stages all processed `tokens_processed` tokens costs its consumer."""
        return self.price_units(tokens_processed, 0) if tokens_processed else 0

    def admit(self, consumer: Consumer, request_id: str, model: str, prompt_tokens: int, max_tokens: int) -> Charge:
        """Hold the request's maximum price; raises InsufficientFunds (nothing written) if it can't pay."""
        amount = self.price_units(prompt_tokens, max_tokens)
        self.ledger.hold(f"hold:{request_id}", consumer.account_id, amount, request_id)
        return Charge(consumer, request_id, model, prompt_tokens, max_tokens, amount)

    def finish(self, charge: Charge, completion_tokens: int, finish_reason: str, request=None) -> int:
        """Settle the hold on the receipts of `request`'s last attempt (a GenerationRequest), or
        void it when there are none. Returns what the consumer paid."""
        produced = max(0, min(completion_tokens, charge.max_tokens))
        rid = charge.request_id
        receipts: list[StageReceipt] = []
        if request is not None and request.stages:
            receipts = self.receipts.collect(request, charge.model)
        if receipts:
            # paid for is produced: tokens the pool made after the client stopped reading count too
            produced = max(produced, min(len(request.tokens), charge.max_tokens))
            self.ledger.settle(f"settle:{rid}", f"hold:{rid}", receipts)
            split = settle(charge.hold_units, [r.stage_work() for r in receipts], self.ledger.params)
            cost = split.total_units - split.refund_units
        else:
            self.ledger.void(f"void:{rid}", f"hold:{rid}", "no stage receipt: nothing to pay for")
            cost = 0
        with self._keys() as conn:
            conn.execute("INSERT OR IGNORE INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (rid, charge.consumer.account_id, charge.model, charge.prompt_tokens, produced, cost,
                          finish_reason, time.time_ns() // 1_000_000))
        if receipts:
            self.on_settled(request, receipts)
        return cost

    def account(self, consumer: Consumer) -> dict:
        aid = consumer.account_id
        with self.reader_engine.connect() as conn:
            balance = conn.execute(select(account_rows.c.balance_units).where(account_rows.c.id == aid)).scalar()
            held = conn.execute(select(func.coalesce(func.sum(hold_rows.c.amount_units - hold_rows.c.released_units), 0))
                                .where(hold_rows.c.account_id == aid, hold_rows.c.status == OPEN)).scalar()
        with self._keys() as conn:
            spent, requests = conn.execute("SELECT COALESCE(SUM(cost_units), 0), COUNT(*) FROM usage "
                                           "WHERE account_id = ?", (aid,)).fetchone()
            recent = conn.execute("SELECT request_id, model, prompt_tokens, completion_tokens, cost_units, "
                                  "finish_reason, ts_ms FROM usage WHERE account_id = ? ORDER BY ts_ms DESC LIMIT ?",
                                  (aid, RECENT_USAGE)).fetchall()
        cols = ("request_id", "model", "prompt_tokens", "completion_tokens", "cost_units", "finish_reason", "ts_ms")
        return {"object": "account", "name": consumer.name, "account_id": aid, "balance_units": int(balance or 0),
                "held_units": int(held), "spent_units": int(spent), "requests": int(requests),
                "recent_usage": [dict(zip(cols, r)) for r in recent]}


class _Closing:
    """sqlite3's context manager commits but does not close; this one does both."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, *exc) -> None:
        self.conn.close()


class RateLimiter:
    """A token bucket per key: `rps` requests a second on average, bursts of up to `burst`."""

    MAX_KEYS = 100_000

    def __init__(self, rps: float, burst: float | None = None, clock=time.monotonic):
        self.rps = float(rps)
        self.burst = float(burst if burst is not None else max(1.0, 2 * self.rps))
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0.0 if the request may go, else the seconds until it may."""
        if self.rps <= 0:
            return 0.0
        now = self.clock()
        with self._lock:
            if len(self._buckets) >= self.MAX_KEYS:
                self._buckets.clear()
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rps)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rps

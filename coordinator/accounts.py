"""Consumer accounts: API keys (stored hashed) in front of the ledger, which holds the credits.

- The ledger is opened with the coordinator's own Ed25519 key, the 32-byte seed in
  `DATA_DIR/node_ed25519.key` (its libp2p identity), so the log's signer is the peer id. Its
  database is `--db URL`, else the one `coordinator serve --db` recorded in DATA_DIR/ledger.url,
  else DATA_DIR/ledger.db (ledger/db.py): every command given the data directory finds it.
- Keys and usage are tables beside the ledger's, in the same database (coordinator/consumers.py).
- Money per request: `admit` holds the quote for prompt + max_tokens in escrow (InsufficientFunds
  -> 402); `finish` settles the hold on the stage receipts of the request's last attempt (see
  coordinator/receipts.py): each stage is paid gas for the tokens it processed times its layers,
  the fees go to their pools, the rest is refunded. The ledger computes that split, once; what a
  consumer is shown as spent is what the ledger's holds paid. Work without a receipt that checks
  out is not charged: with no receipt at all the hold is voided. Work of attempts a failover
  abandoned is not charged either; the consumer pays once for each token. A settlement the
  database does not take at once is retried until it lands (coordinator/settlement.py).
- Durable before delivered: `delivered` writes how many tokens a stream is about to have sent,
  and by which stages, before they leave; receipts of requests in flight are written as they come
  (coordinator/inflight.py). `recover`, at start, settles each hold a crash left open for exactly
  the tokens it delivered (coordinator/recovery.py).
- A consumer's ledger account is a random pseudonym (`consumer:c-…`), kept with its key: the
  public ledger never holds its name.
- Provider accounts are opened, with the provider's public key, when it registers; the stake it
  needs to serve is locked by coordinator/stakes.py.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from contracts import MoneyParams
from contracts.pricing import quote
from coordinator import consumers, inflight
from coordinator.consumers import Consumer, ConsumerExists, ConsumerStore, UsageRow
from coordinator.inflight import InflightStore
from coordinator.receipts import ReceiptBoard
from coordinator.settlement import POSTED, VOIDED, Settler
from ledger.db import make_engine, resolve_url
from ledger.errors import InsufficientFunds
from ledger.reader import LedgerReader
from ledger.receipts import StageReceipt
from ledger.service import LedgerService
from ledger.state import CONSUMER, PROVIDER
from node.transport.identity import KEY_FILE, load_or_create

log = logging.getLogger("meshpool.accounts")

KEY_PREFIX = "mp-"
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
KEY_CACHE_S = 5.0
MAX_CACHED_KEYS = 10_000
RECENT_USAGE = 20
CONSUMER_ACCOUNT_PREFIX = "consumer:c-"
PSEUDONYM_BYTES = 12  # 96 random bits: no two consumers ever draw the same

__all__ = ["Accounts", "Charge", "Consumer", "ConsumerExists", "InsufficientFunds", "RateLimiter", "Usage"]

# called with (request, paid receipts) after each settlement that landed: the auditor's entry point
SettledCallback = Callable[[object, list[StageReceipt]], None]


@dataclass(frozen=True)
class Charge:
    """An admitted request's hold."""
    consumer: Consumer
    request_id: str
    model: str
    prompt_tokens: int
    max_tokens: int
    hold_units: int


@dataclass(frozen=True)
class Usage:
    """A finished request as billed: the tokens counted once (the pool's, which the receipts were
    checked against) and how its hold was resolved (coordinator.settlement: posted, voided,
    pending while retried). Its price is the ledger's: `Accounts.account` reads it from the hold."""
    request_id: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    outcome: str


def new_account_id() -> str:
    """A consumer's pseudonymous ledger account: random, stored with its key, so stable across restarts."""
    return f"{CONSUMER_ACCOUNT_PREFIX}{secrets.token_hex(PSEUDONYM_BYTES)}"


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def coordinator_ledger_key(data_dir: Path) -> Ed25519PrivateKey:
    load_or_create(data_dir)  # creates the identity if the coordinator has never run here
    return Ed25519PrivateKey.from_private_bytes((Path(data_dir) / KEY_FILE).read_bytes())


class Accounts:
    def __init__(self, data_dir: Path, n_layers: int = 0, db: str | None = None, params: MoneyParams | None = None,
                 on_settled: SettledCallback | None = None):
        """`n_layers`: the served model's, for prices (0 where only accounts are managed).
        `db`: the ledger's database URL (default: the data directory's, see ledger.db.resolve_url).
        `params`: the money parameters of a new ledger (an existing one keeps those of its genesis).
        `on_settled(request, receipts)`: called after each settlement; `subscribe` adds more."""
        self.data_dir, self.n_layers = Path(data_dir), n_layers
        url = resolve_url(db, self.data_dir)
        self.ledger = LedgerService(make_engine(url), coordinator_ledger_key(self.data_dir),
                                    beside=[consumers.metadata, inflight.metadata],
                                    **({"params": params} if params else {}))
        self.reader_engine = make_engine(url, writer=False)
        self.reader = LedgerReader(self.reader_engine)
        self.store = ConsumerStore(self.ledger.engine, self.reader_engine)
        self._cache: dict[str, tuple[Consumer, float]] = {}
        self._cache_lock = threading.Lock()
        self.inflight = InflightStore(self.ledger.engine, self.reader_engine)
        # requests admitted here and not yet resolved: only their receipts are worth a write
        self._open_requests: set[str] = set()
        self.receipts = ReceiptBoard(persist=self._keep_receipt)
        self._subscribers: list[SettledCallback] = [on_settled] if on_settled else []
        self.settler = Settler(self.ledger, self.reader, self._settled)

    def subscribe(self, on_settled: SettledCallback) -> None:
        """Call `on_settled(request, receipts)` after each settlement that lands (from then on)."""
        self._subscribers = [*self._subscribers, on_settled]

    def _settled(self, request, receipts: list[StageReceipt]) -> None:
        for callback in self._subscribers:
            callback(request, receipts)

    def recover(self):
        """At start, before anything runs: settle every hold a stop left open for the tokens it had
        delivered, refund the rest (coordinator/recovery.py)."""
        from coordinator.recovery import recover

        return recover(self.ledger, self.inflight, self.store)

    def close(self) -> None:
        self.settler.stop()
        self.ledger.close()
        self.reader_engine.dispose()

    # -- consumers ------------------------------------------------------------------------

    def add_consumer(self, name: str, credits_units: int) -> str:
        """Open the account, mint its credits, return a new API key (only its hash is kept)."""
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(f"consumer name {name!r} must be 1-64 characters of [A-Za-z0-9._-]")
        if type(credits_units) is not int or credits_units < 0:
            raise ValueError("credits must be a non-negative integer")
        if self.store.has_name(name):
            raise ConsumerExists(f"consumer {name!r} exists")
        # The ledger is public and its log is signed for good: it names the account by a random
        # pseudonym, never by the consumer's name, which stays in the key table beside it.
        account_id = new_account_id()
        self.ledger.open_account(account_id, CONSUMER)
        if credits_units:
            self.ledger.mint(f"mint:{account_id}:initial", account_id, credits_units, memo="consumer add")
        api_key = KEY_PREFIX + secrets.token_urlsafe(32)
        self.store.add_key(hash_key(api_key), name, account_id)
        return api_key

    def lookup(self, api_key: str) -> Consumer | None:
        if not api_key.startswith(KEY_PREFIX) or len(api_key) > 128:
            return None
        digest, now = hash_key(api_key), time.monotonic()
        with self._cache_lock:
            hit = self._cache.get(digest)
            if hit and hit[1] > now:
                return hit[0]
        consumer = self.store.find_key(digest)
        if consumer is None:
            return None
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

    def admit(self, consumer: Consumer, request_id: str, model: str, prompt_tokens: int, max_tokens: int) -> Charge:
        """Hold the request's maximum price; raises InsufficientFunds (nothing written) if it can't pay."""
        amount = self.price_units(prompt_tokens, max_tokens)
        self.ledger.hold(f"hold:{request_id}", consumer.account_id, amount, request_id)
        self._open_requests.add(request_id)
        return Charge(consumer, request_id, model, prompt_tokens, max_tokens, amount)

    def finish(self, charge: Charge, request, finish_reason: str) -> Usage:
        """Resolve the hold of `request` (a GenerationRequest; None if it never reached the pool):
        settled on the receipts of its last attempt, or voided when there are none."""
        receipts: list[StageReceipt] = []
        if request is not None and request.stages:
            receipts = self.receipts.collect(request, charge.model)
        # Read once, after the receipts: they were checked against this count (a client that left
        # pays the tokens the pool made after it stopped reading).
        completion_tokens = len(request.tokens) if request is not None else 0
        # The row first: a crash before the hold resolves leaves a row the restart's void prices at 0.
        # It carries no money, so failing to write it must not keep the hold from resolving.
        try:
            self.store.record(charge.consumer.account_id, UsageRow(
                charge.request_id, f"hold:{charge.request_id}", charge.model, charge.prompt_tokens,
                completion_tokens, finish_reason, time.time_ns() // 1_000_000))
        except Exception:
            log.exception("request %s: its usage row was not written", charge.request_id)
        outcome = self.settler.resolve(charge.request_id, receipts, "no stage receipt: nothing to pay for", request)
        self._open_requests.discard(charge.request_id)
        if outcome in (POSTED, VOIDED):  # resolved: what was journaled for a restart is history
            try:
                self.inflight.forget([charge.request_id])
            except Exception:  # the next start removes it
                log.exception("request %s: its in-flight rows were not removed", charge.request_id)
        return Usage(charge.request_id, charge.prompt_tokens, completion_tokens, finish_reason, outcome)

    async def delivered_async(self, charge: Charge, request, delivered_tokens: int) -> None:
        """Before the client is sent more tokens: `delivered_tokens` in all, computed by the stages of
        `request`'s current attempt, written to the database (what a restart settles on). Its write
        joins the other streams' in one transaction, and no thread waits for it."""
        await self.inflight.delivered_async(charge.request_id, f"hold:{charge.request_id}", charge.model,
                                            charge.prompt_tokens, delivered_tokens, request.stages)

    def _keep_receipt(self, receipt: StageReceipt) -> None:
        """A checked receipt of a request in flight goes to the database before the provider is
        acknowledged, so a restart can pay on it (others are not written: nobody settles them)."""
        if receipt.request_id in self._open_requests:
            self.inflight.add_receipt(receipt)

    def account(self, consumer: Consumer) -> dict:
        """Balance, held and spent as the ledger has them, and recent usage priced by its holds."""
        aid = consumer.account_id
        money = self.reader.spending(aid)
        requests, recent = self.store.recent(aid, RECENT_USAGE)
        paid = self.reader.paid_units([u.hold_id for u in recent])
        return {"object": "account", "name": consumer.name, "account_id": aid,
                "balance_units": money["balance_units"], "held_units": money["held_units"],
                "spent_units": money["paid_units"], "requests": requests,
                "recent_usage": [{"request_id": u.request_id, "model": u.model, "prompt_tokens": u.prompt_tokens,
                                  "completion_tokens": u.completion_tokens, "cost_units": paid.get(u.hold_id, 0),
                                  "finish_reason": u.finish_reason, "ts_ms": u.ts_ms} for u in recent]}


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

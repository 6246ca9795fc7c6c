"""The ledger service: every balance change as signed, hash-chained double-entry legs, one op per transaction.

Each public method is an *operation* with a caller-chosen `op_id` (its idempotency key). An
operation takes the global append lock, and then either
- finds its op_id already in the log: same fields -> `OpResult(status="exists")`, nothing written;
  different fields -> `IdempotencyConflict`;
- or builds its legs from the current state, applies them with `state.apply` (which refuses
  negative balances, zero or overflowing amounts, unknown accounts...) and appends them, signed,
  with the account, hold and head rows, in the same transaction. A refusal writes nothing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import MetaData, func, insert, inspect, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from contracts import DEFAULT_PARAMS, MoneyParams
from contracts.settlement import StageWork
from ledger import legs as leg_rules
from ledger import merkle, state
from ledger.chain import ZERO_HASH, CheckpointBody, Entry, canonical_json, meta_json, public_key_hex, sign_hash
from ledger.db import is_postgres, make_engine, resolve_url
from ledger.errors import IdempotencyConflict, InvalidTransfer, KeyMismatch, LedgerCorrupt, LedgerError, UnknownHold
from ledger.models import Base, checkpoints, entries, holds, receipts
from ledger.receipts import StageReceipt
from ledger.store import DbView, Head, lock_head, save_head

OP_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9:._/+=@-]{0,159}")
MAX_RETRIES = 8

log = logging.getLogger("meshpool.ledger")


@dataclass(frozen=True)
class OpResult:
    op_id: str
    status: str  # "created" or "exists"
    first_seq: int
    legs: int


@dataclass(frozen=True)
class Checkpoint:
    entry_count: int
    head_hash: str
    tree_root: str
    ts_ms: int
    signature: str


@dataclass(frozen=True)
class RecoveryReport:
    entry_count: int
    settled_holds: tuple[str, ...]
    voided_holds: tuple[str, ...]
    checkpoint: Checkpoint


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class LedgerService:
    def __init__(self, engine: Engine, signing_key: Ed25519PrivateKey, *, params: MoneyParams | None = None,
                 checkpoint_every_entries: int = 1000, clock_ms: Callable[[], int] = _now_ms,
                 beside: Sequence[MetaData] = ()) -> None:
        """Open the ledger in `engine`, creating its tables and genesis entry if it is new.

        `params`: the money parameters of a new ledger (default DEFAULT_PARAMS); an existing ledger
        keeps those of its genesis entry, and giving other ones raises KeyMismatch.
        `beside`: other tables to keep in the same database (the coordinator's API keys and usage),
        created with the ledger's under the same lock. The log never refers to them."""
        self.engine = engine
        self._beside = tuple(beside)
        self._key = signing_key
        self.public_key = public_key_hex(signing_key)
        self.params = params
        self.checkpoint_every_entries = checkpoint_every_entries
        self._clock_ms = clock_ms
        # Writers of one process queue here rather than spin on the database's lock.
        self._write_lock = threading.RLock()
        self._local = threading.local()
        self._init()

    @classmethod
    def open(cls, signing_key: Ed25519PrivateKey, db: str | None = None, data_dir=None, **kwargs) -> "LedgerService":
        """Open (creating if needed) the ledger at `--db URL` or DATA_DIR/ledger.db."""
        return cls(make_engine(resolve_url(db, data_dir)), signing_key, **kwargs)

    def close(self) -> None:
        self.engine.dispose()

    # ---- setup -------------------------------------------------------------------------
    def _init(self) -> None:
        with self.engine.begin() as conn:
            if is_postgres(self.engine):  # two services starting at once must not race on CREATE TABLE
                conn.execute(text("SELECT pg_advisory_xact_lock(7275846)"))
            Base.metadata.create_all(conn)
            _add_later_columns(conn)
            for metadata in self._beside:
                metadata.create_all(conn)
            genesis = conn.execute(select(entries.c.meta_json).where(entries.c.seq == 0)).scalar()
        if self.params is None:
            self.params = MoneyParams.from_dict(json.loads(genesis)["params"]) if genesis else DEFAULT_PARAMS
        # Creates genesis on first use; on a later open the same key and params give "exists", others KeyMismatch.
        self._run("genesis", {"op": "genesis", "public_key": self.public_key, "params": self.params.to_dict()},
                  lambda view, conn: leg_rules.genesis_legs(self.public_key, self.params), genesis=True)

    # ---- operations --------------------------------------------------------------------
    def open_account(self, account_id: str, kind: str, public_key: str | None = None,
                     op_id: str | None = None) -> OpResult:
        state.check_id("account id", account_id)
        op_id = op_id or f"open:{account_id}"
        return self._run(op_id, {"op": "open", "account": account_id, "kind": kind, "public_key": public_key},
                         lambda view, conn: [leg_rules.Leg("open", None, account_id, 0,
                                                           meta={"kind": kind, "public_key": public_key})])

    def mint(self, op_id: str, account_id: str, amount_units: int, memo: str = "") -> OpResult:
        return self._simple(op_id, "mint", None, account_id, amount_units, memo)

    def burn(self, op_id: str, account_id: str, amount_units: int, memo: str = "") -> OpResult:
        return self._simple(op_id, "burn", account_id, None, amount_units, memo)

    def transfer(self, op_id: str, debit_id: str, credit_id: str, amount_units: int, memo: str = "") -> OpResult:
        return self._simple(op_id, "transfer", debit_id, credit_id, amount_units, memo)

    def hold(self, op_id: str, account_id: str, amount_units: int, request_id: str) -> OpResult:
        """Hold a request's maximum price in escrow; `op_id` is the hold id that settle/void name."""
        state.check_id("hold id", op_id)
        state.check_amount(amount_units)
        return self._run(op_id, {"op": "hold", "account": account_id, "amount_units": amount_units,
                                 "request_id": request_id},
                         lambda view, conn: [leg_rules.Leg("hold", account_id, state.ESCROW_REQUESTS, amount_units,
                                                           meta={"request_id": request_id})])

    def settle(self, op_id: str, hold_id: str, stage_receipts: Sequence[StageReceipt]) -> OpResult:
        """Pay the stages on their receipts, the fees, refund the rest; closes the hold as posted.

        A failed or abandoned request settles the same way with the receipts of the work done."""
        receipts_list = list(stage_receipts)

        def build(view: DbView, conn: Connection) -> list[leg_rules.Leg]:
            hold = self._open_hold(view, hold_id)
            view.prefetch([r.provider_id for r in receipts_list if isinstance(r, StageReceipt)])
            leg_rules.check_receipts(view, hold, receipts_list)
            built = leg_rules.settlement_legs(hold, receipts_list, self.params)
            if receipts_list:
                conn.execute(insert(receipts), [{"op_id": op_id, "stage_index": i,
                                                 "body_json": canonical_json(r.to_dict()).decode()}
                                                for i, r in enumerate(receipts_list)])
            return built

        request = {"op": "settle", "hold": hold_id,
                   "receipts": [r.to_dict() if isinstance(r, StageReceipt) else repr(r) for r in receipts_list]}
        return self._run(op_id, request, build)

    def settle_on_plan(self, op_id: str, hold_id: str, plan: Sequence[StageWork]) -> OpResult:
        """Settle a hold on work the coordinator attests rather than on signed receipts: what it had
        delivered through the stages it recorded, when those stages' receipts never came (a crash).
        Paid exactly as `settle` pays receipts of that work; the plan is kept in the close entry."""
        items = [leg_rules.plan_item(w) if isinstance(w, StageWork) else w for w in plan]
        work = leg_rules.plan_from_items(items)
        for w in work:
            state.check_id("provider id", w.provider_id)

        def build(view: DbView, conn: Connection) -> list[leg_rules.Leg]:
            return leg_rules.plan_settlement_legs(self._open_hold(view, hold_id), work, self.params)

        return self._run(op_id, {"op": "settle_plan", "hold": hold_id, "plan": items}, build)

    def void(self, op_id: str, hold_id: str, reason: str) -> OpResult:
        """Refund the whole hold (nothing was done) and close it as voided."""
        return self._run(op_id, {"op": "void", "hold": hold_id, "reason": reason},
                         lambda view, conn: leg_rules.void_legs(self._open_hold(view, hold_id), reason))

    def lock_stake(self, op_id: str, provider_id: str, amount_units: int) -> OpResult:
        return self._simple(op_id, "stake", provider_id, state.ESCROW_STAKES, amount_units, "")

    def fund_stake(self, op_id: str, provider_id: str, amount_units: int, memo: str) -> OpResult:
        """An operator-funded stake: mint `amount_units` to the provider and lock them, in one operation.

        Both legs land together or neither does; the op id makes a resend lock nothing more."""
        state.check_amount(amount_units)
        if not isinstance(memo, str) or not 0 < len(memo) <= 200:
            raise InvalidTransfer("a funded stake needs a memo of 1-200 characters")
        return self._run(op_id, {"op": "fund_stake", "provider": provider_id, "amount_units": amount_units,
                                 "memo": memo},
                         lambda view, conn: [leg_rules.Leg("mint", None, provider_id, amount_units, meta={"memo": memo}),
                                             leg_rules.Leg("stake", provider_id, state.ESCROW_STAKES, amount_units)])

    def unlock_stake(self, op_id: str, provider_id: str, amount_units: int) -> OpResult:
        return self._simple(op_id, "unstake", state.ESCROW_STAKES, provider_id, amount_units, "")

    def slash(self, op_id: str, peer_id: str, amount_units: int, reason: str, evidence: object) -> OpResult:
        """Take `amount_units` from the peer's stake first, then its balance, to the treasury; record the penalty."""
        state.check_amount(amount_units)

        def build(view: DbView, conn: Connection) -> list[leg_rules.Leg]:
            peer = view.account(peer_id)
            if peer is None or peer.kind not in (state.PROVIDER, state.VERIFIER):
                raise InvalidTransfer(f"no provider or verifier account {peer_id!r} to slash")
            return leg_rules.slash_legs(peer_id, peer.stake_units, peer.balance_units, amount_units, reason, evidence)

        return self._run(op_id, {"op": "slash", "peer": peer_id, "amount_units": amount_units, "reason": reason,
                                 "evidence": evidence}, build)

    def record_audit(self, op_id: str, *, audit_id: str, verifier_id: str, subject_id: str, verifier_agreed: bool,
                     subject_passed: bool, fee_units: int = 0) -> OpResult:
        """Record an audit's outcome (standing of verifier and subject) and pay the verifier from the audit pool."""
        state.check_amount(fee_units, allow_zero=True)
        meta = {"audit_id": audit_id, "subject": subject_id, "verifier_agreed": verifier_agreed,
                "subject_passed": subject_passed}
        debit = state.FEES_VERIFICATION if fee_units else None
        return self._run(op_id, {"op": "audit", "verifier": verifier_id, "fee_units": fee_units, **meta},
                         lambda view, conn: [leg_rules.Leg("audit", debit, verifier_id, fee_units, meta=meta)])

    def record_misconduct(self, op_id: str, peer_id: str, reason: str, evidence: dict) -> OpResult:
        """Record a signed claim that the coordinator's measurement contradicted: it costs the peer
        reputation (contracts.audits.after_misconduct). `evidence` carries an int `claim_ratio` above the
        ledger's `misconduct_claim_ratio`; the op id makes a resend cost nothing more."""
        return self._run(op_id, {"op": "misconduct", "peer": peer_id, "reason": reason, "evidence": evidence},
                         lambda view, conn: [leg_rules.Leg("misconduct", None, peer_id, 0,
                                                           meta={"reason": reason, "evidence": evidence})])

    def checkpoint(self) -> Checkpoint:
        """Sign and store a tree head for the log as it is now."""
        batch = getattr(self._local, "batch", None)
        if batch is not None:
            return self._write_checkpoint(*batch)
        with self._write_lock, self.engine.begin() as conn:
            head = lock_head(conn)
            cp = self._write_checkpoint(conn, head)
            save_head(conn, head)
        return cp

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group commit: this thread's operations inside the block share one transaction (one fsync).

        Each operation is still created, found to exist, or refused on its own (a savepoint each);
        the block commits them all at its end, or none if the block raises."""
        if getattr(self._local, "batch", None) is not None:
            raise LedgerError("ledger batches do not nest")
        with self._write_lock, self.engine.begin() as conn:
            head = lock_head(conn)
            if head is None:
                raise LedgerCorrupt("the ledger has no genesis entry")
            self._local.batch = (conn, head)
            try:
                yield
                save_head(conn, head)
            finally:
                self._local.batch = None

    def recover(self, resolve: Callable[[str, str], Sequence[StageReceipt] | Sequence[StageWork] | None] | None = None
                ) -> RecoveryReport:
        """Startup step after a crash: check the stored head against the log, resolve every open hold.

        `resolve(hold_id, request_id)` may return the receipts of work done (the hold is settled on
        them) or a plan of StageWork the coordinator attests (settled on it, `settle_on_plan`);
        otherwise, or without it, the hold is voided and the consumer refunded. A settlement the
        ledger refuses is voided instead. Every operation's id is `recover:<hold id>`, so a crash
        during recovery and a second start settle nothing twice."""
        with self.engine.connect() as conn:
            self._check_tail(conn)
            open_holds = conn.execute(select(holds.c.id, holds.c.request_id).where(holds.c.status == state.OPEN)
                                      .order_by(holds.c.opened_seq)).all()
        settled, voided = [], []
        for hold_id, request_id in open_holds:
            found = resolve(hold_id, request_id) if resolve else None
            if found:
                try:
                    if all(isinstance(w, StageWork) for w in found):
                        self.settle_on_plan(f"recover:{hold_id}", hold_id, found)
                    else:
                        self.settle(f"recover:{hold_id}", hold_id, found)
                    settled.append(hold_id)
                    continue
                except LedgerCorrupt:
                    raise
                except LedgerError as exc:
                    log.error("hold %s: recovery's settlement refused (%s); refunding the consumer", hold_id, exc)
            self.void(f"recover:{hold_id}", hold_id, "coordinator restarted before settlement")
            voided.append(hold_id)
        cp = self.checkpoint()
        return RecoveryReport(cp.entry_count, tuple(settled), tuple(voided), cp)

    # ---- machinery ---------------------------------------------------------------------
    def _simple(self, op_id: str, kind: str, debit: str | None, credit: str | None, amount: int, memo: str) -> OpResult:
        state.check_amount(amount)
        if not isinstance(memo, str) or len(memo) > 200:
            raise InvalidTransfer("memo must be a string of at most 200 characters")
        meta = {"memo": memo} if memo else {}
        return self._run(op_id, {"op": kind, "debit": debit, "credit": credit, "amount_units": amount, "memo": memo},
                         lambda view, conn: [leg_rules.Leg(kind, debit, credit, amount, meta=meta)])

    @staticmethod
    def _open_hold(view: DbView, hold_id: str) -> state.HoldState:
        hold = view.hold(hold_id)
        if hold is None:
            raise UnknownHold(f"no hold {hold_id!r}")
        return hold

    def _run(self, op_id: str, request: dict, build, *, genesis: bool = False) -> OpResult:
        if not isinstance(op_id, str) or not OP_ID_PATTERN.fullmatch(op_id):
            raise InvalidTransfer(f"op id {op_id!r} must be 1-160 characters of [A-Za-z0-9:._/+=@-]")
        digest = hashlib.sha256(canonical_json(request)).hexdigest()
        batch = getattr(self._local, "batch", None)
        if batch is not None:
            conn, head = batch
            saved = copy.deepcopy(head)
            savepoint = conn.begin_nested()
            try:
                result = self._append(conn, head, op_id, digest, build, genesis)
            except BaseException:
                savepoint.rollback()
                head.__dict__.update(saved.__dict__)
                raise
            savepoint.commit()
            return result
        for attempt in range(MAX_RETRIES):
            try:
                with self._write_lock, self.engine.begin() as conn:
                    head = lock_head(conn)
                    create = head is None
                    if create:
                        if not genesis:
                            raise LedgerCorrupt("the ledger has no genesis entry")
                        head = Head(0, ZERO_HASH, [], state.Totals(), 0)
                    result = self._append(conn, head, op_id, digest, build, genesis)
                    if result.status == "created":
                        save_head(conn, head, create=create)
                    return result
            except (OperationalError, IntegrityError) as exc:
                if attempt + 1 == MAX_RETRIES or not _retryable(exc):
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    def _append(self, conn: Connection, head: Head, op_id: str, digest: str, build, genesis: bool) -> OpResult:
        """Append op `op_id` after `head` (locked by the caller), advancing `head` in memory."""
        if head.entry_count:
            found = conn.execute(select(entries.c.seq, entries.c.meta_json).where(
                entries.c.op_id == op_id, entries.c.leg == 0)).first()
            if found is not None:
                stored = json.loads(found.meta_json).get("op_digest")
                if stored != digest:
                    if genesis:
                        raise KeyMismatch("this ledger was created with another coordinator key or other money "
                                          "parameters than the ones given to the service")
                    raise IdempotencyConflict(f"op {op_id!r} exists with other fields; the first one stands")
                count = conn.execute(select(func.count()).select_from(entries).where(entries.c.op_id == op_id)).scalar()
                return OpResult(op_id, "exists", found.seq, count)
        view = DbView(conn, head.totals)
        built = build(view, conn)
        view.prefetch([x for leg in built for x in (leg.debit_id, leg.credit_id, leg.meta.get("peer"),
                                                     leg.meta.get("subject")) if isinstance(x, str)])
        first_seq = head.entry_count
        ts_ms = self._clock_ms()
        rows = []
        for index, leg in enumerate(built):
            meta = dict(leg.meta)
            if index == 0:
                meta["op_digest"] = digest
            entry = Entry(head.entry_count, op_id, index, leg.kind, leg.debit_id, leg.credit_id, leg.amount_units,
                          leg.ref_id, meta, ts_ms, head.head_hash)
            state.apply(entry, view, self.params)
            text = meta_json(meta)
            entry_hash = entry.hash()
            rows.append({"seq": entry.seq, "op_id": op_id, "leg": index, "kind": leg.kind, "debit_id": leg.debit_id,
                         "credit_id": leg.credit_id, "amount_units": leg.amount_units, "ref_id": leg.ref_id,
                         "meta_json": text, "ts_ms": ts_ms, "prev_hash": head.head_hash,
                         "entry_hash": entry_hash.hex(), "signature": sign_hash(self._key, entry_hash).hex()})
            head.frontier = merkle.frontier_append(head.frontier, head.entry_count, entry_hash)
            head.entry_count += 1
            head.head_hash = entry_hash.hex()
        conn.execute(insert(entries), rows)
        view.flush()
        every = self.checkpoint_every_entries
        if every and head.entry_count // every > head.last_checkpoint_count // every:
            self._write_checkpoint(conn, head)
        return OpResult(op_id, "created", first_seq, len(rows))

    def _write_checkpoint(self, conn: Connection, head: Head) -> Checkpoint:
        if head.last_checkpoint_count == head.entry_count:
            row = conn.execute(select(checkpoints).where(checkpoints.c.entry_count == head.entry_count)).mappings().first()
            if row is not None:
                return Checkpoint(**row)
        body = CheckpointBody(head.entry_count, head.head_hash, merkle.frontier_root(head.frontier).hex(), self._clock_ms())
        cp = Checkpoint(body.entry_count, body.head_hash, body.tree_root, body.ts_ms, body.sign(self._key).hex())
        conn.execute(insert(checkpoints).values(**cp.__dict__))
        head.last_checkpoint_count = head.entry_count
        return cp

    def _check_tail(self, conn: Connection) -> None:
        head = lock_head(conn)
        last = conn.execute(select(entries.c.seq, entries.c.entry_hash).order_by(entries.c.seq.desc()).limit(1)).first()
        if head is None or last is None or last.seq + 1 != head.entry_count or last.entry_hash != head.head_hash:
            raise LedgerCorrupt("the chain head row does not match the last entry; run `ledger verify`")


# Columns added to a table after ledgers existed, with their DDL: `create_all` makes new tables only, so
# an older table gets them here, each at the value a replay of its log gives (no entry set it yet).
_LATER_COLUMNS = {"accounts": {"misconduct_count": "BIGINT NOT NULL DEFAULT 0"}}


def _add_later_columns(conn: Connection) -> None:
    inspector = inspect(conn)
    for table, columns in _LATER_COLUMNS.items():
        have = {c["name"] for c in inspector.get_columns(table)}
        for name, ddl in columns.items():
            if name not in have:
                conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {name} {ddl}"))


def _retryable(exc: DBAPIError) -> bool:
    code = getattr(getattr(exc, "orig", None), "sqlstate", None)
    if code in ("40001", "40P01", "23505"):  # serialization failure, deadlock, unique race: ids make retry safe
        return True
    text = str(exc.orig).lower() if exc.orig is not None else ""
    return "locked" in text or "busy" in text

"""A coordinator's start after a crash: every hold left open is settled for what was delivered.

For each open hold the ledger asks `Recovery.resolve` (LedgerService.recover):
- no `inflight_requests` row, or none of its tokens delivered: voided, the consumer refunded in
  full (a request answered in one body is sent only after it settled, so none of it was seen);
- d tokens delivered: each stage of the attempt recorded with them processed the prompt and the
  first d - 1 of them (the last one sampled is never fed back), `tokens = prompt + d - 1`, as
  settlement normally counts. If every stage of that attempt sent a receipt for exactly that many
  tokens, continuous in its hashes (stage i's input = stage i-1's output), the hold settles on
  those signed receipts; otherwise (the usual case: a stage signs only once the request is
  closed, which a crash prevents) on the recorded plan: the same gas for the same work, attested
  by the coordinator in the close entry instead of by the stages (`LedgerService.settle_on_plan`).
  Receipts for more tokens than were delivered are not used: after a crash the consumer pays for
  the tokens it was sent, never for ones computed after the last record.
The op ids are `recover:<hold id>`: a crash during recovery, or a second start, settles nothing
twice. A recovered request that delivered tokens gets its usage row (finish reason "interrupted",
the tokens delivered), so the consumer's /v1/account lists it with what it cost, unless the
request had written its own before the crash. Rows of holds no longer open are removed afterwards.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import select

from contracts.settlement import StageWork
from coordinator.consumers import ConsumerStore, UsageRow
from coordinator.inflight import Inflight, InflightStore
from ledger.models import holds
from ledger.receipts import StageReceipt
from ledger.service import LedgerService, RecoveryReport

log = logging.getLogger("meshpool.recovery")

INTERRUPTED = "interrupted"  # the finish reason of a request the coordinator's stop cut short


def tokens_processed(row: Inflight) -> int:
    """Positions each stage processed to produce the delivered tokens (0: nothing delivered)."""
    return row.prompt_tokens + row.delivered_tokens - 1 if row.delivered_tokens > 0 else 0


def matching_receipts(row: Inflight, stored: dict[str, StageReceipt]) -> list[StageReceipt] | None:
    """The stored receipts, in stage order, if every stage of the recorded attempt signed for exactly
    the delivered work; else None. Stage 0's input hash is taken as signed: the token ids themselves
    are not journaled (the audit of that stage re-checks them)."""
    n, chosen, previous_output = tokens_processed(row), [], None
    for stage in row.plan:
        r = stored.get(stage.peer_id)
        if (r is None or r.model != row.model or (r.layer_start, r.layer_end) != (stage.start, stage.end)
                or r.token_count != n or (stage.dtype and r.dtype != stage.dtype)
                or (previous_output is not None and r.input_hash != previous_output)):
            return None
        chosen.append(r)
        previous_output = r.output_hash
    return chosen or None


class Recovery:
    def __init__(self, ledger: LedgerService, store: InflightStore, usage: ConsumerStore | None = None):
        self.ledger, self.store, self.usage = ledger, store, usage
        self.rows: dict[str, Inflight] = {}

    def resolve(self, hold_id: str, request_id: str) -> list[StageReceipt] | list[StageWork] | None:
        row = self.rows.get(request_id)
        if row is None or row.hold_id != hold_id or tokens_processed(row) <= 0 or not row.plan:
            return None
        receipts = matching_receipts(row, self.store.receipts_for(request_id))
        if receipts:
            log.info("hold %s: settled on the stages' receipts for %d delivered tokens", hold_id, row.delivered_tokens)
            return receipts
        log.info("hold %s: settled on the recorded pipeline for %d delivered tokens", hold_id, row.delivered_tokens)
        n = tokens_processed(row)
        return [StageWork(s.peer_id, s.start, s.end, n) for s in row.plan]

    def run(self) -> RecoveryReport:
        self.rows = self.store.all()
        report = self.ledger.recover(self.resolve)
        self._record_usage(report.settled_holds)
        # every hold is resolved now: what the tables still name is history
        self.store.forget(self.store.request_ids())
        if report.settled_holds or report.voided_holds:
            log.warning("recovered %d holds a stop left open: %d settled for the tokens delivered, %d refunded",
                        len(report.settled_holds) + len(report.voided_holds), len(report.settled_holds),
                        len(report.voided_holds))
        return report


    def _record_usage(self, settled_holds: tuple[str, ...]) -> None:
        if self.usage is None:
            return
        by_hold = {row.hold_id: row for row in self.rows.values()}
        now_ms = time.time_ns() // 1_000_000
        for hold_id in settled_holds:
            row = by_hold.get(hold_id)
            account_id = self._hold_account(hold_id)
            if row is None or account_id is None:
                continue
            try:  # idempotent: a row the request wrote itself stands
                self.usage.record(account_id, UsageRow(row.request_id, hold_id, row.model, row.prompt_tokens,
                                                       row.delivered_tokens, INTERRUPTED, now_ms))
            except Exception:  # it carries no money: the settlement stands without it
                log.exception("hold %s: its usage row was not written", hold_id)

    def _hold_account(self, hold_id: str) -> str | None:
        with self.ledger.engine.connect() as conn:
            return conn.execute(select(holds.c.account_id).where(holds.c.id == hold_id)).scalar()


def recover(ledger: LedgerService, store: InflightStore, usage: ConsumerStore | None = None) -> RecoveryReport:
    """Resolve every hold a stop left open, from what the database recorded (see the module's text)."""
    return Recovery(ledger, store, usage).run()

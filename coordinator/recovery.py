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
twice. Rows of holds that are no longer open are removed afterwards.
"""

from __future__ import annotations

import logging

from contracts.settlement import StageWork
from coordinator.inflight import Inflight, InflightStore
from ledger.receipts import StageReceipt
from ledger.service import LedgerService, RecoveryReport

log = logging.getLogger("meshpool.recovery")


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
    def __init__(self, ledger: LedgerService, store: InflightStore):
        self.ledger, self.store = ledger, store
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
        # every hold is resolved now: what the tables still name is history
        self.store.forget(self.store.request_ids())
        if report.settled_holds or report.voided_holds:
            log.warning("recovered %d holds a stop left open: %d settled for the tokens delivered, %d refunded",
                        len(report.settled_holds) + len(report.voided_holds), len(report.settled_holds),
                        len(report.voided_holds))
        return report


def recover(ledger: LedgerService, store: InflightStore) -> RecoveryReport:
    """Resolve every hold a stop left open, from what the database recorded (see the module's text)."""
    return Recovery(ledger, store).run()

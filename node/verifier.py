"""A provider's side of audits (DESIGN decision 5), on the /meshpool/audit/1 protocol.

- `AuditFetch`: hand the tensors retained for a request to the coordinator, or to a verifier that
  shows the coordinator's signed ticket for that request (the tensors are a consumer's prompt
  in disguise: nobody else gets them).
- `AuditTask` (from the coordinator only): fetch the audited stage's tensors, judge them with
  verification.check.check_stage, and answer an `AuditVerdict`. What keeps the verifier from
  judging (the tensors cannot be fetched, it holds another model) is "unchecked": it blames nobody.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import torch

from node.layer_reference import LayerAuditor
from node.profile import hardware_class
from node.retention import RetentionStore
from node.transport import Frame, P2PNode, TransportError
from node.transport.identity import verify_by_peer_id
from verification.check import FAIL, UNCHECKED, Outcome, check_stage
from wire.messages import (PROTO_AUDIT, AuditData, AuditFetch, AuditTask, AuditVerdict, MessageError, decode, refuse,
                           ticket_bytes)

log = logging.getLogger("meshpool.provider")

FETCH_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 10.0


def fetch_retained(node: P2PNode, task: AuditTask, expires_ms: int, ticket: bytes) -> list[torch.Tensor]:
    """The subject's retained [input, *output, trace], fetched part by part (AuditData); raises
    TransportError (could not reach it) or MessageError (it answered, but did not hand over its
    tensors)."""
    if task.subject_addrs:
        node.connect(task.subject_addrs[0], timeout_s=CONNECT_TIMEOUT_S)

    def part(index: int, parts: int | None) -> AuditData:
        reply = node.request(task.subject, PROTO_AUDIT,
                             AuditFetch(task.request_id, expires_ms, ticket, index).to_frame(), timeout_s=FETCH_TIMEOUT_S)
        message = decode(reply)
        if not isinstance(message, AuditData):
            raise MessageError(f"the stage did not hand over its tensors: {getattr(message, 'reason', reply.type)}")
        if message.part != index or (parts is not None and message.parts != parts):
            raise MessageError(f"asked for part {index} of {parts}, got {message.part} of {message.parts}")
        return message

    first = part(0, None)
    if first.parts == 1:
        return list(first.tensors)
    slices = [part(i, first.parts).tensors for i in range(1, first.parts)]
    if any(len(s) != 1 for s in slices):
        raise MessageError("a part of the trace carries more than one tensor")
    try:
        trace = torch.cat([s[0] for s in slices])
    except RuntimeError as exc:  # slices of different dtypes or shapes
        raise MessageError(f"the trace's parts do not fit together: {exc}") from exc
    return [*first.tensors, trace]


def as_verdict(audit_id: str, outcome: Outcome) -> Frame:
    metrics = dict(list(outcome.metrics.items())[:32])
    return AuditVerdict(audit_id, outcome.outcome, outcome.reason[:2000], metrics).to_frame()


class AuditService:
    def __init__(self, node: P2PNode, model_dir: Path, device: torch.device, retained: RetentionStore,
                 coordinator_peer, lies: bool = False, on_audit=None):
        """`coordinator_peer()`: the coordinator's peer id (known once connected). `lies`: the
        bad-verifier fault, which reports a mismatch whatever it finds. `on_audit()`: counts audits done."""
        self.node, self.model_dir, self.device = node, model_dir, device
        self.retained, self.coordinator_peer, self.lies = retained, coordinator_peer, lies
        self.on_audit = on_audit or (lambda: None)
        self._auditor: LayerAuditor | None = None
        self._lock = threading.Lock()  # guards _auditor's creation

    def handle(self, frame: Frame, peer: str) -> Frame:
        try:
            message = decode(frame, AuditFetch, AuditTask)
        except MessageError as exc:
            return refuse(str(exc)).to_frame()
        if isinstance(message, AuditFetch):
            return self._fetch(message, peer)
        if peer != self.coordinator_peer():
            return refuse("only the coordinator hands out audit tasks").to_frame()
        return as_verdict(message.audit_id, self._verify(message))

    def _fetch(self, fetch: AuditFetch, peer: str) -> Frame:
        coordinator = self.coordinator_peer()
        if peer != coordinator:
            if fetch.expires_ms < time.time_ns() // 1_000_000:
                return refuse("the audit ticket has expired").to_frame()
            if not verify_by_peer_id(coordinator, ticket_bytes(fetch.request_id, peer, fetch.expires_ms), fetch.ticket):
                return refuse("no valid ticket from the coordinator for this request and peer").to_frame()
        kept = self.retained.get(fetch.request_id)
        if kept is None:
            return refuse(f"nothing retained for request {fetch.request_id!r}").to_frame()
        parts = kept.parts()
        if fetch.part >= len(parts):
            return refuse(f"request {fetch.request_id!r} was retained in {len(parts)} parts").to_frame()
        return AuditData(fetch.request_id, fetch.part, len(parts), tuple(parts[fetch.part])).to_frame()

    def _verify(self, task: AuditTask) -> Outcome:
        self.on_audit()
        if self.lies:
            return Outcome(FAIL, "mismatch")
        try:
            tensors = fetch_retained(self.node, task, task.expires_ms, task.ticket)
        except (TransportError, MessageError) as exc:
            return Outcome(UNCHECKED, f"could not fetch the stage's tensors: {exc}")
        auditor = self._get_auditor()
        outcome = check_stage(auditor, task, tensors)
        # the recompute's time: bench/gpu_pool.py sets it against the time spent serving
        log.info("audit %s of %s: %s %s (recompute %.0f ms), %d references built so far", task.audit_id,
                 task.subject, outcome.outcome, outcome.reason, 1000 * auditor.recompute_s, auditor.references_built)
        return outcome

    def _get_auditor(self) -> LayerAuditor:
        with self._lock:
            if self._auditor is None:
                self._auditor = LayerAuditor(self.model_dir, device=self.device, hardware_class=hardware_class(self.device))
            return self._auditor

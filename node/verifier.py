"""A provider's side of audits (DESIGN decision 5), on the /meshpool/audit/1 protocol.

- `audit.fetch`: hand the tensors retained for a request to the coordinator, or to a verifier that
  shows the coordinator's signed ticket for that request (the tensors are a consumer's prompt
  in disguise: nobody else gets them).
- `audit.task` (from the coordinator only): fetch the audited stage's tensors, check them against
  the receipt's hashes, recompute the stage in one prefill pass, and answer the verdict.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import torch

from node.protocol import (AUDIT_DATA, AUDIT_FETCH, AUDIT_TASK, AUDIT_VERDICT, ack, ticket_bytes)
from node.retention import RetentionStore
from node.sampling import SamplingParams
from node.shard import Shard
from node.transport import Frame, P2PNode, TransportError
from node.transport.identity import verify_by_peer_id

log = logging.getLogger("meshpool.provider")


def verdict(audit_id: str, ok: bool, reason: str, metrics: dict | None = None) -> Frame:
    return Frame(AUDIT_VERDICT.type, AUDIT_VERDICT.version,
                 {"audit_id": audit_id, "ok": ok, "reason": reason, "metrics": metrics or {}})


class AuditService:
    def __init__(self, node: P2PNode, model_dir: Path, model_id: str, device: torch.device,
                 retained: RetentionStore, coordinator_peer, lies: bool = False, on_audit=None):
        """`coordinator_peer()`: the coordinator's peer id (known once connected). `lies`: the
        bad-verifier fault, which reports a mismatch whatever it finds. `on_audit()`: counts audits done."""
        self.node, self.model_dir, self.model_id, self.device = node, model_dir, model_id, device
        self.retained, self.coordinator_peer, self.lies = retained, coordinator_peer, lies
        self.on_audit = on_audit or (lambda: None)
        self._recomputer = None
        self._lock = threading.Lock()

    def handle(self, frame: Frame, peer: str) -> Frame:
        if frame.type == AUDIT_FETCH.type:
            return self._fetch(frame.fields, peer)
        if frame.type == AUDIT_TASK.type:
            if peer != self.coordinator_peer():
                return ack(False, "only the coordinator hands out audit tasks")
            return self._verify(frame.fields)
        return ack(False, f"unexpected {frame.type} on the audit protocol")

    def _fetch(self, f: dict, peer: str) -> Frame:
        coordinator = self.coordinator_peer()
        if peer != coordinator:
            if f["expires_ms"] < time.time_ns() // 1_000_000:
                return ack(False, "the audit ticket has expired")
            if not verify_by_peer_id(coordinator, ticket_bytes(f["request_id"], peer, f["expires_ms"]), f["ticket"]):
                return ack(False, "no valid ticket from the coordinator for this request and peer")
        kept = self.retained.get(f["request_id"])
        if kept is None:
            return ack(False, f"nothing retained for request {f['request_id']!r}")
        return Frame(AUDIT_DATA.type, AUDIT_DATA.version, {"request_id": f["request_id"]},
                     [kept.stage_input, *kept.output])

    def _verify(self, f: dict) -> Frame:
        from verification.check import StageClaim, check_stage, fetch_retained

        audit_id = f["audit_id"]
        self.on_audit()
        if f["model"] != self.model_id:
            return verdict(audit_id, False, f"this verifier holds {self.model_id}, not {f['model']}")
        try:
            shard = Shard(f["model"], f["start"], f["end"], f["n_layers"])
            temperature, top_p, seed = f["sampling"]
            claim = StageClaim(f["request_id"], shard, f["input_hash"], f["output_hash"],
                               SamplingParams(float(temperature), float(top_p), int(seed)))
        except (TypeError, ValueError) as exc:
            return verdict(audit_id, False, f"malformed task: {exc}")
        if self.lies:
            return verdict(audit_id, False, "mismatch")
        try:
            tensors = fetch_retained(self.node, f["subject"], f["subject_addrs"], f["request_id"], f["expires_ms"],
                                     f["ticket"])
        except (TransportError, ValueError) as exc:
            return verdict(audit_id, False, f"could not fetch the stage's tensors: {exc}")
        outcome = check_stage(self._get_recomputer(), claim, tensors)
        log.info("audit %s of %s: %s %s", audit_id, f["subject"], "agree" if outcome.ok else "MISMATCH", outcome.reason)
        return verdict(audit_id, outcome.ok, outcome.reason, outcome.metrics)

    def _get_recomputer(self):
        from verification.recompute import Recomputer

        with self._lock:
            if self._recomputer is None:
                self._recomputer = Recomputer(self.model_dir, device=self.device)
            return self._recomputer

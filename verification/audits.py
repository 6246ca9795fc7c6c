"""The coordinator's auditor (DESIGN decisions 5 and 6).

After a request settles, each (request, stage) is audited with probability p, decided by a coin
seeded with a secret the providers never see. An audit goes to a verifier (newcomers first, so
that they earn their promotion), which fetches the stage's retained tensors and recomputes it.
The coordinator referees: always when the verifier reports a mismatch or is not yet allowed to
serve, and otherwise on a share of audits, so that a verifier covering for cheats is caught too.
Whoever the referee proves wrong is slashed: the stage by the deterring amount for the gas it was
paid, the verifier by the deterring amount for the fee it would have earned. Every outcome is a
ledger entry; the standings they produce decide who serves (coordinator/registry.py).
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from contracts.audits import should_audit
from contracts.pricing import gas_units
from contracts.stakes import slash_units_for
from coordinator.registry import Registry
from ledger.errors import LedgerError
from ledger.reader import LedgerReader
from ledger.receipts import StageReceipt
from ledger.service import LedgerService
from ledger.state import FEES_VERIFICATION
from node.protocol import ACK, AUDIT_TASK, AUDIT_VERDICT, PROTO_AUDIT, ticket_bytes
from node.sampling import SamplingParams
from node.shard import Shard
from node.transport import Frame, Identity, P2PNode, TransportError
from verification.check import Outcome, StageClaim, check_stage, fetch_retained

log = logging.getLogger("meshpool.audits")

TICKET_LIFETIME_S = 300.0
VERIFY_TIMEOUT_S = 120.0
MAX_QUEUED_AUDITS = 10_000
PPM = 1_000_000


@dataclass(frozen=True)
class AuditJob:
    audit_id: str
    receipt: StageReceipt
    stage_index: int
    sampling: SamplingParams
    token_ids: tuple[int, ...]  # what the coordinator sent and got back: prompt + generated


@dataclass(frozen=True)
class AuditResult:
    audit_id: str
    subject: str
    verifier: str | None
    verifier_ok: bool | None  # None: no verifier answered
    refereed: bool
    passed: bool
    reason: str


class Auditor:
    def __init__(self, node: P2PNode, identity: Identity, registry: Registry, ledger: LedgerService,
                 reader: LedgerReader, model_dir: Path, n_layers: int, on_standing_changed: Callable[[], None],
                 referee_check_ppm: int = 200_000, secret: bytes | None = None):
        from verification.recompute import Recomputer

        self.node, self.identity, self.registry = node, identity, registry
        self.ledger, self.reader, self.params = ledger, reader, ledger.params
        self.recomputer = Recomputer(model_dir)
        self.n_layers = n_layers
        self.on_standing_changed = on_standing_changed
        self.referee_check_ppm = referee_check_ppm
        self.secret = secret or secrets.token_bytes(32)
        self.jobs: queue.Queue[AuditJob] = queue.Queue(maxsize=MAX_QUEUED_AUDITS)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="auditor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=VERIFY_TIMEOUT_S)

    def consider(self, request, receipts: list[StageReceipt]) -> None:
        """After a settlement: draw, for each paid stage, whether it is audited."""
        for index, receipt in enumerate(receipts):
            if should_audit(self.secret, receipt.request_id, index, self.params.audit_probability_ppm):
                job = AuditJob(f"{receipt.request_id}.{index}", receipt, index, request.sampling,
                               tuple(request.prompt_ids + request.tokens))
                try:
                    self.jobs.put_nowait(job)
                except queue.Full:
                    log.warning("audit queue full: audit %s dropped", job.audit_id)

    # -- one audit ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                job = self.jobs.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self.audit(job)
            except Exception:  # one broken audit must not stop the others
                log.exception("audit %s failed", job.audit_id)

    def audit(self, job: AuditJob) -> AuditResult | None:
        subject = job.receipt.provider_id
        record = self.registry.providers.get(subject)
        if record is None or record.state == "dead":
            log.info("audit %s skipped: %s is gone", job.audit_id, subject)
            return None
        claim = StageClaim(job.receipt.request_id,
                           Shard(job.receipt.model, job.receipt.layer_start, job.receipt.layer_end, self.n_layers),
                           job.receipt.input_hash, job.receipt.output_hash, job.sampling)
        verifier = self._pick_verifier(subject)
        answer = self._ask(verifier, job) if verifier else None
        verifier_ok = None if answer is None else answer.ok
        referee = (answer is None or not answer.ok or not self.registry.may_serve(verifier)
                   or secrets.randbelow(PPM) < self.referee_check_ppm)
        truth = self._referee(claim, job, record.addrs) if referee else answer
        if truth is None:
            log.info("audit %s skipped: %s did not hand over its tensors", job.audit_id, subject)
            return None
        result = AuditResult(job.audit_id, subject, verifier if answer else None, verifier_ok, referee,
                             truth.ok, truth.reason)
        self._record(job, result, truth)
        return result

    def _pick_verifier(self, subject: str) -> str | None:
        """A live provider other than the subject: newcomers first, then idle ones, then serving."""
        rank = {"newcomer": 0, "idle": 1, "serving": 2}
        live = [p for p in list(self.registry.providers.values()) if p.peer != subject and p.state in rank]
        if not live:
            return None
        best = min(rank[p.state] for p in live)
        choices = [p.peer for p in live if rank[p.state] == best]
        return choices[secrets.randbelow(len(choices))]

    def _ticket(self, request_id: str, peer: str) -> tuple[int, bytes]:
        expires_ms = time.time_ns() // 1_000_000 + int(TICKET_LIFETIME_S * 1000)
        return expires_ms, self.identity.sign(ticket_bytes(request_id, peer, expires_ms))

    def _ask(self, verifier: str, job: AuditJob) -> Outcome | None:
        r = job.receipt
        expires_ms, ticket = self._ticket(r.request_id, verifier)
        subject = self.registry.providers.get(r.provider_id)
        s = job.sampling
        task = Frame(AUDIT_TASK.type, AUDIT_TASK.version, {
            "audit_id": job.audit_id, "request_id": r.request_id, "subject": r.provider_id,
            "subject_addrs": subject.addrs if subject else [], "model": r.model, "start": r.layer_start,
            "end": r.layer_end, "n_layers": self.n_layers, "input_hash": r.input_hash, "output_hash": r.output_hash,
            "sampling": [s.temperature, s.top_p, s.seed], "expires_ms": expires_ms, "ticket": ticket})
        try:
            reply = self.node.request(verifier, PROTO_AUDIT, task, timeout_s=VERIFY_TIMEOUT_S)
        except TransportError as exc:
            log.info("verifier %s did not answer audit %s: %s", verifier, job.audit_id, exc)
            return None
        if reply.type != AUDIT_VERDICT.type or reply.fields["audit_id"] != job.audit_id:
            reason = reply.fields.get("reason", reply.type) if reply.type == ACK.type else reply.type
            log.info("verifier %s refused audit %s: %s", verifier, job.audit_id, reason)
            return None
        return Outcome(reply.fields["ok"], reply.fields["reason"], reply.fields["metrics"])

    def _referee(self, claim: StageClaim, job: AuditJob, addrs: list[str]) -> Outcome | None:
        """The coordinator's own judgement; None if the subject cannot be reached at all."""
        expires_ms, ticket = self._ticket(claim.request_id, self.node.peer_id)
        try:
            tensors = fetch_retained(self.node, job.receipt.provider_id, addrs, claim.request_id, expires_ms, ticket)
        except TransportError:
            return None
        except ValueError as exc:  # reachable, but did not keep what it signed for
            return Outcome(False, str(exc), {})
        outcome = check_stage(self.recomputer, claim, tensors)
        if outcome.ok and claim.shard.is_last:
            # the tokens it retained must be the tokens it sent
            positions, tokens = tensors[2].tolist(), tensors[3].tolist()
            if any(job.token_ids[p] != t for p, t in zip(positions, tokens) if p < len(job.token_ids)):
                return Outcome(False, "retained tokens differ from the tokens the stage sent", outcome.metrics)
        return outcome

    # -- ledger ---------------------------------------------------------------------------

    def _record(self, job: AuditJob, result: AuditResult, truth: Outcome) -> None:
        r = job.receipt
        gain = gas_units(r.token_count, r.layer_end - r.layer_start, self.params)
        verifier_agreed = result.verifier_ok is not None and result.verifier_ok == truth.ok
        # evidence for the ledger, which takes no floats: scalar measurements, as text where fractional
        metrics = {str(k)[:40]: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in list(truth.metrics.items())[:16]
                   if isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) <= 200)}
        try:
            with self.ledger.batch():  # the verdict and its slashes land together or not at all
                self._entries(job, result, verifier_agreed, gain, metrics)
        except LedgerError:
            log.exception("recording audit %s failed", job.audit_id)
            return
        changed = False
        for peer in {r.provider_id, result.verifier} - {None}:
            standing = self.reader.standing(peer)
            if standing is not None and standing != self.registry.standings.get(peer):
                self.registry.set_standing(peer, standing)
                changed = True
        log.info("audit %s of %s: %s (verifier %s said %s, refereed %s)", job.audit_id, r.provider_id,
                 "passed" if truth.ok else f"FAILED: {truth.reason}", result.verifier, result.verifier_ok,
                 result.refereed)
        if changed:
            self.on_standing_changed()

    def _entries(self, job: AuditJob, result: AuditResult, verifier_agreed: bool, gain: int, metrics: dict) -> None:
        r = job.receipt
        if result.verifier is not None:
            # a verifier the referee agrees with earns the stage's gas from the audit pool, as far as it goes
            fee = min(gain, self.reader.balance_units(FEES_VERIFICATION)) if verifier_agreed else 0
            self.ledger.record_audit(f"audit:{job.audit_id}", audit_id=job.audit_id, verifier_id=result.verifier,
                                     subject_id=r.provider_id, verifier_agreed=verifier_agreed,
                                     subject_passed=result.passed, fee_units=fee)
            if not verifier_agreed:
                self.ledger.slash(f"slash:{job.audit_id}:verifier", result.verifier,
                                  slash_units_for(max(gain, 1), self.params),
                                  f"audit {job.audit_id}: the referee contradicts the verifier",
                                  {"audit_id": job.audit_id, "verifier_said_ok": result.verifier_ok})
        if not result.passed:
            self.ledger.slash(f"slash:{job.audit_id}:stage", r.provider_id, slash_units_for(gain, self.params),
                              f"audit {job.audit_id}: {result.reason}"[:200],
                              {"audit_id": job.audit_id, "request_id": r.request_id, "stage": job.stage_index,
                               "metrics": metrics})

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
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from contracts.audits import should_audit
from coordinator import incidents
from coordinator.background import BackgroundLoop
from contracts.pricing import gas_units
from contracts.stakes import slash_units_for
from coordinator.registry import Registry
from ledger.errors import LedgerError
from ledger.reader import LedgerReader
from ledger.receipts import StageReceipt
from ledger.service import LedgerService
from ledger.state import FEES_VERIFICATION
from node.layer_reference import LayerAuditor
from node.transport import Identity, P2PNode, TransportError
from node.verifier import fetch_retained
from verification.check import FAIL, PASS, UNCHECKED, Outcome, check_stage, is_last
from wire.messages import (PROTO_AUDIT, AuditTask, AuditVerdict, MessageError, SamplingParams, decode,
                           ticket_bytes)

log = logging.getLogger("meshpool.audits")

WITHHELD_LIMIT = 3  # audits in a row a stage may fail to hand over its tensors before that is an offence
ESCALATION_AUDITS = 8  # after a marginal failure: the provider's next stages audited, all refereed
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
    verifier: str | None  # None: no verifier judged (none answered, or it could not check)
    verifier_outcome: str | None  # what that verifier said: PASS or FAIL
    refereed: bool
    outcome: str  # PASS, FAIL or UNCHECKED: the verdict that counts
    reason: str
    same_recipe: bool = False  # the verifier also re-ran the stage's own recipe (its hardware class)


class Escalation:
    """Escalate before slashing on the margin. A first marginal failure of a provider (its worst layer
    statistic within verification.check.MARGINAL_EXCESS of the threshold) slashes nobody: its next
    `audits` stages are all audited and refereed, and a failure among them, marginal or clear, is
    recorded and slashed. A clear failure is recorded at once. Thread-safe: settlement threads ask who
    is suspect, the auditor's thread decides."""

    def __init__(self, audits: int = ESCALATION_AUDITS):
        self.audits = audits
        self._owed: dict[str, int] = {}  # peer -> escalated audits still owed
        self._lock = threading.Lock()

    def suspects(self) -> set[str]:
        with self._lock:
            return set(self._owed)

    def decides(self, subject: str, truth: Outcome) -> bool:
        """Whether this verdict of `subject` is recorded now (False: withheld, the provider escalated)."""
        with self._lock:
            owed = self._owed.get(subject)
            if owed is None:
                if truth.marginal:
                    self._owed[subject] = self.audits
                    return False
                return True
            if truth.outcome == FAIL or owed <= 1:
                del self._owed[subject]
            else:
                self._owed[subject] = owed - 1
            return True


class Auditor(BackgroundLoop):
    def __init__(self, node: P2PNode, identity: Identity, registry: Registry, ledger: LedgerService,
                 reader: LedgerReader, model_dir: Path, n_layers: int, on_standing_changed: Callable[[], None],
                 referee_check_ppm: int = 200_000, secret: bytes | None = None):
        self.node, self.identity, self.registry = node, identity, registry
        self.ledger, self.reader, self.params = ledger, reader, ledger.params
        self.layer_auditor = LayerAuditor(model_dir)
        self.n_layers = n_layers
        self.on_standing_changed = on_standing_changed
        self.referee_check_ppm = referee_check_ppm
        self.secret = secret or secrets.token_bytes(32)
        self.jobs: queue.Queue[AuditJob] = queue.Queue(maxsize=MAX_QUEUED_AUDITS)
        self.escalation = Escalation()
        # (request, provider) -> whether its audit was drawn when its receipt came; told to the stage
        self._draws: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self._draws_lock = threading.Lock()
        self._withheld: dict[str, int] = {}  # peer -> audits in a row it withheld its tensors; auditor thread only
        super().__init__("auditor", VERIFY_TIMEOUT_S)

    def retains(self, receipt: StageReceipt) -> bool:
        """When a stage's receipt arrives: draw whether that (request, stage) will be audited, so that
        the stage keeps only what will be asked for. It learns the draw after it has signed."""
        drawn = receipt.provider_id in self.escalation.suspects() or should_audit(
            self.secret, receipt.request_id, receipt.layer_start, self.params.audit_probability_ppm)
        with self._draws_lock:
            self._draws[(receipt.request_id, receipt.provider_id)] = drawn
            while len(self._draws) > MAX_QUEUED_AUDITS:
                self._draws.popitem(last=False)
        return drawn

    def consider(self, request, receipts: list[StageReceipt]) -> None:
        """After a settlement: audit each paid stage drawn when its receipt came (or now, if it came
        another way). A provider that became suspect meanwhile is audited on what it still keeps."""
        suspects = self.escalation.suspects()
        for index, receipt in enumerate(receipts):
            with self._draws_lock:
                drawn = self._draws.pop((receipt.request_id, receipt.provider_id), None)
            if drawn is None:
                drawn = receipt.provider_id in suspects or should_audit(
                    self.secret, receipt.request_id, receipt.layer_start, self.params.audit_probability_ppm)
            if drawn:
                job = AuditJob(f"{receipt.request_id}.{index}", receipt, index, request.sampling,
                               tuple(request.prompt_ids + request.tokens))
                try:
                    self.jobs.put_nowait(job)
                except queue.Full:
                    log.warning("audit queue full: audit %s dropped", job.audit_id)

    # -- one audit ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.jobs.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self.audit(job)
            except Exception:  # one broken audit must not stop the others
                incidents.record("auditor")

    def audit(self, job: AuditJob) -> AuditResult | None:
        subject = job.receipt.provider_id
        record = self.registry.get(subject)
        if record is None or record.state == "dead":
            log.info("audit %s skipped: %s is gone", job.audit_id, subject)
            return None
        hardware_class = self._hardware_class(subject) if job.receipt.dtype != "float32" else ""
        verifier = self._pick_verifier(subject, hardware_class)
        answer = self._ask(verifier, job, record.addrs) if verifier else None
        if answer is not None and answer.outcome == UNCHECKED:  # the verifier could not judge: no verdict
            answer = None
        suspect = subject in self.escalation.suspects()
        referee = (suspect or answer is None or not answer.ok or not self.registry.may_serve(verifier)
                   or secrets.randbelow(PPM) < self.referee_check_ppm)
        truth = self._referee(job, record.addrs) if referee else answer
        if answer is not None and answer.metrics.get("same_recipe"):
            log.info("audit %s: same-recipe verifier %s says %s: %s", job.audit_id, verifier, answer.outcome,
                     " ".join(f"{k}={v:.4g}" for k, v in answer.metrics.items()
                              if k.startswith("worst_") and isinstance(v, float)))
        if truth.ok and answer is not None and answer.outcome == FAIL and answer.metrics.get("same_recipe"):
            truth = self._second_witness(job, record.addrs, hardware_class, {subject, verifier}, answer)
        truth = self._withholding(subject, truth)
        if truth.outcome == UNCHECKED:
            log.info("audit %s of %s could not be checked: %s", job.audit_id, subject, truth.reason)
            return None
        if not self.escalation.decides(subject, truth):
            log.warning("audit %s of %s failed on the margin (%s): escalating", job.audit_id, subject, truth.reason)
            return None
        result = AuditResult(job.audit_id, subject, verifier if answer else None,
                             answer.outcome if answer else None, referee, truth.outcome, truth.reason,
                             bool(answer and answer.metrics.get("same_recipe")))
        self._record(job, result, truth)
        return result

    def _second_witness(self, job: AuditJob, subject_addrs: list[str], hardware_class: str, exclude: set[str],
                        first: Outcome) -> Outcome:
        """A verifier of the stage's class failed it on its same-recipe re-execution, which the
        coordinator's float32 referee cannot see (a fine copy of the weights hides inside bfloat16's
        rounding from a float32 reference). Another verifier of that class decides: agreeing, the
        stage fails on two independent same-recipe re-executions; passing it, nobody is blamed."""
        witness = self._pick_verifier(job.receipt.provider_id, hardware_class, exclude, same_class_only=True)
        second = self._ask(witness, job, subject_addrs) if witness else None
        if second is not None and second.outcome == FAIL and second.metrics.get("same_recipe"):
            return Outcome(FAIL, f"two verifiers of its class: {first.reason}; {second.reason}",
                           {**first.metrics, "witness": witness})
        if second is None or second.outcome == UNCHECKED or not second.metrics.get("same_recipe"):
            reason = f"a same-recipe failure ({first.reason}) no second verifier of {hardware_class!r} could confirm"
        else:
            reason = f"verifiers of {hardware_class!r} disagree: {first.reason}"
        # unsettled in its precision: it serves float32 from now on, where every verifier sees everything
        if self.registry.restrict_to_float32(job.receipt.provider_id, reason[:500]):
            log.warning("%s serves float32 from now on: %s", job.receipt.provider_id, reason)
            self.on_standing_changed()
        return Outcome(UNCHECKED, reason)

    def _hardware_class(self, peer: str) -> str:
        record = self.registry.get(peer)
        value = record.profile.get("hardware_class", "") if record else ""
        return value if isinstance(value, str) else ""

    def _withholding(self, subject: str, truth: Outcome) -> Outcome:
        """A stage that cannot be checked blames nobody once (its retention may have run out); one
        that withholds its tensors WITHHELD_LIMIT audits in a row has failed them."""
        if not truth.metrics.get("withheld"):
            self._withheld.pop(subject, None)
            return truth
        self._withheld[subject] = self._withheld.get(subject, 0) + 1
        if self._withheld[subject] < WITHHELD_LIMIT:
            return truth
        del self._withheld[subject]
        return Outcome(FAIL, f"withheld its retained tensors {WITHHELD_LIMIT} audits in a row ({truth.reason})")

    def _pick_verifier(self, subject: str, hardware_class: str = "", exclude: set[str] = frozenset(),
                       same_class_only: bool = False) -> str | None:
        """A live provider other than the subject: of the subject's hardware class when it has one
        (it re-runs the stage's own recipe), then newcomers first, then idle ones, then serving."""
        rank = {"newcomer": 0, "idle": 1, "serving": 2}
        live = [p for p in self.registry.records() if p.peer != subject and p.peer not in exclude and p.state in rank]
        if hardware_class:
            same = [p for p in live if p.profile.get("hardware_class") == hardware_class]
            live = same if same or same_class_only else live
        if not live:
            return None
        best = min(rank[p.state] for p in live)
        choices = [p.peer for p in live if rank[p.state] == best]
        return choices[secrets.randbelow(len(choices))]

    def _task(self, job: AuditJob, verifier: str, subject_addrs: list[str]) -> AuditTask:
        r = job.receipt
        expires_ms = time.time_ns() // 1_000_000 + int(TICKET_LIFETIME_S * 1000)
        ticket = self.identity.sign(ticket_bytes(r.request_id, verifier, expires_ms))
        return AuditTask(job.audit_id, r.request_id, r.provider_id, tuple(subject_addrs), r.model, r.layer_start,
                         r.layer_end, self.n_layers, r.input_hash, r.output_hash, r.layers_hash, r.dtype, self._hardware_class(r.provider_id), job.sampling,
                         expires_ms, ticket)

    def _ask(self, verifier: str, job: AuditJob, subject_addrs: list[str]) -> Outcome | None:
        task = self._task(job, verifier, subject_addrs)
        try:
            reply = decode(self.node.request(verifier, PROTO_AUDIT, task.to_frame(), timeout_s=VERIFY_TIMEOUT_S))
        except (TransportError, MessageError) as exc:
            log.info("verifier %s did not answer audit %s: %s", verifier, job.audit_id, exc)
            return None
        if not isinstance(reply, AuditVerdict) or reply.audit_id != job.audit_id:
            log.info("verifier %s refused audit %s: %s", verifier, job.audit_id, getattr(reply, "reason", reply))
            return None
        return Outcome(reply.outcome, reply.reason, reply.metrics)

    def _referee(self, job: AuditJob, subject_addrs: list[str]) -> Outcome:
        """The coordinator's own judgement."""
        task = self._task(job, self.node.peer_id, subject_addrs)
        try:
            tensors = fetch_retained(self.node, task, task.expires_ms, task.ticket)
        except TransportError as exc:
            return Outcome(UNCHECKED, f"the stage cannot be reached: {exc}")
        except MessageError as exc:  # reachable, but did not hand over what it signed for
            return Outcome(UNCHECKED, f"withheld: {exc}", {"withheld": True})
        outcome = check_stage(self.layer_auditor, task, tensors)
        if outcome.ok and is_last(task):
            # the tokens it retained must be the tokens it sent
            positions, tokens = tensors[2].tolist(), tensors[3].tolist()
            if any(job.token_ids[p] != t for p, t in zip(positions, tokens) if p < len(job.token_ids)):
                return Outcome(FAIL, "retained tokens differ from the tokens the stage sent", outcome.metrics)
        return outcome

    # -- ledger ---------------------------------------------------------------------------

    def _record(self, job: AuditJob, result: AuditResult, truth: Outcome) -> None:
        r = job.receipt
        gain = gas_units(r.token_count, r.layer_end - r.layer_start, self.params)
        verifier_agreed = result.verifier_outcome is not None and result.verifier_outcome == truth.outcome
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
            if standing is not None and standing != self.registry.standing(peer):
                self.registry.set_standing(peer, standing)
                changed = True
        log.info("audit %s of %s: %s (verifier %s said %s, refereed %s, same recipe %s) %s", job.audit_id,
                 r.provider_id, "passed" if truth.ok else f"FAILED: {truth.reason}", result.verifier,
                 result.verifier_outcome, result.refereed, "yes" if result.same_recipe else "no",
                 " ".join(f"{k}={v}" for k, v in metrics.items() if k.startswith("worst_")))
        if changed:
            self.on_standing_changed()

    def _entries(self, job: AuditJob, result: AuditResult, verifier_agreed: bool, gain: int, metrics: dict) -> None:
        r = job.receipt
        if result.verifier is not None:
            # a verifier the referee agrees with earns the stage's gas from the audit pool, as far as it goes
            fee = min(gain, self.reader.balance_units(FEES_VERIFICATION)) if verifier_agreed else 0
            self.ledger.record_audit(f"audit:{job.audit_id}", audit_id=job.audit_id, verifier_id=result.verifier,
                                     subject_id=r.provider_id, verifier_agreed=verifier_agreed,
                                     subject_passed=result.outcome == PASS, fee_units=fee)
            if not verifier_agreed:
                self.ledger.slash(f"slash:{job.audit_id}:verifier", result.verifier,
                                  slash_units_for(max(gain, 1), self.params),
                                  f"audit {job.audit_id}: the referee contradicts the verifier",
                                  {"audit_id": job.audit_id, "verifier_said_ok": result.verifier_outcome == PASS})
        if result.outcome == FAIL:
            self.ledger.slash(f"slash:{job.audit_id}:stage", r.provider_id, slash_units_for(gain, self.params),
                              f"audit {job.audit_id}: {result.reason}"[:200],
                              {"audit_id": job.audit_id, "request_id": r.request_id, "stage": job.stage_index,
                               "metrics": metrics})

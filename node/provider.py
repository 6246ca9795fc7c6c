"""`provider join`: a provider's process. It profiles its device, registers a signed profile with
the coordinator, heartbeats, loads the shard it is assigned and serves it: steps come in on a
stream from upstream and go on to the next stage (or, from the last stage, sampled tokens go
back to the coordinator)."""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

import torch
from tqdm import tqdm

from node.config import ModelConfig, ModelError
from node.faults import Fault
from node.models import model_id_of
from node.probe import ProbeWork
from node.profile import hardware_class, serving_dtype
from node.reachability import announce_addr
from node.retention import RetentionStore
from node.runtime import ShardRuntime
from node.shard import Shard, tensor_names
from node.stage import StageWorker, StepError
from node.status import ProviderStats
from node.transport import Frame, Identity, P2PNode, Stream, StreamClosed, TransportConfig, TransportError
from node.verifier import AuditService
from wire.messages import (PROTO_ASSIGN, PROTO_AUDIT, PROTO_CONTROL, PROTO_RESULT, PROTO_STAGE, AccountInfo,
                           AccountQuery, Ack, Assign, Close, Failed, Heartbeat, Leave, Message, MessageError, Ping,
                           Probe, ProbeResult, ProbeRun, Receipts, Register, Retain, Step, Unassign, decode,
                           dtype_name, refuse)

log = logging.getLogger("meshpool.provider")

HEARTBEAT_INTERVAL_S = 1.0
ACCOUNT_EVERY_BEATS = 5  # how often the provider asks for its balance and standing, in heartbeats
STAGE_RECV_TIMEOUT_S = 3600.0
CONTROL_TIMEOUT_S = 5.0  # a heartbeat, an account query, a failure report
RECEIPTS_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
FORWARD_TIMEOUT_S = 30.0
LEAVE_TIMEOUT_S = 60.0


class Assignment:
    """The shard a provider serves now, and where its outputs go.

    Replaced whole (never changed in place) under Provider.assign_lock; other threads read the
    reference once and keep using that object. `next_stream` belongs to the one thread that serves
    the upstream stream (it opens, uses and resets it); whoever drops the assignment closes it."""

    def __init__(self, spec: Assign, worker: StageWorker):
        self.spec, self.worker = spec, worker
        self.next_stream: Stream | None = None
        self.lock = threading.Lock()  # one step at a time on the shard


class Provider:
    def __init__(self, identity: Identity, coordinator_addr: str, model_dir: Path, device: torch.device,
                 profile: dict, max_memory_bytes: int, dtype: torch.dtype | None = None, fault: Fault | None = None,
                 retained: RetentionStore | None = None, listen_host: str = "127.0.0.1", relay: str = "auto",
                 p2p_port: int = 0, announce: str = ""):
        """`dtype`: what the shard computes in (default: the device's serving dtype). `fault`: a
        deliberate misbehaviour, for testing the auditors; None in real use."""
        self.identity, self.coordinator_addr = identity, coordinator_addr
        self.model_dir, self.device = model_dir, device
        self.dtype = dtype or serving_dtype(device.type)
        # the profile asks for a precision; the coordinator decides it in each assignment
        # and names its hardware class, so that a verifier of the same class can re-run its recipe
        self.profile = {**profile, "serving_dtype": dtype_name(self.dtype), "hardware_class": hardware_class(device)}
        if fault is not None:
            self.profile = fault.inflate_profile(self.profile)
        self.max_memory_bytes = max_memory_bytes
        self.model_id = model_id_of(model_dir)
        self.fault = fault
        self.retained = retained or RetentionStore()
        self.node = P2PNode(identity, TransportConfig(listen_host=listen_host, listen_port=p2p_port,
                                                      disconnect_on_bad_frame=True))
        self.relay_mode, self.announce, self.announced_addr = relay, announce, ""  # node/reachability.py
        self.coordinator_peer = ""
        self.stats = ProviderStats(peer=identity.peer_id_str)
        self.audits = AuditService(self.node, model_dir, device, self.retained,
                                   lambda: self.coordinator_peer, lies=bool(fault and fault.lies_as_verifier),
                                   on_audit=self.stats.add_audit)
        self.assignment: Assignment | None = None
        self.unassigned = threading.Event()  # set while no shard is assigned
        self.unassigned.set()
        self.assign_lock = threading.Lock()
        self.probe_work: ProbeWork | None = None  # the admission probe being run (coordinator/admission.py)
        self.probe_lock = threading.Lock()
        self.stopping = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> str:
        self.node.set_handler(PROTO_ASSIGN, self._on_assign)
        self.node.set_stream_handler(PROTO_STAGE, self._serve_upstream)
        self.node.set_handler(PROTO_AUDIT, self.audits.handle)
        self.node.start()
        self.coordinator_peer = self.node.connect(self.coordinator_addr)
        self.announced_addr = announce_addr(self.node, self.coordinator_addr, self.coordinator_peer, self.relay_mode,
                                            self.announce)
        self._register()
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
        return self.node.peer_id

    def leave(self, timeout_s: float = LEAVE_TIMEOUT_S) -> None:
        """Tell the coordinator we go; it moves our work elsewhere and answers when we are free."""
        self.stopping.set()
        try:
            reply = self._control(Leave(self.node.peer_id))
            if isinstance(reply, Ack) and reply.ok and not self.unassigned.wait(timeout_s):
                log.warning("the coordinator did not release our shard within %.0f s", timeout_s)
        except (TransportError, MessageError) as exc:
            log.warning("leave was not acknowledged: %s", exc)
        with self.assign_lock:
            self._drop_assignment()
        self.node.close()

    def _control(self, message: Message, timeout_s: float = CONTROL_TIMEOUT_S) -> Message:
        """One request to the coordinator on the control protocol; its decoded answer."""
        return decode(self.node.request(self.coordinator_peer, PROTO_CONTROL, message.to_frame(), timeout_s=timeout_s))

    def _register(self) -> None:
        unsigned = Register(self.profile, (self.announced_addr or self.node.addr,), self.max_memory_bytes, self.identity.public_key_bytes, b"")
        signature = self.identity.sign(unsigned.signed_bytes(self.node.peer_id))
        reply = self._control(Register(**{**vars(unsigned), "signature": signature}), CONNECT_TIMEOUT_S)
        if not isinstance(reply, Ack) or not reply.ok:
            raise ConnectionError(f"the coordinator refused us: {getattr(reply, 'reason', reply)}")

    def _heartbeat_loop(self) -> None:
        beats = 0
        while not self.stopping.wait(HEARTBEAT_INTERVAL_S):
            try:
                reply = self._control(Heartbeat(self.node.peer_id))
                if isinstance(reply, Ack) and not reply.ok and not self.stopping.is_set():
                    log.warning("the coordinator no longer knows us (%s); registering again", reply.reason)
                    self._register()
                beats += 1
                if beats % ACCOUNT_EVERY_BEATS == 1:
                    info = self._control(AccountQuery(self.node.peer_id))
                    if isinstance(info, AccountInfo):
                        self.stats.update(state=info.state, credits_earned_units=info.balance_units,
                                          reputation=info.reputation)
            except (TransportError, ConnectionError, MessageError) as exc:
                log.warning("heartbeat failed: %s", exc)

    # -- assignments ----------------------------------------------------------------------

    def _on_assign(self, frame: Frame, peer: str) -> Frame:
        if peer != self.coordinator_peer:
            return refuse("only the coordinator assigns shards").to_frame()
        try:
            message = decode(frame, Assign, Unassign, Ping, Probe, ProbeRun)
        except MessageError as exc:
            return refuse(str(exc)).to_frame()
        if isinstance(message, Ping):
            return Ack().to_frame()
        if isinstance(message, (Probe, ProbeRun)):
            return self._probe(message).to_frame()
        with self.assign_lock:
            if isinstance(message, Unassign):
                self._drop_assignment()
                return Ack().to_frame()
            return self._assign(message).to_frame()

    def _assign(self, spec: Assign) -> Ack:
        if spec.model != self.model_id:
            return refuse(f"this provider serves {self.model_id}, not {spec.model}")
        old = self.assignment
        try:
            if old is not None and old.spec.same_shard(spec):
                runtime = old.worker.runtime  # same layers: keep the loaded weights
                for sid in list(runtime.sessions):
                    runtime.close(sid)
            else:
                self._drop_assignment()
                shard = Shard(spec.model, spec.start, spec.end, spec.n_layers)
                with tqdm(total=len(tensor_names(ModelConfig.load(self.model_dir), shard)),
                          desc=f"loading layers [{shard.start}, {shard.end})", leave=False,
                          disable=not sys.stderr.isatty()) as bar:
                    # every layer boundary is kept: the receipt commits to them, audits re-execute from them
                    runtime = ShardRuntime(
                        self.model_dir, shard, device=self.device, dtype=getattr(torch, spec.dtype),
                        max_sessions=spec.max_sessions, max_seq_len=spec.max_seq_len,
                        on_tensor_loaded=lambda _name: bar.update(), capture_boundaries=True,
                    )
                if self.fault is not None:
                    self.fault.install(runtime)
        except (ModelError, ValueError) as exc:
            return refuse(str(exc))
        except (MemoryError, torch.OutOfMemoryError) as exc:  # the coordinator plans us below this from now on
            return refuse(f"out of memory: {exc}"[:2000])
        if old is not None and old.next_stream is not None:
            old.next_stream.close()
        self.assignment = Assignment(spec, StageWorker(runtime, spec.pipeline, self.identity, self.retained,
                                                       self.fault))
        self.unassigned.clear()
        self.stats.update(stages=[[spec.start, spec.end]], state="serving")
        log.info("serving layers [%d, %d) in pipeline %s", spec.start, spec.end, spec.pipeline)
        return Ack()

    def _probe(self, message: Probe | ProbeRun) -> Message:
        """The coordinator's admission probe: prepare (untimed), then run (timed by the coordinator)."""
        with self.probe_lock:
            if isinstance(message, Probe):
                self.probe_work = None
                if message.model != self.model_id:
                    return refuse(f"this provider serves {self.model_id}, not {message.model}")
                try:
                    self.probe_work = ProbeWork(self.model_dir, message, self.device)
                except (ModelError, ValueError, RuntimeError) as exc:
                    return refuse(f"probe: {exc}")
                return Ack()
            work, self.probe_work = self.probe_work, None  # one run per prepared probe
            if work is None:
                return refuse("no probe prepared")
            return ProbeResult(message.seed, work.run(message))

    def _drop_assignment(self) -> None:
        self.stats.update(stages=[])
        if self.assignment is not None:
            if self.assignment.next_stream is not None:
                self.assignment.next_stream.close()
            self.assignment = None
        self.unassigned.set()

    # -- data path ------------------------------------------------------------------------

    def _serve_upstream(self, stream: Stream) -> None:
        """Steps from the previous stage (or the coordinator, for stage 0), until the stream ends."""
        # A pipeline's driver numbers its steps upwards and one stream carries them in order, so a step
        # numbered at or below the last one taken is a duplicate: run again it would be refused (its
        # sessions moved on) and the refusal would fail the whole pipeline.
        last_step = -1
        while True:
            try:
                frame = stream.recv(timeout_s=STAGE_RECV_TIMEOUT_S)
            except StreamClosed:
                return
            assignment = self.assignment
            if assignment is None:
                log.warning("step from %s while no shard is assigned", stream.peer_id)
                continue
            if stream.peer_id != assignment.spec.prev_peer:
                log.warning("dropping stage stream from %s: not the upstream of pipeline %s",
                            stream.peer_id, assignment.spec.pipeline)
                return
            try:
                message = decode(frame, Step, Close)
            except MessageError as exc:
                self._report_failure(frame.fields.get("pipeline"), frame.fields.get("step"),
                                     f"malformed {frame.type}: {exc}", stream.peer_id)
                continue
            if isinstance(message, Close):
                with assignment.lock:
                    receipts = assignment.worker.close(message)
                if not assignment.worker.runtime.shard.is_last:
                    self._forward(assignment, message)
                if receipts:
                    self._send_receipts(receipts)
            elif message.step <= last_step:
                log.warning("step %d of pipeline %s from %s dropped: a duplicate (step %d was taken)",
                            message.step, message.pipeline, stream.peer_id, last_step)
            else:
                last_step = message.step
                self._step(assignment, message)

    def _step(self, assignment: Assignment, step: Step) -> None:
        try:
            with assignment.lock:
                out = assignment.worker.step(step)
        except StepError as exc:
            self._report_failure(step.pipeline, step.step, f"stage [{assignment.spec.start}, {assignment.spec.end}) "
                                 f"refused step: {exc}", self.node.peer_id)
            return
        self.stats.add_step(step.x.shape[0])
        self._forward(assignment, out)

    def _forward(self, assignment: Assignment, message: Message) -> None:
        nxt = assignment.spec.next_peer
        protocol = PROTO_RESULT if nxt == self.coordinator_peer else PROTO_STAGE
        try:
            if assignment.next_stream is None:
                self.node.connect(assignment.spec.next_addrs[0], timeout_s=CONNECT_TIMEOUT_S)
                assignment.next_stream = self.node.open_stream(nxt, protocol, timeout_s=CONNECT_TIMEOUT_S)
            assignment.next_stream.send(message.to_frame(), timeout_s=FORWARD_TIMEOUT_S)
        except TransportError as exc:
            assignment.next_stream = None
            if isinstance(message, Step):
                self._report_failure(message.pipeline, message.step, f"next stage {nxt} unreachable: {exc}", nxt)

    def _send_receipts(self, receipts: list) -> None:
        try:
            reply = self._control(Receipts(tuple(receipts)), RECEIPTS_TIMEOUT_S)
            if isinstance(reply, Ack) and not reply.ok:
                log.warning("the coordinator refused our receipts: %s", reply.reason)
            if isinstance(reply, Retain):  # only what was drawn for audit is kept: at GPU scale it is large
                for receipt in receipts:
                    if receipt.request_id not in reply.request_ids:
                        self.retained.drop(receipt.request_id)
            requests, nbytes = self.retained.usage()
            self.stats.update(retained_requests=requests, retained_bytes=nbytes)
        except (TransportError, MessageError) as exc:
            log.warning("could not send receipts: %s", exc)

    def _report_failure(self, pipeline, step, reason: str, peer: str) -> None:
        log.warning("%s", reason)
        pipeline = pipeline if isinstance(pipeline, str) else ""
        step = step if isinstance(step, int) and not isinstance(step, bool) else -1
        try:
            self._control(Failed(pipeline, step, reason[:2000], peer))
        except (TransportError, MessageError) as exc:
            log.warning("could not report the failure to the coordinator: %s", exc)

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
from node.profile import serving_dtype
from node.protocol import (ACCOUNT, ACCOUNT_INFO, ACK, ASSIGN, CLOSE, FAILED, HEARTBEAT, LEAVE, PING,
                           PROTO_ASSIGN, PROTO_AUDIT, PROTO_CONTROL, PROTO_RESULT, PROTO_STAGE, RECEIPTS, REGISTER,
                           STEP, UNASSIGN, ack, signed_profile_bytes)
from node.retention import RetentionStore
from node.runtime import ShardRuntime
from node.shard import Shard, tensor_names
from node.stage import StageWorker, StepError
from node.status import ProviderStats
from node.verifier import AuditService
from node.transport import Frame, Identity, P2PNode, Stream, StreamClosed, TransportConfig, TransportError

log = logging.getLogger("meshpool.provider")

HEARTBEAT_INTERVAL_S = 1.0
ACCOUNT_EVERY_BEATS = 5  # how often the provider asks for its balance and standing, in heartbeats
STAGE_RECV_TIMEOUT_S = 3600.0


class Assignment:
    """The shard a provider serves now, and where its outputs go."""

    def __init__(self, fields: dict, worker: StageWorker):
        self.fields, self.worker = fields, worker
        self.next_stream: Stream | None = None
        self.lock = threading.Lock()  # one step at a time on the shard

    @property
    def pipeline(self) -> str:
        return self.fields["pipeline"]

    def same_shard(self, fields: dict) -> bool:
        keys = ("model", "start", "end", "n_layers", "max_sessions", "max_seq_len")
        return all(self.fields[k] == fields[k] for k in keys)


class Provider:
    def __init__(self, identity: Identity, coordinator_addr: str, model_dir: Path, device: torch.device,
                 profile: dict, max_memory_bytes: int, dtype: torch.dtype | None = None, fault: Fault | None = None,
                 retained: RetentionStore | None = None):
        """`dtype`: what the shard computes in (default: the device's serving dtype). `fault`: a
        deliberate misbehaviour, for testing the auditors; None in real use."""
        self.identity, self.coordinator_addr = identity, coordinator_addr
        self.model_dir, self.device = model_dir, device
        self.dtype = dtype or serving_dtype(device.type)
        self.profile, self.max_memory_bytes = profile, max_memory_bytes
        self.model_id = model_id_of(model_dir)
        self.fault = fault
        self.retained = retained or RetentionStore()
        self.node = P2PNode(identity, TransportConfig(disconnect_on_bad_frame=True))
        self.coordinator_peer = ""
        self.stats = ProviderStats(peer=identity.peer_id_str)
        self.audits = AuditService(self.node, model_dir, self.model_id, device, self.retained,
                                   lambda: self.coordinator_peer, lies=bool(fault and fault.lies_as_verifier),
                                   on_audit=self.stats.add_audit)
        self.assignment: Assignment | None = None
        self.assign_lock = threading.Lock()
        self.stopping = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> str:
        self.node.set_handler(PROTO_ASSIGN, self._on_assign)
        self.node.set_stream_handler(PROTO_STAGE, self._serve_upstream)
        self.node.set_handler(PROTO_AUDIT, self.audits.handle)
        self.node.start()
        self.coordinator_peer = self.node.connect(self.coordinator_addr)
        self._register()
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
        return self.node.peer_id

    def leave(self, timeout_s: float = 60.0) -> None:
        """Tell the coordinator we go; it moves our work elsewhere and answers when we are free."""
        self.stopping.set()
        try:
            self.node.request(self.coordinator_peer, PROTO_CONTROL,
                              Frame(LEAVE.type, LEAVE.version, {"peer": self.node.peer_id}), timeout_s=timeout_s)
        except TransportError as exc:
            log.warning("leave was not acknowledged: %s", exc)
        with self.assign_lock:
            self._drop_assignment()
        self.node.close()

    def _register(self) -> None:
        addrs = [self.node.addr]
        body = signed_profile_bytes(self.node.peer_id, self.profile, addrs, self.max_memory_bytes)
        reply = self.node.request(self.coordinator_peer, PROTO_CONTROL, Frame(REGISTER.type, REGISTER.version, {
            "profile": self.profile, "addrs": addrs, "max_memory_bytes": self.max_memory_bytes,
            "public_key": self.identity.public_key_bytes, "signature": self.identity.sign(body),
        }))
        if reply.type != ACK.type or not reply.fields.get("ok"):
            raise ConnectionError(f"the coordinator refused us: {reply.fields.get('reason', reply.type)}")

    def _heartbeat_loop(self) -> None:
        beat = Frame(HEARTBEAT.type, HEARTBEAT.version, {"peer": self.node.peer_id})
        asking = Frame(ACCOUNT.type, ACCOUNT.version, {"peer": self.node.peer_id})
        beats = 0
        while not self.stopping.wait(HEARTBEAT_INTERVAL_S):
            try:
                reply = self.node.request(self.coordinator_peer, PROTO_CONTROL, beat, timeout_s=5.0)
                if not reply.fields.get("ok") and not self.stopping.is_set():
                    log.warning("the coordinator no longer knows us (%s); registering again", reply.fields.get("reason"))
                    self._register()
                beats += 1
                if beats % ACCOUNT_EVERY_BEATS == 1:
                    info = self.node.request(self.coordinator_peer, PROTO_CONTROL, asking, timeout_s=5.0)
                    if info.type == ACCOUNT_INFO.type:
                        f = info.fields
                        self.stats.update(state=f["state"], credits_earned_units=f["balance_units"],
                                          reputation=f["reputation"])
            except (TransportError, ConnectionError) as exc:
                log.warning("heartbeat failed: %s", exc)

    # -- assignments ----------------------------------------------------------------------

    def _on_assign(self, frame: Frame, peer: str) -> Frame:
        if peer != self.coordinator_peer:
            return ack(False, "only the coordinator assigns shards")
        if frame.type == PING.type:
            return ack()
        with self.assign_lock:
            if frame.type == UNASSIGN.type:
                self._drop_assignment()
                return ack()
            if frame.type != ASSIGN.type:
                return ack(False, f"unexpected {frame.type}")
            f = frame.fields
            if f["model"] != self.model_id:
                return ack(False, f"this provider serves {self.model_id}, not {f['model']}")
            old = self.assignment
            try:
                if old is not None and old.same_shard(f):
                    runtime = old.worker.runtime  # same layers: keep the loaded weights
                    for sid in list(runtime.sessions):
                        runtime.close(sid)
                else:
                    self._drop_assignment()
                    shard = Shard(f["model"], f["start"], f["end"], f["n_layers"])
                    with tqdm(total=len(tensor_names(ModelConfig.load(self.model_dir), shard)),
                              desc=f"loading layers [{shard.start}, {shard.end})", leave=False,
                              disable=not sys.stderr.isatty()) as bar:
                        runtime = ShardRuntime(
                            self.model_dir, shard, device=self.device, dtype=self.dtype,
                            max_sessions=f["max_sessions"], max_seq_len=f["max_seq_len"],
                            on_tensor_loaded=lambda _name: bar.update(),
                        )
                    if self.fault is not None:
                        self.fault.install(runtime)
            except (ModelError, ValueError) as exc:
                return ack(False, str(exc))
            if old is not None and old.next_stream is not None:
                old.next_stream.close()
            self.assignment = Assignment(dict(f), StageWorker(runtime, f["pipeline"], self.identity, self.retained,
                                                              self.fault))
            self.stats.update(stages=[[f["start"], f["end"]]], state="serving")
            log.info("serving layers [%d, %d) in pipeline %s", f["start"], f["end"], f["pipeline"])
            return ack()

    def _drop_assignment(self) -> None:
        self.stats.update(stages=[])
        if self.assignment is not None:
            if self.assignment.next_stream is not None:
                self.assignment.next_stream.close()
            self.assignment = None

    # -- data path ------------------------------------------------------------------------

    def _serve_upstream(self, stream: Stream) -> None:
        """Steps from the previous stage (or the coordinator, for stage 0), until the stream ends."""
        while True:
            try:
                frame = stream.recv(timeout_s=STAGE_RECV_TIMEOUT_S)
            except StreamClosed:
                return
            assignment = self.assignment
            if assignment is None:
                log.warning("step from %s while no shard is assigned", stream.peer_id)
                continue
            if stream.peer_id != assignment.fields["prev_peer"]:
                log.warning("dropping stage stream from %s: not the upstream of pipeline %s",
                            stream.peer_id, assignment.pipeline)
                return
            if frame.type == CLOSE.type:
                with assignment.lock:
                    receipts = assignment.worker.close(frame.fields["sessions"], frame.fields["requests"])
                if not assignment.worker.runtime.shard.is_last:
                    self._forward(assignment, frame)
                if receipts:
                    self._send_receipts(receipts)
            elif frame.type == STEP.type:
                self._step(assignment, frame)
            else:
                log.warning("unexpected %s from %s on the stage stream", frame.type, stream.peer_id)

    def _step(self, assignment: Assignment, frame: Frame) -> None:
        try:
            with assignment.lock:
                out = assignment.worker.step(frame)
        except (StepError, ValueError, KeyError) as exc:
            self._report_failure(frame, f"stage [{assignment.fields['start']}, {assignment.fields['end']}) "
                                        f"refused step: {exc}", self.node.peer_id)
            return
        self.stats.add_step(frame.tensors[0].shape[0])
        self._forward(assignment, out)

    def _forward(self, assignment: Assignment, frame: Frame) -> None:
        nxt = assignment.fields["next_peer"]
        protocol = PROTO_RESULT if nxt == self.coordinator_peer else PROTO_STAGE
        try:
            if assignment.next_stream is None:
                self.node.connect(assignment.fields["next_addrs"][0], timeout_s=10.0)
                assignment.next_stream = self.node.open_stream(nxt, protocol, timeout_s=10.0)
            assignment.next_stream.send(frame, timeout_s=30.0)
        except TransportError as exc:
            assignment.next_stream = None
            if frame.type != CLOSE.type:
                self._report_failure(frame, f"next stage {nxt} unreachable: {exc}", nxt)

    def _send_receipts(self, receipts: list) -> None:
        frame = Frame(RECEIPTS.type, RECEIPTS.version, {"receipts": [r.to_dict() for r in receipts]})
        try:
            reply = self.node.request(self.coordinator_peer, PROTO_CONTROL, frame, timeout_s=10.0)
            if not reply.fields.get("ok"):
                log.warning("the coordinator refused our receipts: %s", reply.fields.get("reason"))
        except TransportError as exc:
            log.warning("could not send receipts: %s", exc)

    def _report_failure(self, frame: Frame, reason: str, peer: str) -> None:
        log.warning("%s", reason)
        failed = Frame(FAILED.type, FAILED.version, {
            "pipeline": frame.fields.get("pipeline", ""), "step": frame.fields.get("step", -1),
            "reason": reason, "peer": peer,
        })
        try:
            self.node.request(self.coordinator_peer, PROTO_CONTROL, failed, timeout_s=5.0)
        except TransportError as exc:
            log.warning("could not report the failure to the coordinator: %s", exc)

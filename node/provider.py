"""`provider join`: a provider's process. It profiles its device, registers a signed profile with
the coordinator, heartbeats, loads the shard it is assigned and serves it: steps come in on a
stream from upstream and go on to the next stage (or, from the last stage, sampled tokens go
back to the coordinator).

Losing the coordinator (its process restarted, the network dropped) is noticed by the connection
closing or a heartbeat failing; the provider then dials the coordinator's multiaddr again, with
capped exponential backoff and jitter, until a heartbeat gets through, and registers again if the
coordinator no longer knows it. Its standing (vouch, stake, reputation) is the coordinator's to
keep, in its data directory and ledger; the provider keeps its shard loaded meanwhile, so a
restarted coordinator that plans the same stages gets them back at once."""

from __future__ import annotations

import concurrent.futures
import logging
import random
import sys
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from node import link_test
from node.config import ModelConfig, ModelError
from node.faults import Fault
from node.models import model_id_of
from node.probe import ProbeWork
from node.profile import hardware_class, serving_dtype
from node.reachability import announce_addr
from node.retention import RetentionStore
from node.runtime import ShardRuntime
from node.sealer import Sealer
from node.shard import Shard, tensor_names
from node.stage import StageWorker, StepError
from node.status import ProviderStats
from node.transport import Frame, Identity, P2PNode, Stream, StreamClosed, TransportConfig, TransportError
from node.verifier import AuditService
from wire.messages import (LINK_KINDS, PROTO_ASSIGN, PROTO_AUDIT, PROTO_CONTROL, PROTO_LINK_TEST, PROTO_RESULT,
                           PROTO_STAGE, AccountInfo, AccountQuery, Ack, Assign, Close, Failed, Heartbeat, Leave,
                           LinkTest, Message, MessageError, Ping, Probe, ProbeResult, ProbeRun, Receipts, Register,
                           Retain, Step, Unassign, decode, dtype_name, refuse)

log = logging.getLogger("meshpool.provider")

HEARTBEAT_INTERVAL_S = 1.0
ACCOUNT_EVERY_BEATS = 5  # how often the provider asks for its balance and standing, in heartbeats
STAGE_RECV_TIMEOUT_S = 3600.0
CONTROL_TIMEOUT_S = 5.0  # a heartbeat, an account query, a failure report
RECEIPTS_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
FORWARD_TIMEOUT_S = 30.0
LEAVE_TIMEOUT_S = 60.0
# Re-dialing a lost coordinator: the first retry at once-ish, then doubling to a cap small enough
# that a restarted coordinator has its pool back within seconds; jitter spreads a pool's redials.
REDIAL_FIRST_S = 0.25
REDIAL_MAX_S = 2.0


def redial_wait_s(backoff_s: float) -> float:
    """Equal jitter: half the backoff plus a random part of the other half, so a pool's providers do
    not all dial a restarted coordinator in the same instant."""
    return backoff_s / 2 + random.uniform(0, backoff_s / 2)


def warm_up_shard_building(device: torch.device) -> None:
    """A shard is built on the meta device and then materialised; the first time, torch imports parts
    of itself lazily (torch._dynamo from an Embedding's init, sympy from Module.to_empty): 1-2 s here,
    measured. Paid at start, not in the first assignment, which may be a failover's."""
    with torch.device("meta"):
        torch.nn.Embedding(2, 2)
    torch.nn.Linear(2, 2, device="meta").to_empty(device=device)


class Assignment:
    """The shard a provider serves now, and where its outputs go.

    Replaced whole (never changed in place) under Provider.assign_lock; other threads read the
    reference once and keep using that object. `next_stream` belongs to the one thread that serves
    the upstream stream (it opens, uses and resets it); whoever drops the assignment closes it."""

    def __init__(self, spec: Assign, worker: StageWorker):
        self.spec, self.worker = spec, worker
        self.next_stream: Stream | None = None
        # the stream to the next hop, opened in the background as soon as the shard is assigned;
        # the upstream thread takes it at the first step (or dials itself if it failed)
        self.prepared: concurrent.futures.Future | None = None
        self.lock = threading.Lock()  # one step at a time on the shard

    def close_streams(self) -> None:
        if self.next_stream is not None:
            self.next_stream.close()
        prepared, self.prepared = self.prepared, None
        if prepared is not None:  # never taken: close it once it is open
            prepared.add_done_callback(lambda f: f.exception() is None and f.result().close())


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
        self.sealer = Sealer(self._send_receipts)  # closed requests are hashed and receipted off the serving thread
        self.unassigned = threading.Event()  # set while no shard is assigned
        self.unassigned.set()
        self.assign_lock = threading.Lock()
        self.probe_work: ProbeWork | None = None  # the admission probe being run (coordinator/admission.py)
        self.probe_lock = threading.Lock()
        self.link_tests = link_test.LinkTestServer()  # other providers time their hop to us (node/link_test.py)
        self.stopping = threading.Event()
        self.contact_lost = threading.Event()  # set when the coordinator's connection closes

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> str:
        warm_up_shard_building(self.device)
        self.node.set_handler(PROTO_ASSIGN, self._on_assign)
        self.node.set_stream_handler(PROTO_STAGE, self._serve_upstream)
        self.node.set_stream_handler(PROTO_LINK_TEST, self.link_tests.serve)
        self.node.set_handler(PROTO_AUDIT, self.audits.handle)
        self.node.on_peer_lost(self._on_peer_lost)
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
        self.contact_lost.set()  # wakes the heartbeat loop, which sees `stopping` and ends
        try:
            reply = self._control(Leave(self.node.peer_id))
            if isinstance(reply, Ack) and reply.ok and not self.unassigned.wait(timeout_s):
                log.warning("the coordinator did not release our shard within %.0f s", timeout_s)
        except (TransportError, MessageError) as exc:
            log.warning("leave was not acknowledged: %s", exc)
        with self.assign_lock:
            self._drop_assignment()
        self.sealer.shutdown()  # the last requests' receipts go out before we do
        self.node.close()

    def _control(self, message: Message, timeout_s: float = CONTROL_TIMEOUT_S) -> Message:
        """One request to the coordinator on the control protocol; its decoded answer."""
        return decode(self.node.request(self.coordinator_peer, PROTO_CONTROL, message.to_frame(), timeout_s=timeout_s))

    def _register(self) -> None:
        unsigned = Register(self.profile, (self.announced_addr or self.node.addr,), self.max_memory_bytes,
                            self.identity.public_key_bytes, b"")
        signature = self.identity.sign(unsigned.signed_bytes(self.node.peer_id))
        reply = self._control(Register(**{**vars(unsigned), "signature": signature}), CONNECT_TIMEOUT_S)
        if not isinstance(reply, Ack) or not reply.ok:
            raise ConnectionError(f"the coordinator refused us: {getattr(reply, 'reason', reply)}")

    def _on_peer_lost(self, peer: str) -> None:
        if peer != self.coordinator_peer:
            return
        if self.stopping.is_set():  # leaving, and the coordinator is gone: nobody will release our shard
            self.unassigned.set()
            return
        log.warning("connection to the coordinator closed; dialing it again")
        self.contact_lost.set()

    def _heartbeat_loop(self) -> None:
        """A heartbeat a second while in contact; while not, dial the coordinator's multiaddr again
        after each failure (capped exponential backoff with jitter) and register once it answers."""
        beats, lost_since_s, backoff_s, wait_s = 0, None, REDIAL_FIRST_S, HEARTBEAT_INTERVAL_S
        while not self.stopping.is_set():
            if self.contact_lost.wait(wait_s):  # the connection closed: dial now, not after a beat
                self.contact_lost.clear()
                lost_since_s = lost_since_s or time.monotonic()
            if self.stopping.is_set():
                return
            try:
                if lost_since_s is not None:  # the peerstore may have forgotten its address: dial it
                    self.node.connect(self.coordinator_addr, timeout_s=CONNECT_TIMEOUT_S)
                reply = self._control(self._heartbeat())
                if isinstance(reply, Ack) and not reply.ok and not self.stopping.is_set():
                    log.warning("the coordinator no longer knows us (%s); registering again", reply.reason)
                    if "/p2p-circuit" in self.announced_addr:  # our relay slot went with the coordinator's process
                        self.announced_addr = announce_addr(self.node, self.coordinator_addr, self.coordinator_peer,
                                                            self.relay_mode, self.announce)
                    self._register()
                if lost_since_s is not None:
                    log.info("back in contact with the coordinator after %.1f s", time.monotonic() - lost_since_s)
                lost_since_s, backoff_s, wait_s = None, REDIAL_FIRST_S, HEARTBEAT_INTERVAL_S
                beats += 1
                if beats % ACCOUNT_EVERY_BEATS == 1:
                    info = self._control(AccountQuery(self.node.peer_id))
                    if isinstance(info, AccountInfo):
                        self.stats.update(state=info.state, credits_earned_units=info.balance_units,
                                          reputation=info.reputation)
            except Exception as exc:  # noqa: BLE001 - whatever a beat raised, the loop must live on to redial
                if not isinstance(exc, (TransportError, ConnectionError, MessageError)):
                    log.exception("heartbeat failed unexpectedly; treated as lost contact")
                if lost_since_s is None:
                    log.warning("lost contact with the coordinator: %s: %s", type(exc).__name__, exc)
                    lost_since_s, backoff_s = time.monotonic(), REDIAL_FIRST_S
                else:
                    log.info("coordinator still unreachable after %.0f s: %s", time.monotonic() - lost_since_s, exc)
                    backoff_s = min(backoff_s * 2, REDIAL_MAX_S)
                self.stats.update(state="reconnecting")
                wait_s = redial_wait_s(backoff_s)


    def _heartbeat(self) -> Heartbeat:
        """A beat with how we hold our links now: to the coordinator and to our next stage (the hop
        we dial), so that /pool can tell a relayed hop from one hole punching made direct."""
        assignment = self.assignment
        peers = [self.coordinator_peer] if self.coordinator_peer else []
        if assignment is not None and assignment.spec.next_peer not in ("", *peers):
            peers.append(assignment.spec.next_peer)
        links = [(p, self.node.connection_kind(p)) for p in peers]
        links = [(p, kind) for p, kind in links if kind in LINK_KINDS]  # "none": no link to speak of
        return Heartbeat(self.node.peer_id, tuple(p for p, _ in links), tuple(k for _, k in links))

    # -- assignments ----------------------------------------------------------------------

    def _on_assign(self, frame: Frame, peer: str) -> Frame:
        if peer != self.coordinator_peer:
            return refuse("only the coordinator assigns shards").to_frame()
        try:
            message = decode(frame, Assign, Unassign, Ping, Probe, ProbeRun, LinkTest)
        except MessageError as exc:
            return refuse(str(exc)).to_frame()
        if isinstance(message, Ping):
            return Ack().to_frame()
        if isinstance(message, (Probe, ProbeRun)):
            return self._probe(message).to_frame()
        if isinstance(message, LinkTest):  # the coordinator times our hop to another provider
            return link_test.run(self.node, message).to_frame()
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
                    # every layer's updates are kept: the receipt commits to them, audits re-execute from them
                    runtime = ShardRuntime(
                        self.model_dir, shard, device=self.device, dtype=getattr(torch, spec.dtype),
                        max_sessions=spec.max_sessions, max_seq_len=spec.max_seq_len,
                        on_tensor_loaded=lambda _name: bar.update(), capture_trace=True,
                    )
                if self.fault is not None:
                    self.fault.install(runtime)
                started_s = time.perf_counter()
                if n_graphs := runtime.capture_graphs():  # no step of the serving waits for one
                    log.info("captured %d CUDA graphs of layers [%d, %d) in %.1f s", n_graphs, shard.start,
                             shard.end, time.perf_counter() - started_s)
        except (ModelError, ValueError) as exc:
            return refuse(str(exc))
        except (MemoryError, torch.OutOfMemoryError) as exc:  # the coordinator plans us below this from now on
            return refuse(f"out of memory: {exc}"[:2000])
        if old is not None:
            old.close_streams()
        assignment = Assignment(spec, StageWorker(runtime, spec.pipeline, self.identity, self.retained, self.fault))
        assignment.prepared = self._prepare_next(spec)
        self.assignment = assignment
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
            work = self.probe_work
            if work is None or not work.runs_left:
                return refuse("no probe prepared")
            result = ProbeResult(message.seed, work.run(message))
            if not work.runs_left:
                self.probe_work = None
            return result

    def _next_protocol(self, spec: Assign) -> str:
        return PROTO_RESULT if spec.next_peer == self.coordinator_peer else PROTO_STAGE

    def _prepare_next(self, spec: Assign) -> concurrent.futures.Future:
        """Dial the next hop and open the stream to it now, while the other stages still load: after
        a failover the replayed step then waits for no handshake on any hop."""
        prepared: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                if spec.next_addrs:
                    self.node.connect(spec.next_addrs[0], timeout_s=CONNECT_TIMEOUT_S)
                prepared.set_result(self.node.open_stream(spec.next_peer, self._next_protocol(spec),
                                                          timeout_s=CONNECT_TIMEOUT_S, link=True))
            except TransportError as exc:  # the first step dials again and reports what fails then
                prepared.set_exception(exc)

        threading.Thread(target=run, name="prepare-next", daemon=True).start()
        return prepared

    def _drop_assignment(self) -> None:
        self.stats.update(stages=[])
        if self.assignment is not None:
            self.assignment.close_streams()
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
                    unsealed = assignment.worker.release(message)
                if not assignment.worker.runtime.shard.is_last:
                    self._forward(assignment, message)
                self.sealer.submit(assignment.worker, unsealed)
            elif message.step <= last_step:
                log.warning("step %d of pipeline %s from %s dropped: a duplicate (step %d was taken)",
                            message.step, message.pipeline, stream.peer_id, last_step)
            else:
                last_step = message.step
                self._step(assignment, message)

    def _step(self, assignment: Assignment, step: Step) -> None:
        with assignment.lock:
            try:
                out, keep_record = assignment.worker.run(step)
                self._forward(assignment, out)  # sent on before the step's bookkeeping
                keep_record()
            except StepError as exc:
                self._report_failure(step.pipeline, step.step, f"stage [{assignment.spec.start}, "
                                     f"{assignment.spec.end}) refused step: {exc}", self.node.peer_id)
                return
            except Exception as exc:  # a device error or a bug: said at once, not left to the coordinator's timeout
                log.exception("step %d of pipeline %s failed", step.step, step.pipeline)
                self._report_failure(step.pipeline, step.step, f"stage [{assignment.spec.start}, "
                                     f"{assignment.spec.end}) failed step {step.step}: {exc!r}", self.node.peer_id)
                return
        self.stats.add_step(step.x.shape[0])

    def _forward(self, assignment: Assignment, message: Message) -> None:
        nxt = assignment.spec.next_peer
        try:
            if assignment.next_stream is None:
                assignment.next_stream = self._take_prepared(assignment)
            if assignment.next_stream is None:
                self.node.connect(assignment.spec.next_addrs[0], timeout_s=CONNECT_TIMEOUT_S)
                assignment.next_stream = self.node.open_stream(nxt, self._next_protocol(assignment.spec),
                                                               timeout_s=CONNECT_TIMEOUT_S, link=True)
            assignment.next_stream.send(message.to_frame(), timeout_s=FORWARD_TIMEOUT_S)
        except TransportError as exc:
            assignment.next_stream = None
            if isinstance(message, Step):
                self._report_failure(message.pipeline, message.step, f"next stage {nxt} unreachable: {exc}", nxt)

    def _take_prepared(self, assignment: Assignment) -> Stream | None:
        prepared, assignment.prepared = assignment.prepared, None
        if prepared is None:
            return None
        try:
            stream = prepared.result(timeout=CONNECT_TIMEOUT_S)
        except (TransportError, concurrent.futures.TimeoutError):
            prepared.add_done_callback(lambda f: f.exception() is None and f.result().close())
            return None
        return stream

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

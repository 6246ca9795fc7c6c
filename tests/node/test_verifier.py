"""A verifier's side of audits over real libp2p hosts: what it cannot check blames nobody."""

from __future__ import annotations

import threading
import time

import torch

from node.retention import RetentionStore
from node.transport import P2PNode
from node.verifier import AuditService
from verification.check import UNCHECKED
from wire.messages import PROTO_AUDIT, AuditTask, AuditVerdict, SamplingParams, decode


def task_for(subject: P2PNode, request_id: str = "req-1") -> AuditTask:
    return AuditTask("req-1.0", request_id, subject.peer_id, (subject.addr,), "any-model", 0, 2, 4, "0" * 64,
                     "0" * 64, "0" * 64, "float32", "", SamplingParams(), 2**62, b"")


def test_a_verifier_whose_fetch_is_cut_answers_unchecked(tmp_path):
    coordinator, verifier, subject = P2PNode(), P2PNode(), P2PNode()
    for node in (coordinator, verifier, subject):
        node.start()
    fetching = threading.Event()

    def hang_up(frame, peer):  # the audited stage's connection drops in the middle of the fetch
        fetching.set()
        threading.Thread(target=subject.close, daemon=True).start()
        time.sleep(30)

    subject.set_handler(PROTO_AUDIT, hang_up)
    service = AuditService(verifier, tmp_path, torch.device("cpu"), RetentionStore(), lambda: coordinator.peer_id)
    verifier.set_handler(PROTO_AUDIT, service.handle)
    try:
        coordinator.connect(verifier.addr)
        reply = decode(coordinator.request(verifier.peer_id, PROTO_AUDIT, task_for(subject).to_frame(), timeout_s=120))
        assert fetching.is_set()
        assert isinstance(reply, AuditVerdict) and reply.outcome == UNCHECKED, reply
        assert "could not fetch" in reply.reason
    finally:
        coordinator.close()
        verifier.close()


def test_a_stage_that_kept_nothing_leaves_the_verifier_unchecked_and_others_get_nothing(tmp_path):
    coordinator, verifier, subject = P2PNode(), P2PNode(), P2PNode()
    for node in (coordinator, verifier, subject):
        node.start()
    subject.set_handler(PROTO_AUDIT, AuditService(subject, tmp_path, torch.device("cpu"), RetentionStore(),
                                                  lambda: coordinator.peer_id).handle)
    service = AuditService(verifier, tmp_path, torch.device("cpu"), RetentionStore(), lambda: coordinator.peer_id)
    verifier.set_handler(PROTO_AUDIT, service.handle)
    try:
        coordinator.connect(verifier.addr)
        # a ticket the coordinator never signed: the stage refuses, the verifier cannot judge
        reply = decode(coordinator.request(verifier.peer_id, PROTO_AUDIT, task_for(subject).to_frame(), timeout_s=60))
        assert reply.outcome == UNCHECKED and "no valid ticket" in reply.reason
        # an audit task from anyone but the coordinator is refused outright
        subject.connect(verifier.addr)
        refused = decode(subject.request(verifier.peer_id, PROTO_AUDIT, task_for(subject).to_frame(), timeout_s=60))
        assert not refused.ok and "only the coordinator" in refused.reason
    finally:
        for node in (coordinator, verifier, subject):
            node.close()


def test_a_trace_larger_than_a_part_is_fetched_in_parts_and_put_back_together(tmp_path, monkeypatch):
    """AuditData travels in parts (a trace outgrows one frame): the fetcher gets back exactly what
    the stage retained; a part beyond the last is refused."""
    import node.retention
    from node.retention import SessionRecord
    from node.verifier import fetch_retained
    from wire.messages import Ack, AuditFetch

    monkeypatch.setattr(node.retention, "AUDIT_PART_BYTES", 3 * 40 * 8 * 4)  # three trace rows a part
    record = SessionRecord()
    record.add(torch.randn(40, 8), torch.randn(40, 8))
    kept = record.seal(torch.randn(2 * 5 + 1, 40, 8))  # 5 layers: 11 rows, so 4 parts of the trace
    store = RetentionStore()
    store.put("req-1", kept)
    coordinator, subject = P2PNode(), P2PNode()
    for n in (coordinator, subject):
        n.start()
    subject.set_handler(PROTO_AUDIT, AuditService(subject, tmp_path, torch.device("cpu"), store,
                                                  lambda: coordinator.peer_id).handle)
    try:
        assert len(kept.parts()) == 5
        fetched = fetch_retained(coordinator, task_for(subject), 2**62, b"")
        assert len(fetched) == len(kept.tensors)
        assert all(torch.equal(a, b) for a, b in zip(fetched, kept.tensors))
        beyond = decode(coordinator.request(subject.peer_id, PROTO_AUDIT,
                                            AuditFetch("req-1", 2**62, b"", 5).to_frame(), timeout_s=30))
        assert isinstance(beyond, Ack) and not beyond.ok and "5 parts" in beyond.reason
    finally:
        for n in (coordinator, subject):
            n.close()

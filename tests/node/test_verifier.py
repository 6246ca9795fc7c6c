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

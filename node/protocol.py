"""The pool's stream protocols and the named messages that cross them.

Data path of one step: coordinator --stage.step--> stage 0 --stage.step--> ... --> last stage
--stage.result--> coordinator. Control: a provider registers and heartbeats to the coordinator;
the coordinator assigns shards to providers.
"""

from __future__ import annotations

import json

from wire.frames import Frame, MessageSpec, register_message

PROTO_CONTROL = "/meshpool/control/1"  # provider -> coordinator: register, heartbeat, leave
PROTO_ASSIGN = "/meshpool/assign/1"  # coordinator -> provider: load a shard, or drop it
PROTO_STAGE = "/meshpool/stage/1"  # upstream -> stage: steps and closes, long-lived stream
PROTO_RESULT = "/meshpool/result/1"  # last stage -> coordinator: sampled tokens, long-lived stream
PROTO_AUDIT = "/meshpool/audit/1"  # coordinator -> verifier: audit tasks; verifier -> stage: retained tensors

STEP_KINDS = ("prefill", "decode")

# provider -> coordinator
REGISTER = register_message(MessageSpec("pool.register", 1, {
    "profile": dict, "addrs": list, "max_memory_bytes": int, "public_key": bytes, "signature": bytes,
}, max_tensors=0))
HEARTBEAT = register_message(MessageSpec("pool.heartbeat", 1, {"peer": str}, max_tensors=0))
LEAVE = register_message(MessageSpec("pool.leave", 1, {"peer": str}, max_tensors=0))
ACK = register_message(MessageSpec("pool.ack", 1, {"ok": bool, "reason": str}, max_tensors=0))
# what the pool and the ledger say about the asking provider (for its status line)
ACCOUNT = register_message(MessageSpec("pool.account", 1, {"peer": str}, max_tensors=0))
ACCOUNT_INFO = register_message(MessageSpec("pool.account_info", 1, {
    "state": str, "balance_units": int, "reputation": int,
}, max_tensors=0))

# coordinator -> provider: serve layers [start, end) of `model` in pipeline `pipeline`, taking steps
# from `prev_peer` only and sending results to `next_peer` at `next_addrs` (the coordinator is
# the previous peer of stage 0 and the next peer of the last stage).
ASSIGN = register_message(MessageSpec("pool.assign", 1, {
    "pipeline": str, "model": str, "start": int, "end": int, "n_layers": int, "prev_peer": str,
    "next_peer": str, "next_addrs": list, "max_sessions": int, "max_seq_len": int,
}, max_tensors=0))
UNASSIGN = register_message(MessageSpec("pool.unassign", 1, {"pipeline": str}, max_tensors=0))
PING = register_message(MessageSpec("pool.ping", 1, {}, max_tensors=0))

# along a pipeline. `sampling` holds [temperature, top_p, seed] per session; `positions` the
# number of tokens each session already holds before this step; `stage_ms` the compute time of
# each stage the step went through so far (each stage appends its own; for metrics only).
STEP = register_message(MessageSpec("stage.step", 1, {
    "pipeline": str, "step": int, "kind": str, "sessions": list, "positions": list, "sampling": list,
    "stage_ms": list,
}, min_tensors=1, max_tensors=1))
# `requests` names the request of each session ("" for none): a stage seals what it retained of
# that session under the request id and signs the request's receipt.
CLOSE = register_message(MessageSpec("stage.close", 1, {"pipeline": str, "sessions": list, "requests": list},
                                     max_tensors=0))
RESULT = register_message(MessageSpec("stage.result", 1, {
    "pipeline": str, "step": int, "sessions": list, "tokens": list, "stage_ms": list,
}, max_tensors=0))
# a stage that cannot run or forward a step tells the coordinator, naming the peer at fault
FAILED = register_message(MessageSpec("stage.failed", 1, {
    "pipeline": str, "step": int, "reason": str, "peer": str,
}, max_tensors=0))

# stage -> coordinator, after a close: the signed receipts (ledger.receipts.StageReceipt as dicts)
RECEIPTS = register_message(MessageSpec("stage.receipts", 1, {"receipts": list}, max_tensors=0))

# Audits. The coordinator gives a verifier a task naming the audited stage (`subject`), the layer
# range, the hashes the receipts committed to, and a ticket: the coordinator's signature over
# (request id, verifier, expiry), which lets the verifier fetch the subject's retained tensors.
AUDIT_TASK = register_message(MessageSpec("audit.task", 1, {
    "audit_id": str, "request_id": str, "subject": str, "subject_addrs": list, "model": str, "start": int,
    "end": int, "n_layers": int, "input_hash": str, "output_hash": str, "sampling": list, "expires_ms": int,
    "ticket": bytes,
}, max_tensors=0))
AUDIT_VERDICT = register_message(MessageSpec("audit.verdict", 1, {
    "audit_id": str, "ok": bool, "reason": str, "metrics": dict,
}, max_tensors=0))
AUDIT_FETCH = register_message(MessageSpec("audit.fetch", 1, {
    "request_id": str, "expires_ms": int, "ticket": bytes,
}, max_tensors=0))
# the retained input, then the output: [hidden] or, from a last stage, [hidden, positions, tokens]
AUDIT_DATA = register_message(MessageSpec("audit.data", 1, {"request_id": str}, min_tensors=2, max_tensors=4))

MAX_BATCH_SESSIONS = 256
MAX_SESSION_ID_CHARS = 64
MAX_REQUEST_ID_CHARS = 128


def ack(ok: bool = True, reason: str = "") -> Frame:
    return Frame(ACK.type, ACK.version, {"ok": ok, "reason": reason})


def ticket_bytes(request_id: str, verifier: str, expires_ms: int) -> bytes:
    """What the coordinator signs to let `verifier` fetch the tensors retained for `request_id`."""
    return b"meshpool-audit-ticket/1\x00" + json.dumps([request_id, verifier, expires_ms]).encode()


def signed_profile_bytes(peer: str, profile: dict, addrs: list[str], max_memory_bytes: int) -> bytes:
    """The exact bytes a provider signs in pool.register and the coordinator verifies."""
    body = {"peer": peer, "profile": profile, "addrs": addrs, "max_memory_bytes": max_memory_bytes}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

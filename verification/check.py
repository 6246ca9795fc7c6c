"""Audit one stage of one request: fetch what the stage retained, hold it to the receipt's hashes,
recompute the layers in one prefill pass, and compare. Verifiers and the referee both run this."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from node.protocol import AUDIT_DATA, AUDIT_FETCH, PROTO_AUDIT
from node.retention import tensor_digest
from node.sampling import SamplingParams
from node.shard import Shard
from node.transport import Frame, P2PNode
from verification.compare import compare_hidden, compare_tokens
from verification.recompute import Recomputer

FETCH_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class StageClaim:
    """What the audited stage's receipt committed to, and how its last stage sampled."""

    request_id: str
    shard: Shard
    input_hash: str
    output_hash: str
    sampling: SamplingParams


@dataclass(frozen=True)
class Outcome:
    ok: bool
    reason: str
    metrics: dict


def fetch_retained(node: P2PNode, subject: str, addrs: list[str], request_id: str, expires_ms: int,
                   ticket: bytes) -> list[torch.Tensor]:
    """The subject's retained [input, *output]; raises TransportError or ValueError."""
    if addrs:
        node.connect(addrs[0], timeout_s=10.0)
    reply = node.request(subject, PROTO_AUDIT, Frame(AUDIT_FETCH.type, AUDIT_FETCH.version, {
        "request_id": request_id, "expires_ms": expires_ms, "ticket": ticket}), timeout_s=FETCH_TIMEOUT_S)
    if reply.type != AUDIT_DATA.type:
        raise ValueError(f"the stage did not hand over its tensors: {reply.fields.get('reason', reply.type)}")
    return list(reply.tensors)


def check_stage(recomputer: Recomputer, claim: StageClaim, tensors: list[torch.Tensor]) -> Outcome:
    """Judge a stage from its retained tensors. Anything that does not match the receipt fails."""
    if len(tensors) != (4 if claim.shard.is_last else 2):
        return Outcome(False, f"{len(tensors)} retained tensors, not what this stage keeps", {})
    stage_input, output = tensors[0], tensors[1:]
    if tensor_digest([stage_input]) != claim.input_hash:
        return Outcome(False, "retained input does not match the receipt's input hash", {})
    if tensor_digest(output) != claim.output_hash:
        return Outcome(False, "retained output does not match the receipt's output hash", {})
    claimed_hidden = output[0]
    if not claimed_hidden.is_floating_point() or claimed_hidden.dim() != 2:
        return Outcome(False, "retained output is not a matrix of hidden states", {})
    dtype = claimed_hidden.dtype  # recompute in the precision the stage served in
    try:
        hidden, logits = recomputer.run(claim.shard, dtype, stage_input)
    except ValueError as exc:
        return Outcome(False, f"cannot recompute: {exc}", {})
    try:
        verdict = compare_hidden(claimed_hidden, hidden, dtype)
    except ValueError as exc:  # the honest recomputation itself overflowed: its input was garbage
        return Outcome(True, f"inconclusive: {exc}", {})
    metrics = verdict.to_dict()
    if not verdict.ok or logits is None:
        return Outcome(verdict.ok, verdict.reason, metrics)
    positions, tokens = output[1].tolist(), output[2].tolist()
    if any(not 0 < p <= hidden.shape[0] for p in positions):
        return Outcome(False, "sampled positions outside the request", metrics)
    # the token chosen at position p comes from the logits of position p - 1
    token_verdict = compare_tokens(logits[[p - 1 for p in positions]], tokens, positions, claim.sampling, dtype)
    return Outcome(token_verdict.ok, token_verdict.reason, {**metrics, **token_verdict.to_dict()})

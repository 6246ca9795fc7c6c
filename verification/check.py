"""Judge one stage of one request from what it retained: hold the tensors to the receipt's hashes,
recompute the layers, compare. Verifiers and the coordinator's referee both call `check_stage`;
fetching the tensors and recomputing are theirs (node/verifier.py, node/recompute.py), so this
module stays pure.

Three outcomes: "pass", "fail" (evidence of wrong work: what the stage handed over contradicts its
receipt, or its outputs are not what its layers compute), and "unchecked" (nothing can be concluded:
the honest recomputation itself is not finite, or the verifier cannot run it). Only a fail blames the
stage; an unchecked audit blames nobody and is never a pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from verification.commitments import tensor_digest
from verification.compare import compare_hidden, compare_tokens
from wire.messages import AuditTask

PASS, FAIL, UNCHECKED = "pass", "fail", "unchecked"

# (task, dtype, stage input) -> (hidden states (T, D), logits (T, V) on the last stage else None)
Recompute = Callable[[AuditTask, torch.dtype, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class Outcome:
    outcome: str  # PASS, FAIL or UNCHECKED
    reason: str
    metrics: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.outcome == PASS


def is_last(task: AuditTask) -> bool:
    return task.end == task.n_layers


def check_stage(recompute: Recompute, task: AuditTask, tensors: list[torch.Tensor]) -> Outcome:
    """Judge a stage from its retained [input, *output] tensors against the receipt in `task`."""
    if len(tensors) != (4 if is_last(task) else 2):
        return Outcome(FAIL, f"{len(tensors)} retained tensors, not what this stage keeps")
    stage_input, output = tensors[0], tensors[1:]
    if tensor_digest([stage_input]) != task.input_hash:
        return Outcome(FAIL, "retained input does not match the receipt's input hash")
    if tensor_digest(output) != task.output_hash:
        return Outcome(FAIL, "retained output does not match the receipt's output hash")
    claimed_hidden = output[0]
    if not claimed_hidden.is_floating_point() or claimed_hidden.dim() != 2:
        return Outcome(FAIL, "retained output is not a matrix of hidden states")
    dtype = claimed_hidden.dtype  # recompute in the precision the stage served in
    try:
        hidden, logits = recompute(task, dtype, stage_input)
    except ValueError as exc:
        return Outcome(UNCHECKED, f"cannot recompute: {exc}")
    try:
        verdict = compare_hidden(claimed_hidden, hidden, dtype)
    except ValueError as exc:  # the honest recomputation itself overflowed: nothing to conclude
        return Outcome(UNCHECKED, str(exc))
    metrics = verdict.to_dict()
    if not verdict.ok:
        return Outcome(FAIL, verdict.reason, metrics)
    if logits is None:
        return Outcome(PASS, verdict.reason, metrics)
    positions, tokens = output[1].tolist(), output[2].tolist()
    if any(not 0 < p <= hidden.shape[0] for p in positions):
        return Outcome(FAIL, "sampled positions outside the request", metrics)
    # the token chosen at position p comes from the logits of position p - 1
    token_verdict = compare_tokens(logits[[p - 1 for p in positions]], tokens, positions, task.sampling, dtype)
    return Outcome(PASS if token_verdict.ok else FAIL, token_verdict.reason, {**metrics, **token_verdict.to_dict()})

"""Judge one stage of one request from what it retained: hold the tensors to the receipt's hashes,
re-execute every layer alone from its committed input, compare. Verifiers and the coordinator's
referee both call `check_stage`; fetching the tensors and re-executing layers are theirs
(node/verifier.py, node/layer_reference.py), so this module stays pure.

A stage commits, besides its input and output, to its layer trace (the receipt's `layers_hash`):
each layer's attention and MLP updates (verification/trace.py), in the precision the coordinator
assigned it (the receipt's `dtype`). Each update is then checked on its own, at its own scale
(verification/layer_compare.py): honest drift is one block's drift whatever the stage's depth,
and a cheat shows at the layer it touches.

Three outcomes: "pass", "fail" (evidence of wrong work: what the stage handed over contradicts its
receipt or its assignment, or its layers do not compute what the model's layers compute), and
"unchecked" (nothing can be concluded: the honest re-execution itself is not finite, or the
verifier cannot run it). Only a fail blames the stage; an unchecked audit blames nobody and is
never a pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from verification.commitments import tensor_digest, trace_matches
from verification.compare import compare_tokens
from verification.trace import n_trace_rows, residuals
from verification.layer_compare import COULD_NOT_CHECK, FAIL as LAYER_FAIL, LayerVerdict
from wire.messages import AuditTask, dtype_name

PASS, FAIL, UNCHECKED = "pass", "fail", "unchecked"
# A layer failure whose worst statistic is at most this many times its threshold is marginal: the
# auditor escalates it (more of the provider's work audited) before anybody is slashed. Everything
# else that fails (a hash, the dtype, a trace unlike the output, a token, a layer far over its
# threshold) is clear.
MARGINAL_EXCESS = 2.0

# (task, stage input, trace (2L + 1, T, D), rows) -> (the stage's verdict, each layer's
# verdict, the last stage's logits (len(rows), V) at those rows, else None); raises ValueError when
# it cannot re-execute at all
ReExecute = Callable[[AuditTask, torch.Tensor, torch.Tensor, list[int]],
                     tuple[LayerVerdict, list[LayerVerdict], torch.Tensor | None]]


@dataclass(frozen=True)
class Outcome:
    outcome: str  # PASS, FAIL or UNCHECKED
    reason: str
    metrics: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.outcome == PASS

    @property
    def marginal(self) -> bool:
        """A failure within MARGINAL_EXCESS of a layer threshold (metrics["excess"])."""
        return self.outcome == FAIL and 0 < self.metrics.get("excess", 0) <= MARGINAL_EXCESS


def excess(verdict: LayerVerdict) -> float:
    """How far a failed layer's statistics are over the thresholds it was judged by: the largest ratio."""
    limits, stats = verdict.limits, verdict.stats
    if limits is None or stats is None:
        return float("inf")
    pairs = [(stats.median, limits.median_max), (stats.quantile, limits.quantile_max), (stats.max, limits.max_max)]
    if not stats.block or stats.block in limits.same_blocks:  # the same-recipe limits judged this block
        pairs += [(stats.ulp_fraction, limits.ulp_fraction_max), (stats.drift_ratio, limits.drift_ratio_max),
                  (stats.same_median, limits.same_median_max)]
    ratios = [value / limit for value, limit in pairs if value == value and 0 < limit < float("inf")]
    return max(ratios, default=float("inf"))


def is_last(task: AuditTask) -> bool:
    return task.end == task.n_layers


def layer_metrics(verdicts: list[LayerVerdict]) -> dict:
    """The evidence an audit records: layers checked and the worst per-layer statistics."""
    stats = [v.stats for v in verdicts if v.stats is not None]
    # whether a same-recipe recompute judged these layers: what a float32 referee cannot see
    metrics = {"layers_checked": len({v.layer for v in verdicts if v.stats is not None}), "same_recipe": any(s.same_median == s.same_median for s in stats)}
    for name in ("median", "quantile", "max", "drift_ratio", "same_median", "ulp_fraction"):
        values = [getattr(s, name) for s in stats if getattr(s, name) == getattr(s, name)]  # not NaN
        if values:
            metrics[f"worst_{name}"] = max(values)
    return metrics


def check_stage(reexecute: ReExecute, task: AuditTask, tensors: list[torch.Tensor]) -> Outcome:
    """Judge a stage from its retained [input, *output, trace] against the receipt in `task`."""
    if not task.layers_hash:
        return Outcome(FAIL, "the receipt commits to no layer trace")
    if len(tensors) != (5 if is_last(task) else 3):
        return Outcome(FAIL, f"{len(tensors)} retained tensors, not what this stage keeps")
    stage_input, output, trace = tensors[0], tensors[1:-1], tensors[-1]
    if tensor_digest([stage_input]) != task.input_hash:
        return Outcome(FAIL, "retained input does not match the receipt's input hash")
    if tensor_digest(output) != task.output_hash:
        return Outcome(FAIL, "retained output does not match the receipt's output hash")
    if not trace_matches(trace, task.layers_hash):
        return Outcome(FAIL, "retained layer trace does not match the receipt's layers hash")
    claimed = output[0]
    for name, t in (("output", claimed), ("layer trace", trace)):
        if dtype_name(t.dtype) != task.dtype:
            return Outcome(FAIL, f"{name} in {t.dtype}, but the stage was assigned {task.dtype}")
    if claimed.dim() != 2 or trace.dim() != 3 or trace.shape[0] != n_trace_rows(task.end - task.start) \
            or tuple(trace.shape[1:]) != tuple(claimed.shape):
        return Outcome(FAIL, f"trace {tuple(trace.shape)} does not fit "
                             f"{task.end - task.start} layers and an output of {tuple(claimed.shape)}")
    if not torch.equal(residuals(trace)[0][-1], claimed):
        return Outcome(FAIL, "the output sent is not what the trace's updates add up to")
    rows: list[int] = []
    if is_last(task):
        positions = output[1].tolist()
        if any(not 0 < p <= claimed.shape[0] for p in positions):
            return Outcome(FAIL, "sampled positions outside the request")
        rows = [p - 1 for p in positions]  # the token chosen at position p comes from row p - 1
    try:
        verdict, verdicts, logits = reexecute(task, stage_input, trace, rows)
    except ValueError as exc:
        return Outcome(UNCHECKED, f"cannot re-execute: {exc}")
    metrics = layer_metrics(verdicts)
    if verdict.outcome == LAYER_FAIL:
        metrics["excess"] = excess(verdict)
        return Outcome(FAIL, verdict.reason, metrics)
    if verdict.outcome == COULD_NOT_CHECK:
        return Outcome(UNCHECKED, verdict.reason, metrics)
    if logits is None:
        return Outcome(PASS, verdict.reason, metrics)
    tokens = compare_tokens(logits, output[2].tolist(), positions, task.sampling, claimed.dtype)
    return Outcome(PASS if tokens.ok else FAIL, tokens.reason, {**metrics, **tokens.to_dict()})

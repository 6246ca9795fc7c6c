"""Tolerant comparison of a stage's claimed outputs with a verifier's recomputation (DESIGN 5).

Production audits compare layer by layer (verification/layer_compare.py) and use only
`compare_tokens` from here; `compare_hidden` is the whole-stage comparison they replaced, kept as
the baseline bench/audit_calibration.py measures (its drift compounds over depth).

Hidden states (T, D) are compared position by position: the relative L2 error
||claimed - recomputed|| / ||recomputed|| (the worst position decides) and the agreement of the
K largest-magnitude components (the worst position decides). Tokens of the last stage are
compared by re-applying the sampling rule of node/sampling.py to the recomputed logits; a token
that differs is tolerated only as a near-tie, when its score is within a calibrated margin of the
recomputed best score.

Every threshold below comes from bench/audit_calibration.py (figures in bench/audit_calibration.json):
honest pairs (batch 1 / batch 8 decode / chunked prefill vs one prefill, bf16 upstream into an fp32
stage, ...) all stay well under them; in float32 every cheat measured (noise down to 1e-3 of the
row RMS, skipped layers, other weights, a 1e-3 relative change of one layer's weights) lands above
them; in bfloat16 only cheats of ~5 % or more can be told from bf16 rounding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from wire.messages import SamplingParams
from verification.sampling import gumbel_noise, sample

# Components compared by top-k agreement, per position.
TOPK_K = 32


@dataclass(frozen=True)
class HiddenThresholds:
    rel_l2_max: float  # fail when some position's relative L2 error exceeds this
    topk_agreement_min: float  # fail when some position's top-K overlap falls below this


# Calibration (bench/audit_calibration.json: 8 prompts of 32-118 tokens + 32 greedy tokens, 3 stages
# [0,10) [10,20) [20,30), batch 1 / batch 8 decode / chunked prefill / bf16 upstream into fp32 and
# the reverse, each recomputed in one prefill; 96 honest audits per dtype, CPU only):
#   float32  honest rel_l2 max 1.7e-6 (median ~1e-6), top-k min 1.00.
#            cheats rel_l2 min 1.04e-3 (noise 1e-3; 1e-3 weight change of one layer: 1.04e-3 to 7e-3;
#            skip/lazy/wrong-model >= 0.55); all 96 cheat audits fail.
#            Threshold 1e-4: 60x the honest maximum (room for other hardware's kernels), 10x below
#            the weakest cheat.
#   bfloat16 honest rel_l2 max 2.5e-2 (3.0e-2 in an earlier run on shorter prompts), top-k min 0.906.
#            cheats: noise 1e-1 -> >= 0.105, skip/lazy/wrong-model >= 0.55: caught; noise 1e-2 / 1e-3
#            and a 1e-3 weight change land at 0.009-0.085, inside the honest spread: bf16 rounding
#            (2^-8 per value) hides them, and no threshold tells them apart from honest drift.
#            Threshold 6e-2: 2x the honest maximum, below noise 1e-1.
#   top-k (K=32): float32 cheats 0.97 (noise 1e-3) to 0.0; bf16 honest min 0.906 (3 of 32 swapped).
# Cross-hardware check (one run, layers [10,15), 8 prompts): served on an H100 (CUDA graphs + Triton
# decode, batch 8 and 1, and one prefill) vs one CPU prefill: float32 rel_l2 max 2.3e-6, bfloat16
# 1.25e-2, top-k min 1.00 / 0.94 -- the same spread as CPU-only drift.
HIDDEN_THRESHOLDS: dict[torch.dtype, HiddenThresholds] = {
    torch.float32: HiddenThresholds(rel_l2_max=1e-4, topk_agreement_min=0.90),
    torch.bfloat16: HiddenThresholds(rel_l2_max=6e-2, topk_agreement_min=0.75),
    # float16 keeps 3 more mantissa bits than bfloat16: bfloat16's figures / 8, not measured.
    torch.float16: HiddenThresholds(rel_l2_max=1e-2, topk_agreement_min=0.75),
}

# Near-tie margin, in logits (temperature 1), per dtype: a differing token passes when
# (best recomputed score - claimed token's score) * temperature <= margin. Calibration (greedy):
# largest honest |claimed logit - recomputed logit| at sampled rows float32 7.3e-5, bfloat16 0.75
# (1.5 in an earlier run); largest honest score gap of a differing token float32 0 (no mismatch),
# bfloat16 0.25 (several mismatches); skip/lazy/wrong-model last stages differ by gaps of 15-25.
TOKEN_MARGIN_LOGITS: dict[torch.dtype, float] = {
    torch.float32: 1e-3,
    torch.bfloat16: 1.5,
    torch.float16: 0.25,
}
# With top_p < 1 a claimed token just outside the recomputed nucleus is a near-tie too, when the
# probability mass ranked above it exceeds top_p by at most this much. Not calibrated: the
# calibration samples greedily; bf16 logit drift of ~1 may move more mass than this near the edge.
NUCLEUS_SLACK = 1e-2


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str
    rel_l2_max: float = 0.0
    topk_agreement_min: float = 1.0
    tokens_checked: int = 0
    token_mismatches: int = 0  # differing tokens, near-ties included
    near_ties: int = 0  # differing tokens tolerated as near-ties
    worst_position: int = -1  # row of the worst hidden position or first bad token (-1: none)

    def to_dict(self) -> dict:
        return asdict(self)


def thresholds_for(dtype: torch.dtype) -> HiddenThresholds:
    if dtype not in HIDDEN_THRESHOLDS:
        raise ValueError(f"no audit thresholds for {dtype}; known: {sorted(str(d) for d in HIDDEN_THRESHOLDS)}")
    return HIDDEN_THRESHOLDS[dtype]


def hidden_errors(claimed: torch.Tensor, recomputed: torch.Tensor, k: int = TOPK_K) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: relative L2 error (T,) and top-k agreement (T,), computed in float64."""
    c, r = claimed.double(), recomputed.double()  # (T, D)
    rel = (c - r).norm(dim=-1) / r.norm(dim=-1).clamp_min(1e-30)
    k = min(k, c.shape[-1])
    top_c = c.abs().topk(k, dim=-1).indices  # (T, k)
    top_r = r.abs().topk(k, dim=-1).indices
    # overlap of the two index sets per row: (T, k, 1) == (T, 1, k)
    agree = (top_c[:, :, None] == top_r[:, None, :]).any(-1).double().mean(-1)
    return rel, agree


def compare_hidden(claimed: torch.Tensor, recomputed: torch.Tensor, dtype: torch.dtype) -> Verdict:
    """Claimed hidden states (T, D) of a stage against the verifier's recomputation in `dtype`."""
    limits = thresholds_for(dtype)
    if not isinstance(claimed, torch.Tensor) or not claimed.is_floating_point():
        return Verdict(False, "claimed output is not a floating-point tensor")
    if recomputed.dim() != 2 or recomputed.shape[0] == 0 or not torch.isfinite(recomputed).all():
        raise ValueError("the recomputation is empty, not (T, D) or not finite: the audit is inconclusive")
    if tuple(claimed.shape) != tuple(recomputed.shape):
        return Verdict(False, f"shape mismatch: claimed {tuple(claimed.shape)}, recomputed {tuple(recomputed.shape)}")
    finite = torch.isfinite(claimed).all(dim=-1)
    if not finite.all():
        row = int((~finite).nonzero()[0, 0])
        return Verdict(False, f"claimed output has non-finite values (first at row {row})", float("inf"), 0.0,
                       worst_position=row)
    rel, agree = hidden_errors(claimed, recomputed)
    worst_rel, worst_agree = int(rel.argmax()), int(agree.argmin())
    rel_max, agree_min = float(rel[worst_rel]), float(agree[worst_agree])
    if rel_max > limits.rel_l2_max:
        return Verdict(False, f"relative L2 error {rel_max:.3g} at row {worst_rel} exceeds {limits.rel_l2_max:g}",
                       rel_max, agree_min, worst_position=worst_rel)
    if agree_min < limits.topk_agreement_min:
        return Verdict(False, f"top-{TOPK_K} agreement {agree_min:.3f} at row {worst_agree} is below "
                       f"{limits.topk_agreement_min:g}", rel_max, agree_min, worst_position=worst_agree)
    return Verdict(True, "hidden states agree", rel_max, agree_min)


def token_gap_logits(logits_row: torch.Tensor, token: int, params: SamplingParams, position: int) -> float:
    """How far (in logits at temperature 1) the claimed token's score falls below the best score
    the sampling rule of node/sampling.py sees in the recomputed logits (V,): 0 when the rule
    could pick it, inf when it cannot be a near-tie (outside the nucleus by more than NUCLEUS_SLACK).

    With top_p < 1 the nucleus itself may differ by a token at its edge, so the best score is taken
    over the tokens sure to be in any nucleus within the slack (their mass, theirs included, stays
    below top_p - NUCLEUS_SLACK); the claimed token need only be within the slack of the edge."""
    if params.temperature == 0.0:
        scores = logits_row.double()
        return float(scores.max() - scores[token])
    raw = logits_row.double() / params.temperature  # (V,)
    scores = raw + gumbel_noise(params.seed, position, raw.numel())
    candidates = scores
    if params.top_p < 1.0:
        sorted_raw, order = raw.sort(descending=True)
        probs = sorted_raw.softmax(-1)
        mass_with = torch.empty_like(probs)
        mass_with[order] = probs.cumsum(-1)  # per token: mass ranked at or above it
        mass_above = mass_with - raw.softmax(-1)
        if float(mass_above[token]) - params.top_p > NUCLEUS_SLACK:
            return float("inf")
        sure = mass_with < params.top_p - NUCLEUS_SLACK
        candidates = scores[sure]
        if candidates.numel() == 0:
            return 0.0
    return max(0.0, float(candidates.max() - scores[token])) * params.temperature


def compare_tokens(recomputed_logits: torch.Tensor, claimed_tokens: list[int], positions: list[int],
                   sampling: SamplingParams, dtype: torch.dtype) -> Verdict:
    """Tokens the last stage claims to have sampled at `positions` (the positions passed to
    node.sampling.sample) against the rule applied to the recomputed logits (N, V) of those rows."""
    margin = TOKEN_MARGIN_LOGITS.get(dtype)
    if margin is None:
        raise ValueError(f"no near-tie margin for {dtype}")
    if recomputed_logits.dim() != 2 or len(positions) != recomputed_logits.shape[0]:
        raise ValueError(f"logits {tuple(recomputed_logits.shape)} do not match {len(positions)} positions")
    n = len(positions)
    if len(claimed_tokens) != n:
        return Verdict(False, f"{len(claimed_tokens)} tokens claimed for {n} sampled positions", tokens_checked=n)
    vocab = recomputed_logits.shape[1]
    bad = [i for i, t in enumerate(claimed_tokens) if type(t) is not int or not 0 <= t < vocab]
    if bad:
        return Verdict(False, f"claimed token {claimed_tokens[bad[0]]!r} is not in [0, {vocab})",
                       tokens_checked=n, worst_position=bad[0])
    expected = sample(recomputed_logits, [sampling] * n, positions)  # the serving rule itself
    mismatches = near_ties = 0
    for i, (want, got, pos) in enumerate(zip(expected, claimed_tokens, positions)):
        if want == got:
            continue
        mismatches += 1
        gap = token_gap_logits(recomputed_logits[i], got, sampling, pos)
        if gap <= margin:
            near_ties += 1
            continue
        return Verdict(False, f"token {got} at position {pos} differs from {want} by a score gap of {gap:.3g} "
                       f"logits (> near-tie margin {margin:g})", tokens_checked=n,
                       token_mismatches=mismatches, near_ties=near_ties, worst_position=i)
    return Verdict(True, "tokens agree" + (f" ({near_ties} near-ties)" if near_ties else ""),
                   tokens_checked=n, token_mismatches=mismatches, near_ties=near_ties)

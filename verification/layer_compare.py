"""Per-layer comparison of a stage's committed layer trace with a single-layer re-execution.

For layer i the stage committed its input x, the attention's update a and the MLP's update m (T, D),
in its serving dtype (verification/trace.py); the verifier recomputes each update alone from what
the stage committed as its input (node/layer_reference.py): r_a = attention(x), r_m = MLP(x + a), in
float32 with the weights rounded to the serving dtype. Each update y is judged against its r at its
own scale, per position t:

    e_t = ||y_t - r_t|| / ||r_t||

so neither the width nor the depth of the model moves it (the stream grows with depth, an update
does not, and the stream's rounding never enters). Over the T positions of a request: the median
(a cheat on the weights moves every row), the 90th percentile (a cheat on attention, e.g. a window,
moves only the later rows) and the maximum (a cheat on a few rows, e.g. only the decode steps).
A verifier of the stage's own hardware class also recomputes in the serving dtype (s: the same
recipe) and counts the elements more than one ulp (of the serving dtype) from round(s): where the
stage ran the verifier's kernels none are, and a 1e-3 change of the weights moves a tenth of them.
The drift ratio ||y - r|| / ||s - r|| and the median ||y_t - s_t|| / ||r_t|| are measured beside it
(bench/layer_audit.py), not judged: they do not separate that change from honest rounding.

Outcomes: pass, fail, could-not-check (the reference is not finite, shapes do not fit, ...); a
could-not-check is never a pass and never slashes. The embeddings (stage 0's trace row 0) are a
table lookup: they must match the rounded table bit for bit.

Every threshold below comes from bench/layer_audit.py (figures in bench/layer_audit*.json).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

PASS, FAIL, COULD_NOT_CHECK = "pass", "fail", "could-not-check"
QUANTILE = 0.9  # the high quantile over positions
# Below this many positions the quantile is one of the few largest rows: it is judged only from
# here on (a window cheat shows past its 64 tokens anyway); median and max always.
QUANTILE_MIN_POSITIONS = 32


@dataclass(frozen=True)
class LayerStats:
    positions: int
    median: float  # of e_t over positions
    quantile: float  # QUANTILE of e_t over positions
    max: float
    ulp_fraction: float  # elements of y more than one ulp from round(s) (s: same-recipe recompute, else r)
    # sqrt(sum_t ||y_t - r_t||^2 / sum_t ||s_t - r_t||^2): the claimed error against the verifier's own
    # same-recipe error, over all positions (nan without a same-recipe recompute, or when s == r)
    drift_ratio: float = float("nan")
    same_median: float = float("nan")  # median of ||y_t - s_t|| / ||r_t|| (error against s)
    block: str = ""  # "attention" or "mlp"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LayerThresholds:
    median_max: float  # fail when the median of e_t exceeds this
    quantile_max: float  # fail when the QUANTILE of e_t exceeds this
    max_max: float = float("inf")  # fail when the largest e_t exceeds this
    ulp_fraction_max: float = 1.0  # fail when more elements than this are > 1 ulp off (1.0: not used)
    drift_ratio_max: float = float("inf")  # fail when the drift ratio exceeds this (needs s)
    same_median_max: float = float("inf")  # fail when the median error against s exceeds this (needs s)
    same_blocks: tuple[str, ...] = ("attention", "mlp")  # the blocks the three limits above judge


@dataclass(frozen=True)
class LayerVerdict:
    outcome: str  # PASS, FAIL or COULD_NOT_CHECK
    reason: str
    layer: int = -1  # absolute layer index; -1 the embeddings, n_layers the head
    stats: LayerStats | None = None
    limits: LayerThresholds | None = None  # what a failed layer was judged by

    @property
    def ok(self) -> bool:
        return self.outcome == PASS

    def to_dict(self) -> dict:
        return dict(outcome=self.outcome, reason=self.reason, layer=self.layer,
                    stats=None if self.stats is None else self.stats.to_dict())


# Thresholds, from bench/layer_audit.json (this 2-core CPU: the default model's 30-layer stage, 16
# requests of 32-160 tokens + 8 decoded, served as prefill + decode b1 and as a 3-chunk prefill +
# decode b8: 1,920 honest block checks per dtype; random 1B / 8B shapes) and the H200 runs
# (bench/layer_audit_cuda_*.json: batches 1, 8 and 64, 8 or 96 decoded tokens). None failed.
#   float32 vs the float32 reference. Honest: e_t <= 2.7e-6 everywhere (CPU and H200). Weakest
#            cheat, tamper (1e-3 relative weight noise): median >= 8.8e-4, p90 >= 1.1e-3, max >= 1.3e-3
#            (the default model; 2.2e-3 on the random shapes); int8 median >= 5.2e-3. Every cheat
#            fails every layer it touches.
#   bfloat16 vs the float32 reference. Honest: median <= 0.0158, p90 <= 0.023, max <= 0.056 (the
#            default model, 7,776 checks with bench/layer_audit_cpu_honest.json; H200 8B shape
#            0.008 / 0.010 / 0.012). Caught: int4 (median >= 0.051),
#            fp8 (192 of 240 blocks), skip-layer, other-model, window (the attention past 64
#            tokens); int8 (>= 0.0055) and tamper (>= 0.0022) stay inside bf16's own rounding.
REFERENCE_THRESHOLDS: dict[torch.dtype, LayerThresholds] = {
    torch.float32: LayerThresholds(median_max=1e-4, quantile_max=2e-4, max_max=5e-4),
    torch.bfloat16: LayerThresholds(median_max=0.033, quantile_max=0.06, max_max=0.12),
}
# bfloat16 against a same-recipe recompute s: a verifier of the stage's own hardware class also runs
# the block in the serving dtype (the serving op sequence), on top of the reference's thresholds,
# and counts the elements more than one ulp from round(s). Keyed by the class's device type: the
# verifier's own kernels decide how close an honest stage lands.
#   cpu (default model, 30-layer stage): honest <= 0.035 (0 where the stage ran the verifier's own
#       prefill kernel); tamper >= 0.118, int8 >= 0.59, fp8 >= 0.80.
#   cuda (H200, random 1B / 8B shapes through the CUDA graphs, verifier on the H200): the MLP's
#       decode kernels round as eager does: honest <= 0.0015 with 96 decoded tokens of ~170;
#       tamper >= 0.21, int8 >= 0.70. Decoded rows' attention comes from the Triton decode kernel
#       (float32 softmax and PV), the verifier's from SDPA's flash prefill (probabilities rounded
#       to bf16): 11-16 % of an honest attention update's elements part there, so on CUDA the
#       same-recipe count judges the MLP only (every copy of the weights changes the MLP too).
# Across classes (GPU serving, CPU verifier) a verifier runs the float32 reference alone.
SAME_RECIPE_THRESHOLDS: dict[str, dict[torch.dtype, LayerThresholds]] = {
    "cpu": {torch.bfloat16: LayerThresholds(median_max=0.033, quantile_max=0.06, max_max=0.12, ulp_fraction_max=0.072)},
    "cuda": {torch.bfloat16: LayerThresholds(median_max=0.033, quantile_max=0.06, max_max=0.12, ulp_fraction_max=0.072,
                                             same_blocks=("mlp",))},
}


def same_recipe_thresholds(device_type: str, dtype: torch.dtype) -> dict[torch.dtype, LayerThresholds] | None:
    """The same-recipe table a verifier on `device_type` judges a `dtype` stage of its own class by,
    or None where none was measured (float32 needs none: the reference alone catches every cheat)."""
    table = SAME_RECIPE_THRESHOLDS.get(device_type, {})
    return table if dtype in table else None


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype`'s values at |x| (float32 in, float32 out); the smallest normal's at 0."""
    info = torch.finfo(dtype)
    mantissa_bits = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[dtype]
    _, exponent = torch.frexp(x.abs().float().clamp_min(info.tiny))  # |x| = m 2^e, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exponent - 1 - mantissa_bits)


def layer_stats(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, same: torch.Tensor | None = None,
                block: str = "") -> LayerStats:
    """Statistics of one committed update y (T, D) in `dtype` against its recompute r (T, D) in
    float32 and optionally s (T, D), the verifier's same-recipe recompute in `dtype`."""
    y64, r64 = y.double(), ref.double()
    scale = r64.norm(dim=-1).clamp_min(1e-30)  # an update of nothing: any error is infinite
    err = (y64 - r64).norm(dim=-1)  # (T,)
    e = err / scale
    drift_ratio = same_median = float("nan")
    rounded = ref.to(dtype).float()
    if same is not None:
        s64 = same.double()
        own = (s64 - r64).norm(dim=-1)
        if float(own.pow(2).sum()) > 0:
            drift_ratio = float((err.pow(2).sum() / own.pow(2).sum()).sqrt())
        same_median = float(((y64 - s64).norm(dim=-1) / scale).median())
        rounded = same.to(dtype).float()
    off = (y.float() - rounded).abs() > ulp(rounded, dtype) * 1.0001
    return LayerStats(
        positions=int(e.numel()), median=float(e.median()), quantile=float(e.quantile(QUANTILE)),
        max=float(e.max()), ulp_fraction=float(off.double().mean()),
        drift_ratio=drift_ratio, same_median=same_median, block=block,
    )


def _could_not(reason: str, layer: int) -> LayerVerdict:
    return LayerVerdict(COULD_NOT_CHECK, reason, layer)


def check_update(y: torch.Tensor, ref: torch.Tensor, layer: int = -1, same: torch.Tensor | None = None,
                 thresholds: dict[torch.dtype, LayerThresholds] | None = None, block: str = "") -> LayerVerdict:
    """Layer `layer`'s committed update y (T, D) (its attention's or its MLP's: `block`) against the
    float32 recompute r (T, D) and, for a low-precision stage, the same-recipe recompute s. The dtype
    of y is the serving dtype; `thresholds` defaults to REFERENCE_THRESHOLDS, or the CPU's
    SAME_RECIPE_THRESHOLDS with s."""
    where = f"layer {layer} {block}".rstrip()
    table = thresholds if thresholds is not None else SAME_RECIPE_THRESHOLDS["cpu"] if same is not None \
        else REFERENCE_THRESHOLDS
    for name, t in (("update", y), ("reference", ref)) + ((("same-recipe recompute", same),)
                                                         if same is not None else ()):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2 or t.shape[0] == 0:
            return _could_not(f"{where}: the {name} is not a non-empty (T, D) float tensor", layer)
    if tuple(y.shape) != tuple(ref.shape) or (same is not None and tuple(same.shape) != tuple(ref.shape)):
        return _could_not(f"{where}: shapes differ: update {tuple(y.shape)}, reference {tuple(ref.shape)}", layer)
    if y.dtype not in table:
        return _could_not(f"no thresholds for {y.dtype}", layer)
    if not torch.isfinite(ref).all() or (same is not None and not torch.isfinite(same).all()):
        return _could_not(f"{where}: the recomputation is not finite", layer)
    if not torch.isfinite(y).all():
        row = int((~torch.isfinite(y).all(-1)).nonzero()[0, 0])
        return LayerVerdict(FAIL, f"{where}: committed update not finite (first at row {row})", layer)
    limits = table[y.dtype]
    stats = layer_stats(y, ref.to(y.device), y.dtype, None if same is None else same.to(y.device), block)
    judged = same is not None and (not block or block in limits.same_blocks)  # else measured, not judged
    nan = float("nan")
    for value, limit, what in (
            (stats.median, limits.median_max, "median error relative to the update"),
            (stats.quantile if stats.positions >= QUANTILE_MIN_POSITIONS else float("nan"), limits.quantile_max,
             f"p{QUANTILE * 100:.0f} error relative to the update"),
            (stats.max, limits.max_max, "largest error relative to the update"),
            (stats.ulp_fraction if judged else nan, limits.ulp_fraction_max, "fraction of elements > 1 ulp off"),
            (stats.drift_ratio if judged else nan, limits.drift_ratio_max,
             "error over the verifier's own same-recipe error"),
            (stats.same_median if judged else nan, limits.same_median_max,
             "median error against the same-recipe recompute")):
        if value > limit:  # nan (not measured) compares False
            return LayerVerdict(FAIL, f"{where}: {what} {value:.3g} exceeds {limit:g}", layer, stats, limits)
    return LayerVerdict(PASS, f"{where} agrees", layer, stats)


def check_embedding(e: torch.Tensor, ref: torch.Tensor) -> LayerVerdict:
    """Stage 0's committed boundary 0 (T, D) against the rounded table's rows: bit for bit."""
    if not isinstance(ref, torch.Tensor) or ref.dim() != 2 or not torch.isfinite(ref).all():
        return _could_not("the reference embeddings are not a finite (T, D) tensor", -1)
    if not isinstance(e, torch.Tensor) or tuple(e.shape) != tuple(ref.shape):
        return LayerVerdict(FAIL, f"committed embeddings {tuple(getattr(e, 'shape', ()))} do not match "
                                  f"{tuple(ref.shape)}", -1)
    same = (e.float() == ref.to(e.device, e.dtype).float()).all(-1)  # the stage rounds the table as we do
    if not same.all():
        row = int((~same).nonzero()[0, 0])
        return LayerVerdict(FAIL, f"embeddings differ from the table at {int((~same).sum())} rows (first {row})", -1)
    return LayerVerdict(PASS, "embeddings match the table", -1)


def combine(verdicts: list[LayerVerdict]) -> LayerVerdict:
    """A stage's verdict from its layers': the first failure; else could-not-check if any layer
    could not be checked; else pass."""
    if not verdicts:
        return _could_not("no layer was checked", -1)
    for v in verdicts:
        if v.outcome == FAIL:
            return v
    for v in verdicts:
        if v.outcome == COULD_NOT_CHECK:
            return v
    return LayerVerdict(PASS, f"all {len(verdicts)} checks agree", verdicts[-1].layer)

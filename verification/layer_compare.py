"""Per-layer comparison of a stage's committed layer boundaries with a single-layer re-execution.

For layer i the stage committed its input x (T, D) and output y (T, D), in its serving dtype; the
verifier recomputed r = layer_i(x) (node/layer_reference.py). Per position t the statistic is the
error relative to the layer's own update, not to the residual stream,

    e_t = ||y_t - r_t|| / (||r_t - x_t|| + eps ||r_t||)        (eps: the dtype's machine epsilon)

so neither the width nor the depth of the model (the stream grows with depth, the update does not)
moves it; the eps term only matters on rows whose update is below the dtype's resolution of the
stream (an attention-sink row), where rounding the output alone is the honest error. Over the T
positions of a request: the median (a cheat on the weights moves every row), the 90th percentile
(a cheat on attention, e.g. a window, moves only the later rows) and the maximum (a cheat on a few
rows, e.g. only the decode steps). Besides,
the fraction of elements more than one ulp (of the serving dtype) away from round(r): against a
same-recipe recompute, honest hardware mostly lands within one rounding step.

Outcomes: pass, fail, could-not-check (the reference is not finite, shapes do not fit, ...); a
could-not-check is never a pass and never slashes. The embeddings (stage 0's boundary 0) are a
table lookup: they must match the rounded table bit for bit.

Every threshold below comes from bench/layer_audit.py (figures in bench/layer_audit.json).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

PASS, FAIL, COULD_NOT_CHECK = "pass", "fail", "could-not-check"
QUANTILE = 0.9  # the high quantile over positions
# Below this many positions the quantile is one of the few largest rows, which honestly include an
# attention-sink row whose update is tiny against the stream (e up to 0.24 in bf16): the quantile is
# judged only from here on (a window cheat shows past its 64 tokens anyway); median and max always.
QUANTILE_MIN_POSITIONS = 32


@dataclass(frozen=True)
class LayerStats:
    positions: int
    median: float  # of e_t over positions
    quantile: float  # QUANTILE of e_t over positions
    max: float
    ulp_fraction: float  # elements of y more than one ulp from round(s) (s: same-recipe recompute, else r)
    stream_ratio: float  # median ||x_t|| / ||r_t - x_t||: how large the stream is against the update
    # sqrt(sum_t ||y_t - r_t||^2 / sum_t ||s_t - r_t||^2): the claimed error against the verifier's own
    # same-recipe error, over all positions (nan without a same-recipe recompute, or when s == r)
    drift_ratio: float = float("nan")
    same_median: float = float("nan")  # median of ||y_t - s_t|| / ||r_t - x_t|| (error against s)

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


# Thresholds, from bench/layer_audit.json (this 2-core CPU, default model, one 30-layer stage,
# 24 requests of 32-160 tokens + 8 decoded, served as prefill + decode b1 and as a 3-chunk prefill
# + decode b8: 1440 honest layer audits per dtype, none failed; cheats on the 4 longest requests,
# every layer. Random-weight Llama-3.2-1B / 3-8B shapes (4 / 2 layers) land inside these bounds.)
#   float32 vs the float32 reference. Honest: median of e_t <= 5e-7, p90 <= 9e-7, max <= 2.6e-6
#            (decode and chunked rows: other kernels; one prefill is bit-identical on one CPU).
#            Weakest cheat, tamper (1e-3 relative weight noise): median >= 1.07e-3, p90 >= 1.33e-3,
#            max >= 1.73e-3; int8 median >= 8.0e-3; window p90 >= 1.9e-2; skip-layer 1.0.
#            Thresholds 1e-4 / 2e-4 / 5e-4: ~100-300x the honest figures (room for GPU kernels),
#            well under half-way to tamper. All 960 cheat layer audits fail.
#   bfloat16 vs the float32 reference. Honest: median <= 0.0139 (per layer 0.004-0.012, flat in
#            depth), p90 <= 0.030, max <= 0.243 (rows whose update is tiny against the stream).
#            Caught: int4 (median >= 0.090), skip-layer / other-model (~1), window (112 of 120 layers).
#            fp8 (median >= 0.020, 96 of 120 layers fail) sits just above the honest maximum, int8 (>= 0.0094) and tamper
#            (>= 0.0041) inside the honest spread: bf16 rounding inside the layer (2^-9 per op) hides
#            them from a float32 reference. Thresholds 0.04 / 0.06 / 0.5: 2-3x the honest maxima,
#            at most half-way to int4 (median, p90) and to skip-layer (max).
REFERENCE_THRESHOLDS: dict[torch.dtype, LayerThresholds] = {
    torch.float32: LayerThresholds(median_max=1e-4, quantile_max=2e-4, max_max=5e-4),
    torch.bfloat16: LayerThresholds(median_max=0.04, quantile_max=0.06, max_max=0.5),
}
# bfloat16 against a same-recipe recompute s: a verifier of the stage's own hardware class also runs
# the layer in the serving dtype (the serving op sequence), on top of the reference's thresholds.
# Keyed by the class's device type: the verifier's own kernels decide how close an honest stage lands.
#   cpu (this 2-core CPU, default model): honest rows whose kernels differ from the verifier's (masked
#       attention of chunked prefill, batched decode): median error against s <= 0.0033, elements > 1
#       ulp off <= 0.082, drift ratio 1.00-1.01. Cheats: int8 >= 0.0095 / >= 0.46 / >= 1.15; fp8 >= 0.021
#       / 0.73 / 1.62; int4 0.090 / 0.92 / 5.7; tamper >= 0.0028 / >= 0.13 / 0.91-1.00: partly inside
#       the honest spread, caught on 100 of 120 layers only. Thresholds 0.006 and 0.25: at most
#       half-way from the honest maxima to int8; drift ratio 2.5.
#   cuda (H200 serving through its CUDA graphs, H200 verifier; bench/layer_audit_cuda_same.json, 1,536
#       honest layer audits of random 1B / 8B shapes): drift ratio 0.999-1.002, median error against s
#       <= 0.0011, > 1 ulp <= 0.027; int8 drift ratio >= 1.42, tamper 1.00-1.01. But in the real 8B-shaped
#       pool (bench/gpu_pool.py, embeddings ~100x a layer's update), 15-17 % of an honest layer's
#       elements land > 1 ulp from s and its error against s is rounding of the stream: where the
#       update is below the stream's bf16 resolution, the fused decode kernels' rounding order (one
#       rounding of the residual sum) and the verifier's (one per add) part by ulps of the stream. The
#       drift ratio compares like with like (each recompute's error against the float32 r), so it is
#       the one statistic used: 1.3, honest +0.002, int8 +0.42. A 1e-3 tamper stays inside bf16's
#       rounding of the committed boundaries (ratio 1.01): only float32 serving shows it.
# Across classes (GPU serving, CPU verifier) honest same-recipe drift reaches 0.006 and hides tamper:
# a verifier of another class runs the float32 reference alone.
SAME_RECIPE_THRESHOLDS: dict[str, dict[torch.dtype, LayerThresholds]] = {
    "cpu": {torch.bfloat16: LayerThresholds(median_max=0.04, quantile_max=0.06, max_max=0.5, ulp_fraction_max=0.25,
                                            drift_ratio_max=2.5, same_median_max=0.006)},
    "cuda": {torch.bfloat16: LayerThresholds(median_max=0.04, quantile_max=0.06, max_max=0.5, drift_ratio_max=1.3)},
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


def layer_stats(x: torch.Tensor, y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
                same: torch.Tensor | None = None) -> LayerStats:
    """Statistics of one layer: committed input x and output y (T, D) in `dtype`, recomputed r (T, D)
    in float32, and optionally s (T, D), the verifier's same-recipe recompute in `dtype`."""
    x64, y64, r64 = x.double(), y.double(), ref.double()
    update = (r64 - x64).norm(dim=-1)  # (T,)
    stream = x64.norm(dim=-1)
    floor = 1e-30 + 1e-12 * stream  # an update of nothing: any error is infinite
    scale = update + torch.finfo(dtype).eps * r64.norm(dim=-1)  # (T,) the update, or the output's rounding
    err = (y64 - r64).norm(dim=-1)  # (T,)
    e = err / scale.maximum(floor)
    drift_ratio = same_median = float("nan")
    rounded = ref.to(dtype).float()
    if same is not None:
        s64 = same.double()
        own = (s64 - r64).norm(dim=-1)
        if float(own.pow(2).sum()) > 0:
            drift_ratio = float((err.pow(2).sum() / own.pow(2).sum()).sqrt())
        same_median = float(((y64 - s64).norm(dim=-1) / scale.maximum(floor)).median())
        rounded = same.to(dtype).float()
    off = (y.float() - rounded).abs() > ulp(rounded, dtype) * 1.0001
    return LayerStats(
        positions=int(e.numel()), median=float(e.median()), quantile=float(e.quantile(QUANTILE)),
        max=float(e.max()), ulp_fraction=float(off.double().mean()),
        stream_ratio=float((stream / update.maximum(floor)).median()),
        drift_ratio=drift_ratio, same_median=same_median,
    )


def _could_not(reason: str, layer: int) -> LayerVerdict:
    return LayerVerdict(COULD_NOT_CHECK, reason, layer)


def check_layer(x: torch.Tensor, y: torch.Tensor, ref: torch.Tensor, layer: int = -1,
                same: torch.Tensor | None = None,
                thresholds: dict[torch.dtype, LayerThresholds] | None = None) -> LayerVerdict:
    """Layer `layer`'s committed input x and output y (T, D) against the float32 recomputed output
    r (T, D) and, for a low-precision stage, the same-recipe recompute s. The dtype of y is the
    serving dtype; `thresholds` defaults to REFERENCE_THRESHOLDS, or the CPU's SAME_RECIPE_THRESHOLDS with s."""
    table = thresholds if thresholds is not None else SAME_RECIPE_THRESHOLDS["cpu"] if same is not None \
        else REFERENCE_THRESHOLDS
    for name, t in (("input", x), ("output", y), ("reference", ref)) + ((("same-recipe recompute", same),)
                                                                          if same is not None else ()):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2 or t.shape[0] == 0:
            return _could_not(f"the {name} is not a non-empty (T, D) float tensor", layer)
    if tuple(x.shape) != tuple(y.shape) or tuple(y.shape) != tuple(ref.shape):
        return _could_not(f"shapes differ: input {tuple(x.shape)}, output {tuple(y.shape)}, "
                          f"reference {tuple(ref.shape)}", layer)
    if y.dtype not in table:
        return _could_not(f"no thresholds for {y.dtype}", layer)
    if same is not None and tuple(same.shape) != tuple(ref.shape):
        return _could_not(f"same-recipe recompute {tuple(same.shape)} differs from {tuple(ref.shape)}", layer)
    if not torch.isfinite(ref).all() or not torch.isfinite(x).all() or (same is not None
                                                                        and not torch.isfinite(same).all()):
        return _could_not("the recomputation (or its committed input) is not finite", layer)
    if not torch.isfinite(y).all():
        row = int((~torch.isfinite(y).all(-1)).nonzero()[0, 0])
        return LayerVerdict(FAIL, f"layer {layer}: committed output not finite (first at row {row})", layer)
    limits = table[y.dtype]
    stats = layer_stats(x, y, ref.to(x.device), y.dtype, None if same is None else same.to(x.device))
    for value, limit, what in (
            (stats.median, limits.median_max, "median error relative to the update"),
            (stats.quantile if stats.positions >= QUANTILE_MIN_POSITIONS else float("nan"), limits.quantile_max,
             f"p{QUANTILE * 100:.0f} error relative to the update"),
            (stats.max, limits.max_max, "largest error relative to the update"),
            (stats.ulp_fraction, limits.ulp_fraction_max, "fraction of elements > 1 ulp off"),
            (stats.drift_ratio, limits.drift_ratio_max, "error over the verifier's own same-recipe error"),
            (stats.same_median, limits.same_median_max, "median error against the same-recipe recompute")):
        if value > limit:  # nan (not measured) compares False
            return LayerVerdict(FAIL, f"layer {layer}: {what} {value:.3g} exceeds {limit:g}", layer, stats, limits)
    return LayerVerdict(PASS, f"layer {layer} agrees", layer, stats)


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
    return LayerVerdict(PASS, f"all {len(verdicts)} boundaries agree", verdicts[-1].layer)

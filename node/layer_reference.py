"""Re-execution of ONE layer at a time, for a per-layer audit (DESIGN 5).

A stage commits to its layer trace, in the dtype it serves in (node/runtime.py `capture_trace`,
verification/trace.py): its input and every layer's attention and MLP updates. The verifier
re-runs each layer i alone, over all the request's positions in one causal prefill: the attention
from the committed input x_i of layer i, the MLP from the committed x_i + a_i, and compares each
with the committed update (verification/layer_compare.py). Honest drift is then one block's drift
whatever the stage's depth; a cheat shows at every layer it touches. The attention is re-run at every
position, the MLP (most of a layer's weights) at MLP_ROWS of them (`mlp_rows`): an audit costs a
fraction of what serving the request did.

The reference holds the weights exactly as the stage should: the checkpoint's tensors rounded to
the serving dtype, then held in the compute dtype (float32 for the reference; the serving dtype
itself for a same-recipe recompute, which runs the serving path's op sequence).

    ref = LayerReference.from_checkpoint(model_dir, shard, serving_dtype=torch.bfloat16)
    a, m = ref.updates(shard.start + i, x, h)             # (T, D) each, in float32
    e = ref.embed(ids)                                    # stage 0: trace row 0
    logits = ref.head(boundaries[-1])                     # last stage: final norm + head
    verdict = audit_trace(ref, same, stage_input, trace)  # all of it, one verdict

The last stage's tokens are checked as before (verification/compare.py `compare_tokens`) on
`ref.head` of its last boundary's sampled rows.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F

from node.config import ModelConfig
from node.layers import DecoderLayer, rope_tables
from node.models import model_id_of
from node.runtime import ShardModel
from node.shard import Checkpoint, Shard, tensor_names
from verification.layer_compare import (COULD_NOT_CHECK, LayerVerdict, check_embedding, check_update, combine,
                                        same_recipe_thresholds)
from verification.trace import n_trace_rows, residuals
from wire.messages import AuditTask

MAX_TOKENS = 1 << 15  # positions one re-execution may cover
BLOCKS = ("attention", "mlp")
MLP_ROWS = 32  # positions whose MLP an audit re-executes per layer (verification/layer_compare.py
#                judges the 90th percentile from 32 positions on)
LAST_MLP_ROWS = 8  # of which the latest


def run_attention(layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """One layer's attention update over T positions (a fresh causal prefill, no cache): x (T, D) -> (T, D)."""
    kv: dict[str, torch.Tensor] = {}

    def write(name, new):  # new: (1, Hkv, T, Dh); the "cache" is just this step's keys/values
        kv[name] = new

    def read(name):
        return kv[name]

    return layer.attn(layer.input_norm(x)[None], cos[None, None], sin[None, None], "k", "v", write, read, None)[0]


def run_mlp(layer: DecoderLayer, h: torch.Tensor) -> torch.Tensor:
    """One layer's MLP update from the stream after its attention: h (T, D) -> (T, D)."""
    return layer.mlp(layer.post_attn_norm(h))


def shard_tensors(model_dir: str | Path, shard: Shard) -> tuple[ModelConfig, Shard, dict[str, torch.Tensor]]:
    """(config, shard, the shard's checkpoint tensors): LayerReference's first arguments. Loaded in
    float32: rounding to the serving dtype happens once, in LayerReference.__init__."""
    config = ModelConfig.load(model_dir)
    return config, shard, Checkpoint(model_dir).load(tensor_names(config, shard), dtype=torch.float32, device="cpu")


class LayerReference:
    """The layers of one shard with the serving dtype's weights, run one at a time in `compute_dtype`."""

    def __init__(self, config: ModelConfig, shard: Shard, tensors: dict[str, torch.Tensor],
                 serving_dtype: torch.dtype, compute_dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        if shard.n_layers != config.n_layers:
            raise ValueError(f"shard {shard} does not fit a model of {config.n_layers} layers")
        self.config, self.shard = config, shard
        self.serving_dtype, self.compute_dtype, self.device = serving_dtype, compute_dtype, torch.device(device)
        names = tensor_names(config, shard)
        rounded = {n: tensors[n].to(serving_dtype).to(compute_dtype) for n in names}  # as the stage holds them
        self.model = ShardModel(config, shard, compute_dtype, self.device).eval()
        self.model.load_tensors(rounded)
        self._rope_tokens = 0
        self.cos = self.sin = None

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path, shard: Shard, serving_dtype: torch.dtype,
                        compute_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        return cls(*shard_tensors(model_dir, shard), serving_dtype, compute_dtype, device)

    def _rope(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        if T > self._rope_tokens:
            cos, sin = rope_tables(self.config, max(T, 256))
            # the serving runtime casts the tables to its dtype: so does a same-recipe recompute
            self.cos, self.sin = cos.to(self.device, self.compute_dtype), sin.to(self.device, self.compute_dtype)
            self._rope_tokens = max(T, 256)
        return self.cos[:T], self.sin[:T]

    def _check_hidden(self, x: torch.Tensor) -> None:
        D = self.config.hidden_size
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != D or not 0 < x.shape[0] <= MAX_TOKENS \
                or not x.is_floating_point():
            raise ValueError(f"expected hidden states (T <= {MAX_TOKENS}, {D}), got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")

    @torch.inference_mode()
    def updates(self, index: int, x: torch.Tensor, h: torch.Tensor, blocks: tuple[str, ...] = BLOCKS,
                mlp_rows: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Layer `index`'s (absolute, within the shard) attention update from its committed input x
        and its MLP update from the committed stream after the attention h, both (T, D) and upcast
        as they are: (a, m), each (T, D) in the compute dtype, m only at `mlp_rows` when given;
        None for a block not in `blocks`."""
        if not self.shard.start <= index < self.shard.end:
            raise ValueError(f"layer {index} is outside {self.shard}")
        self._check_hidden(x)
        self._check_hidden(h)
        layer = self.model.layers[index - self.shard.start]
        a = m = None
        if "attention" in blocks:
            cos, sin = self._rope(x.shape[0])
            a = run_attention(layer, x.to(self.device, self.compute_dtype), cos, sin)
        if "mlp" in blocks:
            m = run_mlp(layer, (h if mlp_rows is None else h[mlp_rows]).to(self.device, self.compute_dtype))
        return a, m

    @torch.inference_mode()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Stage 0's boundary 0: the embeddings (T, D) of token ids (T,)."""
        if self.model.embed is None:
            raise ValueError(f"{self.shard} does not embed tokens")
        if ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32) or not 0 < ids.numel() <= MAX_TOKENS:
            raise ValueError(f"expected token ids (T,), got {ids.dtype} {tuple(ids.shape)}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise ValueError(f"token id out of range [0, {self.config.vocab_size})")
        return self.model.embed(ids.to(self.device, torch.int64))

    @torch.inference_mode()
    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The last stage: final norm and LM head over its last boundary h (T, D): logits (T, V)."""
        if self.model.norm is None:
            raise ValueError(f"{self.shard} is not the last stage")
        self._check_hidden(h)
        return F.linear(self.model.norm(h.to(self.device, self.compute_dtype)), self.model.head_weight())


def mlp_rows(n_positions: int, generator: torch.Generator) -> torch.Tensor | None:
    """The positions whose MLP update an audit re-executes in one layer: every one of a short
    request; else the last LAST_MLP_ROWS (the latest decode steps) and the rest of MLP_ROWS drawn
    among the others. An MLP works on each position alone, so a sample costs only its share of the
    recompute (the MLP is most of a layer's weights), and every copy of the weights moves every
    position; a fresh draw per layer leaves a cheat on a few positions nowhere to hide."""
    if n_positions <= MLP_ROWS:
        return None
    earlier = n_positions - LAST_MLP_ROWS
    drawn = torch.randperm(earlier, generator=generator)[:MLP_ROWS - LAST_MLP_ROWS].sort().values
    return torch.cat((drawn, torch.arange(earlier, n_positions)))


def audit_trace(ref: LayerReference, same: LayerReference | None, stage_input: torch.Tensor,
                trace: torch.Tensor, same_thresholds=None,
                generator: torch.Generator | None = None) -> tuple[LayerVerdict, list[LayerVerdict]]:
    """A stage audit from its committed layer trace (2L + 1, T, D): the embeddings of stage 0's token
    ids bit for bit, then every layer's attention and MLP updates alone against `ref` (float32) and,
    for a low-precision stage of the verifier's own hardware class, `same` (its serving dtype),
    judged by `same_thresholds` (verification/layer_compare.py SAME_RECIPE_THRESHOLDS of the
    verifier's device type). Every position's attention, MLP_ROWS positions' MLP (`mlp_rows`, drawn
    from `generator`: by default seeded unpredictably, after the stage committed). Returns (the
    stage's verdict, each check's verdict)."""
    shard, L = ref.shard, ref.shard.n_shard_layers
    generator = generator or torch.Generator().manual_seed(secrets.randbits(63))
    if not isinstance(trace, torch.Tensor) or trace.dim() != 3 or trace.shape[0] != n_trace_rows(L) \
            or trace.shape[2] != ref.config.hidden_size:
        v = LayerVerdict(COULD_NOT_CHECK, f"trace {tuple(getattr(trace, 'shape', ()))} is not "
                                          f"({n_trace_rows(L)}, T, {ref.config.hidden_size})")
        return v, [v]
    boundaries, mids = residuals(trace)
    # A block the same-recipe count judges needs no float32 recompute: the count catches every copy
    # the reference does and those it cannot (bench/layer_audit.py), so the serving-dtype recompute
    # stands in as the reference there, and an audit costs one recompute of the stage, not two.
    limits = (same_thresholds or {}).get(trace.dtype) if same is not None else None
    by_same = limits.same_blocks if limits is not None else ()
    verdicts = []
    try:
        if shard.is_first:
            verdicts.append(check_embedding(trace[0], ref.embed(stage_input).to(trace.dtype)))
        elif stage_input.shape != trace[0].shape or not torch.equal(stage_input.to(trace.dtype), trace[0]):
            # the receipt's input hash binds trace row 0 to what upstream sent
            verdicts.append(LayerVerdict("fail", "trace row 0 is not the stage's input", shard.start))
        for i in range(L):
            index, x, h = shard.start + i, boundaries[i], mids[i]
            rows = mlp_rows(x.shape[0], generator)
            r = ref.updates(index, x, h, tuple(b for b in BLOCKS if b not in by_same), rows)
            # the same recipe only where its count judges: elsewhere it would be measured, not used
            s = (None, None) if same is None else same.updates(index, x, h, by_same, rows)
            mlp = trace[2 + 2 * i] if rows is None else trace[2 + 2 * i][rows]
            for block, claimed, r_b, s_b in zip(BLOCKS, (trace[1 + 2 * i], mlp), r, s):
                if r_b is None:
                    r_b = s_b.float()
                # compared where the recompute lies: on a GPU the statistics cost less than the recompute
                verdicts.append(check_update(claimed.to(r_b.device), r_b, index, s_b,
                                             same_thresholds if s_b is not None else None, block))
    except ValueError as exc:  # e.g. token ids outside the vocabulary: nothing to re-execute
        verdicts.append(LayerVerdict(COULD_NOT_CHECK, f"cannot re-execute: {exc}", shard.start))
    return combine(verdicts), verdicts


class LayerAuditor:
    """verification.check's ReExecute for one model directory: re-executes every layer of an audited
    stage against a float32 reference of the weights the stage was assigned (its dtype), on `device`;
    and, when the stage served in low precision on hardware of this verifier's class
    (`hardware_class`, node/profile.py), in that precision too: the same recipe, judged by the
    tighter same-recipe thresholds. References are kept for `max_cached` (shard, dtype) pairs, each
    pair's float32 reference with its same-recipe twin: counted one by one, a same-recipe audit took
    both places and a verifier auditing two stages in turn rebuilt every reference at every audit
    (a CPU newcomer in tests/verification/test_audits_e2e.py: 130 builds in 164 audits, ~99 s)."""

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu", max_cached: int = 2,
                 hardware_class: str = ""):
        if max_cached < 1:
            raise ValueError("max_cached must be >= 1")
        self.model_dir, self.device, self.max_cached = Path(model_dir), torch.device(device), max_cached
        self.hardware_class = hardware_class
        self.model_id = model_id_of(self.model_dir)
        # (shard, dtype) -> compute dtype -> reference; least recently used first
        self._references: OrderedDict[tuple[Shard, torch.dtype], dict[torch.dtype, LayerReference]] = OrderedDict()
        self._lock = threading.Lock()  # one re-execution at a time: references are large
        self.recompute_s = 0.0  # the latest audit's
        self.references_built = 0

    def __call__(self, task: AuditTask, stage_input: torch.Tensor, trace: torch.Tensor,
                 rows: list[int]) -> tuple[LayerVerdict, list[LayerVerdict], torch.Tensor | None]:
        if task.model != self.model_id:
            raise ValueError(f"this verifier holds {self.model_id}, not {task.model}")
        shard = Shard(task.model, task.start, task.end, task.n_layers)
        dtype = getattr(torch, task.dtype)
        same_thresholds = None
        if self.hardware_class and task.hardware_class == self.hardware_class:
            same_thresholds = same_recipe_thresholds(self.device.type, dtype)
        with self._lock:
            ref, same = self._references_of(shard, dtype, same_recipe=same_thresholds is not None)
            started_s = time.perf_counter()
            verdict, verdicts = audit_trace(ref, same, stage_input, trace, same_thresholds)
            last = residuals(trace)[0][-1] if shard.is_last and rows else None
            logits = ref.head(last[rows]).cpu() if last is not None else None
            self.recompute_s = time.perf_counter() - started_s  # the audit's compute, not loading references
        return verdict, verdicts, logits

    def _references_of(self, shard: Shard, dtype: torch.dtype,
                       same_recipe: bool) -> tuple[LayerReference, LayerReference | None]:
        """The float32 reference of `shard` served in `dtype` and, if asked, its same-recipe twin."""
        held = self._references.pop((shard, dtype), {})
        wanted = {torch.float32, dtype} if same_recipe else {torch.float32}  # one, for a float32 stage
        missing = [c for c in wanted if c not in held]
        if missing:  # the checkpoint read once for both
            loaded = shard_tensors(self.model_dir, shard)
            for compute_dtype in missing:
                held[compute_dtype] = LayerReference(*loaded, dtype, compute_dtype, self.device)
                self.references_built += 1
        self._references[(shard, dtype)] = held
        while len(self._references) > self.max_cached:
            self._references.popitem(last=False)
        return held[torch.float32], held[dtype] if same_recipe else None

"""Llama-family decoder layers over a slot-indexed KV cache.

Shapes: B sessions in a batch, T new tokens per session, D hidden size, H query heads,
Hkv key/value heads, Dh head size, S cache slots, L cached tokens visible to a step.
q/k/v and gate/up projections are fused into one matmul each (fewer, larger kernels).
"""

from __future__ import annotations

import ctypes
import math
import mmap
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from node.config import ModelConfig, RopeScaling

# cuDNN's attention builds an execution plan for each new shape, ~57 ms a call on an H200 (torch 2.11),
# and prompts, growing contexts and audits bring new shapes all the time: prefill steps spent 45 % of a
# serving GPU stage's time there. Flash and memory-efficient attention need no plan (0.05-1 ms a call).
torch.backends.cuda.enable_cudnn_sdp(False)


def rope_tables(config: ModelConfig, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_tokens, Dh) in float32, computed the way transformers does."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    inv_freq = _scale_inv_freq(inv_freq, config.rope_scaling)
    positions = torch.arange(max_tokens, dtype=torch.int64).float()
    freqs = torch.outer(positions, inv_freq)  # (max_tokens, Dh/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _scale_inv_freq(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth blend between.
        low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, blended, scaled)
    return inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, heads, T, Dh); cos/sin: (B, 1, T, Dh)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def input_major_(weights: list[nn.Parameter]) -> None:
    """Re-lay (out, in) matrices in place, each as the transpose of a contiguous (in, out) one,
    all in one buffer the OS is asked to back with huge pages. Same shapes and values; strides
    (1, out). Decode at batch 1 on the CPU is these weights streamed once a token, and on this
    project's AMD EPYC both changes roughly double that stream (bench/cpu_decode.py):
    - MKL's one-row product x @ W.t() over the (out, in) layout of nn.Linear takes a
      row-dot-product path (~7 GB/s); over contiguous (in, out) it streams (~11-15 GB/s);
    - with 4 KiB pages the hardware prefetchers stop at every page and each page costs a TLB
      miss; 2 MiB pages (transparent huge pages, which this kernel gives only on madvise) lift
      a one-core stream by ~1.6x.
    Copies into the parameters (loading) keep the layout."""
    weights = list({id(w): w for w in weights}.values())  # a tied head may be listed twice
    if not weights:
        return
    dtype, device = weights[0].dtype, weights[0].device
    if any(w.dtype != dtype or w.device != device for w in weights):
        raise ValueError("input_major_ takes weights of one dtype on one device")
    item = weights[0].element_size()
    align = max(1, 64 // item)  # each matrix starts on a cache line
    offsets, total = [], 0
    for w in weights:
        offsets.append(total)
        total += -(-w.numel() // align) * align
    huge = HUGE_PAGE_BYTES // item
    arena = torch.empty(total + huge, dtype=dtype, device=device)
    skip = (-arena.data_ptr() % HUGE_PAGE_BYTES) // item  # start on a huge-page boundary
    arena = arena[skip:skip + total]
    _advise_huge_pages(arena)  # before the first write: pages are committed on first touch
    for w, offset in zip(weights, offsets):
        out_features, in_features = w.shape
        data = arena[offset:offset + w.numel()].view(in_features, out_features)
        data.copy_(w.data.t())
        w.data = data.t()


HUGE_PAGE_BYTES = 2 << 20
_MADV_HUGEPAGE = 14


def _advise_huge_pages(t: torch.Tensor) -> None:
    """Ask Linux for transparent huge pages under `t` (a no-op elsewhere or where they are off)."""
    if t.device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    page = mmap.PAGESIZE
    start = -(-t.data_ptr() // page) * page
    end = t.data_ptr() + t.numel() * t.element_size()
    if end > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)  # -1 if refused: fine


class KVCache(nn.Module):
    """Preallocated keys and values for `n_slots` sessions of up to `max_tokens` each, per layer.

    On the CPU torch.empty only reserves address space: pages are committed as sessions fill them.
    On a GPU the cache starts zeroed: its allocator hands back old memory, and a masked-out NaN
    there would still poison attention (a zero weight times NaN is NaN).
    """

    def __init__(self, n_layers: int, n_slots: int, n_kv_heads: int, max_tokens: int, head_dim: int,
                 dtype: torch.dtype, device):
        super().__init__()
        shape = (n_layers, n_slots, n_kv_heads, max_tokens, head_dim)
        alloc = torch.zeros if torch.device(device).type == "cuda" else torch.empty
        self.register_buffer("k", alloc(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", alloc(shape, dtype=dtype, device=device), persistent=False)

    @property
    def bytes_per_token(self) -> int:
        n_layers, _, n_kv_heads, _, head_dim = self.k.shape
        return 2 * n_layers * n_kv_heads * head_dim * self.k.element_size()


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.qkv = nn.Linear(config.hidden_size, q_dim + 2 * kv_dim, bias=config.qkv_bias)
        self.o = nn.Linear(q_dim, config.hidden_size, bias=config.o_bias)

    def forward(self, x, cos, sin, k_cache, v_cache, write, read, mask, groups=None):
        """x: (B, T, D). `write(cache, new)` stores this step's keys/values, `read(cache)` returns
        the (B, Hkv, L, Dh) keys/values the step attends to, `mask` is (B, 1, T, L) bool or None
        for a plain causal prefill of T == L tokens. With `groups` (ragged steps, `Group`) x is
        (1, N, D), the rows of several sessions, and write/read/mask are each group's."""
        B, T, _ = x.shape
        H, Hkv, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv(x)
        # q and k rotate as one tensor: half the small ops of a decode step's RoPE, same values
        qk = apply_rope(qkv[..., :(H + Hkv) * Dh].view(B, T, H + Hkv, Dh).transpose(1, 2), cos, sin)
        q, k = qk.split((H, Hkv), dim=1)  # (B, H, T, Dh), (B, Hkv, T, Dh)
        v = qkv[..., (H + Hkv) * Dh:].view(B, T, Hkv, Dh).transpose(1, 2)
        if groups is None:
            out = _attend(q, k, v, k_cache, v_cache, write, read, mask)  # (B, H, T, Dh)
        else:  # each group attends over its own sessions' keys; the projections above and below are shared
            out = torch.cat([g.attend(q, k, v, k_cache, v_cache) for g in groups], dim=2)  # (1, H, N, Dh)
        return self.o(out.transpose(1, 2).reshape(B, T, -1))


def _attend(q, k, v, k_cache, v_cache, write, read, mask):
    write(k_cache, k)
    write(v_cache, v)
    keys, values = read(k_cache), read(v_cache)
    return F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1, enable_gqa=True
    )  # (B, H, T, Dh)


@dataclass(frozen=True)
class Group:
    """Rows [lo, hi) of a ragged step's (1, heads, N, Dh) queries/keys/values that attend together:
    one session's T new rows (`batch` 1), or `batch` sessions' one new row each (a decode). Its
    `write`, `read` and `mask` are as for a step of just these sessions (B = batch)."""

    lo: int
    hi: int
    batch: int
    write: Callable
    read: Callable
    mask: torch.Tensor | None

    def attend(self, q, k, v, k_cache, v_cache) -> torch.Tensor:
        def own(t):  # (1, h, rows, Dh) -> (B, h, T, Dh): a decode group's rows are its sessions
            t = t[:, :, self.lo:self.hi]
            return t.transpose(0, 2) if self.batch > 1 else t
        out = _attend(own(q), own(k), own(v), k_cache, v_cache, self.write, self.read, self.mask)
        return out.transpose(0, 2) if self.batch > 1 else out  # (1, H, rows, Dh)


@dataclass(frozen=True)
class Packed:
    """Rows [lo, hi) of a ragged step that are several new sessions' whole prompts, back to back:
    each row attends causally within its own prompt only (`mask`, (1, 1, n, n) block-diagonal), so
    all of them take one attention call and need no cache read. `write(cache, new)` stores the
    rows' keys/values in their sessions' slots."""

    lo: int
    hi: int
    write: Callable
    mask: torch.Tensor

    def attend(self, q, k, v, k_cache, v_cache) -> torch.Tensor:
        q, k, v = (t[:, :, self.lo:self.hi] for t in (q, k, v))
        self.write(k_cache, k)
        self.write(v_cache, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=True)  # (1, H, n, Dh)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in float32 whatever the serving dtype, as the reference implementation does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, k_cache, v_cache, write, read, mask, trace: list | None = None, groups=None):
        """`trace`: if given, the attention's and then the MLP's update (what each adds to the
        residual stream) are appended to it, for the stage's commitment (node/runtime.py).
        `groups`: a ragged step's attention groups (`Attention.forward`)."""
        a = self.attn(self.input_norm(x), cos, sin, k_cache, v_cache, write, read, mask, groups)
        x = x + a
        m = self.mlp(self.post_attn_norm(x))
        if trace is not None:
            trace += (a, m)
        return x + m


def load_layer(layer: DecoderLayer, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Fill `layer` from checkpoint tensors named like transformers' Llama/Qwen2/Mistral."""
    def take(name):
        return tensors.pop(prefix + name)

    def cat(*names):
        return torch.cat([take(n) for n in names], dim=0)

    with torch.no_grad():
        layer.input_norm.weight.copy_(take("input_layernorm.weight"))
        layer.post_attn_norm.weight.copy_(take("post_attention_layernorm.weight"))
        attn, mlp = layer.attn, layer.mlp
        attn.qkv.weight.copy_(cat("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"))
        if attn.qkv.bias is not None:
            attn.qkv.bias.copy_(cat("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"))
        attn.o.weight.copy_(take("self_attn.o_proj.weight"))
        if attn.o.bias is not None:
            attn.o.bias.copy_(take("self_attn.o_proj.bias"))
        mlp.gate_up.weight.copy_(cat("mlp.gate_proj.weight", "mlp.up_proj.weight"))
        mlp.down.weight.copy_(take("mlp.down_proj.weight"))
        if mlp.down.bias is not None:
            mlp.gate_up.bias.copy_(cat("mlp.gate_proj.bias", "mlp.up_proj.bias"))
            mlp.down.bias.copy_(take("mlp.down_proj.bias"))

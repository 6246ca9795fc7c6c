"""Fused decode kernels (Triton) and their plain-PyTorch twins.

A decode step reads every weight once and does little else, so what it costs beyond the weight
reads is the number of kernels: each of these replaces the 3-10 small kernels the eager layer
runs. Each op has a PyTorch twin with the same signature and the same bfloat16 rounding steps;
the twins run where Triton does not (the CPU) and are the reference the kernels are tested against.

Shapes: B rows (sessions, padded to a bucket), D hidden, H query heads, Hkv key/value heads,
G = H / Hkv, Dh head size, S cache slots, T cache length, I intermediate size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from verification.triton_probe import INTERPRET, tl, triton

ATTENTION_CHUNK = 256  # keys per attention program; longer contexts split over programs


# -- PyTorch twins ---------------------------------------------------------------------------

def rms_norm_ref(x, weight, eps, delta=None):
    """(x + delta) and its RMS norm, both (B, D). Rounds as transformers does: the sum to the
    serving dtype, the normalised value to the serving dtype, then times the weight."""
    res = x if delta is None else x + delta
    x32 = res.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(res.dtype)
    return res, weight * normed


def rope_write_ref(qkv, cos, sin, positions, slots, k_cache, v_cache, n_heads, n_kv_heads):
    """Rotate q and k of qkv (B, (H + 2 Hkv) Dh) at `positions` (B,), store k and v in the
    (S, Hkv, T, Dh) caches at (slots, :, positions), return rotated q (B, H, Dh)."""
    B = qkv.shape[0]
    dh = k_cache.shape[-1]
    q, k, v = qkv.view(B, n_heads + 2 * n_kv_heads, dh).split((n_heads, n_kv_heads, n_kv_heads), dim=1)
    c, s = cos[positions][:, None], sin[positions][:, None]  # (B, 1, Dh)

    def rotate(x):
        half = dh // 2
        return x * c + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * s

    k_cache[slots, :, positions] = rotate(k)
    v_cache[slots, :, positions] = v
    return rotate(q)


def decode_attention_ref(q, k_cache, v_cache, slots, lengths, plan=(1, 0)):
    """Attention of one query per row, q (B, H, Dh), over the first `lengths` (B,) cached keys
    of its slot. Returns (B, H * Dh). `plan` (attention_plan) only matters to the kernel."""
    B, H, dh = q.shape
    T = k_cache.shape[2]  # the whole cache, masked: no host sync, so a graph can capture it
    valid = (torch.arange(T, device=q.device)[None, :] < lengths[:, None])[:, None, :, None]  # (B, 1, T, 1)
    # keys past a row's length may be anything, NaN too: a zero attention weight times NaN is NaN
    keys, values = (torch.where(valid, c[slots], 0) for c in (k_cache, v_cache))  # (B, Hkv, T, Dh)
    mask = valid.transpose(-1, -2)  # (B, 1, 1, T)
    out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask, enable_gqa=True)
    return out.reshape(B, H * dh)


def rope_attention_ref(qkv, cos, sin, positions, slots, k_cache, v_cache, n_heads, n_kv_heads, plan=(1, 0)):
    """rope_write_ref then decode_attention_ref, for a decode step (lengths = positions + 1)."""
    q = rope_write_ref(qkv, cos, sin, positions, slots, k_cache, v_cache, n_heads, n_kv_heads)
    return decode_attention_ref(q, k_cache, v_cache, slots, positions + 1, plan)


def silu_mul_ref(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# -- Triton kernels --------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(X, DELTA, W, RES, OUT, D, eps, HAS_DELTA: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        x = tl.load(X + row * D + cols, mask=mask, other=0.0)
        if HAS_DELTA:
            x = (x.to(tl.float32) + tl.load(DELTA + row * D + cols, mask=mask, other=0.0).to(tl.float32)).to(
                RES.dtype.element_ty)
            tl.store(RES + row * D + cols, x, mask=mask)
        x32 = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / D + eps)
        normed = (x32 * rstd).to(OUT.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + row * D + cols, (w * normed).to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_write_kernel(QKV, COS, SIN, POS, SLOTS, K_CACHE, V_CACHE, Q_OUT,
                           stride_s, stride_h, stride_t,
                           H: tl.constexpr, HKV: tl.constexpr, DH: tl.constexpr):
        # one program per (row, head) over H query heads then Hkv key heads (each with its value head)
        row, head = tl.program_id(0), tl.program_id(1)
        half = tl.arange(0, DH // 2)
        pos = tl.load(POS + row)
        c1 = tl.load(COS + pos * DH + half).to(tl.float32)
        c2 = tl.load(COS + pos * DH + DH // 2 + half).to(tl.float32)
        s1 = tl.load(SIN + pos * DH + half).to(tl.float32)
        s2 = tl.load(SIN + pos * DH + DH // 2 + half).to(tl.float32)
        base = QKV + row * (H + 2 * HKV) * DH + head * DH
        x1 = tl.load(base + half).to(tl.float32)
        x2 = tl.load(base + DH // 2 + half).to(tl.float32)
        ty = Q_OUT.dtype.element_ty
        # x * cos + rotate_half(x) * sin, each product and the sum rounded as eager bfloat16 does
        o1 = ((x1 * c1).to(ty).to(tl.float32) + (-x2 * s1).to(ty).to(tl.float32)).to(ty)
        o2 = ((x2 * c2).to(ty).to(tl.float32) + (x1 * s2).to(ty).to(tl.float32)).to(ty)
        if head < H:
            out = Q_OUT + (row * H + head) * DH
            tl.store(out + half, o1)
            tl.store(out + DH // 2 + half, o2)
        else:
            kv = head - H
            slot = tl.load(SLOTS + row)
            dst = slot * stride_s + kv * stride_h + pos * stride_t
            tl.store(K_CACHE + dst + half, o1)
            tl.store(K_CACHE + dst + DH // 2 + half, o2)
            full = tl.arange(0, DH)
            v = tl.load(base + HKV * DH + full)
            tl.store(V_CACHE + dst + full, v)

    @triton.jit
    def _rotated(base, cos, sin, d, mask, DH: tl.constexpr, ty):
        # rows at `base` (any shape ending in DH) times cos plus rotate_half times sin, each product
        # and the sum rounded as eager bfloat16 does (rotate_half: the halves swapped, the first negated)
        x = tl.load(base + d, mask=mask, other=0.0).to(tl.float32)
        x_swapped = tl.load(base + (d + DH // 2) % DH, mask=mask, other=0.0).to(tl.float32)
        sign = tl.where(d < DH // 2, -1.0, 1.0)
        return ((x * cos).to(ty).to(tl.float32) + (sign * x_swapped * sin).to(ty).to(tl.float32)).to(ty)

    @triton.jit
    def _attention_kernel(Q, COS, SIN, POS, K_CACHE, V_CACHE, SLOTS, LENGTHS, OUT, PART_O, PART_LSE,
                          stride_s, stride_h, stride_t, sm_scale, CHUNK,
                          G: tl.constexpr, HKV: tl.constexpr, DH: tl.constexpr, BLOCK_G: tl.constexpr,
                          BLOCK_N: tl.constexpr, N_SPLITS: tl.constexpr, UPCAST: tl.constexpr,
                          IEEE: tl.constexpr, ROPE: tl.constexpr):
        # one program per (row, kv head, split): its G query heads over keys [split*CHUNK, ...) that
        # are below the row's length; keys past the length are never read.
        # ROPE (a decode step: each row its session's only row, its new key the last of its context):
        # Q is the qkv projection (B, (H + 2 Hkv) Dh); the program rotates its heads' q and its kv
        # head's new key itself, attends to that key from registers and the split holding it writes
        # it and the new value into the cache: one kernel a layer fewer than rope_write + attention
        row, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        slot = tl.load(SLOTS + row)
        if ROPE:
            pos = tl.load(POS + row)
            length = (pos + 1).to(tl.int32)
        else:
            length = tl.load(LENGTHS + row).to(tl.int32)
        start = split * CHUNK
        end = tl.minimum(start + CHUNK, length)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, DH)
        heads = kvh * G + g
        kv_base = slot * stride_s + kvh * stride_h
        if ROPE:
            cos = tl.load(COS + pos * DH + d).to(tl.float32)
            sin = tl.load(SIN + pos * DH + d).to(tl.float32)
            ty = OUT.dtype.element_ty
            row_base = Q + row * (HKV * G + 2 * HKV) * DH
            q = _rotated(row_base + heads[:, None] * DH, cos[None, :], sin[None, :], d[None, :], g[:, None] < G,
                         DH, ty)
            k_new = _rotated(row_base + (HKV * G + kvh) * DH, cos, sin, d, d < DH, DH, ty).to(
                K_CACHE.dtype.element_ty)
            v_new = tl.load(row_base + (HKV * G + HKV + kvh) * DH + d)
            at = pos + 0 * d  # (DH,): the split whose keys hold the new one writes it
            own = (at >= start) & (at < start + CHUNK)
            tl.store(K_CACHE + kv_base + pos * stride_t + d, k_new, mask=own)
            tl.store(V_CACHE + kv_base + pos * stride_t + d, v_new, mask=own)
        else:
            q = tl.load(Q + (row * HKV * G + heads[:, None]) * DH + d[None, :], mask=g[:, None] < G, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, DH), tl.float32)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            valid = n < end
            offs = kv_base + n[:, None] * stride_t + d[None, :]
            k = tl.load(K_CACHE + offs, mask=valid[:, None], other=0.0)
            v = tl.load(V_CACHE + offs, mask=valid[:, None], other=0.0)
            if ROPE:  # the new key and value from registers, not read back from the cache
                new = (n == pos)[:, None]
                k = tl.where(new, k_new[None, :], k)
                v = tl.where(new, v_new[None, :], v)
            if UPCAST:
                k, v = k.to(tl.float32), v.to(tl.float32)
            if IEEE:  # float32 serving: no tf32 rounding
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale  # (BLOCK_G, BLOCK_N)
            else:
                s = tl.dot(q, tl.trans(k)) * sm_scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l = l * alpha + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        hmask = g[:, None] < G
        if N_SPLITS == 1:
            out = acc / l[:, None]
            tl.store(OUT + (row * HKV * G + heads[:, None]) * DH + d[None, :], out.to(OUT.dtype.element_ty),
                     mask=hmask)
        else:
            # partial result of this split, normalised, with its log-sum-exp (-inf when empty)
            safe_l = tl.where(l > 0, l, 1.0)
            part = (row * HKV * G + heads) * N_SPLITS + split
            tl.store(PART_O + part[:, None] * DH + d[None, :], acc / safe_l[:, None], mask=hmask)
            tl.store(PART_LSE + part, tl.where(l > 0, m + tl.log(safe_l), float("-inf")), mask=g < G)

    @triton.jit
    def _attention_combine_kernel(PART_O, PART_LSE, OUT, DH: tl.constexpr, N_SPLITS: tl.constexpr):
        head_row = tl.program_id(0)  # row * H + head
        sp = tl.arange(0, N_SPLITS)
        d = tl.arange(0, DH)
        lse = tl.load(PART_LSE + head_row * N_SPLITS + sp)
        w = tl.exp(lse - tl.max(lse, axis=0))  # split 0 is never empty, so the max is finite
        parts = tl.load(PART_O + (head_row * N_SPLITS + sp[:, None]) * DH + d[None, :])
        out = tl.sum(parts * w[:, None], axis=0) / tl.sum(w, axis=0)
        tl.store(OUT + head_row * DH + d, out.to(OUT.dtype.element_ty))

    @triton.jit
    def _silu_mul_kernel(GU, OUT, I, BLOCK: tl.constexpr):
        row, blk = tl.program_id(0), tl.program_id(1)
        cols = blk * BLOCK + tl.arange(0, BLOCK)
        mask = cols < I
        gate = tl.load(GU + row * 2 * I + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(GU + row * 2 * I + I + cols, mask=mask, other=0.0).to(tl.float32)
        ty = OUT.dtype.element_ty
        act = (gate / (1.0 + tl.exp(-gate))).to(ty).to(tl.float32)
        tl.store(OUT + row * I + cols, (act * up).to(ty), mask=mask)


def rms_norm(x, weight, eps, delta=None):
    B, D = x.shape
    res = torch.empty_like(x) if delta is not None else x
    out = torch.empty_like(x)
    _rms_norm_kernel[(B,)](x, delta if delta is not None else x, weight, res, out, D, eps,
                           HAS_DELTA=delta is not None, BLOCK_D=triton.next_power_of_2(D),
                           num_warps=8 if D >= 2048 else 4)
    return res, out


def rope_write(qkv, cos, sin, positions, slots, k_cache, v_cache, n_heads, n_kv_heads):
    B = qkv.shape[0]
    dh = k_cache.shape[-1]
    assert k_cache.stride(-1) == 1 and k_cache.stride() == v_cache.stride() and qkv.is_contiguous()
    q = torch.empty(B, n_heads, dh, dtype=qkv.dtype, device=qkv.device)
    _rope_write_kernel[(B, n_heads + n_kv_heads)](
        qkv, cos, sin, positions, slots, k_cache, v_cache, q,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), H=n_heads, HKV=n_kv_heads, DH=dh, num_warps=1)
    return q


def decode_attention(q, k_cache, v_cache, slots, lengths, plan=(1, 0)):
    return _attention(q, None, None, None, k_cache, v_cache, slots, lengths, plan, q.shape[1])


def rope_attention(qkv, cos, sin, positions, slots, k_cache, v_cache, n_heads, n_kv_heads, plan=(1, 0)):
    """rope_write then decode_attention in one kernel, for a decode step only: each row its
    session's only row (its new key the last of its context, length = position + 1)."""
    assert k_cache.stride(-1) == 1 and k_cache.stride() == v_cache.stride() and qkv.is_contiguous()
    # no lengths: the kernel takes each row's length as its position + 1 (positions stand in, unread)
    return _attention(qkv, cos, sin, positions, k_cache, v_cache, slots, positions, plan, n_heads)


def _attention(q, cos, sin, positions, k_cache, v_cache, slots, lengths, plan, n_heads):
    B, dh = q.shape[0], k_cache.shape[-1]
    H, n_kv = n_heads, k_cache.shape[1]
    G = H // n_kv
    n_splits, chunk = plan
    chunk = chunk or k_cache.shape[2]
    out = torch.empty(B, H * dh, dtype=q.dtype, device=q.device)
    if n_splits > 1:
        part_o = torch.empty(B * H * n_splits, dh, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(B * H * n_splits, dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out
    rope = cos is not None
    # the interpreter cannot take a bfloat16 dot product: there the kernel upcasts dot operands
    _attention_kernel[(B, n_kv, n_splits)](
        q, cos if rope else q, sin if rope else q, positions if rope else q, k_cache, v_cache, slots, lengths,
        out, part_o, part_lse, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), 1.0 / math.sqrt(dh), chunk,
        G=G, HKV=n_kv, DH=dh, BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_N=64,
        N_SPLITS=n_splits, UPCAST=INTERPRET, IEEE=INTERPRET or q.dtype == torch.float32, ROPE=rope, num_warps=4)
    if n_splits > 1:
        _attention_combine_kernel[(B * H,)](part_o, part_lse, out, DH=dh, N_SPLITS=n_splits, num_warps=4)
    return out


def silu_mul(gate_up):
    B, two_i = gate_up.shape
    I = two_i // 2
    out = torch.empty(B, I, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(B, triton.cdiv(I, block))](gate_up, out, I, BLOCK=block, num_warps=4)
    return out


MAX_SPLITS = 32


def attention_plan(max_length: int, max_tokens: int) -> tuple[int, int]:
    """(programs per row and kv head, keys per program) for a batch whose longest context is
    `max_length` tokens of a cache of `max_tokens`. Splits come in powers of two so that a few
    graphs cover every length; one program takes contexts up to a chunk."""
    splits = 1
    while splits * ATTENTION_CHUNK < max_length:
        splits *= 2
    if splits == 1:
        return 1, max_tokens
    if splits <= MAX_SPLITS:
        return splits, ATTENTION_CHUNK
    return MAX_SPLITS, splits * ATTENTION_CHUNK // MAX_SPLITS


def attention_plans(max_tokens: int) -> list[tuple[int, int]]:
    """Every plan `attention_plan` gives for contexts of 1 to `max_tokens` tokens: it changes only
    where the splits double."""
    lengths, splits = [1], 1
    while splits * ATTENTION_CHUNK < max_tokens:
        lengths.append(splits * ATTENTION_CHUNK + 1)
        splits *= 2
    return list(dict.fromkeys(attention_plan(n, max_tokens) for n in lengths))


class Ops:
    """The fused ops, Triton kernels or their PyTorch twins."""

    def __init__(self, use_triton: bool):
        self.use_triton = use_triton
        if use_triton:
            self.rms_norm, self.rope_write, self.attention, self.rope_attention, self.silu_mul = (
                rms_norm, rope_write, decode_attention, rope_attention, silu_mul)
        else:
            self.rms_norm, self.rope_write, self.attention, self.rope_attention, self.silu_mul = (
                rms_norm_ref, rope_write_ref, decode_attention_ref, rope_attention_ref, silu_mul_ref)

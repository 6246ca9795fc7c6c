"""The CUDA decode path: bucket logic and the fused step on the CPU, kernels and graphs on a GPU.

The fused kernels also run on the CPU under the Triton interpreter (TRITON_INTERPRET=1 with Triton
installed); without either they are skipped here and run where a GPU is.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from node.config import ModelConfig
from node.cuda_graphs import (DecodeStep, batch_buckets, bucket_for, graph_keys, pad_step, row_buckets,
                              segment_bounds)
from node import fused
from node.fused import ATTENTION_CHUNK, MAX_SPLITS, Ops, attention_plan, attention_plans
from node.runtime import SessionError, ShardRuntime
from node.shard import Shard
from tests.node.random_models import make_random_model
from verification.argmax import ARGMAX_BLOCK, argmax_rows

HAS_CUDA = torch.cuda.is_available()
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"
kernels = pytest.mark.skipif(
    fused.triton is None or not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs Triton and a GPU, or TRITON_INTERPRET=1")
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def test_batch_buckets_cover_every_batch_size():
    assert batch_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert batch_buckets(6) == (1, 2, 4, 6)
    assert batch_buckets(1) == (1,)
    buckets = batch_buckets(20)
    for n in range(1, 21):
        b = bucket_for(n, buckets)
        assert n <= b and (b == 1 or n > b // 2 or b == 20)
    with pytest.raises(ValueError):
        bucket_for(21, buckets)


def test_row_buckets_extend_the_batch_buckets_to_prompt_steps():
    assert row_buckets(32, 128) == (1, 2, 4, 8, 16, 32, 64, 128)
    assert row_buckets(6, 128) == (1, 2, 4, 6, 12, 24, 48, 96, 128)
    assert row_buckets(32, 32) == batch_buckets(32) == row_buckets(32, 0)
    assert row_buckets(40, 100) == (1, 2, 4, 8, 16, 32, 40, 80, 100)


def test_padding_rows_point_at_the_dummy_slot():
    assert pad_step([3, 0, 5], [7, 2, 9], 4, dummy_slot=32) == [[3, 0, 5, 32], [7, 2, 9, 0], [8, 3, 10, 1]]
    assert pad_step([1], [0], 1, dummy_slot=8) == [[1], [0], [1]]
    with pytest.raises(ValueError):
        pad_step([1, 2], [0, 0], 1, dummy_slot=8)


def test_segments_cover_the_layers_in_order():
    assert segment_bounds(1, 4) == [(0, 1)]
    assert segment_bounds(16, 4) == [(0, 1), (1, 5), (5, 9), (9, 13), (13, 16)]
    for n in range(1, 40):
        bounds = segment_bounds(n, 4)
        assert bounds[0][0] == 0 and bounds[-1][1] == n and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_attention_plan_splits_long_contexts_in_powers_of_two():
    assert attention_plan(1, 2048) == (1, 2048)
    assert attention_plan(ATTENTION_CHUNK, 2048) == (1, 2048)
    assert attention_plan(ATTENTION_CHUNK + 1, 2048) == (2, ATTENTION_CHUNK)
    assert attention_plan(3 * ATTENTION_CHUNK, 2048) == (4, ATTENTION_CHUNK)
    for length in (1000, 5000, 40_000, 131_072):
        splits, chunk = attention_plan(length, 131_072)
        assert splits * chunk >= length and splits <= MAX_SPLITS and splits & (splits - 1) == 0


def test_attention_plans_are_every_plan_of_every_context_length():
    for max_tokens in (1, ATTENTION_CHUNK, ATTENTION_CHUNK + 1, 2048, 5000, 40_000):
        every = list(dict.fromkeys(attention_plan(n, max_tokens) for n in range(1, max_tokens + 1)))
        assert attention_plans(max_tokens) == every


@pytest.mark.parametrize("max_sessions,has_head,max_tokens", [(6, True, 1024), (32, False, 2048), (1, True, 300)])
def test_graph_keys_are_the_keys_steps_replay(max_sessions, has_head, max_tokens):
    """What a stage captures before serving (GraphedDecoder.capture_all): every key a decode or
    prompt step of up to 128 rows can replay (as `rows` computes it), and no other."""
    buckets = row_buckets(max_sessions, 128)
    replayed = set()
    for length in range(1, max_tokens + 1):  # the step's longest context
        plan = attention_plan(length, max_tokens)
        for n in range(1, 129):
            bucket = bucket_for(n, buckets)
            if n <= max_sessions:
                replayed.add((bucket, plan, False, True))  # a decode step
            replayed.add((bucket, plan, has_head, False))  # a prompt step
            if n <= max_sessions or not has_head:
                replayed.add((bucket, plan, False, False))  # a prompt step that wants every row's logits
    keys = graph_keys(buckets, max_sessions, has_head, max_tokens)
    assert len(keys) == len(set(keys)) and set(keys) == replayed


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_random_model("llama", path, n_layers=4)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 1024  # room for contexts longer than one attention chunk
    (path / "config.json").write_text(json.dumps(config))
    return path


def _runtime(model_dir, start, end, **kwargs):
    return ShardRuntime(model_dir, Shard("m", start, end, ModelConfig.load(model_dir).n_layers), **kwargs)


@pytest.mark.parametrize("decodes_only", [False, True], ids=["rope-written-first", "rope-in-attention"])
@pytest.mark.parametrize("start,end", [(0, 4), (0, 2), (2, 4)], ids=["whole", "first", "last"])
def test_fused_step_matches_the_layer_path(llama_dir, start, end, decodes_only):
    """The step the graphs capture, with the PyTorch twins of the kernels, against the layers; as
    a prompt step runs it, and as a decode step (RoPE and the cache write inside the attention)."""
    torch.manual_seed(0)
    ref, fast = _runtime(llama_dir, start, end, max_sessions=5), _runtime(llama_dir, start, end, max_sessions=5)
    first = start == 0
    prompts = [[5, 6, 7], [9, 1, 2, 3, 4, 8, 10], [42]]
    hidden = ref.config.hidden_size
    for i, p in enumerate(prompts):
        x = torch.tensor(p) if first else torch.randn(len(p), hidden)
        ref.prefill(f"s{i}", x)
        fast.prefill(f"s{i}", x)
    step = DecodeStep(fast.model, fast.cache, fast.cos, fast.sin, Ops(use_triton=False))
    dummy = 4  # a slot no session holds
    for _ in range(3):
        xs = [torch.tensor([11 + i]) if first else torch.randn(1, hidden) for i in range(3)]
        sessions = [fast.sessions[f"s{i}"] for i in range(3)]
        slots, positions, lengths = (torch.tensor(r) for r in pad_step(
            [s.slot for s in sessions], [s.n_tokens for s in sessions], 4, dummy))
        x = torch.cat(xs + [xs[0]])  # the padding row carries any input
        state = x  # through one-layer segments, as the graphs run it
        for a, b in segment_bounds(step.n_layers, 1):
            state = step.segment(a, b, state, slots, positions, lengths,
                                 attention_plan(int(lengths.max()), fast.max_seq_len), decodes_only=decodes_only)
        got, got_hidden = state if isinstance(state, tuple) else (state, None)
        for s in sessions:
            s.n_tokens += 1
        want = ref.decode([(f"s{i}", xs[i]) for i in range(3)])
        torch.testing.assert_close(got[:3], want, atol=1e-4, rtol=1e-4)
        if got_hidden is not None:  # the last stage also hands back the hidden states it keeps for audits
            torch.testing.assert_close(got_hidden[:3], ref.last_hidden, atol=1e-4, rtol=1e-4)
    for i in range(3):  # and both caches hold the same keys and values
        n = ref.sessions[f"s{i}"].n_tokens
        torch.testing.assert_close(fast.cache.k[:, i, :, :n], ref.cache.k[:, i, :, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast.cache.v[:, i, :, :n], ref.cache.v[:, i, :, :n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
def test_a_trace_written_in_place_is_the_step_kept_by_reference(llama_dir, device):
    """Into a trace tensor (the graphs' buffer) the layers' products are written in place, not copied
    after: outputs and every trace row bit for bit those of a step that keeps references (a list)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rt = _runtime(llama_dir, 1, 4, max_sessions=3, device=device, dtype=dtype)
    ops = Ops(use_triton=device == "cuda" and fused.triton is not None)
    hidden, n_layers = rt.config.hidden_size, 3
    slots, positions, lengths = (torch.tensor(r, device=device) for r in pad_step([0, 1], [0, 0], 2, 2))
    x = torch.randn(2, hidden, device=device).to(dtype)
    plan = attention_plan(1, rt.max_seq_len)
    kept = []
    step = DecodeStep(rt.model, rt.cache, rt.cos, rt.sin, ops, kept)
    want_h, want_logits = step(x, slots, positions, lengths, plan)[::-1]
    buffer = torch.full((2 * n_layers + 1, 3, hidden), float("nan"), device=device, dtype=dtype)
    step = DecodeStep(rt.model, rt.cache, rt.cos, rt.sin, ops, buffer)
    got_h, got_logits = step(x, slots, positions, lengths, plan)[::-1]
    assert torch.equal(got_logits, want_logits) and torch.equal(got_h, want_h)
    assert torch.equal(buffer[:, :2], torch.stack(kept))


# -- the Triton kernels against their twins ----------------------------------------------------

def _dtype():
    return torch.bfloat16 if HAS_CUDA else torch.float32


@kernels
@pytest.mark.parametrize("with_delta", [False, True])
def test_rms_norm_kernel(with_delta):
    g = torch.Generator(device=KERNEL_DEVICE).manual_seed(1)
    x, delta = (torch.randn(3, 320, generator=g, device=KERNEL_DEVICE).to(_dtype()) for _ in range(2))
    w = torch.randn(320, generator=g, device=KERNEL_DEVICE).to(_dtype())
    res, out = fused.rms_norm(x, w, 1e-5, delta if with_delta else None)
    ref_res, ref_out = fused.rms_norm_ref(x, w, 1e-5, delta if with_delta else None)
    torch.testing.assert_close(res, ref_res, atol=0, rtol=0)
    torch.testing.assert_close(out, ref_out, atol=2e-2, rtol=1e-2)


@kernels
def test_rope_write_kernel_and_silu_mul():
    g = torch.Generator(device=KERNEL_DEVICE).manual_seed(2)
    H, Hkv, Dh, S, T, B = 8, 2, 64, 5, 40, 3
    cos = torch.randn(T, Dh, generator=g, device=KERNEL_DEVICE).to(_dtype())
    sin = torch.randn(T, Dh, generator=g, device=KERNEL_DEVICE).to(_dtype())
    qkv = torch.randn(B, (H + 2 * Hkv) * Dh, generator=g, device=KERNEL_DEVICE).to(_dtype())
    slots, positions = torch.tensor([4, 0, 2], device=KERNEL_DEVICE), torch.tensor([0, 17, 39], device=KERNEL_DEVICE)
    caches = [torch.zeros(S, Hkv, T, Dh, dtype=_dtype(), device=KERNEL_DEVICE) for _ in range(4)]
    q = fused.rope_write(qkv, cos, sin, positions, slots, caches[0], caches[1], H, Hkv)
    ref_q = fused.rope_write_ref(qkv, cos, sin, positions, slots, caches[2], caches[3], H, Hkv)
    # the compiler may fuse a product into the sum (one rounding fewer): a bfloat16 unit apart at most
    torch.testing.assert_close(q, ref_q, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(caches[0], caches[2], atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(caches[1], caches[3], atol=0, rtol=0)
    gate_up = torch.randn(B, 2 * 1100, generator=g, device=KERNEL_DEVICE).to(_dtype())
    torch.testing.assert_close(fused.silu_mul(gate_up), fused.silu_mul_ref(gate_up), atol=2e-2, rtol=1e-2)


@kernels
@pytest.mark.parametrize("max_length", [1, 37, 700], ids=["one-key", "one-split", "four-splits"])
def test_attention_kernel_reads_only_each_rows_keys(max_length):
    g = torch.Generator(device=KERNEL_DEVICE).manual_seed(3)
    H, Hkv, Dh, S, T = 8, 2, 64, 4, 1024
    k_cache, v_cache = (torch.randn(S, Hkv, T, Dh, generator=g, device=KERNEL_DEVICE).to(_dtype()) for _ in range(2))
    lengths = torch.tensor([max_length, max(1, max_length // 3), 1], device=KERNEL_DEVICE)
    for c in (k_cache, v_cache):  # poison every key past a row's length: it must not be read
        for row, slot in enumerate((3, 1, 0)):
            c[slot, :, int(lengths[row]):] = float("nan")
    slots = torch.tensor([3, 1, 0], device=KERNEL_DEVICE)
    q = torch.randn(3, H, Dh, generator=g, device=KERNEL_DEVICE).to(_dtype())
    plan = attention_plan(max_length, T)
    got = fused.decode_attention(q, k_cache, v_cache, slots, lengths, plan)
    want = fused.decode_attention_ref(q, torch.nan_to_num(k_cache), torch.nan_to_num(v_cache), slots, lengths)
    assert plan[0] == (4 if max_length == 700 else 1)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@kernels
@pytest.mark.parametrize("max_length", [1, 37, 700], ids=["one-key", "one-split", "four-splits"])
def test_rope_in_attention_is_rope_write_then_attention(max_length):
    """A decode step's one kernel (rotate q and the new key, attend with the key from registers,
    write key and value) gives the outputs and the cache of the two kernels a prompt step runs."""
    g = torch.Generator(device=KERNEL_DEVICE).manual_seed(4)
    H, Hkv, Dh, S, T = 8, 2, 64, 4, 1024
    cos = torch.randn(T, Dh, generator=g, device=KERNEL_DEVICE).to(_dtype())
    sin = torch.randn(T, Dh, generator=g, device=KERNEL_DEVICE).to(_dtype())
    qkv = torch.randn(4, (H + 2 * Hkv) * Dh, generator=g, device=KERNEL_DEVICE).to(_dtype())
    caches = torch.randn(2, S, Hkv, T, Dh, generator=g, device=KERNEL_DEVICE).to(_dtype())
    slots = torch.tensor([3, 1, 0, 2], device=KERNEL_DEVICE)  # the last row: padding on its own slot
    positions = torch.tensor([max_length - 1, max(1, max_length // 3) - 1, 0, 0], device=KERNEL_DEVICE)
    for row, slot in enumerate(slots.tolist()):  # keys at and past a row's position: never read
        caches[:, slot, :, int(positions[row]):] = float("nan")
    plan = attention_plan(max_length, T)
    k1, v1 = caches.clone()
    want = fused.decode_attention(fused.rope_write(qkv, cos, sin, positions, slots, k1, v1, H, Hkv),
                                  k1, v1, slots, positions + 1, plan)
    k2, v2 = caches.clone()
    got = fused.rope_attention(qkv, cos, sin, positions, slots, k2, v2, H, Hkv, plan)
    # the compiler may fuse a product into a sum in one kernel and not the other: a bfloat16 unit apart
    close = dict(atol=2e-2, rtol=1e-2) if HAS_CUDA else dict(atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got, want, **close)
    assert torch.equal(k2.isnan(), k1.isnan())  # the new keys written where rope_write writes them
    torch.testing.assert_close(k2.nan_to_num(), k1.nan_to_num(), **close)
    assert torch.equal(v2.nan_to_num(), v1.nan_to_num())
    ref = fused.rope_attention_ref(qkv, cos, sin, positions, slots, *caches.nan_to_num().clone(), H, Hkv)
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)


@kernels
def test_argmax_kernel_is_argmax_ties_included():
    """The greedy pick on a GPU (verification/argmax.py greedy) chooses what argmax does, the
    first of equal maxima too, within a chunk of the kernel and across chunks."""
    g = torch.Generator(device=KERNEL_DEVICE).manual_seed(5)
    logits = torch.randn(5, 128256, generator=g, device=KERNEL_DEVICE).to(_dtype())
    block = ARGMAX_BLOCK
    logits[1, [9, 700, 128255]] = 50.0  # ties in one chunk and across chunks
    logits[2, [block + 3, block + 1, 3 * block]] = 50.0
    logits[3] = 0.0  # all equal: the first
    logits[4, 128255] = 60.0  # the last, in the short last chunk
    want = logits.argmax(-1)
    assert want.tolist()[1:] == [9, block + 1, 0, 128255]
    assert torch.equal(argmax_rows(logits), want)
    assert torch.equal(argmax_rows(logits[:, :1000]), logits[:, :1000].argmax(-1))  # one short chunk


# -- the whole path on a GPU -------------------------------------------------------------------

@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphs_match_eager_fused_and_layer_paths(llama_dir, dtype):
    ranges = [(0, 2), (2, 4)]
    make = lambda **kw: [_runtime(llama_dir, a, b, device="cuda", dtype=dtype, max_sessions=6,  # noqa: E731
                                  max_seq_len=1024, **kw) for a, b in ranges]
    graphed, eager, layers = make(), make(), make(cuda_graphs=False)
    for stage in eager:
        stage.graphs.use_graphs = False
    assert graphed[0].graphs is not None and layers[0].graphs is None
    # three sessions in slots 1, 2, 3 (slot 0 freed again: the rows are not one run), one long
    prompts = [[7, 8, 9], list(range(1, 300)), [42]]
    results = []
    for chain in (graphed, eager, layers):
        chain[0].prefill("blocker", torch.tensor([1]))
        tokens, logits = [], []
        for i, p in enumerate(prompts):
            x = torch.tensor(p)
            for stage in chain:
                x = stage.prefill(f"s{i}", x)
            tokens.append([int(x.argmax(-1))])
        chain[0].close("blocker")
        for _ in range(12):
            xs = [torch.tensor([t[-1]]) for t in tokens]
            for stage in chain:
                out = stage.decode([(f"s{i}", x) for i, x in enumerate(xs)])
                xs = list(out[:, None].unbind(0))
            logits.append(out.float().clone())
            for t, nxt in zip(tokens, out.argmax(-1).tolist()):
                t.append(nxt)
        results.append((tokens, torch.stack(logits)))
    (g_tok, g_log), (e_tok, e_log), (l_tok, l_log) = results
    assert g_tok == e_tok and torch.equal(g_log, e_log)  # the graphs replay exactly the eager kernels
    keys = graphed[1].graphs.graphs
    assert max(k[1][0] for k in keys) == 2  # the long session's decodes took a 2-split plan
    assert {k[0] for k in keys if k[2]} == {1, 4}  # the short prompts' steps replayed graphs with head rows
    if dtype == torch.float32:
        assert g_tok == l_tok
        assert (g_log - l_log).norm() / l_log.norm() < 1e-3
    else:  # bfloat16 rounds differently in fused and unfused kernels; compare before tokens can part
        assert (g_log[0] - l_log[0]).norm() / l_log[0].norm() < 3e-2


@cuda
def test_graphs_captured_before_serving_leave_no_step_a_capture(llama_dir):
    """A provider captures its graphs when it loads its layers (ShardRuntime.capture_graphs): steps
    of any batch and context then replay them, with the outputs of graphs captured on first use."""
    make = lambda: [_runtime(llama_dir, a, b, device="cuda", dtype=torch.bfloat16, max_sessions=6,  # noqa: E731
                             max_seq_len=1024) for a, b in [(0, 2), (2, 4)]]
    ready, lazy = make(), make()
    captured = [rt.capture_graphs() for rt in ready]
    assert all(captured) and captured == [len(rt.graphs.graphs) for rt in ready]
    assert [rt.capture_graphs() for rt in ready] == [0, 0]
    outputs = []
    for chain in (ready, lazy):
        logits = []
        for i, prompt in enumerate([[7, 8, 9], list(range(1, 300)), [42], [5, 6]]):
            x = torch.tensor(prompt)
            for stage in chain:
                x = stage.prefill(f"s{i}", x)
            logits.append(x.float())
        for n in (4, 3, 1, 2):  # decodes of several batch sizes
            xs = [torch.tensor([1])] * n
            for stage in chain:
                out = stage.decode([(f"s{i}", x) for i, x in enumerate(xs)])
                xs = list(out[:, None].unbind(0))
            logits.append(out.float())
        outputs.append(logits)
    assert [len(rt.graphs.graphs) for rt in ready] == captured  # no step captured one
    assert all(torch.equal(a, b) for a, b in zip(*outputs))


@cuda
def test_graph_path_keeps_session_errors(llama_dir):
    rt = _runtime(llama_dir, 0, 4, device="cuda", dtype=torch.bfloat16, max_sessions=2, max_seq_len=8)
    rt.prefill("s", torch.arange(7))
    for bad, message in [(torch.tensor([1, 2]), "exactly one token"), (torch.tensor([512]), "out of range"),
                         (torch.tensor([1.0]), "token ids")]:
        with pytest.raises(SessionError, match=message):
            rt.decode([("s", bad)])
    rt.decode([("s", torch.tensor([1]))])
    with pytest.raises(SessionError, match="would hold 9 tokens"):
        rt.decode([("s", torch.tensor([1]))])
    assert rt.sessions["s"].n_tokens == 8


@cuda
def test_graphs_capture_layer_traces_that_pass_a_layer_audit(llama_dir):
    """With capture on, decode still replays CUDA graphs; the traces they write are the eager
    kernels' bit for bit, and every layer of them passes a per-layer audit, against the float32
    reference and against a same-recipe recompute on the GPU."""
    from node.layer_reference import LayerReference, audit_trace
    from verification.layer_compare import same_recipe_thresholds
    from verification.trace import residuals

    make = lambda: [_runtime(llama_dir, a, b, device="cuda", dtype=torch.bfloat16, max_sessions=4,  # noqa: E731
                             max_seq_len=256, capture_trace=True) for a, b in [(0, 2), (2, 4)]]
    graphed, eager = make(), make()
    for stage in eager:
        stage.graphs.use_graphs = False
    assert graphed[0].graphs is not None and graphed[0].graphs.use_graphs
    prompts = [list(range(3, 40)), [42, 7, 9]]
    ids = {}
    for chain in (graphed, eager):
        tokens = []
        for i, p in enumerate(prompts):
            x = torch.tensor(p)
            for stage in chain:
                x = stage.prefill(f"s{i}", x)
            tokens.append(list(p) + [int(x.argmax(-1))])
        for _ in range(10):
            xs = [torch.tensor([t[-1]]) for t in tokens]
            for stage in chain:
                out = stage.decode([(f"s{i}", x) for i, x in enumerate(xs)])
                xs = list(out[:, None].unbind(0))
            for t, nxt in zip(tokens, out.argmax(-1).tolist()):
                t.append(nxt)
        ids[id(chain)] = tokens
    assert ids[id(graphed)] == ids[id(eager)]
    for i, tokens in enumerate(ids[id(graphed)]):
        for g, e in zip(graphed, eager):
            assert torch.equal(g.trace(f"s{i}"), e.trace(f"s{i}"))
        fed = torch.tensor(tokens[:-1])  # the last token was sampled, never fed
        inputs = (fed, residuals(graphed[0].trace(f"s{i}"))[0][-1])
        for stage, stage_input in zip(graphed, inputs):
            ref, same = (LayerReference.from_checkpoint(llama_dir, stage.shard, serving_dtype=torch.bfloat16,
                                                        compute_dtype=dt, device="cuda")
                         for dt in (torch.float32, torch.bfloat16))
            verdict, verdicts = audit_trace(ref, same, stage_input, stage.trace(f"s{i}"),
                                            same_recipe_thresholds("cuda", torch.bfloat16))
            assert verdict.ok, [v.reason for v in verdicts if not v.ok]


@cuda
def test_sampling_on_the_gpu_chooses_what_the_cpu_does():
    """Logits on a GPU, rows with a temperature (and top-p) among greedy ones: the same tokens as the
    same logits on the CPU, where a verifier recomputes them."""
    from verification.sampling import sample
    from wire.messages import SamplingParams

    logits = (3 * torch.randn(6, 5000, generator=torch.Generator().manual_seed(0))).to(torch.bfloat16)
    params = [SamplingParams(), SamplingParams(temperature=0.7, seed=1), SamplingParams(temperature=1.3, seed=2),
              SamplingParams(), SamplingParams(temperature=1.0, top_p=0.9, seed=3), SamplingParams(temperature=0.2, seed=4)]
    positions = [5, 6, 7, 8, 9, 10]
    assert sample(logits.cuda(), params, positions) == sample(logits, params, positions)

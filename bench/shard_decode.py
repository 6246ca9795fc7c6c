"""Decode tokens/s of chained shards beside transformers `generate` on the same model, same run.

    python bench/shard_decode.py                 # default model on this CPU, batch 1/8/32
    python bench/shard_decode.py --batches 1,8 --new-tokens 32 --splits 1,2,3
    python bench/shard_decode.py --device cuda    # random-weight Llama-3.2-1B and Llama-3-8B shapes

Each row times only the decode steps (prefill excluded) of B sessions with prompts of equal length,
greedy, with no early stop. transformers' decode time is generate(N new) minus generate(1 new).
Writes bench/shard_decode_<dtype>.json next to this file (bench/shard_decode_cuda.json on CUDA).

On CUDA the floor of a step is the bytes it must read (weights, the batch's embedding rows, the
keys and values in context) over the copy bandwidth (read + write) measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.config import ModelConfig  # noqa: E402
from node.local_pipeline import LocalPipeline  # noqa: E402
from node.models import default_model_dir  # noqa: E402
from node.shard import split_layers  # noqa: E402
from verification.argmax import greedy  # noqa: E402


def time_ours(pipeline: LocalPipeline, prompts: torch.Tensor, n_new: int,
              keep_logits: bool = False) -> tuple[float, list]:
    sids = [f"bench-{i}" for i in range(len(prompts))]
    tokens = [[int(pipeline.prefill(sid, p.tolist()).argmax(-1))] for sid, p in zip(sids, prompts)]
    kept = []
    start = time.perf_counter()
    for _ in range(n_new - 1):
        logits = pipeline.decode(sids, [t[-1] for t in tokens])
        if keep_logits:
            kept.append(logits.float().clone())
        for t, nxt in zip(tokens, greedy(logits).tolist()):  # as the pool's sampler picks
            t.append(nxt)
    seconds = time.perf_counter() - start
    for sid in sids:
        pipeline.close(sid)
    return seconds, kept if keep_logits else tokens


def time_transformers(model, prompts: torch.Tensor, n_new: int) -> tuple[float, list[list[int]]]:
    def generate(n):
        start = time.perf_counter()
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0)
        if out.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    prefill_s, _ = generate(1)
    total_s, out = generate(n_new)
    return max(total_s - prefill_s, 1e-9), out[:, prompts.shape[1]:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: the shipped default model)")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--splits", default="2,3", help="numbers of chained stages to time")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights and activations, for both ours and transformers")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shapes", default="llama-3.2-1b,llama-3-8b", help="CUDA: random-weight model shapes")
    parser.add_argument("--max-seq-len", type=int, default=512, help="CUDA: cache length of each session")
    parser.add_argument("--json", help="where to write the JSON (default: next to this script)")
    args = parser.parse_args()
    if args.device == "cuda":
        return cuda_main(args)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    model_dir = Path(args.model) if args.model else default_model_dir()
    config = ModelConfig.load(model_dir)
    batches = [int(b) for b in args.batches.split(",")]
    splits = [int(s) for s in args.splits.split(",")]
    dtype = getattr(torch, args.dtype)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    reference.generation_config.eos_token_id = None  # decode the full count, as ours does
    pipelines = {
        n: LocalPipeline.load(model_dir, split_layers(config.n_layers, [1.0] * n), dtype=dtype,
                             max_sessions=max(batches))
        for n in splits
    }
    generator = torch.Generator().manual_seed(0)

    rows = []
    print(f"model {model_dir.name}: {config.n_layers} layers, hidden {config.hidden_size}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, prompt {args.prompt_tokens} tokens, {args.new_tokens} new")
    print(f"{'batch':>5} {'transformers tok/s':>19} " + " ".join(f"{f'{n} stages tok/s':>16} {'ratio':>6} {'same':>5}"
                                                           for n in splits))
    for batch in batches:
        prompts = torch.randint(3, config.vocab_size, (batch, args.prompt_tokens), generator=generator)
        ref_s, ref_tokens = time_transformers(reference, prompts, args.new_tokens)
        ref_rate = batch * (args.new_tokens - 1) / ref_s
        row = {"batch": batch, "transformers_tokens_per_s": round(ref_rate, 2), "chained": {}}
        cells = []
        for n, pipeline in pipelines.items():
            ours_s, tokens = time_ours(pipeline, prompts, args.new_tokens)
            rate = batch * (args.new_tokens - 1) / ours_s
            # share of sessions whose greedy tokens equal transformers' (ties can flip a batched matmul)
            same = sum(a == b for a, b in zip(tokens, ref_tokens)) / batch
            row["chained"][n] = {"tokens_per_s": round(rate, 2), "ratio": round(rate / ref_rate, 2),
                                 "same_tokens_fraction": same}
            cells.append(f"{rate:>16.1f} {rate / ref_rate:>5.2f}x {same:>5.0%}")
        rows.append(row)
        print(f"{batch:>5} {ref_rate:>19.1f} " + " ".join(cells))

    out = {
        "model": model_dir.name, "device": "cpu", "dtype": args.dtype, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "rows": rows,
    }
    path = Path(__file__).with_name(f"shard_decode_{args.dtype}.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")

# -- CUDA: random-weight Llama shapes -----------------------------------------------------------

SHAPES = {
    # public configs of meta-llama/Llama-3.2-1B (head untied here, as in FIGURES.md) and Meta-Llama-3-8B
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
    "llama-3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, max_position_embeddings=8192,
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}


def copy_bandwidth_gbps(n_bytes: int = 2 << 30) -> float:
    """Device-to-device copy of n_bytes, bytes read plus bytes written per second (median of 20)."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(23):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    return 2 * n_bytes / statistics.median(times[3:]) / 1e9


def random_llama(name: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=None, pad_token_id=0, architectures=["LlamaForCausalLM"], **SHAPES[name])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    return model


def step_bytes(stages, batch: int, mean_context: float) -> tuple[int, int]:
    """(bytes one decode step must read: weights, `batch` embedding rows and the keys/values in
    context; all weight bytes, the issue's convention) over the stages of a pipeline."""
    read = total = 0
    for stage in stages:
        params = stage.model.parameter_bytes()
        total += params
        read += params + stage.cache.bytes_per_token * batch * mean_context
        # the embedding is a lookup of `batch` rows, unless it is also the head
        if stage.model.embed is not None and not (stage.shard.is_last and stage.model.lm_head is None):
            emb = stage.model.embed.weight
            read -= emb.numel() * emb.element_size() - batch * emb.shape[1] * emb.element_size()
    return int(read), total


def graph_step_s(stages, batch: int, n: int = 30) -> float:
    """Device time of one decode step from back-to-back replays of each stage's captured graph."""
    from node.cuda_graphs import bucket_for

    graphs = []
    for stage in stages:
        bucket = bucket_for(batch, stage.graphs.buckets)
        graphs += [g for (b, plan, _, decodes_only), (gs, _) in stage.graphs.graphs.items()
                   if b == bucket and plan[0] == 1 and decodes_only for g in gs]  # a decode step's graphs
    for g in graphs:
        g.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        for g in graphs:
            g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3 / n


def kernel_breakdown(stage, batch: int) -> dict:
    """Device time per kind of kernel in one eager step of `stage` (the kernels its graph replays)."""
    from node.cuda_graphs import bucket_for
    from node.fused import attention_plan

    dec = stage.graphs
    bucket = bucket_for(batch, dec.buckets)
    inputs, plan = dec._inputs(bucket), attention_plan(1, stage.max_seq_len)
    with torch.inference_mode():
        dec.step(*inputs, plan, decodes_only=True)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                dec.step(*inputs, plan, decodes_only=True)
            torch.cuda.synchronize()
    kinds: dict[str, list[float]] = {}
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if not us or evt.key.startswith(("cuda", "Memcpy", "Memset")) and "kernel" not in evt.key.lower():
            continue
        name = evt.key
        kind = next((k for k in ("_rms_norm", "_rope_write", "_attention_combine", "_attention", "_silu_mul")
                     if k in name), None) or ("embedding" if "ndex" in name or "mbedding" in name else
                                              "add" if "elementwise" in name or "add" in name.lower() else "matmul")
        entry = kinds.setdefault(kind, [0.0, 0])
        entry[0] += us / 5
        entry[1] += evt.count / 5
    return {k: {"us_per_step": round(v[0], 1), "kernels_per_step": round(v[1], 1)} for k, v in sorted(kinds.items())}


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(share of sessions with identical tokens, mean share of each session's tokens before the
    first difference): with random weights the greedy choice is often a near-tie, and one flip
    changes all that follows."""
    same = sum(x == y for x, y in zip(a, b)) / len(a)
    prefix = []
    for x, y in zip(a, b):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x))
        prefix.append(n / len(x))
    return same, sum(prefix) / len(prefix)


def cuda_main(args) -> None:
    from node.config import ModelConfig
    from node.runtime import ShardRuntime
    from node.shard import Shard

    import transformers

    batches = [int(b) for b in args.batches.split(",")]
    bw_gbps = copy_bandwidth_gbps()
    n_new, n_prompt = args.new_tokens, args.prompt_tokens
    mean_context = n_prompt + n_new / 2
    device_name = torch.cuda.get_device_name()
    print(f"{device_name}, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"copy bandwidth {bw_gbps:.0f} GB/s; bfloat16, prompt {n_prompt} tokens, {n_new} new")
    probe = attention = None
    try:  # where a step's time goes; the table stands without these
        probe = matmul_probe()
        print("  F.linear at batch 1 on the 8B matrices, GB/s read:", probe)
        attention = {n: attention_probe(n) for n in (80, 1024)}
        print("  8B attention, 32 layers, cache of 2048 (us): context 80:", attention[80],
              "context 1024:", attention[1024])
    except Exception as exc:
        print(f"  probe failed: {exc!r}")
    results = {}
    for name in args.shapes.split(","):
        reference = random_llama(name)
        config = ModelConfig.from_dict(reference.config.to_dict())
        tensors = dict(reference.state_dict())
        generator = torch.Generator().manual_seed(0)
        prompts = {b: torch.randint(3, config.vocab_size, (b, n_prompt), generator=generator) for b in batches}
        ref = {}
        for b in batches:
            seconds, tokens = time_transformers(reference, prompts[b].cuda(), n_new)
            ref[b] = (b * (n_new - 1) / seconds, tokens)
        layouts = {"whole": [(0, config.n_layers)], "2-stage": [(0, config.n_layers // 2),
                                                                 (config.n_layers // 2, config.n_layers)]}
        shape = {"layers": config.n_layers, "hidden": config.hidden_size, "rows": [], "checks": {}}
        rows = {b: {"batch": b, "transformers_tokens_per_s": round(ref[b][0], 2)} for b in batches}
        for layout, ranges in layouts.items():
            stages = [ShardRuntime.from_tensors(config, Shard(name, a, z, config.n_layers), tensors, device="cuda",
                                                dtype=torch.bfloat16, max_sessions=max(batches),
                                                max_seq_len=args.max_seq_len) for a, z in ranges]
            pipeline = LocalPipeline(stages)
            for b in batches:
                time_ours(pipeline, prompts[b], 4)  # captures this bucket's graphs
                runs = [time_ours(pipeline, prompts[b], n_new) for _ in range(3)]  # a host hiccup skews one
                seconds, tokens = sorted(runs, key=lambda r: r[0])[1]
                rate = b * (n_new - 1) / seconds
                device_rate = b / graph_step_s(stages, b)
                read, total = step_bytes(stages, b, mean_context)
                floor = b * bw_gbps * 1e9 / read
                same, prefix = agreement(tokens, ref[b][1])
                rows[b][layout] = {
                    "tokens_per_s": round(rate, 1), "pct_of_floor": round(100 * rate / floor, 1),
                    "ratio_to_generate": round(rate / ref[b][0], 1),
                    "graph_only_tokens_per_s": round(device_rate, 1),
                    "graph_only_pct_of_floor": round(100 * device_rate / floor, 1),
                    "floor_tokens_per_s": round(floor, 1), "bytes_read_per_step": read,
                    "floor_all_weights_tokens_per_s": round(b * bw_gbps * 1e9 / total, 1),
                    "same_as_transformers": {"sessions": same, "token_prefix": round(prefix, 3)},
                }
                if b == 8:
                    shape["checks"][layout] = check_paths(pipeline, prompts[b], 32, reference)
            if layout == "whole":
                try:
                    shape["kernels_batch1"] = kernel_breakdown(stages[0], 1)
                except Exception as exc:  # the profiler is a nicety; the table stands without it
                    print(f"  no kernel breakdown: {exc!r}")
            del pipeline, stages
            torch.cuda.empty_cache()
        del reference, tensors
        torch.cuda.empty_cache()
        shape["rows"] = list(rows.values())
        results[name] = shape
        print_cuda_table(name, shape)
    out = {"device": device_name, "torch": torch.__version__, "transformers": transformers.__version__,
           "copy_bandwidth_gbps": round(bw_gbps, 1), "linear_batch1_read_gbps": probe,
           "attention_probe_us": attention, "dtype": "bfloat16", "prompt_tokens": n_prompt,
           "new_tokens": n_new, "max_seq_len": args.max_seq_len, "shapes": results}
    path = Path(args.json) if args.json else Path(__file__).with_name("shard_decode_cuda.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


def check_paths(pipeline: LocalPipeline, prompts: torch.Tensor, n_new: int, reference) -> dict:
    """Greedy tokens of the graphs against the same fused kernels run eagerly (must be equal) and
    against the layers of node/layers.py (the CPU path, here in bfloat16 on the GPU); first-step
    logits of both against transformers, to size the bfloat16 noise."""
    stages = pipeline.stages
    decoders = [stage.graphs for stage in stages]

    def run(mode: str, n: int, keep_logits: bool = False):
        for stage, dec in zip(stages, decoders):
            stage.graphs = None if mode == "layers" else dec  # the runtime's layer path: same weights, cache
            stage.fused_rows = None if mode == "layers" else dec.step.ops  # prompts too
            dec.use_graphs = mode == "graphs"
        return time_ours(pipeline, prompts, n, keep_logits)[1]

    graphed, eager, layers = run("graphs", n_new), run("eager", n_new), run("layers", n_new)
    # logits of the first decode step after the same prefill: how far the two paths differ
    first_graphs, first_layers = run("graphs", 2, True)[0], run("layers", 2, True)[0]
    run("graphs", 1)  # leave the graphs on
    with torch.inference_mode():  # transformers on the prompt plus the token the step was fed
        ids = torch.cat([prompts, torch.tensor([[t[0]] for t in graphed])], dim=1).cuda()
        first_ref = reference(ids).logits[:, -1].float()

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    rel_err = rel(first_graphs, first_layers)
    vs_ref = {"graphs": rel(first_graphs, first_ref), "layers": rel(first_layers, first_ref)}
    same_eager, same_layers = agreement(graphed, eager), agreement(graphed, layers)
    print(f"  check, batch {len(prompts)}, {n_new} steps: graphs == eager fused kernels: "
          f"{same_eager[0]:.0%} of sessions; graphs vs layer path: {same_layers[0]:.0%} of sessions, "
          f"{same_layers[1]:.0%} of tokens before the first difference; first-step logits, relative "
          f"difference: graphs-layers {rel_err:.1e}, graphs-transformers {vs_ref['graphs']:.1e}, "
          f"layers-transformers {vs_ref['layers']:.1e}")
    return {"steps": n_new, "graph_equals_eager_sessions": same_eager[0], "graph_vs_layers_sessions": same_layers[0],
            "graph_vs_layers_token_prefix": round(same_layers[1], 3), "first_step_logits_rel_err": rel_err,
            "first_step_logits_rel_err_vs_transformers": vs_ref}


def graph_time_s(fn, n: int = 32) -> float:
    """Device time of `n` calls of fn, captured in one graph (launches do not count)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    graph.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    graph.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3


def attention_probe(context: int, max_tokens: int = 2048) -> dict:
    """32 layers of Llama-3-8B decode attention at `context` tokens in a cache of `max_tokens`:
    the kernel here (reads each row's keys) against SDPA over the whole static cache, masked."""
    from node.fused import attention_plan, decode_attention

    out = {}
    for batch in (1, 32):
        k, v = (torch.randn(batch, 8, max_tokens, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        q = torch.randn(batch, 32, 128, device="cuda", dtype=torch.bfloat16)
        slots = torch.arange(batch, device="cuda")
        lengths = torch.full((batch,), context, device="cuda")
        mask = (torch.arange(max_tokens, device="cuda") < context)[None, None, None, :]
        plan = attention_plan(context, max_tokens)
        ours = graph_time_s(lambda: decode_attention(q, k, v, slots, lengths, plan))
        sdpa = graph_time_s(lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask,
                                                                    enable_gqa=True))
        out[f"batch {batch}"] = {"ours_us": round(ours * 1e6), "sdpa_whole_cache_us": round(sdpa * 1e6)}
        del k, v
    return out


def matmul_probe(batch: int = 1) -> dict:
    """Read bandwidth (GB/s) of cuBLAS through F.linear on the Llama-3-8B matrices at `batch` rows."""
    shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
              "head": (128256, 4096)}
    out = {}
    for name, (n, k) in shapes.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(3)]  # over the L2
        x = torch.randn(batch, k, device="cuda", dtype=torch.bfloat16)
        seconds = graph_time_s(lambda: [F.linear(x, w) for w in ws], n=10)
        out[name] = round(n * k * 2 * 30 / seconds / 1e9)
        del ws
    return out


def print_cuda_table(name: str, shape: dict) -> None:
    print(f"\n{name} ({shape['layers']} layers, hidden {shape['hidden']}): tok/s through the runtime API "
          f"(host loop, token to host each step) | % of floor | x generate; graph-only = device step alone")
    print(f"{'batch':>5} {'generate':>9} | {'whole':>8} {'%floor':>6} {'xgen':>6} {'graph':>8} {'%floor':>6} | "
          f"{'2-stage':>8} {'%floor':>6} {'xgen':>6} {'graph':>8} {'%floor':>6} | {'2st/whole':>9} {'same':>5}")
    for r in shape["rows"]:
        w, s = r["whole"], r["2-stage"]
        print(f"{r['batch']:>5} {r['transformers_tokens_per_s']:>9.1f} | {w['tokens_per_s']:>8.1f} "
              f"{w['pct_of_floor']:>5.1f}% {w['ratio_to_generate']:>5.1f}x {w['graph_only_tokens_per_s']:>8.1f} "
              f"{w['graph_only_pct_of_floor']:>5.1f}% | {s['tokens_per_s']:>8.1f} {s['pct_of_floor']:>5.1f}% "
              f"{s['ratio_to_generate']:>5.1f}x {s['graph_only_tokens_per_s']:>8.1f} {s['graph_only_pct_of_floor']:>5.1f}% | "
              f"{s['tokens_per_s'] / w['tokens_per_s']:>9.2f} {w['same_as_transformers']['token_prefix']:>5.0%}")
    floor = shape["rows"][0]["whole"]
    print(f"  floor at batch {shape['rows'][0]['batch']}: {floor['floor_tokens_per_s']} tok/s "
          f"({floor['bytes_read_per_step'] / 1e9:.2f} GB read per step; "
          f"{floor['floor_all_weights_tokens_per_s']} tok/s counting every weight byte)")
    if "kernels_batch1" in shape:
        print("  kernels of one batch-1 step (whole):",
              ", ".join(f"{k} {v['us_per_step']:.0f}us/{v['kernels_per_step']:.0f}" for k, v in
                        shape["kernels_batch1"].items()))



if __name__ == "__main__":
    main()

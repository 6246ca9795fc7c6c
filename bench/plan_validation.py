"""Validate the planner's cost model on this machine: predicted vs measured decode step times.

Measures this machine's read bandwidth and matmul rate the way providers do (node/profile.py),
turns them into a ProviderSpec, then times decode steps of real shards of the default model
(node/runtime.py ShardRuntime, float32 on the CPU) of different sizes and roles at batch 1 and 8,
and prints predicted / measured (best of the timed steps) per shard, twice: from the figures a
provider claims (its profile: "before") and from the coordinator's admission probe, two middle
layers timed at the same batch and turned into figures by inverting the cost model
(coordinator/admission.py, coordinator/measurements.py: "after", what the planner now plans from). Memory: the planner's bytes for the shard (weights +
KV cache for max_sessions × max_seq_len) against what the runtime allocates.

    .venv/bin/python bench/plan_validation.py [--device cuda] [--shape llama3-8b] [--steps 24]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from coordinator.admission import OVERHEAD_PROBE_LAYERS, PROBE_LAYERS, PROBE_STEPS, PROBE_TOKENS  # noqa: E402
from coordinator.measurements import Measurements, Observation  # noqa: E402
from coordinator.planner import ModelShape, ProviderSpec, stage_memory_bytes, stage_time_s  # noqa: E402
from node.config import ModelConfig  # noqa: E402
from node.models import default_model_dir  # noqa: E402
from node.probe import WARM_UP_STEPS, ProbeWork  # noqa: E402
from node.profile import matmul_tflops, read_bandwidth_gb_per_s, serving_dtype  # noqa: E402
from node.runtime import ShardRuntime  # noqa: E402
from node.shard import Shard, tensor_names  # noqa: E402
from wire.messages import Probe, ProbeRun, dtype_name  # noqa: E402

SHARDS = [(0, 5), (5, 15), (10, 30), (0, 30)]  # first 5, middle 10, last 20, whole model
# --shape llama3-8b: random weights in Llama-3-8B's shapes (a GPU check, no checkpoint needed)
LLAMA3_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False,
}
LLAMA3_8B_SHARDS = {"cuda": [(0, 4), (4, 12), (16, 32), (0, 32)],
                    "cpu": [(0, 1), (1, 3), (30, 32)]}  # 23 GB of shared RAM here: fp32 shards of ~4 GB
BATCHES = (1, 8)
PROMPT_TOKENS = 128
WARMUP_STEPS = 8


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_tensors(config: ModelConfig, shard: Shard, dtype, device) -> dict[str, torch.Tensor]:
    """Checkpoint-named random tensors for `shard` (timing only: the values do not matter)."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    shapes = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
              "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
              "self_attn.o_proj.weight": (h, q), "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
              "mlp.down_proj.weight": (h, i), "model.embed_tokens.weight": (v, h), "model.norm.weight": (h,),
              "lm_head.weight": (v, h)}
    out = {}
    for name in tensor_names(config, shard):
        key = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
        out[name] = (torch.randn(shapes[key], device=device, dtype=dtype) * 0.02)
    return out


def time_decode(runtime: ShardRuntime, shard: Shard, batch: int, hidden: int, steps: int, device) -> list[float]:
    """Seconds per decode step of `batch` sessions, after a prefill of PROMPT_TOKENS each."""
    gen = torch.Generator().manual_seed(0)
    sessions = [f"s{i}" for i in range(batch)]
    for sid in sessions:
        if shard.is_first:
            runtime.prefill(sid, torch.randint(0, 1000, (PROMPT_TOKENS,), generator=gen))
        else:
            runtime.prefill(sid, torch.randn(PROMPT_TOKENS, hidden, generator=gen))
    times = []
    for step in range(WARMUP_STEPS + steps):
        if shard.is_first:
            inputs = [(sid, torch.randint(0, 1000, (1,), generator=gen)) for sid in sessions]
        else:
            inputs = [(sid, torch.randn(1, hidden, generator=gen)) for sid in sessions]
        sync(device)
        t0 = time.perf_counter()
        runtime.decode(inputs)
        sync(device)
        if step >= WARMUP_STEPS:
            times.append(time.perf_counter() - t0)
    return times


def probed_spec(me: ProviderSpec, shape: ModelShape, config: ModelConfig, model_dir, batch: int, dtype,
                device) -> ProviderSpec:
    """`me` as the planner now sees it: its speed and fixed time a step from the admission's two probes
    at `batch` (best of 3 runs each, timed here in-process: the round trip a real probe takes off is
    not there)."""
    start = max(1, shape.n_layers // 2 - PROBE_LAYERS // 2)
    end = min(shape.n_layers - 1, start + PROBE_LAYERS)
    steps = max(PROBE_STEPS)
    context = PROBE_TOKENS + WARM_UP_STEPS + (steps + 1) // 2
    timed = [Observation(n - start, False, False, batch, context,
                         probe_seconds(shape, config, model_dir, start, n, batch, steps, dtype, device))
             for n in (end, start + OVERHEAD_PROBE_LAYERS)]
    store = Measurements(shape, batch)
    store.record_probe(me, *timed)
    return store.spec_for(me)


def probe_seconds(shape: ModelShape, config: ModelConfig, model_dir, start: int, end: int, batch: int, steps: int,
                  dtype, device) -> float:
    """A step of the probe of layers [start, end) at `batch`: the best of 3 runs of `steps` steps."""
    probe = Probe("default", start, end, shape.n_layers, batch, PROBE_TOKENS, 1, dtype_name(dtype))
    best = float("inf")
    for run in range(3):
        runtime = None
        if model_dir is None:
            shard = Shard("default", start, end, shape.n_layers)
            runtime = ShardRuntime.from_tensors(config, shard, random_tensors(config, shard, dtype, device), device=device,
                                                dtype=dtype, max_sessions=batch, max_seq_len=PROBE_TOKENS + 128)
        work = ProbeWork(model_dir, probe, device, runtime=runtime)
        sync(device)
        t0 = time.perf_counter()
        work.run(ProbeRun(2 + run, steps))
        sync(device)
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--shape", default="default", choices=["default", "llama3-8b"])
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = serving_dtype(device.type)
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    if args.shape == "default":
        model_dir, shards = default_model_dir(), SHARDS
        raw = json.loads((model_dir / "config.json").read_text())
        name = "SmolLM2-135M"
    else:
        shards = LLAMA3_8B_SHARDS["cpu" if device.type == "cpu" else "cuda"]
        model_dir, raw, name = None, LLAMA3_8B_CONFIG, "Llama-3-8B (random weights)"
    config = ModelConfig.from_dict(raw)
    shape = ModelShape.from_hf_config(raw, name=name, bytes_per_param=dtype_bytes, activation_bytes=dtype_bytes)
    bandwidth = read_bandwidth_gb_per_s(device, dtype)
    tflops = matmul_tflops(device, dtype)
    me = ProviderSpec("this-machine", memory_bytes=2**40, mem_bandwidth_gb_per_s=bandwidth, matmul_tflops=tflops)
    max_seq_len = PROMPT_TOKENS + WARMUP_STEPS + args.steps + 8
    mean_context = PROMPT_TOKENS + WARMUP_STEPS + args.steps // 2
    print(f"device {device} {dtype}, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print(f"measured as providers do: read bandwidth {bandwidth:.1f} GB/s, matmul {tflops:.3f} TFLOPS; "
          f"{shape.name} {shape.n_layers} layers, {shape.layer_weight_bytes / 1e6:.1f} MB per layer")
    probed = {batch: probed_spec(me, shape, config, model_dir, batch, dtype, device) for batch in BATCHES}
    for batch, spec in probed.items():
        print(f"probe at batch {batch}: {spec.mem_bandwidth_gb_per_s:.2f} GB/s, {spec.matmul_tflops:.4f} TFLOPS "
              f"effective, fixed {spec.step_overhead_ms:.3f} ms a step")
    print(f"{'shard':<9}{'role':<7}{'batch':>6}{'pred ms':>9}{'meas ms':>9}{'p/m':>6}{'probe ms':>9}{'p/m':>6}"
          f"{'pred MB':>9}{'alloc MB':>9}{'p/m':>7}")
    rows = []
    for start, end in shards:
        shard = Shard("default", start, end, shape.n_layers)
        first, last = shard.is_first, shard.is_last
        role = "whole" if first and last else "first" if first else "last" if last else "middle"
        for batch in BATCHES:
            if model_dir is not None:
                runtime = ShardRuntime(model_dir, shard, device=device, dtype=dtype, max_sessions=batch,
                                       max_seq_len=max_seq_len)
            else:
                tensors = random_tensors(config, shard, dtype, device)
                runtime = ShardRuntime.from_tensors(config, shard, tensors, device=device, dtype=dtype,
                                                    max_sessions=batch, max_seq_len=max_seq_len)
                del tensors
            times = time_decode(runtime, shard, batch, shape.hidden, args.steps, device)
            measured = min(times)  # best of N, as node/profile.py measures: others share this machine
            predicted = stage_time_s(me, shape, end - start, first, last, batch, mean_context)
            from_probe = stage_time_s(probed[batch], shape, end - start, first, last, batch, mean_context)
            allocated = runtime.model.parameter_bytes() + runtime.cache.k.nbytes + runtime.cache.v.nbytes
            planned = stage_memory_bytes(shape, end - start, first, last, batch, runtime.max_seq_len)
            rows.append({"start": start, "end": end, "role": role, "batch": batch, "predicted_ms": predicted * 1e3,
                         "measured_min_ms": measured * 1e3, "measured_median_ms": statistics.median(times) * 1e3,
                         "ratio_predicted_over_measured": predicted / measured,
                         "probe_predicted_ms": from_probe * 1e3, "ratio_probe_predicted_over_measured": from_probe / measured,
                         "planned_bytes": planned,
                         "allocated_bytes": allocated, "memory_ratio": planned / allocated,
                         "context_tokens": mean_context})
            label = f"[{start},{end})"
            print(f"{label:<9}{role:<7}{batch:>6}{predicted * 1e3:>9.2f}"
                  f"{measured * 1e3:>9.2f}{predicted / measured:>6.2f}{from_probe * 1e3:>9.2f}{from_probe / measured:>6.2f}"
                  f"{planned / 1e6:>9.1f}{allocated / 1e6:>9.1f}{planned / allocated:>7.3f}", flush=True)
            del runtime
            if device.type == "cuda":
                torch.cuda.empty_cache()
    ratios = [r["ratio_predicted_over_measured"] for r in rows]
    summary = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    print(f"predicted/measured step time, from the claimed profile: median {summary['median']:.2f}, "
          f"range {summary['min']:.2f}..{summary['max']:.2f}")
    # the probe times a whole run (a mean step, contention included), so its like is the median step;
    # the profile's figures are best-of-N, like the best step
    for key, predicted, measured in (("claim_vs_median", "predicted_ms", "measured_median_ms"),
                                     ("probe_vs_best", "probe_predicted_ms", "measured_min_ms"),
                                     ("probe_vs_median", "probe_predicted_ms", "measured_median_ms")):
        ratios = [r[predicted] / r[measured] for r in rows]
        summary[key] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                        "within_25_percent": sum(0.75 <= x <= 1.25 for x in ratios), "of": len(ratios)}
        print(f"predicted/measured step time, {key.replace('_', ' ')} step: median {summary[key]['median']:.2f}, "
              f"range {summary[key]['min']:.2f}..{summary[key]['max']:.2f}, "
              f"{summary[key]['within_25_percent']} of {len(ratios)} within ±25%")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = {"device": str(device), "device_name": device_name, "shape": args.shape, "dtype": str(dtype), "torch_threads": torch.get_num_threads(),
           "load_average_1min": os.getloadavg()[0], "measured_read_bandwidth_gb_per_s": bandwidth,
           "measured_matmul_tflops": tflops,
           "probed": {b: {"mem_bandwidth_gb_per_s": p.mem_bandwidth_gb_per_s, "matmul_tflops": p.matmul_tflops,
                          "step_overhead_ms": p.step_overhead_ms}
                      for b, p in probed.items()},
           "model": shape.name, "prompt_tokens": PROMPT_TOKENS,
           "steps": args.steps, "rows": rows, "summary": summary}
    # one JSON for every run: keyed by device and shape, other runs' results kept
    key = f"{device.type}/{args.shape}"
    path = Path(__file__).with_suffix(".json") if device.type == "cpu" else Path(os.environ.get("OUT", ".")) / "plan_validation.json"
    runs = json.loads(path.read_text()) if path.is_file() else {}
    runs[key] = out
    path.write_text(json.dumps(runs, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

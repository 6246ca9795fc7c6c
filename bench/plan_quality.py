"""Planner quality: predicted tokens/s of the planner vs exhaustive search vs exo-style baselines.

Pools are built from published device figures (peak memory bandwidth and dense half-precision
matmul rate, not measurements), for Llama-3 8B and 70B shapes in bf16, over three kinds of link.
Every figure is the planner's own cost model (coordinator/planner/cost.py); the model itself is
checked against this machine in bench/plan_validation.py.

    .venv/bin/python bench/plan_quality.py            # prints a table, writes bench/plan_quality.json
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.planner import (LLAMA3_8B, LLAMA3_70B, InsufficientMemoryError, Link, Links, Objective,  # noqa: E402
                                 ProviderSpec, Workload, equal_split, memory_proportional, plan)

GB = 10**9


@dataclass(frozen=True)
class Device:
    name: str
    memory_gb: float  # what the planner may fill (see USABLE below)
    bandwidth_gb_per_s: float
    tflops: float  # dense bf16/fp16 matmul with fp32 accumulate
    power_w: float
    price_usd: float


# Published figures. GPUs: 90% of VRAM usable; Apple: the default GPU wired limit (75% of 192 GB,
# 2/3 of 16 GB); CPU host: 120 of 128 GB. Prices: street/list prices for one device (the 3090 used).
DEVICES = {
    "RTX4090": Device("RTX4090", 24 * 0.9, 1008, 165, 450, 1_800),
    "RTX3090": Device("RTX3090", 24 * 0.9, 936, 71, 350, 800),
    "A100": Device("A100", 80 * 0.9, 2039, 312, 400, 15_000),
    "H100": Device("H100", 80 * 0.9, 3350, 989, 700, 30_000),
    "M2Ultra": Device("M2Ultra", 144, 800, 27.2, 200, 5_600),
    "M1": Device("M1", 10.7, 68.25, 2.6, 39, 700),
    "CPU": Device("CPU", 120, 83, 1.5, 200, 1_500),  # 16-core desktop, 2-channel DDR5-5200
}
# references only: 95% of HBM, as vLLM's gpu_memory_utilization lets 70B bf16 run on 2x H100
REFERENCE_DEVICES = {"H100": Device("H100", 80 * 0.95, 3350, 989, 700, 30_000), "RTX4090": DEVICES["RTX4090"]}
AMORTISE_YEARS = 3
ELECTRICITY_USD_PER_KWH = 0.15
LINKS = {  # one way latency, as between any two peers and the coordinator
    "1Gbps": Link(latency_ms=10.0, bandwidth_gbps=1.0),  # home broadband across a region
    "10Gbps": Link(latency_ms=0.5, bandwidth_gbps=10.0),  # LAN / campus
    "datacentre": Link(latency_ms=0.01, bandwidth_gbps=100.0),  # InfiniBand / 100 GbE in a rack
}
POOLS = {
    "home6": ["RTX4090", "RTX4090", "RTX3090", "M2Ultra", "M1", "CPU"],
    "dc5": ["H100", "A100", "A100", "RTX4090", "RTX3090"],
    "consumer6": ["RTX4090", "RTX4090", "RTX3090", "RTX3090", "M1", "CPU"],
    "mixed12": None,  # 12 random devices (seed 0): local search only
}
EXACT_MAX = 6
WORKLOADS = {Objective.LATENCY: Workload(batch=1, context_tokens=4096),
             Objective.THROUGHPUT: Workload(batch=8, context_tokens=4096)}
# Literature, for scale (vLLM community decode benchmarks at batch 16 on rented GPUs; 4090: a
# bandwidth-bound single-stream 4-bit estimate, electricity only).
LITERATURE = [
    {"setup": "Llama-3.1-8B fp16, 1x H100, vLLM batch 16", "tokens_per_s": 5500, "usd_per_hour": 2.49,
     "usd_per_million_tokens": 0.13, "source": "https://gpuadvisor.com/cost-to-serve-1m-tokens"},
    {"setup": "Llama-3.1-70B fp16, 2x H100 TP, vLLM batch 16", "tokens_per_s": 2200, "usd_per_hour": 4.98,
     "usd_per_million_tokens": 0.63, "source": "https://gpuadvisor.com/cost-to-serve-1m-tokens"},
    {"setup": "Llama-3.1-8B 4-bit, 1x RTX 4090, batch 1, electricity only", "tokens_per_s": 201.6,
     "usd_per_million_tokens": 0.0445 * 0.73, "note": "CAD 0.0445 at CAD 0.0718/kWh, converted at 0.73",
     "source": "https://d-central.tech/self-hosted-ai-inference-cost/"},
]


def usd_per_hour(device: Device) -> float:
    return device.price_usd / (AMORTISE_YEARS * 8760) + device.power_w / 1000 * ELECTRICITY_USD_PER_KWH


def build_pool(names: list[str], devices: dict[str, Device] = DEVICES) -> tuple[list[ProviderSpec], dict[str, Device]]:
    providers, kind = [], {}
    for i, name in enumerate(names):
        d = devices[name]
        peer = f"{name}-{i}"
        providers.append(ProviderSpec(peer, int(d.memory_gb * GB), d.bandwidth_gb_per_s, d.tflops))
        kind[peer] = d
    return providers, kind


def plan_usd_per_million(p, kind: dict[str, Device]) -> float:
    """Hourly cost of the providers the plan uses (idle ones serve elsewhere) over its output."""
    hourly = sum(usd_per_hour(kind[s.peer_id]) for pipe in p.pipelines for s in pipe.stages)
    return hourly / (p.tokens_per_s * 3600) * 1e6


def row(pool_name, names, model, link_name, objective) -> dict:
    providers, kind = build_pool(names)
    links, workload = Links(LINKS[link_name]), WORKLOADS[objective]
    out = {"pool": pool_name, "model": model.name, "link": link_name, "objective": objective.value,
           "providers": len(providers), "batch": workload.batch, "context_tokens": workload.context_tokens}
    try:
        t0 = time.perf_counter()
        ours = plan(providers, model, workload, links, objective, exact_max_providers=EXACT_MAX)
        out["plan_s"] = round(time.perf_counter() - t0, 2)
    except InsufficientMemoryError as exc:
        out["error"] = str(exc)
        return out
    local = plan(providers, model, workload, links, objective, exact_max_providers=0)
    out["planner_tokens_per_s"] = ours.tokens_per_s
    out["planner_exact"] = len(providers) <= EXACT_MAX
    out["local_search_tokens_per_s"] = local.tokens_per_s
    out["exhaustive_tokens_per_s"] = ours.tokens_per_s if len(providers) <= EXACT_MAX else None
    out["latency_ms"] = ours.latency_s * 1e3
    out["pipelines"] = [[f"{s.peer_id}:{s.n_layers}" for s in pipe.stages] for pipe in ours.pipelines]
    out["microbatches"] = [c.microbatches for c in ours.costs]
    out["usd_per_million_tokens"] = plan_usd_per_million(ours, kind)
    for name, baseline in (("memory_proportional", memory_proportional), ("equal_split", equal_split)):
        b = baseline(providers, model, workload, links, objective)
        out[f"{name}_tokens_per_s"] = b.tokens_per_s
        out[f"{name}_fits_memory"] = b.fits_memory
        out[f"{name}_usd_per_million_tokens"] = plan_usd_per_million(b, kind)
    return out


def reference_rows() -> list[dict]:
    """Single-device setups of the literature, under this cost model (bf16, datacentre links)."""
    rows = []
    for names, model, batch in ((["H100"], LLAMA3_8B, 16), (["H100", "H100"], LLAMA3_70B, 16),
                                (["RTX4090"], LLAMA3_8B, 1)):
        providers, kind = build_pool(names, REFERENCE_DEVICES)
        workload = Workload(batch=batch, context_tokens=1024)
        p = plan(providers, model, workload, Links(LINKS["datacentre"]), Objective.THROUGHPUT)
        rows.append({"setup": f"{model.name} bf16, {len(names)}x {names[0]}, batch {batch}, context 1024",
                     "tokens_per_s": p.tokens_per_s, "usd_per_million_tokens": plan_usd_per_million(p, kind),
                     "pipelines": [[f"{s.peer_id}:{s.n_layers}" for s in pipe.stages] for pipe in p.pipelines]})
    return rows


def fmt(x, fits=True) -> str:
    if x is None:
        return "-"
    return f"{x:,.1f}" + ("" if fits else "*")


def main() -> None:
    rng = random.Random(0)
    POOLS["mixed12"] = [rng.choice(sorted(DEVICES)) for _ in range(12)]
    rows = []
    header = (f"{'pool':<10}{'model':<12}{'link':<11}{'objective':<11}{'planner':>10}{'local':>10}{'exhaust':>10}"
              f"{'memprop':>10}{'equal':>10}{'x memprop':>10}{'$/Mtok':>9}{'ms/tok':>9}")
    print("predicted tokens/s (* = baseline exceeds a provider's memory)")
    print(header)
    for pool_name, names in POOLS.items():
        for model in (LLAMA3_8B, LLAMA3_70B):
            for link_name in LINKS:
                for objective in (Objective.LATENCY, Objective.THROUGHPUT):
                    r = row(pool_name, names, model, link_name, objective)
                    rows.append(r)
                    if "error" in r:
                        print(f"{pool_name:<10}{model.name:<12}{link_name:<11}{objective.value:<11}  cannot hold")
                        continue
                    gain = r["planner_tokens_per_s"] / r["memory_proportional_tokens_per_s"]
                    print(f"{pool_name:<10}{model.name:<12}{link_name:<11}{objective.value:<11}"
                          f"{fmt(r['planner_tokens_per_s']):>10}{fmt(r['local_search_tokens_per_s']):>10}"
                          f"{fmt(r['exhaustive_tokens_per_s']):>10}"
                          f"{fmt(r['memory_proportional_tokens_per_s'], r['memory_proportional_fits_memory']):>10}"
                          f"{fmt(r['equal_split_tokens_per_s'], r['equal_split_fits_memory']):>10}"
                          f"{gain:>10.2f}{r['usd_per_million_tokens']:>9.3f}{r['latency_ms']:>9.1f}", flush=True)
    refs = reference_rows()
    print("\nreference setups under this cost model vs the literature")
    for r in refs:
        print(f"  model: {r['setup']:<52} {r['tokens_per_s']:>9,.0f} tok/s  ${r['usd_per_million_tokens']:.3f}/M")
    for r in LITERATURE:
        print(f"  lit.:  {r['setup']:<52} {r['tokens_per_s']:>9,.0f} tok/s  ${r['usd_per_million_tokens']:.3f}/M")
    feasible = [r for r in rows if "error" not in r]
    exact_rows = [r for r in feasible if r["exhaustive_tokens_per_s"]]
    summary = {
        "rows": len(rows),
        "geomean_gain_vs_memory_proportional": _geomean(
            [r["planner_tokens_per_s"] / r["memory_proportional_tokens_per_s"] for r in feasible]),
        "geomean_gain_vs_equal_split": _geomean(
            [r["planner_tokens_per_s"] / r["equal_split_tokens_per_s"] for r in feasible]),
        "local_search_over_exhaustive_min": min(
            r["local_search_tokens_per_s"] / r["exhaustive_tokens_per_s"] for r in exact_rows),
        "local_search_equals_exhaustive": sum(
            abs(r["local_search_tokens_per_s"] / r["exhaustive_tokens_per_s"] - 1) < 1e-6 for r in exact_rows),
        "exhaustive_rows": len(exact_rows),
    }
    print(f"\nplanner / memory-proportional ring: geomean x{summary['geomean_gain_vs_memory_proportional']:.2f}; "
          f"/ equal split: x{summary['geomean_gain_vs_equal_split']:.2f} (baselines as predicted, even where they "
          f"would not fit); local search = exhaustive in {summary['local_search_equals_exhaustive']}/"
          f"{summary['exhaustive_rows']} rows, worst {summary['local_search_over_exhaustive_min']:.3f}")
    assumptions = {
        "devices": {k: vars(v) for k, v in DEVICES.items()},
        "usd_per_hour": {k: usd_per_hour(v) for k, v in DEVICES.items()},
        "amortise_years": AMORTISE_YEARS, "utilisation": 1.0, "electricity_usd_per_kwh": ELECTRICITY_USD_PER_KWH,
        "links": {k: vars(v) for k, v in LINKS.items()},
        "weights": "bf16", "workloads": {k.value: vars(v) for k, v in WORKLOADS.items()},
        "pools": POOLS,
    }
    out = {"assumptions": assumptions, "rows": rows, "reference_model": refs, "literature": LITERATURE,
           "summary": summary}
    path = Path(__file__).with_suffix(".json")
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {path}")


def _geomean(xs: list[float]) -> float:
    import math
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


if __name__ == "__main__":
    main()

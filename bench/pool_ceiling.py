"""The pool's host-side ceiling: a real pool (`coordinator serve` + one `provider join`, libp2p, the
HTTP API, streaming `openai` clients) on a tiny model whose compute is negligible, so tokens/s and
time to first token measure what the pool adds around an engine: the coordinator's loop, the
hops, detokenizing, streaming, the delivery records. On an H200 the 8B pool gave 100 / 270 / 349
tok/s to 1 / 8 / 32 clients against 210 / 1,630 / 6,185 in process (bench/gpu_pool_load.json):
that gap is this ceiling, and it can be measured here, without a GPU.

    python bench/pool_ceiling.py [--clients 1,8,32] [--tokens 64] [--rounds 3] [--baseline /path/to/checkout]

With --baseline the same pool running another checkout's code is measured too, alternating with
this one `--repeats` times (the 2 cores are shared: alternation spreads the noise over both).
The tiny model (2 layers, hidden 64, the default model's tokenizer) is written on first use.
Writes bench/pool_ceiling.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.api_load import run_level  # noqa: E402
from bench.gpu_pool import write_model  # noqa: E402
from coordinator.local_pool import LocalPool  # noqa: E402
from node.models import default_model_dir, model_id_of  # noqa: E402

# 2 layers of hidden 64: the compute of a step is negligible beside what the pool does around it
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
            rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=2048)


def run_pool(model_dir: Path, levels: list[int], tokens: int, rounds: int, code_dir: Path | None) -> list[dict]:
    pool = LocalPool(Path(tempfile.mkdtemp(prefix="meshpool-ceiling-")), model_dir, context_tokens=256,
                     max_sessions=max(levels), code_dir=code_dir,
                     coordinator_args=["--rate-limit-rps", "100000", "--audit-probability-ppm", "1"])
    try:
        pool.start_coordinator()
        pool.add_provider("p0")
        pool.wait_for_pipelines(1)
        key = pool.add_consumer("bench", 10**15)
        model = model_id_of(model_dir)
        run_level(pool, model, key, 1, 4, 1)  # warm-up
        return [run_level(pool, model, key, n, tokens, rounds) for n in levels]
    finally:
        pool.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--baseline", type=Path, help="a checkout (e.g. of main) measured too, alternating")
    p.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "meshpool-tiny-model")
    p.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = p.parse_args()
    levels = [int(x) for x in args.clients.split(",")]
    if not (args.model_dir / "config.json").exists():
        write_model(args.model_dir, default_model_dir(), TINY["num_hidden_layers"], "cpu", TINY)
    codes = {"this": None, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    runs: dict[str, list[list[dict]]] = {name: [] for name in codes}
    for _ in range(args.repeats):
        for name, code in codes.items():
            runs[name].append(run_pool(args.model_dir, levels, args.tokens, args.rounds, code))
    out = {"levels": levels, "tokens": args.tokens, "rounds": args.rounds, "repeats": args.repeats,
           "baseline": str(args.baseline or ""), "runs": runs, "median": {}}
    print(f"{'code':9} {'clients':>7} {'tok/s':>8} {'ttft p50 ms':>12} {'ttft p99 ms':>12}   (median of {args.repeats})")
    for name in codes:
        out["median"][name] = []
        for k, n in enumerate(levels):
            rows = [run[k] for run in runs[name]]
            row = {"clients": n, "errors": sum(r["errors"] for r in rows),
                   **{f: statistics.median(r[f] for r in rows) for f in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms")}}
            out["median"][name].append(row)
            print(f"{name:9} {n:>7} {row['tokens_per_s']:>8.1f} {row['ttft_p50_ms']:>12.1f} {row['ttft_p99_ms']:>12.1f}")
    if args.baseline:
        ratios = [round(a["tokens_per_s"] / b["tokens_per_s"], 2) for a, b in zip(out["median"]["this"],
                                                                                  out["median"]["baseline"])]
        out["ratio_vs_baseline"] = dict(zip(map(str, levels), ratios))
        print("tokens/s this / baseline:", out["ratio_vs_baseline"])
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""Load on the consumer API of a local pool: 1, 8 and 32 concurrent streaming clients.

    python bench/api_load.py [--clients 1,8,32] [--tokens 32] [--rounds 2]

The pool is `coordinator serve` plus two `provider join` processes whose memory caps force two
stages (one compute thread each, as in the tests), 32 KV slots a stage. Each client is the
official `openai` client streaming a greedy completion of `--tokens` tokens, `--rounds` requests
in a row. Figures: aggregate tokens/s (all tokens / wall time of the level), p50 and p99 time to
first token (request sent -> first text chunk). The ratio is against 1 client in the same run.
Writes bench/api_load.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import openai  # noqa: E402

from coordinator.local_pool import LocalPool  # noqa: E402

CAP_MB = 600
PROMPTS = ["Once upon a time, in a small village,", "The three primary colors are", "def fibonacci(n):",
           "The history of the printing press begins"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_level(pool: LocalPool, model: str, key: str, clients: int, tokens: int, rounds: int) -> dict:
    ttft_s: list[float] = []
    counts: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(i: int):
        oc = openai.OpenAI(base_url=pool.api + "/v1", api_key=key, max_retries=0, timeout=600)
        for r in range(rounds):
            start = time.perf_counter()
            first = None
            try:
                stream = oc.completions.create(model=model, prompt=PROMPTS[(i + r) % len(PROMPTS)], max_tokens=tokens,
                                               temperature=0, stream=True, stream_options={"include_usage": True})
                n = 0
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].text and first is None:
                        first = time.perf_counter() - start
                    if chunk.usage:
                        n = chunk.usage.completion_tokens
            except openai.APIError as exc:
                with lock:
                    errors.append(str(exc))
                continue
            with lock:
                ttft_s.append(first if first is not None else time.perf_counter() - start)
                counts.append(n)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall_s = time.perf_counter() - start
    return {"clients": clients, "requests": len(counts), "errors": len(errors), "tokens": sum(counts),
            "wall_s": round(wall_s, 2), "tokens_per_s": round(sum(counts) / wall_s, 1),
            "ttft_p50_ms": round(1000 * statistics.median(ttft_s), 1) if ttft_s else None,
            "ttft_p99_ms": round(1000 * percentile(ttft_s, 0.99), 1) if ttft_s else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    levels = [int(x) for x in args.clients.split(",")]

    pool = LocalPool(Path(tempfile.mkdtemp(prefix="meshpool-api-load-")), context_tokens=256,
                     max_sessions=max(levels), coordinator_args=["--rate-limit-rps", "1000"])
    try:
        pool.start_coordinator()
        for i in range(2):
            pool.add_provider(f"provider{i}", max_memory_mb=CAP_MB)
        state = pool.wait_for_pipelines(1)
        key = pool.add_consumer("bench", 10**15)
        model = pool.get("/v1/models")["data"][0]["id"]
        stages = [[(s["start"], s["end"]) for s in p["stages"]] for p in state["pipelines"]]
        run_level(pool, model, key, 1, 4, 1)  # warm-up
        rows = [run_level(pool, model, key, n, args.tokens, args.rounds) for n in levels]
        oc = openai.OpenAI(base_url=pool.api + "/v1", api_key=key, max_retries=0)
        account = oc.get("/account", cast_to=object)
        account = {k: account[k] for k in ("balance_units", "held_units", "spent_units", "requests")}
    finally:
        pool.stop()

    base = rows[0]["tokens_per_s"]
    print(f"pipelines (layer ranges): {stages}; {args.tokens} tokens a request, {args.rounds} requests a client")
    print(f"{'clients':>7} {'requests':>8} {'errors':>6} {'tokens/s':>9} {'vs 1':>6} {'TTFT p50 ms':>11} "
          f"{'TTFT p99 ms':>11}")
    for row in rows:
        row["ratio_vs_first"] = round(row["tokens_per_s"] / base, 2) if base else None
        print(f"{row['clients']:>7} {row['requests']:>8} {row['errors']:>6} {row['tokens_per_s']:>9.1f} "
              f"{row['ratio_vs_first']:>5.2f}x {row['ttft_p50_ms']:>11.1f} {row['ttft_p99_ms']:>11.1f}")
    path = Path(__file__).with_suffix(".json")
    path.write_text(json.dumps({"pipelines": stages, "tokens_per_request": args.tokens, "rounds": args.rounds,
                                "rows": rows, "account": account}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

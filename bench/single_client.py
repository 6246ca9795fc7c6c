"""One client on the real pool against the fastest single-process decode, interleaved in one run.

    python bench/single_client.py [--stages 2,3] [--tokens 64] [--rounds 5] [--baseline DIR]

Pools: `coordinator serve` plus N `provider join` processes whose memory caps force N stages (one
compute thread each, as LocalPool runs them), for each N in --stages, running this checkout's code
and, with --baseline, another checkout's (e.g. `git archive main | tar -x -C DIR`). All of them stay
up together, and so do bench/cpu_decode.py's single-process contenders (each a process of its own:
the shard runtime with every layer on one thread, `transformers` 4.33 from its own venv on one
thread with and without torch's huge pages). Each round asks every pool for one streamed greedy
completion of --tokens tokens (the official `openai` client) and every contender for the same
number of decode steps, one after the other, so every figure meets the same load on this shared
2-core machine; figures are medians over the rounds.

Per pool: tokens/s as the client sees it (request sent -> last token: prefill and HTTP included),
its decode rate (first -> last token), and where a decode token's time goes, from the coordinator's
/metrics read at the first and the last token of each request: the pipeline step as the coordinator sees it (send -> result),
the stages' own compute in it, the hops (the step minus that compute, over stages + 1 hops: the
figure "per hop"), and the rest of the token's period (driver, results in, between steps). The
ratio that must hold: the 3-stage pool's decode rate >= 80% of the fastest single-process one (of
the medians, and the median of the ratios round by round).
Writes bench/single_client.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import openai  # noqa: E402
import torch  # noqa: E402

from bench.cpu_decode import Worker, ensure_ref_venv  # noqa: E402
from coordinator.local_pool import LocalPool  # noqa: E402
from node.models import default_model_dir  # noqa: E402

CAPS_MB = {1: None, 2: 600, 3: 300}  # memory caps that make the planner use exactly that many stages
PROMPT = "Once upon a time, in a small village,"
ROOT = Path(__file__).resolve().parent.parent


def metric_sums(api: str) -> dict[str, float]:
    """The coordinator's step, stage and hop histograms' _sum and _count, by series."""
    text = urllib.request.urlopen(api + "/metrics", timeout=30).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r'(meshpool_(?:pipeline_step|stage_step|hop)_seconds_(?:sum|count))(\{[^}]*\})? (\S+)', line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def breakdown(before: dict, after: dict, n_stages: int) -> dict:
    """Mean ms of a decode step and of its parts over the window between two metric reads."""
    def mean_ms(name: str, labels: str) -> float | None:
        n = after.get(f"{name}_count{labels}", 0) - before.get(f"{name}_count{labels}", 0)
        s = after.get(f"{name}_sum{labels}", 0) - before.get(f"{name}_sum{labels}", 0)
        return 1000 * s / n if n else None

    counts = "meshpool_pipeline_step_seconds_count"

    def count_keys(kind: str) -> list[str]:  # one a pipeline
        return [k for k in after if k.startswith(counts) and f'kind="{kind}"' in k]

    def step_ms(kind: str) -> float | None:  # over every pipeline of the window (a re-plan starts another)
        sums = [k.replace("_count", "_sum", 1) for k in count_keys(kind)]
        n = steps(kind)
        return 1000 * sum(after[k] - before.get(k, 0) for k in sums) / n if n else None

    def steps(kind: str) -> int:
        return int(sum(after[k] - before.get(k, 0) for k in count_keys(kind)))

    step, prefill = step_ms("decode"), step_ms("prefill")
    stages = [mean_ms("meshpool_stage_step_seconds", f'{{stage="{i}"}}') for i in range(n_stages)]
    # stage compute is over every step; a prefill step (prompts, decodes riding along) apart from the decodes
    return {"step_ms": step and round(step, 2), "stage_compute_ms": [s and round(s, 2) for s in stages],
            "hop_ms": (h := mean_ms("meshpool_hop_seconds", "")) and round(h, 3),
            "prefill_step_ms": prefill and round(prefill, 2), "decode_steps": steps("decode"),
            "prefill_steps": steps("prefill"),
            "pipelines": sum(after[k] > before.get(k, 0) for k in count_keys("decode"))}


class PoolUnderTest:
    def __init__(self, name: str, n_stages: int, code_dir: Path | None):
        self.name, self.n_stages = name, n_stages
        self.pool = LocalPool(Path(tempfile.mkdtemp(prefix="meshpool-single-")), context_tokens=512,
                              coordinator_args=["--rate-limit-rps", "1000"], code_dir=code_dir)
        self.pool.start_coordinator()
        for i in range(n_stages):
            self.pool.add_provider(f"p{i}", max_memory_mb=CAPS_MB[n_stages])
        state = self.pool.wait_for(lambda s: s["pipelines"] and len(s["pipelines"][0]["stages"]) == n_stages,
                                   what=f"a {n_stages}-stage pipeline")
        self.ranges = [(s["start"], s["end"]) for s in state["pipelines"][0]["stages"]]
        key = self.pool.add_consumer("bench", 10**15)
        self.model = self.pool.get("/v1/models")["data"][0]["id"]
        self.client = openai.OpenAI(base_url=self.pool.api + "/v1", api_key=key, max_retries=0, timeout=600)
        self.rates: list[float] = []  # tokens/s the client sees, prefill included
        self.decode_rates: list[float] = []  # first -> last token
        self.ttft_ms: list[float] = []
        self.windows: list[dict] = []
        self.text = ""

    def request(self, tokens: int) -> None:
        start = time.perf_counter()
        before = None
        first = last = None
        text, n = [], 0
        for chunk in self.client.completions.create(model=self.model, prompt=PROMPT, max_tokens=tokens, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].text:
                last = time.perf_counter()
                if first is None:  # the prefill's step is in the metrics by now: the window holds decode steps
                    first, before = last, metric_sums(self.pool.api)
                text.append(chunk.choices[0].text)
            if chunk.usage:
                n = chunk.usage.completion_tokens
        self.text = "".join(text)
        self.rates.append(n / (last - start))
        self.decode_rates.append((n - 1) / (last - first))
        self.ttft_ms.append(1000 * (first - start))
        window = breakdown(before, metric_sums(self.pool.api), self.n_stages)
        window["token_period_ms"] = round(1000 * (last - first) / (n - 1), 2)
        window["outside_the_step_ms"] = window["step_ms"] and round(window["token_period_ms"] - window["step_ms"], 2)
        self.windows.append(window)

    def summary(self) -> dict:
        def med(key):
            values = [w[key] for w in self.windows if w[key] is not None]
            return round(statistics.median(values), 3) if values else None
        stages = [round(statistics.median(w["stage_compute_ms"][i] for w in self.windows), 2)
                  for i in range(self.n_stages)]
        period, step, hop, outside = med("token_period_ms"), med("step_ms"), med("hop_ms"), med("outside_the_step_ms")
        return {"pool": self.name, "stages": self.n_stages, "ranges": self.ranges,
                "tokens_per_s": round(statistics.median(self.rates), 2),
                "decode_tokens_per_s": round(statistics.median(self.decode_rates), 2),
                "ttft_ms": round(statistics.median(self.ttft_ms), 1),
                "per_token_ms": {"period": period, "pipeline_step": step, "stage_compute": stages,
                                 "hops": hop and round(hop * (self.n_stages + 1), 2), "per_hop": hop,
                                 "outside_the_step": outside},
                "all": {"tokens_per_s": [round(r, 2) for r in self.rates],
                        "decode_tokens_per_s": [round(r, 2) for r in self.decode_rates]}}

    def stop(self) -> None:
        self.pool.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="a checkout (e.g. of main) whose pools are measured too")
    parser.add_argument("--ref-venv", type=Path, default=Path(tempfile.gettempdir()) / "tf433-venv",
                        help="the venv with transformers 4.33 (made there if absent, as bench/cpu_decode.py does)")
    parser.add_argument("--json", type=Path, default=Path(__file__).with_suffix(".json"))
    args = parser.parse_args()
    model_dir = default_model_dir()
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT)["input_ids"]
    ref_python = ensure_ref_venv(args.ref_venv, torch.__version__.split("+")[0])
    thp = {"THP_MEM_ALLOC_ENABLE": "1"}
    pools, workers = [], []
    try:
        for n in [int(x) for x in args.stages.split(",")]:
            if args.baseline:
                pools.append(PoolUnderTest(f"baseline {n} stages", n, args.baseline.resolve()))
            pools.append(PoolUnderTest(f"this tree {n} stages", n, None))
        # the contenders' code comes from PYTHONPATH: this tree (the runtime) and any tree for transformers
        workers = [Worker("runtime 1 thread", sys.executable, "runtime", model_dir, 1, ROOT),
                   Worker("transformers 4.33 1 thread", ref_python, "transformers", model_dir, 1, ROOT),
                   Worker("transformers 4.33 1 thread THP", ref_python, "transformers", model_dir, 1, ROOT, thp)]
        for p in pools:
            p.request(4)  # warm-up: first streams, first allocations
            p.windows.clear(), p.rates.clear(), p.decode_rates.clear(), p.ttft_ms.clear()
        for w in workers:
            w.run(ids, 4)
            w.rates.clear()
        print(f"{len(pools)} pools and {len(workers)} single-process contenders up; {args.tokens} tokens a round; "
              f"2 shared cores, load average {os.getloadavg()[0]:.1f}")
        for r in range(args.rounds):
            # every other round in reverse order: no contender always follows the same one
            order = pools + workers if r % 2 == 0 else workers[::-1] + pools[::-1]
            for c in order:
                c.request(args.tokens) if isinstance(c, PoolUnderTest) else c.run(ids, args.tokens)
            cells = [f"{p.decode_rates[-1]:.1f}" for p in pools] + [f"{w.rates[-1]:.1f}" for w in workers]
            print(f"round {r + 1}: decode tok/s " + " ".join(cells) + f"  (load {os.getloadavg()[0]:.1f})", flush=True)
    finally:
        for p in pools:
            p.stop()
        for w in workers:
            w.close()
    singles = {w.name: round(statistics.median(w.rates), 2) for w in workers}
    fastest = max((n for n in singles if n.startswith("transformers")), key=singles.get)
    rows = [p.summary() for p in pools]
    print(f"\n{'':<22} {'tok/s':>6} {'decode':>7} {'TTFT ms':>8} {'period':>7} {'step':>6} {'compute':>8} "
          f"{'hops':>5} {'per hop':>7} {'outside':>7} {'vs fastest':>10} {'by round':>8}")
    best = next(w for w in workers if w.name == fastest)
    for row, p in zip(rows, pools):
        t = row["per_token_ms"]
        row["decode_vs_fastest_single_process"] = round(row["decode_tokens_per_s"] / singles[fastest], 3)
        # the same ratio round by round (each pool beside the contender it met the same load with)
        row["decode_vs_fastest_by_round"] = [round(a / b, 3) for a, b in zip(p.decode_rates, best.rates)]
        row["decode_vs_fastest_median_of_rounds"] = round(statistics.median(row["decode_vs_fastest_by_round"]), 3)
        print(f"{row['pool']:<22} {row['tokens_per_s']:>6.1f} {row['decode_tokens_per_s']:>7.1f} {row['ttft_ms']:>8.1f} "
              f"{t['period']:>7.2f} {t['pipeline_step']:>6.2f} {sum(t['stage_compute']):>8.2f} {t['hops']:>5.2f} "
              f"{t['per_hop']:>7.3f} {t['outside_the_step']:>7.2f} {row['decode_vs_fastest_single_process']:>9.2f}x "
              f"{row['decode_vs_fastest_median_of_rounds']:>7.2f}x")
    for name, rate in singles.items():
        print(f"{name:<34} {rate:>6.1f} tok/s (decode steps only)")
    print(f"must hold: the 3-stage pool's decode rate >= 80% of the fastest single-process decode ({fastest}); "
          f"per hop <= 0.5 ms")
    texts = {p.name: p.text for p in pools}
    out = {"model": model_dir.name, "prompt": PROMPT, "tokens": args.tokens, "rounds": args.rounds,
           "baseline": str(args.baseline) if args.baseline else None,
           "contended": "2 cores shared with other work; pools and contenders interleaved round by round",
           "pools": rows, "single_process_tokens_per_s": singles, "fastest_single_process": fastest,
           "single_process_all": {w.name: [round(x, 2) for x in w.rates] for w in workers},
           "same_text_across_pools": len(set(texts.values())) == 1, "loadavg": os.getloadavg()}
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

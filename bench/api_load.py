"""Load on the consumer API of a local pool: 1, 8 and 32 concurrent streaming clients.

    python bench/api_load.py [--clients 1,8,16,32] [--tokens 32] [--rounds 2] [--baseline /path/to/main]
    python bench/api_load.py --clients 1 --caps-mb 230,230,230   # three stages

The pool is `coordinator serve` plus two `provider join` processes whose memory caps force two
stages (one compute thread each, as in the tests), 32 KV slots a stage; `--caps-mb` gives one
provider per cap instead (230,230,230 makes three). With one client in the levels, `transformers`
generate at batch 1 in this process is timed too, and the single client's rate set against it. Each client is the
official `openai` client streaming a greedy completion of `--tokens` tokens, `--rounds` requests
in a row. Figures: aggregate tokens/s (all tokens / wall time of the level), p50 and p99 time to
first token (request sent -> first text chunk), a stream's decode rate (its tokens after the first
over first -> last text chunk, median) and its tail (last text chunk -> the stream's end: the
finish, the usage chunk, [DONE]; settlement runs behind them; median), and the steady tokens/s while
every client streams (`steady_rate`: without the level's ramp-up and stragglers), and each round's
times to first token, sorted (`ttft_ms_by_round`: round 0 is a burst, every client at once; later
rounds arrive as streams end, while the others decode). The ratio is against 1 client in the same run.
With --baseline, a pool running another checkout's code (e.g. main) is measured in the same run:
every pool is started first and each level runs on each pool in turn, the order flipping from level
to level, so that load from other processes on the machine falls on both alike. `--stages 3` uses
three providers instead (memory caps that force three stages); `--paths libp2p,link` measures this
checkout's pool once per stage-frame path (MESHPOOL_FRAME_LINK). `transformers` generate in this
process at batch 1 and at --gain-batch (16) is timed before the pools and again after them (their
means are used): "kept of generate's batching gain" = (pool tok/s at 16 clients / at 1) / (generate
tok/s at batch 16 / at 1); the share of the gain beyond 1x ((pool gain - 1) / (generate gain - 1))
is printed beside it. One client is measured first and again last, and its mean is what these
ratios divide by (the machine's load drifts). Writes bench/api_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import openai  # noqa: E402
import torch  # noqa: E402

from coordinator.local_pool import LocalPool  # noqa: E402
from node.transport.config import FRAME_LINK_ENV  # noqa: E402

CAPS_MB = {2: 500, 3: 300}  # caps that make the planner use that many stages (weights: 517 MB), 32 sessions each
PROMPTS = ["Once upon a time, in a small village,", "The three primary colors are", "def fibonacci(n):",
           "The history of the printing press begins"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_level(pool: LocalPool, model: str, key: str, clients: int, tokens: int, rounds: int) -> dict:
    ttft_s: list[float] = []
    ttft_by_round: dict[int, list[float]] = {}
    counts: list[int] = []
    errors: list[str] = []
    decode_rates: list[float] = []  # a stream's tokens after its first over first text -> last text
    tails_s: list[float] = []  # last text -> the stream's end (the finish, usage, [DONE])
    spans: list[tuple[float, float, int]] = []  # each request's first text, last text, tokens
    busy: dict[int, tuple[float, float]] = {}  # client -> its first request's first text, its last request's end
    lock = threading.Lock()

    def client(i: int):
        oc = openai.OpenAI(base_url=pool.api + "/v1", api_key=key, max_retries=0, timeout=600)
        for r in range(rounds):
            start = time.perf_counter()
            first = last = None
            try:
                stream = oc.completions.create(model=model, prompt=PROMPTS[(i + r) % len(PROMPTS)], max_tokens=tokens,
                                               temperature=0, stream=True, stream_options={"include_usage": True})
                n = 0
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].text:
                        last = time.perf_counter()
                        first = first or last
                    if chunk.usage:
                        n = chunk.usage.completion_tokens
            except openai.APIError as exc:
                with lock:
                    errors.append(str(exc))
                continue
            end = time.perf_counter()
            with lock:
                ttft_s.append((first or end) - start)
                ttft_by_round.setdefault(r, []).append((first or end) - start)
                counts.append(n)
                if first is not None and last > first and n > 1:
                    decode_rates.append((n - 1) / (last - first))
                    tails_s.append(end - last)
                    spans.append((first, last, n))
                busy[i] = (busy.get(i, (first or end, 0.0))[0], end)

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
            "ttft_p99_ms": round(1000 * percentile(ttft_s, 0.99), 1) if ttft_s else None,
            "stream_decode_tokens_per_s_p50": round(statistics.median(decode_rates), 1) if decode_rates else None,
            "tail_ms_p50": round(1000 * statistics.median(tails_s), 1) if tails_s else None,
            "steady_tokens_per_s": steady_rate(spans, busy.values()),
            "ttft_ms_by_round": {r: sorted(round(1000 * t) for t in ts) for r, ts in sorted(ttft_by_round.items())}}


def steady_rate(spans: list[tuple[float, float, int]], busy) -> float | None:
    """Tokens/s while every client was streaming: from the last client's first token to the first
    client's last end, each request's tokens counted as spread evenly between its first and last
    text. A short level's ramp-up and stragglers weigh on its whole-level figure; not on this."""
    busy = list(busy)
    if not busy or not spans:
        return None
    lo, hi = max(b[0] for b in busy), min(b[1] for b in busy)
    if hi <= lo:
        return None
    tokens = 0.0
    for first, last, n in spans:
        overlap = max(0.0, min(last, hi) - max(first, lo))
        tokens += (n - 1) * overlap / (last - first) + (lo <= first <= hi)
    return round(tokens / (hi - lo), 1)


def start_pool(levels: list[int], code_dir: Path | None, caps_mb: tuple[int, ...], path: str | None = None) -> dict:
    """A pool of a provider per memory cap whose processes run the code in `code_dir` (None: this
    checkout), warmed up; `path`: "libp2p" or "link", the transport path of its stage frames (None:
    default). The returned run collects its levels' rows."""
    if path is not None:
        os.environ[FRAME_LINK_ENV] = "on" if path == "link" else "off"  # the pool's processes inherit it
    pool = LocalPool(Path(tempfile.mkdtemp(prefix="meshpool-api-load-")), context_tokens=256,
                     max_sessions=max(levels), coordinator_args=["--rate-limit-rps", "1000"], code_dir=code_dir)
    try:
        pool.start_coordinator()
        for i, cap_mb in enumerate(caps_mb):
            pool.add_provider(f"provider{i}", max_memory_mb=cap_mb)
        state = pool.wait_for_pipelines(1)
        key = pool.add_consumer("bench", 10**15)
        model = pool.get("/v1/models")["data"][0]["id"]
        run_level(pool, model, key, 1, 4, 1)  # warm-up
    except BaseException:
        pool.stop()
        raise
    finally:
        os.environ.pop(FRAME_LINK_ENV, None)
    return {"code": str(code_dir or Path(__file__).resolve().parent.parent), "path": path or "default",
            "pipelines": [[(s["start"], s["end"]) for s in p["stages"]] for p in state["pipelines"]], "rows": [],
            "_pool": pool, "_key": key, "_model": model}


def measure(run: dict, clients: int, tokens: int, rounds: int) -> None:
    run["rows"].append(run_level(run["_pool"], run["_model"], run["_key"], clients, tokens, rounds))


def stop_pool(run: dict) -> dict:
    pool = run.pop("_pool")
    try:
        oc = openai.OpenAI(base_url=pool.api + "/v1", api_key=run.pop("_key"), max_retries=0)
        account = oc.get("/account", cast_to=object)
        run["account"] = {k: account[k] for k in ("balance_units", "held_units", "spent_units", "requests")}
    finally:
        run.pop("_model", None)
        pool.stop()
    base = run["rows"][0]["tokens_per_s"]
    for row in run["rows"]:
        row["ratio_vs_first"] = round(row["tokens_per_s"] / base, 2) if base else None
    return run


def generate_tokens_per_s(batch: int, tokens: int) -> float:
    """`transformers` generate in this process, one compute thread (as each pool process has): greedy
    tokens/s of a batch of `batch` copies of a prompt, the prompt's prefill included."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from node.models import default_model_dir

    torch.set_num_threads(1)
    model_dir = default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(model_dir)(PROMPTS[0])["input_ids"]] * batch)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, **kwargs)  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)
        return batch * (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start)


def print_rows(run: dict) -> None:
    print(f"{run['code']} ({run.get('path', 'default')} path): pipelines (layer ranges) {run['pipelines']}")
    print(f"{'clients':>7} {'requests':>8} {'errors':>6} {'tokens/s':>9} {'vs 1':>6} {'TTFT p50 ms':>11} "
          f"{'TTFT p99 ms':>11}")
    for row in run["rows"]:
        print(f"{row['clients']:>7} {row['requests']:>8} {row['errors']:>6} {row['tokens_per_s']:>9.1f} "
              f"{row['ratio_vs_first']:>5.2f}x {row['ttft_p50_ms']:>11.1f} {row['ttft_p99_ms']:>11.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,8,16,32")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", type=Path, help="a checkout (e.g. of main) measured first, in the same run")
    parser.add_argument("--caps-mb", default="",
                        help="one provider per memory cap (MB), e.g. 230,230,230 (default: --stages' caps)")
    parser.add_argument("--gain-batch", type=int, default=16,
                        help="compare the pool's gain at this many clients with generate's at this batch")
    parser.add_argument("--stages", type=int, default=2, choices=sorted(CAPS_MB))
    parser.add_argument("--paths", default="",
                        help="e.g. libp2p,link: this checkout's pool once per stage-frame path, in this order")
    parser.add_argument("--out", help="where to write the figures (default bench/api_load.json)")
    args = parser.parse_args()
    levels = [int(x) for x in args.clients.split(",")]
    caps_mb = tuple(int(x) for x in args.caps_mb.split(",")) if args.caps_mb else (CAPS_MB[args.stages],) * args.stages

    n = args.gain_batch
    # generate in one process before the pools and again after them: the figures are their means
    one_before = generate_tokens_per_s(1, args.tokens) if 1 in levels else None
    many_before = generate_tokens_per_s(n, args.tokens) if 1 in levels and n in levels else None
    # Every pool is started first and each level is measured on each pool in turn (the order flips
    # from level to level), so that the load others put on this machine falls on all of them alike.
    runs = []
    try:
        if args.baseline:
            runs.append(start_pool(levels, args.baseline.resolve(), caps_mb))
        for path in [p for p in args.paths.split(",") if p] or [None]:
            runs.append(start_pool(levels, None, caps_mb, path))
        for i, n in enumerate(levels):
            for run in (runs if i % 2 == 0 else runs[::-1]):
                measure(run, n, args.tokens, args.rounds)
        if 1 in levels:  # one client again at the end: the baseline every ratio divides by is the mean of both
            for run in (runs if len(levels) % 2 == 0 else runs[::-1]):
                measure(run, 1, args.tokens, args.rounds)
    finally:
        runs = [stop_pool(run) for run in runs]
    print(f"{args.tokens} tokens a request, {args.rounds} requests a client; load average {os.getloadavg()[0]:.1f}")
    for run in runs:
        print_rows(run)
    out = {"tokens_per_request": args.tokens, "rounds": args.rounds, "caps_mb": list(caps_mb), "runs": runs,
           # the figures of this checkout, where earlier versions of this file had them
           "pipelines": runs[-1]["pipelines"], "rows": runs[-1]["rows"], "account": runs[-1]["account"]}
    n = args.gain_batch
    if 1 in levels:  # one client against generate in one process at batch 1, same run
        one = (one_before + generate_tokens_per_s(1, args.tokens)) / 2
        out["generate_batch_1_tokens_per_s"] = round(one, 1)
        for run in runs:
            single = statistics.mean(r["tokens_per_s"] for r in run["rows"] if r["clients"] == 1)
            run["single_client_vs_generate"] = round(single / one, 3)
            print(f"{run['code']}: 1 client {single:.1f} tok/s = {single / one:.0%} of generate at batch 1 "
                  f"in one process (1 thread, prefill included) {one:.1f} tok/s")
    if 1 in levels and n in levels:
        many = (many_before + generate_tokens_per_s(n, args.tokens)) / 2
        gain = many / one
        out["generate"] = {"batch_1_tokens_per_s": round(one, 1), f"batch_{n}_tokens_per_s": round(many, 1),
                           "gain": round(gain, 2),
                           "before_pools": {"batch_1": round(one_before, 1), f"batch_{n}": round(many_before, 1)}}
        print(f"generate in one process (1 thread), mean of before and after the pools: batch 1 {one:.1f} tok/s, "
              f"batch {n} {many:.1f} tok/s, gain {gain:.2f}x (before the pools: {one_before:.1f} and "
              f"{many_before:.1f})")
        for run in runs:
            rows = {r["clients"]: r for r in run["rows"]}
            ones = [r for r in run["rows"] if r["clients"] == 1]  # measured first and last
            pool_1 = statistics.mean(r["tokens_per_s"] for r in ones)
            median_1 = statistics.mean(r["ttft_p50_ms"] for r in ones)
            pool_gain = rows[n]["tokens_per_s"] / pool_1
            # kept: the pool's gain over generate's; beyond_one: the same of what each adds to 1x
            kept = pool_gain / gain
            beyond_one = (pool_gain - 1) / (gain - 1) if gain > 1 else None
            p99_vs_median = rows[n]["ttft_p99_ms"] / median_1
            run["batching"] = {"pool_gain": round(pool_gain, 2), "kept_of_generate_gain": round(kept, 3),
                               "share_of_generate_gain": beyond_one and round(beyond_one, 3),
                               f"ttft_p99_at_{n}_vs_single_median": round(p99_vs_median, 2)}
            print(f"{run['code']}: {n} clients get {pool_gain:.2f}x one client's tok/s: kept of generate's "
                  f"batching gain {kept:.0%} ((pool {n}/pool 1) / (generate {n}/generate 1)), "
                  f"{beyond_one:.0%} of the gain beyond 1x; TTFT p99 at {n} = {p99_vs_median:.2f}x the 1-client median")
    out["loadavg"] = os.getloadavg()
    path = Path(args.out) if args.out else Path(__file__).with_suffix(".json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

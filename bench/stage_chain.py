"""Where a token's time goes inside the stages, before the network and the coordinator: one decode
token at a time, fed back as the pool feeds it, through ever more of what a provider does, measured
in one process in the same run.

    python bench/stage_chain.py [--model-dir DIR] [--device cuda:0] [--dtype bfloat16] [--batches 1,8]

1. `runtime`: ShardRuntime.decode over all layers and argmax (bench/gpu_pool.py's in-process baseline);
2. `runtime + trace`: the same runtime keeping every layer's update, as providers run it for audits;
3. `worker`: StageWorker.step on `Step`s built as the driver builds them (checks, sampling, the
   records a stage keeps, hidden states copied off the device);
4. `worker + wire`: every Step and Result through its wire frame (encode and strict decode);
5. `2 workers + wire`: the layers split over two workers, the hidden states framed between them.
Each figure: ms a token (per batch row: tokens/s too), median of `--repeats`; "+ms" against the line
above. The real pool's per-token time minus line 4 (one stage) or 5 (two) is what the network, the
threads and the coordinator cost (bench/gpu_pool.py prints it for the same checkpoint).
Without --model-dir, the default model (float32 on the CPU). Writes bench/stage_chain.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.shard_decode import time_ours  # noqa: E402
from node.config import ModelConfig  # noqa: E402
from node.local_pipeline import LocalPipeline  # noqa: E402
from node.models import default_model_dir, model_id_of  # noqa: E402
from node.retention import RetentionStore  # noqa: E402
from node.runtime import ShardRuntime  # noqa: E402
from node.shard import Shard  # noqa: E402
from node.stage import StageWorker  # noqa: E402
from node.transport.identity import Identity  # noqa: E402
from wire.messages import Close, Result, SamplingParams, Step, decode  # noqa: E402

PROMPT_TOKENS = 8


def runtimes(model_dir: Path, ranges, device: str, dtype, max_sessions: int, trace: bool) -> list[ShardRuntime]:
    n_layers = ModelConfig.load(model_dir).n_layers
    return [ShardRuntime(model_dir, Shard(model_id_of(model_dir), a, b, n_layers), device=device, dtype=dtype,
                         max_sessions=max_sessions, max_seq_len=512, capture_trace=trace) for a, b in ranges]


def prompts_of(batch: int, vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))


def time_runtime(runtime: ShardRuntime, batch: int, n_tokens: int, vocab: int) -> float:
    """Seconds for `n_tokens` decode steps of `batch` sessions, the argmax fed back each step."""
    return time_ours(LocalPipeline([runtime]), prompts_of(batch, vocab), n_tokens + 1)[0]


def time_workers(workers: list[StageWorker], batch: int, n_tokens: int, vocab: int, wire: bool) -> float:
    """The same through StageWorker.step, each step built as coordinator/driver.py builds it."""
    sids = tuple(f"w{i}" for i in range(batch))
    params = (SamplingParams(),) * batch
    prompts = prompts_of(batch, vocab)
    numbers = iter(range(10**9))

    def run(step: Step) -> Result:
        message = step
        for worker in workers:
            message = worker.step(decode(message.to_frame(), Step) if wire else message)
        return decode(message.to_frame(), Result) if wire else message

    result = run(Step("p", next(numbers), "prefill", sids, (0,) * batch, params, (), prompts.reshape(-1),
                      (PROMPT_TOKENS,) * batch))
    positions = [PROMPT_TOKENS] * batch
    last = list(result.tokens)  # on the host: the device is done with the prefill
    started = time.perf_counter()
    for _ in range(n_tokens):
        step = Step("p", next(numbers), "decode", sids, tuple(positions), params, (),
                    torch.tensor(last, dtype=torch.int64))
        last = list(run(step).tokens)
        positions = [p + 1 for p in positions]
    seconds = time.perf_counter() - started
    for worker in workers:
        worker.close(Close("p", sids, tuple(f"req-{s}" for s in sids)))
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="", help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = p.parse_args()
    model_dir = args.model_dir or default_model_dir()
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    config = ModelConfig.load(model_dir)
    n, batches = config.n_layers, [int(b) for b in args.batches.split(",")]
    max_sessions = max(batches)
    whole, halves = [(0, n)], [(0, n // 2), (n // 2, n)]

    def workers_of(ranges):
        return [StageWorker(r, "p", Identity.generate(), RetentionStore())
                for r in runtimes(model_dir, ranges, args.device, dtype, max_sessions, True)]

    plain = runtimes(model_dir, whole, args.device, dtype, max_sessions, False)[0]
    traced = runtimes(model_dir, whole, args.device, dtype, max_sessions, True)[0]
    one, two = workers_of(whole), workers_of(halves)
    lines = {
        "runtime": lambda b, t: time_runtime(plain, b, t, config.vocab_size),
        "runtime + trace": lambda b, t: time_runtime(traced, b, t, config.vocab_size),
        "worker": lambda b, t: time_workers(one, b, t, config.vocab_size, wire=False),
        "worker + wire": lambda b, t: time_workers(one, b, t, config.vocab_size, wire=True),
        "2 workers + wire": lambda b, t: time_workers(two, b, t, config.vocab_size, wire=True),
    }
    rows = []
    for batch in batches:
        for measure in lines.values():
            measure(batch, 4)  # warm-up: this batch's graphs, kernels' first compiles
        samples = {name: [] for name in lines}
        for _ in range(args.repeats):  # interleaved, so that drift falls on every line alike
            for name, measure in lines.items():
                samples[name].append(measure(batch, args.tokens) / args.tokens * 1000)
        before = None
        print(f"batch {batch}: ms a step (tokens/s)")
        for name, ms in samples.items():
            step_ms = statistics.median(ms)
            extra = "" if before is None else f"  {step_ms - before:+.3f} ms"
            print(f"  {name:18s} {step_ms:8.3f} ms ({batch * 1000 / step_ms:8.1f} tok/s){extra}")
            rows.append({"batch": batch, "line": name, "step_ms": round(step_ms, 4),
                         "tokens_per_s": round(batch * 1000 / step_ms, 1), "samples_ms": [round(x, 4) for x in ms]})
            before = step_ms
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    args.out.write_text(json.dumps({"model_dir": str(model_dir), "layers": n, "device": device_name,
                                    "dtype": str(dtype), "tokens": args.tokens, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

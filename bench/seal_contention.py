"""A GPU stage's decode steps while the requests that ended are sealed beside them, in one process.

    python bench/seal_contention.py --model-dir DIR [--device cuda:0] [--batch 32] [--steps 200]

A provider seals each request that ends (node/sealer.py: its layer trace, tens of MB on a GPU stage,
copied off the device and hashed on worker threads) while its serving thread goes on with the next
steps. Here one StageWorker (all layers, CUDA graphs, layer traces, as providers serve) decodes
`--batch` sessions step after step; in the `sealing` runs a request of `--trace-tokens` tokens ends
every `--seal-every` steps (as at 32 clients of 64 tokens each) and is sealed by a Sealer as a
provider seals it (with a provider's GIL switch interval); in the `quiet` runs the same requests end and nothing is sealed. Prints the
decode step's ms (p50 / p90 / max) of each, interleaved over `--repeats`, and writes JSON to --out.
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

from node.config import ModelConfig  # noqa: E402
from node.cpu_threads import serve_switch_interval  # noqa: E402
from node.models import model_id_of  # noqa: E402
from node.retention import RetentionStore  # noqa: E402
from node.runtime import ShardRuntime  # noqa: E402
from node.sealer import Sealer  # noqa: E402
from node.shard import Shard  # noqa: E402
from node.stage import StageWorker  # noqa: E402
from node.transport.identity import Identity  # noqa: E402
from wire.messages import Close, SamplingParams, Step  # noqa: E402

PROMPT_TOKENS = 8


def run(worker: StageWorker, vocab: int, batch: int, steps: int, trace_tokens: int, seal_every: int,
        sealer: Sealer | None) -> list[float]:
    """ms of each decode step of `batch` sessions; a request of `trace_tokens` ends every `seal_every`."""
    numbers = iter(range(10**9))
    gen = torch.Generator().manual_seed(0)

    def prefill(sids: tuple[str, ...], n: int) -> list[int]:
        ids = torch.randint(3, vocab, (len(sids) * n,), generator=gen)
        return list(worker.step(Step("p", next(numbers), "prefill", sids, (0,) * len(sids),
                                     (SamplingParams(),) * len(sids), (), ids, (n,) * len(sids))).tokens)

    sids = tuple(f"d{i}" for i in range(batch))
    last, positions = prefill(sids, PROMPT_TOKENS), [PROMPT_TOKENS] * batch
    times_ms = []
    for i in range(steps):
        if i % seal_every == 0:  # a request ends: its whole trace (prompt and tokens) is released
            done = (f"r{i}",)
            prefill(done, trace_tokens)
            unsealed = worker.release(Close("p", done, (f"req-{i}",)))
            if sealer is not None:
                sealer.submit(worker, unsealed)
        step = Step("p", next(numbers), "decode", sids, tuple(positions), (SamplingParams(),) * batch, (),
                    torch.tensor(last, dtype=torch.int64))
        started = time.perf_counter()
        last = list(worker.step(step).tokens)
        times_ms.append((time.perf_counter() - started) * 1000)
        positions = [p + 1 for p in positions]
    worker.release(Close("p", sids, ("",) * batch))
    return times_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--trace-tokens", type=int, default=72)
    p.add_argument("--seal-every", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = p.parse_args()
    serve_switch_interval()  # as a provider serves
    config = ModelConfig.load(args.model_dir)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    runtime = ShardRuntime(args.model_dir, Shard(model_id_of(args.model_dir), 0, config.n_layers, config.n_layers),
                           device=args.device, dtype=dtype, max_sessions=args.batch + 1,
                           max_seq_len=PROMPT_TOKENS + args.steps + args.trace_tokens + 8, capture_trace=True)
    retained = RetentionStore()
    worker = StageWorker(runtime, "p", Identity.generate(), retained)
    sealed = []

    def receive(receipts) -> None:  # the retained traces go, as the coordinator's reply lets them go
        sealed.extend(receipts)
        for receipt in receipts:
            retained.drop(receipt.request_id)

    sealer = Sealer(receive)
    modes = {"quiet": None, "sealing": sealer}
    for sealing in modes.values():  # warm-up: graphs, kernels, the pinned-memory cache
        run(worker, config.vocab_size, args.batch, 8, args.trace_tokens, args.seal_every, sealing)
    samples = {name: [] for name in modes}
    for _ in range(args.repeats):
        for name, sealing in modes.items():
            samples[name] += run(worker, config.vocab_size, args.batch, args.steps, args.trace_tokens,
                                 args.seal_every, sealing)
    sealer.shutdown()
    rows = {}
    for name, ms in samples.items():
        ms = sorted(ms)
        rows[name] = {"p50_ms": round(statistics.median(ms), 3), "p90_ms": round(ms[int(0.9 * len(ms))], 3),
                      "max_ms": round(ms[-1], 3), "mean_ms": round(statistics.fmean(ms), 3), "steps": len(ms)}
        print(f"{name:8s} decode step at batch {args.batch}: p50 {rows[name]['p50_ms']:.3f}  "
              f"p90 {rows[name]['p90_ms']:.3f}  max {rows[name]['max_ms']:.3f}  mean {rows[name]['mean_ms']:.3f} ms")
    print(f"sealed {len(sealed)} requests; sealing / quiet mean: {rows['sealing']['mean_ms'] / rows['quiet']['mean_ms']:.2f}x")
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    args.out.write_text(json.dumps({"device": device, "layers": config.n_layers, "batch": args.batch,
                                    "trace_tokens": args.trace_tokens, "seal_every": args.seal_every,
                                    "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

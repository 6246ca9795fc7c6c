"""Decode tokens/s of chained shards beside transformers `generate` on the same model, same run.

    python bench/shard_decode.py                 # default model on this CPU, batch 1/8/32
    python bench/shard_decode.py --batches 1,8 --new-tokens 32 --splits 1,2,3

Each row times only the decode steps (prefill excluded) of B sessions with prompts of equal length,
greedy, with no early stop. transformers' decode time is generate(N new) minus generate(1 new).
Writes bench/shard_decode_<dtype>.json next to this file.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.config import ModelConfig  # noqa: E402
from node.local_pipeline import LocalPipeline  # noqa: E402
from node.models import default_model_dir  # noqa: E402
from node.shard import split_layers  # noqa: E402


def time_ours(pipeline: LocalPipeline, prompts: torch.Tensor, n_new: int) -> tuple[float, list[list[int]]]:
    sids = [f"bench-{i}" for i in range(len(prompts))]
    tokens = [[int(pipeline.prefill(sid, p.tolist()).argmax(-1))] for sid, p in zip(sids, prompts)]
    start = time.perf_counter()
    for _ in range(n_new - 1):
        logits = pipeline.decode(sids, [t[-1] for t in tokens])
        for t, nxt in zip(tokens, logits.argmax(-1).tolist()):
            t.append(nxt)
    seconds = time.perf_counter() - start
    for sid in sids:
        pipeline.close(sid)
    return seconds, tokens


def time_transformers(model, prompts: torch.Tensor, n_new: int) -> tuple[float, list[list[int]]]:
    def generate(n):
        start = time.perf_counter()
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0)
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
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()

"""The cost of committing to a GPU stage's layer trace: one SHA-256 over the whole trace (the receipts'
layers hash before) against `trace_digest` (each row's digest, then a digest of those), same run, same trace.

    python bench/trace_digest.py [--tokens 136] [--layers 32] [--hidden 4096] [--repeats 5]

The default trace is a request of 72 prompt + 64 new tokens through a whole Llama-3-8B-shaped stage:
(2 x 32 + 1, 136, 4096) bfloat16, 72 MB. A request's settlement waits for its receipts; the hashing
runs on a provider's sealer threads, beside its serving (node/sealer.py). Writes bench/trace_digest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from verification.commitments import tensor_digest, trace_digest  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=136)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = p.parse_args()
    trace = torch.randn(2 * args.layers + 1, args.tokens, args.hidden).to(torch.bfloat16)
    times_ms: dict[str, list[float]] = {"whole": [], "rows": []}
    for _ in range(args.repeats):  # alternating, so both meet the same load
        for name, digest in (("whole", lambda: tensor_digest([trace])), ("rows", lambda: trace_digest(trace))):
            start = time.perf_counter()
            digest()
            times_ms[name].append((time.perf_counter() - start) * 1e3)
    mb = trace.numel() * trace.element_size() / 1e6
    out = {"trace_shape": list(trace.shape), "trace_mb": round(mb, 1), "cpus": os.cpu_count(),
           **{f"{name}_ms_median": round(statistics.median(v), 1) for name, v in times_ms.items()}}
    out["speedup"] = round(out["whole_ms_median"] / out["rows_ms_median"], 2)
    print(f"trace {tuple(trace.shape)} bfloat16, {mb:.0f} MB, {os.cpu_count()} CPUs: one SHA-256 "
          f"{out['whole_ms_median']} ms, rows in parallel {out['rows_ms_median']} ms ({out['speedup']}x)")
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Per-token latency of a real pool of 1, 2 and 4 stages over loopback libp2p, against the same
layer ranges chained in one process, measured in the same run: the cost of each hop.

    python bench/pipeline_overhead.py [--tokens 64] [--repeats 3] [--baseline /path/to/main]

Each pool is `coordinator serve` plus N `provider join` processes whose memory caps force N stages
(one compute thread each, as in the tests). Per-token latency = (time of a request for 1 + T tokens
minus time of a request for 1 token) / T, median of the repeats. A token crosses N + 1 hops:
coordinator -> stage 0 -> ... -> last stage -> coordinator. "per hop ms" = (pool - in process) /
hops, the two measured minutes apart; "in-pool hop ms" = the coordinator's own figure for the same
steps (its wall time of a step minus the compute each stage reports, over hops: see
coordinator/measurements.py), which the compute's noise does not reach. Then an 8 MB activation hop between
two processes, P2PNode (as the stages use it) against plain TCP, with bench/transport.py's code.
With --baseline, each pool is also measured running another checkout's code (e.g. main), in the
same run, and so is the Python time of encoding and decoding one batch-1 frame of each kind.
Each pool runs once per transport path (--paths): "libp2p" (MESHPOOL_FRAME_LINK=off: stage frames
over py-libp2p streams, as before the frame link) and "link" (node/transport/link.py). A pool's
per-token figure carries the compute's noise (on this 2-core, shared machine: milliseconds), so
the hop itself is also measured without compute, by bench/hop_ring.py's ring of relay processes
(both paths, same run), with the parts a hop is made of measured alone beside it.
Writes bench/pipeline_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.hop_ring import parts_us, ring_us  # noqa: E402
from bench.transport import run_row  # noqa: E402
from coordinator.local_pool import LocalPool  # noqa: E402
from node.config import ModelConfig  # noqa: E402
from node.local_pipeline import LocalPipeline  # noqa: E402
from node.models import default_model_dir  # noqa: E402
from node.transport.config import FRAME_LINK_ENV  # noqa: E402
from wire.messages import Result, SamplingParams, Step  # noqa: E402
from wire.frames import encode_frame  # noqa: E402

CAPS_MB = {1: None, 2: 450, 3: 300, 4: 230}  # memory caps that make the planner use exactly N stages
PROMPT = "The history of the printing press begins"


def pool_latency_ms(n_stages: int, tokens: int, repeats: int, code_dir: Path | None = None
                    ) -> tuple[float, list[tuple[int, int]], float | None]:
    """(ms per token, layer ranges, the coordinator's own per-hop figure: step wall time minus the
    stages' reported compute, over hops (coordinator/measurements.py), its EWMA read after each
    request, median; None where the code does not report it)."""
    with tempfile.TemporaryDirectory(prefix="meshpool-bench-") as root:
        pool = LocalPool(Path(root), code_dir=code_dir)
        try:
            pool.start_coordinator()
            for i in range(n_stages):
                pool.add_provider(f"p{i}", max_memory_mb=CAPS_MB[n_stages])
            state = pool.wait_for(lambda s: s["pipelines"] and len(s["pipelines"][0]["stages"]) == n_stages,
                                  what=f"a {n_stages}-stage pipeline")
            ranges = [(s["start"], s["end"]) for s in state["pipelines"][0]["stages"]]
            model = pool.get("/v1/models")["data"][0]["id"]
            key = pool.add_consumer("bench", 10**12)

            def timed(max_tokens: int) -> tuple[float, int]:
                start = time.perf_counter()
                status, body = pool.post("/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                                                             "temperature": 0}, api_key=key)
                assert status == 200, body
                return time.perf_counter() - start, body["usage"]["completion_tokens"]

            timed(4)  # warm-up: first streams, first allocations
            per_token, hop_ms = [], []
            for _ in range(repeats):
                one_s, _ = timed(1)
                many_s, n = timed(1 + tokens)
                per_token.append((many_s - one_s) / (n - 1) * 1e3)
                measured = pool.get("/pool").get("measurements", {}).get("hop_latency_ms")
                if measured is not None:
                    hop_ms.append(measured)
            return statistics.median(per_token), ranges, statistics.median(hop_ms) if hop_ms else None
        finally:
            pool.stop()


def local_latency_ms(model_dir: Path, ranges: list[tuple[int, int]], tokens: int) -> float:
    pipeline = LocalPipeline.load(model_dir, ranges)
    ids = list(range(100, 110))
    pipeline.prefill("s", ids)
    token = 5
    for _ in range(3):
        pipeline.decode(["s"], [token])
    start = time.perf_counter()
    for _ in range(tokens):
        pipeline.decode(["s"], [token])
    return (time.perf_counter() - start) / tokens * 1e3


def bytes_per_token(config: ModelConfig, n_stages: int) -> int:
    """Frame bytes one decode token puts on the wire, all hops together."""
    step = Step("0" * 16, 1, "decode", ("s0",), (100,), (SamplingParams(),), (), torch.tensor([5]))
    ids = encode_frame(step.to_frame())
    hidden = encode_frame(step.forward(torch.zeros(1, config.hidden_size), 0.5).to_frame())
    result = encode_frame(Result("0" * 16, 1, ("s0",), (5,), (0.5,) * n_stages).to_frame())
    return len(ids) + (n_stages - 1) * len(hidden) + len(result)


SERIALIZATION = r"""
import json, time, torch
from wire.frames import decode_frame, encode_frame
from wire.messages import Result, SamplingParams, Step, decode

def us(f, n=2000):
    f()
    start = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - start) / n * 1e6

ids = Step("0" * 16, 1, "decode", ("s0",), (100,), (SamplingParams(),), (), torch.tensor([5]))
hidden = ids.forward(torch.zeros(1, HIDDEN), 0.5)
result = Result("0" * 16, 1, ("s0",), (5,), (0.5, 0.5))
out = {}
for name, message in (("step_ids", ids), ("step_hidden", hidden), ("result", result)):
    data = encode_frame(message.to_frame())
    out[name] = {"encode_us": round(us(lambda: encode_frame(message.to_frame())), 1),
                 "decode_us": round(us(lambda: decode(decode_frame(bytearray(data)))), 1)}
print(json.dumps(out))
"""


def serialization_us(code_dir: Path, hidden_size: int) -> dict:
    """Encode and decode of one batch-1 frame of each kind, by the code in `code_dir` (a subprocess)."""
    done = subprocess.run([sys.executable, "-c", SERIALIZATION.replace("HIDDEN", str(hidden_size))], cwd=code_dir,
                          env={**os.environ, "PYTHONPATH": str(code_dir), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, check=True, timeout=300)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stages", default="1,2,4")
    parser.add_argument("--baseline", type=Path, help="a checkout (e.g. of main) measured too, in the same run")
    parser.add_argument("--paths", default="libp2p,link", help="transport paths of the pools: libp2p, link")
    parser.add_argument("--ring-steps", type=int, default=400, help="steps through the relay ring (0: skip it)")
    parser.add_argument("--ring-relays", type=int, default=3)
    parser.add_argument("--skip-8mb", action="store_true", help="skip the 8 MB activation hop")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as each provider process runs
    os.environ["OMP_NUM_THREADS"] = "1"
    model_dir = default_model_dir()
    config = ModelConfig.load(model_dir)

    here = Path(__file__).resolve().parent.parent
    trees = ([("baseline", args.baseline.resolve())] if args.baseline else []) + [("this", here)]
    paths = [p for p in args.paths.split(",") if p]
    ring = []
    if args.ring_steps:
        ring = [ring_us(path, args.ring_relays, args.ring_steps, config.hidden_size) for path in paths]
        for r in ring:
            print(f"relay ring, {r['path']:>6}: round trip {r['round_trip_us']:.0f} us over {r['hops']} hops = "
                  f"{r['per_hop_us'] / 1e3:.3f} ms per hop (median; p90 {r['p90_per_hop_us'] / 1e3:.3f})")
    parts = parts_us(config.hidden_size)
    print("a hop's parts, alone (us): " + ", ".join(f"{k} {v}" for k, v in parts.items()))
    rows = []
    print(f"{'code':>8} {'path':>6} {'stages':>6} {'layer ranges':<28} {'pool ms/token':>13} "
          f"{'in-process ms/token':>19} {'per hop ms':>10} {'in-pool hop ms':>14} {'bytes/token':>11}")
    for n in [int(s) for s in args.stages.split(",")]:
        for label, tree in trees:
            for path in paths:
                os.environ[FRAME_LINK_ENV] = "on" if path == "link" else "off"  # LocalPool's processes inherit it
                pool_ms, ranges, measured_hop_ms = pool_latency_ms(n, args.tokens, args.repeats,
                                                                    None if tree == here else tree)
                local_ms = local_latency_ms(model_dir, ranges, args.tokens)
                hop_ms = (pool_ms - local_ms) / (n + 1)
                n_bytes = bytes_per_token(config, n)
                rows.append({"code": label, "path": path, "stages": n, "ranges": ranges,
                             "pool_ms_per_token": round(pool_ms, 2), "in_process_ms_per_token": round(local_ms, 2),
                             "per_hop_ms": round(hop_ms, 2), "in_pool_hop_ms": measured_hop_ms,
                             "hops_per_token": n + 1, "bytes_per_token": n_bytes})
                print(f"{label:>8} {path:>6} {n:>6} {str(ranges):<28} {pool_ms:>13.1f} {local_ms:>19.1f} "
                      f"{hop_ms:>10.2f} {measured_hop_ms if measured_hop_ms is not None else float('nan'):>14.3f} "
                      f"{n_bytes:>11}")
    os.environ.pop(FRAME_LINK_ENV, None)
    serialization = {label: serialization_us(tree, config.hidden_size) for label, tree in trees}
    for label, figures in serialization.items():
        print(f"{label:>8} encode/decode us per batch-1 frame: "
              + ", ".join(f"{k} {v['encode_us']:.0f}/{v['decode_us']:.0f}" for k, v in figures.items()))

    hop_8mb = None
    if not args.skip_8mb:
        hops = {kind: [run_row(kind, True, 50, 7)["hop_8m_mb_s"] for _ in range(3)] for kind in ("tcp", "node-aes")}
        tcp_mb_s, node_mb_s = (statistics.median(hops[k]) for k in ("tcp", "node-aes"))
        print(f"8 MB hop between processes: plain TCP {tcp_mb_s:.0f} MB/s, P2PNode {node_mb_s:.0f} MB/s "
              f"= {node_mb_s / tcp_mb_s:.0%} of TCP (median of 3)")
        hop_8mb = {"plain_tcp": tcp_mb_s, "p2pnode_aes": node_mb_s, "ratio": round(node_mb_s / tcp_mb_s, 3)}
    path = Path(__file__).with_suffix(".json")
    path.write_text(json.dumps({"model": model_dir.name, "hidden_size": config.hidden_size, "tokens": args.tokens,
                                "relay_ring": ring, "hop_parts_us": parts, "rows": rows,
                                "serialization_us": serialization, "hop_8mb_mb_s": hop_8mb,
                                "loadavg": os.getloadavg(),
                                "note": "2 shared CPU cores, contended by other work: medians"}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

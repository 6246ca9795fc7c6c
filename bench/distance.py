"""A pool over emulated distance: 2- and 4-stage pools of real processes (`coordinator serve`,
`provider join`) whose every link goes through a shaper (node/transport/shaper.py) adding
0 / 5 / 20 / 50 ms one way at 100 Mbit/s (or 1 Gbit/s), against the link model's prediction.

Links: each provider's connection to the coordinator goes through one shaper in front of the
coordinator; each provider listens on a fixed port behind its own shaper and announces the
shaper (`provider join --p2p-port P --announce-addr /ip4/127.0.0.1/tcp/Q --relay never`), so the
hop from the stage before it is shaped too. Step time = one decode step of one request, from
two greedy requests of 8 and 40 tokens: (t40 - t8) / 32.
Predicted step = the 0 ms step of the same pool size + (stages + 1) hops × Link(delay, rate).time_s(
bytes of the hop), the planner's link cost (coordinator/planner/cost.py's hop bytes, float32).
Run: .venv/bin/python bench/distance.py [--stages 2,4] [--delays 0,5,20,50] [--rate-mbit 100]
(writes bench/distance.json after every pool, so a partial run keeps what it measured)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.local_pool import LocalPool  # noqa: E402
from coordinator.planner import Link  # noqa: E402
from coordinator.planner.cost import TOKEN_ID_BYTES  # noqa: E402
from node.transport.shaper import Shape, ShaperThread  # noqa: E402

MODEL = "smollm2-135m-instruct"
HIDDEN = 576  # the default model's hidden size: 2,304 bytes of float32 activations per token
CAPS_MB = {2: 480, 4: 230}  # memory caps that make the planner use exactly this many providers
PROMPT = "The history of the printing press begins"
SHORT, LONG = 8, 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_of(addr: str) -> int:
    return int(addr.split("/tcp/")[1].split("/")[0])


def timed(pool: LocalPool, max_tokens: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    status, body = pool.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens,
                                                 "temperature": 0}, api_key=pool.api_key)
    assert status == 200, body
    return time.perf_counter() - t0, body["usage"]["completion_tokens"]


def run_pool(n_stages: int, shape: Shape, reps: int) -> dict:
    shapers: list[ShaperThread] = []
    os.environ["MESHPOOL_SHAPE_BULK"] = f"{shape.delay_ms},{shape.rate_mbit}"  # the processes' bulk channels
    pool = LocalPool(Path(tempfile.mkdtemp(prefix=f"distance-{n_stages}-")), heartbeat_timeout_s=10.0)
    try:
        pool.start_coordinator()
        s = ShaperThread(("127.0.0.1", port_of(pool.p2p_addr)), shape)
        shapers.append(s)
        coordinator_id = pool.p2p_addr.split("/p2p/")[1]
        pool.p2p_addr = f"/ip4/127.0.0.1/tcp/{s.start()}/p2p/{coordinator_id}"
        for i in range(n_stages):
            port = free_port()
            s = ShaperThread(("127.0.0.1", port), shape)
            shapers.append(s)
            pool.add_provider(f"p{i}", CAPS_MB[n_stages], extra_args=[
                "--p2p-port", str(port), "--announce-addr", f"/ip4/127.0.0.1/tcp/{s.start()}", "--relay", "never"])
        state = pool.wait_for(lambda st: st["pipelines"] and sum(len(p["stages"]) for p in st["pipelines"]) >= 1,
                              300, "a pipeline")
        time.sleep(3.0)  # let re-plans after the last join settle
        state = pool.wait_for(lambda st: st["pipelines"], 120, "a settled pipeline")
        pool.api_key = pool.add_consumer("bench", 10**12)
        timed(pool, 4)  # warm up
        steps = []
        for _ in range(reps):
            (t_long, n_long), (t_short, n_short) = timed(pool, LONG), timed(pool, SHORT)
            steps.append((t_long - t_short) / (n_long - n_short))
        steps.sort()
        step_s = steps[len(steps) // 2]
        state = pool.get("/pool")
        pipeline = state["pipelines"][0]
        return {"stages": len(pipeline["stages"]), "step_ms": round(step_s * 1e3, 2),
                "tokens_per_s": round(1 / step_s, 2), "steps_ms": [round(x * 1e3, 2) for x in steps],
                "hop_ms_coordinator": state["measurements"]["hop_latency_ms"],
                "planner_at_plan_time": {"predicted_tokens_per_s": pipeline.get("predicted_tokens_per_s"),
                                         "stage_predicted_ms": [st.get("predicted_ms") for st in pipeline["stages"]]},
                "rtt_ms": {p["peer"][-6:]: p.get("rtt_ms") for p in state["providers"]}}
    finally:
        os.environ.pop("MESHPOOL_SHAPE_BULK", None)
        pool.stop()
        for s in shapers:
            s.close()


def link_cost_ms(n_stages: int, shape: Shape) -> float:
    """The planner's link model: (stages + 1) hops of one decode step, batch 1, float32."""
    link = Link(shape.delay_ms, shape.rate_mbit / 1e3)
    hops = [TOKEN_ID_BYTES] + [HIDDEN * 4] * (n_stages - 1) + [TOKEN_ID_BYTES]
    return sum(link.time_s(b) for b in hops) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", default="2,4")
    ap.add_argument("--delays", default="0,5,20,50")
    ap.add_argument("--rate-mbit", type=float, default=100.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="distance.json", help="file name beside this script")
    args = ap.parse_args()
    out_path = Path(__file__).with_name(args.out)
    results: dict = {"rate_mbit": args.rate_mbit, "note": "2 shared CPU cores with other work running: "
                     "figures under contention", "pools": {}}
    print(f"{'stages':>6} {'delay ms':>8} {'step ms':>8} {'pred ms':>8} {'meas/pred':>9} {'split pred':>10} "
          f"{'meas/split':>10} {'hop ms':>7} {'model hop':>9} {'tok/s':>7}")
    for n in (int(x) for x in args.stages.split(",")):
        base_ms = hop0_ms = None
        for d in (float(x) for x in args.delays.split(",")):
            shape = Shape(d, args.rate_mbit)
            got = run_pool(n, shape, args.reps)
            link_ms = link_cost_ms(n, shape)
            hop_ms = got["hop_ms_coordinator"] or 0.0
            if base_ms is None:  # the first (0 ms) pool: the baselines
                base_ms = got["step_ms"] - link_ms
                hop0_ms = hop_ms - link_ms / (n + 1)  # software time per hop, beyond the link model
            pred = base_ms + link_ms
            compute_ms = got["step_ms"] - (n + 1) * hop_ms
            split = compute_ms + (n + 1) * hop0_ms + link_ms
            model_hop = hop0_ms + link_ms / (n + 1)
            got |= {"delay_ms": d, "predicted_step_ms": round(pred, 2),
                    "measured_over_predicted": round(got["step_ms"] / pred, 3),
                    "compute_ms": round(compute_ms, 2), "predicted_split_step_ms": round(split, 2),
                    "measured_over_predicted_split": round(got["step_ms"] / split, 3),
                    "hop_ms_model": round(model_hop, 2)}
            results["pools"][f"{n} stages, {d:g} ms"] = got
            print(f"{got['stages']:>6} {d:>8g} {got['step_ms']:>8.1f} {pred:>8.1f} {got['step_ms'] / pred:>9.2f} "
                  f"{split:>10.1f} {got['step_ms'] / split:>10.2f} {hop_ms:>7.1f} {model_hop:>9.1f} "
                  f"{got['tokens_per_s']:>7.2f}", flush=True)
            results["loadavg"] = os.getloadavg()
            out_path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

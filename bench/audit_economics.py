"""Audit economics: does auditing make cheating lose money, and what does it cost the honest?

In process, on the default model (3 stages [0,10) [10,20) [20,30)), with the rules of contracts/
(MoneyParams defaults, gas_units, slash_units_for, deters_cheating) and the comparison of
verification/compare.py:
- per cheat: the detection probability of one audited (request, stage), over N requests; per
  request at the default p (detection x p); gain per request (gas of the layers it skipped, or the
  whole stage's gas for wrong-model / lazy, and as an upper bound for noise and changed weights,
  which stand for a cheaper approximate model) against the expected loss p x detection x slash;
- the false-positive rate over >= 200 honest audits in float32, bfloat16 and mixed pipelines,
  greedy and sampled (temperature 0.8, per-request seeds);
- audit compute as a share of serving compute: one prefill recomputation against the time the
  stage spent serving (prefill + decode steps), times p.

    nice -n 5 .venv/bin/python bench/audit_economics.py   # prints a table, writes bench/audit_economics.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.audit_calibration import (RANGES, audit, build_stages, load_tensors, perturb_layer,  # noqa: E402
                                     serve, tokenize)
from contracts.audits import deters_cheating  # noqa: E402
from contracts.params import DEFAULT_PARAMS, PPM_DENOMINATOR  # noqa: E402
from contracts.pricing import gas_units  # noqa: E402
from contracts.stakes import slash_units_for  # noqa: E402
from node.faults import Fault  # noqa: E402
from node.models import default_model_dir, model_id_of  # noqa: E402
from wire.messages import SamplingParams  # noqa: E402
from node.recompute import Recomputer  # noqa: E402

F32, BF16 = torch.float32, torch.bfloat16
NEW_TOKENS = 16
SAMPLED = SamplingParams(temperature=0.8, seed=0)
HONEST = [  # name, stage dtypes, batch, prefill chunks
    ("fp32 b8", (F32, F32, F32), 8, 1),
    ("bf16 b8", (BF16, BF16, BF16), 8, 1),
    ("bf16>fp32>bf16 b8", (BF16, F32, BF16), 8, 1),
    ("fp32>bf16>fp32 b1", (F32, BF16, F32), 1, 1),
    ("bf16 chunked2 b1", (BF16, BF16, BF16), 1, 2),
]
CHEATS = [  # name, fault spec, stage dtype, gain: "skip" | "stage"
    ("noise 1e-3", "noise:0.001", F32, "stage"),
    ("skip", "skip", F32, "skip"),
    ("wrong-model", "wrong-model", F32, "stage"),
    ("lazy", "lazy", F32, "stage"),
    ("weights 1e-3", "layer", F32, "stage"),
    ("noise 1e-2 (bf16)", "noise:0.01", BF16, "stage"),
    ("weights 1e-3 (bf16)", "layer", BF16, "stage"),
]
CHEAT_STAGES = (1, 2)  # a middle stage and the last stage


def with_seed(params: SamplingParams, request: int) -> SamplingParams:
    return SamplingParams(params.temperature, params.top_p, params.seed + request)


def serve_requests(stages, prompts, batch, chunks=1, faults=None, sampling=None):
    """records[request][stage], and each request's sampling parameters (greedy when `sampling` is None)."""
    if sampling is None:
        return serve(stages, prompts, batch, chunks, faults, NEW_TOKENS), [SamplingParams()] * len(prompts)
    records, params = [], []
    for i, p in enumerate(prompts):  # one seed per request: served one group per seed
        ps = with_seed(sampling, i)
        records += serve(stages, [p], 1, chunks, faults, NEW_TOKENS, ps)
        params.append(ps)
    return records, params


def main() -> None:
    torch.set_num_threads(1)
    model_dir = default_model_dir()
    model_id = model_id_of(model_dir)
    config, tensors = load_tensors(model_dir)
    prompts = tokenize(model_dir)
    recomputer = Recomputer(model_dir, max_cached=6)
    params = DEFAULT_PARAMS
    p = params.audit_probability_ppm / PPM_DENOMINATOR
    started = time.perf_counter()
    results: dict = {"params": params.to_dict(), "new_tokens": NEW_TOKENS, "requests_per_cheat": len(prompts)}

    # -- honest: false positives and audit cost ----------------------------------------------
    honest_rows, cost = [], {}
    for name, dtypes, batch, chunks in HONEST:
        for sampling in (None, SAMPLED):
            stages = build_stages(config, tensors, model_id, dtypes)
            records, ps = serve_requests(stages, prompts, batch if sampling is None else 1, chunks, None, sampling)
            for i, per_stage in enumerate(records):
                for k, rec in enumerate(per_stage):
                    row = audit(recomputer, rec, ps[i])
                    row.update(scenario=name, sampled=sampling is not None, stage=k)
                    honest_rows.append(row)
    false_positives = [r for r in honest_rows if not r["ok"]]
    for key, rows in (("batch 1", [r for r in honest_rows if r["sampled"]]),
                      ("batch 8", [r for r in honest_rows if not r["sampled"] and "b8" in r["scenario"]])):
        recompute_s, serve_s = sum(r["recompute_s"] for r in rows), sum(r["serve_s"] for r in rows)
        cost[key] = dict(recompute_s=recompute_s, serve_s=serve_s, ratio=recompute_s / serve_s,
                         overhead_pct_at_p=100 * p * recompute_s / serve_s)
    results["honest"] = dict(audits=len(honest_rows), false_positives=len(false_positives),
                             false_positive_rate=len(false_positives) / len(honest_rows),
                             failures=[f"{r['scenario']} stage {r['stage']}: {r['reason']}" for r in false_positives],
                             audit_cost=cost)

    # -- cheats -------------------------------------------------------------------------------
    print(f"{'cheat':22} {'stage':>5} {'det/audit':>9} {'det/req@p':>9} {'gain':>7} {'slash':>9} "
          f"{'E[loss]':>9} {'deters':>6}")
    cheat_rows = {}
    for name, spec, dtype, gain_kind in CHEATS:
        for k in CHEAT_STAGES:
            s, e = RANGES[k]
            fault = None if spec == "layer" else Fault.parse(spec, seed=k)
            weights = perturb_layer(tensors, e - 1, 1e-3, seed=k) if spec == "layer" else tensors
            stages = build_stages(config, weights, model_id, (dtype,) * 3, fault_at=k, fault=fault)
            records, ps = serve_requests(stages, prompts, 1, 1, {k: fault} if fault else None, SAMPLED)
            verdicts = [audit(recomputer, per_stage[k], ps[i]) for i, per_stage in enumerate(records)]
            detection = sum(not v["ok"] for v in verdicts) / len(verdicts)
            tokens = sum(len(prompts[i]) + NEW_TOKENS - 1 for i in range(len(prompts))) // len(prompts)
            n_layers = e - s
            stage_gas = gas_units(tokens, n_layers, params)
            gain = gas_units(tokens, n_layers - n_layers // 2, params) if gain_kind == "skip" else stage_gas
            slash = slash_units_for(stage_gas, params)
            p_eff_ppm = max(1, round(params.audit_probability_ppm * detection))
            expected_loss = p * detection * slash
            deters = detection > 0 and deters_cheating(p_eff_ppm, slash, gain)
            row = dict(stage=k, dtype=str(dtype), detection_per_audit=detection, detection_per_request=p * detection,
                       gain_units=gain, gain_kind=gain_kind, slash_units=slash, expected_loss_units=expected_loss,
                       expected_net_units=(1 - p * detection) * gain - expected_loss, deters=deters,
                       reasons=sorted({v["reason"][:60] for v in verdicts}))
            cheat_rows[f"{name} @stage{k}"] = row
            print(f"{name:22} {k:>5} {detection:>9.2f} {p * detection:>9.3f} {gain:>7} {slash:>9} "
                  f"{expected_loss:>9.0f} {'yes' if deters else 'NO':>6}")
    # a verifier that lies reports the opposite of its comparison: the referee disagrees every time
    bad = Fault.parse("bad-verifier")
    lies = sum(bad.verifier_report(r["ok"]) != r["ok"] for r in honest_rows)
    cheat_rows["bad-verifier"] = dict(audits=len(honest_rows), disagreements_with_referee=lies,
                                      detection_per_audit=lies / len(honest_rows))
    print(f"{'bad-verifier':22} {'-':>5} {lies / len(honest_rows):>9.2f}   (every audit it lies on goes to the referee)")
    results["cheats"] = cheat_rows
    results["elapsed_s"] = time.perf_counter() - started

    h = results["honest"]
    print(f"\nhonest audits: {h['audits']}, false positives: {h['false_positives']} "
          f"(rate {h['false_positive_rate']:.3%})")
    for key, c in cost.items():
        print(f"audit compute, serving at {key}: one recomputation = {c['ratio']:.2f} x serving time; "
              f"at p = {p:g}: {c['overhead_pct_at_p']:.2f} % of serving compute")
    print(f"elapsed {results['elapsed_s']:.0f} s")
    out = Path(__file__).with_suffix(".json")
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

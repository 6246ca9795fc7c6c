"""The real pool on a GPU machine: coordinator and providers as processes, over libp2p and HTTP,
on a random-weight Llama-3-8B-shaped model in bfloat16, every stage of every request audited.

    python bench/gpu_pool.py --tokenizer-dir DIR [--stages 1,2] [--requests 16] [--clients 4]

For each pipeline shape (1 stage: one provider holding all 32 layers; 2 stages: two providers whose
memory caps split the layers) it serves `--requests` completions from `--clients` concurrent
clients through `/v1/completions`, then waits for the audits (p = 99.9999 %) and reads their
outcomes from the ledger: passed, failed, slashes. Prints a table; writes JSON to `--out`.

    python bench/gpu_pool.py --tokenizer-dir DIR --load 1,8,32 [--stages 1,2] [--devices cuda:0,cuda:1]

With `--load` it measures speed instead, as a user meets the pool: at each level, that many clients
stream greedy completions through the official `openai` client (`--rounds` each) with audits at
1 ppm and no witnesses; tokens/s and time to first token p50/p99, beside the in-process runtime
(node/runtime.py ShardRuntime on the same checkpoint and device, all layers, CUDA graphs) decoding
the same number of tokens at batch 1, 8 and 32 in the same run, and the ratios between them. With
`--baseline DIR` (a checkout of other code, e.g. `git archive main`) each shape's pool runs that code
first, then this code, in the same run: "this / baseline" ratios.

The checkpoint is written on the machine (no hub): Llama-3-8B shapes (hidden 4096, 32 layers,
32/8 heads, intermediate 14336) with the tokenizer of `--tokenizer-dir` (its vocabulary), weights
N(0, 0.02), embeddings N(0, 4) so the residual stream is a few times a layer's update.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from bench.api_load import run_level  # noqa: E402
from bench.shard_decode import time_ours  # noqa: E402
from bench.single_client import breakdown, metric_sums  # noqa: E402
from contracts.params import MoneyParams  # noqa: E402
from coordinator.local_pool import LocalPool  # noqa: E402
from coordinator.planner import ModelShape, ProviderSpec, stage_time_s  # noqa: E402
from node.local_pipeline import LocalPipeline  # noqa: E402
from node.models import model_id_of  # noqa: E402
from node.runtime import ShardRuntime  # noqa: E402
from node.shard import Shard  # noqa: E402

SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
             num_hidden_layers=32, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192)
PROMPTS = ["Once upon a time, in a small village,", "The three primary colors are", "def fibonacci(n):",
           "The history of the printing press begins with"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def write_model(path: Path, tokenizer_dir: Path, n_layers: int, device: str, shape: dict = SHAPE) -> None:
    """A random Llama checkpoint of `shape` (default the Llama-3-8B one) in bfloat16, one safetensors
    file per layer, with the tokenizer of `tokenizer_dir` (its vocabulary)."""
    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    path.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", **shape, "num_hidden_layers": n_layers}
    (path / "config.json").write_text(json.dumps(config))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, path / name)
    g = torch.Generator(device).manual_seed(0)
    D, I = shape["hidden_size"], shape["intermediate_size"]
    H, Hkv = shape["num_attention_heads"], shape["num_key_value_heads"]
    Dh = D // H

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device=device) * std).to(torch.bfloat16).cpu()

    index = {}
    files = {"model-embed.safetensors": {"model.embed_tokens.weight": rand(vocab, D, std=4.0),
                                         "model.norm.weight": (1 + rand(D, std=0.1).float()).bfloat16(),
                                         "lm_head.weight": rand(vocab, D)}}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        files[f"model-layer{i:02d}.safetensors"] = {
            p + "input_layernorm.weight": (1 + rand(D, std=0.1).float()).bfloat16(),
            p + "post_attention_layernorm.weight": (1 + rand(D, std=0.1).float()).bfloat16(),
            p + "self_attn.q_proj.weight": rand(H * Dh, D), p + "self_attn.k_proj.weight": rand(Hkv * Dh, D),
            p + "self_attn.v_proj.weight": rand(Hkv * Dh, D), p + "self_attn.o_proj.weight": rand(D, H * Dh),
            p + "mlp.gate_proj.weight": rand(I, D), p + "mlp.up_proj.weight": rand(I, D),
            p + "mlp.down_proj.weight": rand(D, I)}
    for file, tensors in files.items():
        save_file(tensors, str(path / file))
        index.update({name: file for name in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))


AUDIT_LINE = re.compile(r"audit (\S+) of (\S+): (passed|FAILED: .*?) \(verifier")
RECOMPUTE_MS = re.compile(r"audit \S+ of \S+: .* \(recompute (\d+) ms\)")


def audit_outcomes(pool: LocalPool) -> dict:
    """What the auditor concluded, from the coordinator's log (audits refereed without a verifier
    leave no ledger entry unless they fail): passed, failed, unchecked, escalated, and penalties."""
    log = pool.coordinator.log()
    verdicts = AUDIT_LINE.findall(log)
    failed = [{"audit": a, "subject": s, "reason": v} for a, s, v in verdicts if v != "passed"]
    penalties, after = 0, -1
    while True:
        page = pool.get(f"/ledger/entries?after={after}&limit=1000")
        penalties += sum(e["kind"] == "penalty" for e in page["entries"])
        if not page["entries"]:
            break
        after = page["next_after"]
    return {"audits": len(verdicts), "audits_failed": len(failed), "failed": failed[:5],
            "same_recipe_audits": log.count("same recipe yes"),
            "unchecked": log.count("could not be checked"), "escalated": log.count("escalating"),
            "penalties": penalties}


def devices_of(args) -> list[str]:
    return args.devices.split(",") if args.devices else [args.device]


def serve_stages(pool: LocalPool, n_stages: int, args, extra_args: list[str] = ()) -> dict:
    """Starts `n_stages` serving providers, one per device of `--devices` in turn, and waits for their
    pipeline: /pool then. bfloat16 weights of the 8B shape are 16 GB (the planner counts each provider
    at its dtype): a cap of 10 GB splits them in two."""
    cap = [] if n_stages == 1 else ["--max-memory-mb", "10000"]
    devices = devices_of(args)
    for i in range(n_stages):
        pool.add_provider(f"gpu{i}", extra_args=["--device", devices[i % len(devices)], *cap, *extra_args])
    return pool.wait_for(lambda s: len(s["pipelines"]) == 1 and len(s["pipelines"][0]["stages"]) == n_stages,
                         what=f"a {n_stages}-stage pipeline", timeout_s=300)


def run_shape(root: Path, model_dir: Path, n_stages: int, args) -> dict:
    # the coordinator referees on its CPU (the other hardware), with a few of the host's cores;
    # witnesses (newcomers on the same GPU) stay newcomers: they only verify
    dtype = ["--serving-dtype", args.serving_dtype] if args.serving_dtype != "auto" else []
    pool = LocalPool(root, model_dir, context_tokens=args.context_tokens, max_sessions=8, compute_threads=8,
                     coordinator_args=["--audit-probability-ppm", "999999", "--promotion-audits", "100000", *dtype])
    try:
        pool.start_coordinator()
        started_s = time.perf_counter()
        for i in range(args.witnesses):
            pool.add_provider(f"witness{i}", vouch=False, extra_args=["--device", args.device])
        fault = ["--fault-injection", args.fault] if args.fault else []
        state = serve_stages(pool, n_stages, args, ["--retention-mb", "8192", *fault])
        ready_s = time.perf_counter() - started_s
        key = pool.add_consumer("bench", 10**12)
        model = model_id_of(model_dir)

        def one(i: int) -> int:
            status, reply = pool.post("/v1/completions", {"model": model, "prompt": PROMPTS[i % len(PROMPTS)],
                                                          "max_tokens": args.tokens, "temperature": 0},
                                      api_key=key, timeout_s=300)
            return reply["usage"]["completion_tokens"] if status == 200 else -status

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as ex:
            counts = list(ex.map(one, range(args.requests)))
        serve_s = time.perf_counter() - t0
        deadline = time.monotonic() + args.audit_wait_s  # every stage of every request is audited
        while time.monotonic() < deadline and audit_outcomes(pool)["audits"] < n_stages * args.requests:
            time.sleep(2)
        outcomes = audit_outcomes(pool)
        # audit compute against serving compute: every stage of every request was audited here (p ~ 1),
        # so at the default p the verifiers spend p x (their recompute time) / (the stages' serving time);
        # serving time counts every stage busy for the whole serve (an upper bound: the share is at most this)
        recompute_ms = [int(ms) for proc in pool.providers.values() for ms in RECOMPUTE_MS.findall(proc.log())]
        recompute_s = sum(recompute_ms) / 1e3
        # the mean audit's recompute for every stage of every request (some may still be running)
        all_audits_s = recompute_s / max(1, len(recompute_ms)) * n_stages * args.requests
        default_p = MoneyParams().audit_probability_ppm / 1e6
        return {"stages": n_stages, "devices": devices_of(args)[:n_stages], "pipeline": state["pipelines"][0]["stages"],
                "ready_s": round(ready_s, 1),
                "witnesses": args.witnesses, "fault": args.fault, "serving_dtype": args.serving_dtype,
                "requests": args.requests, "clients": args.clients, "errors": [c for c in counts if c < 0],
                "tokens": sum(c for c in counts if c > 0), "serve_s": round(serve_s, 2),
                "tokens_per_s": round(sum(c for c in counts if c > 0) / serve_s, 1), **outcomes,
                "audits_expected": n_stages * args.requests, "recompute_s": round(recompute_s, 2),
                "recompute_audits": len(recompute_ms),
                "audit_compute_pct_at_default_p": round(100 * default_p * all_audits_s / (serve_s * n_stages), 2),
                "coordinator_log_tail": pool.coordinator.log()[-3000:] if outcomes["audits_failed"] else ""}
    finally:
        pool.stop()


def in_process_rates(model_dir: Path, device: str, batches: list[int], n_new: int, n_prompt: int = 8) -> dict:
    """Decode tokens/s of the runtime in one process (all layers on `device`, bfloat16, CUDA graphs)
    at each batch: the baseline the pool is held to."""
    model = model_id_of(model_dir)
    n_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    runtime = ShardRuntime(model_dir, Shard(model, 0, n_layers, n_layers), device=device, dtype=torch.bfloat16,
                           max_sessions=max(batches), max_seq_len=512)
    pipeline = LocalPipeline([runtime])
    generator = torch.Generator().manual_seed(0)
    rates = {}
    for b in batches:
        prompts = torch.randint(3, runtime.config.vocab_size, (b, n_prompt), generator=generator)
        time_ours(pipeline, prompts, 4)  # captures this batch's graphs
        seconds = sorted(time_ours(pipeline, prompts, n_new)[0] for _ in range(3))[1]
        rates[b] = round(b * (n_new - 1) / seconds, 1)
    del pipeline, runtime
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rates


def load_shape(root: Path, model_dir: Path, n_stages: int, levels: list[int], in_process: dict, args,
               code_dir: Path | None = None, microbatches: int | None = None) -> dict:
    """`levels` of concurrent streaming clients on a pool of `n_stages` providers, audits at 1 ppm;
    `code_dir`: the pool runs that checkout's code (a baseline) instead of this one's; `microbatches`:
    the coordinator's --microbatches (default: its own)."""
    chosen = ["--microbatches", str(microbatches)] if microbatches else []
    pool = LocalPool(root, model_dir, context_tokens=args.context_tokens, max_sessions=max(levels), compute_threads=8,
                     code_dir=code_dir, coordinator_args=["--audit-probability-ppm", "1", "--rate-limit-rps", "100000",
                                       "--serving-dtype", "bfloat16", *chosen])
    try:
        pool.start_coordinator()
        started_s = time.perf_counter()
        state = serve_stages(pool, n_stages, args)
        ready_s = time.perf_counter() - started_s
        key = pool.add_consumer("bench", 10**15)
        model = model_id_of(model_dir)
        run_level(pool, model, key, 1, 4, 1)  # warm-up
        rows = []
        for n in levels:
            run_level(pool, model, key, n, 4, 1)  # captures this batch's graphs on every stage
            before = metric_sums(pool.api)
            rows.append(run_level(pool, model, key, n, args.tokens, args.rounds))
            # where a step's time went (the coordinator's histograms over this level): the whole step as
            # the coordinator saw it, each stage's own compute (prefill steps too), the mean hop
            rows[-1]["breakdown"] = breakdown(before, metric_sums(pool.api), n_stages)
            if n in in_process:
                rows[-1]["vs_in_process"] = round(rows[-1]["tokens_per_s"] / in_process[n], 3)
        final = pool.get("/pool")
        served = final["pipelines"][0] if final["pipelines"] else state["pipelines"][0]
        check = prediction_check(model_dir, state, final, rows, args.tokens) if code_dir is None else None
        return {"stages": n_stages, "code": str(code_dir or "this"), "microbatches": microbatches,
                "devices": devices_of(args)[:n_stages],
                "ready_s": round(ready_s, 1),
                "pipeline": served["stages"], "microbatches_in_flight": served.get("microbatches"),
                "replanned": served.get("id") != state["pipelines"][0].get("id"),
                "providers_measured": [p.get("measured") for p in final.get("providers", [])], "levels": rows,
                "probed": [p.get("measured") for p in state.get("providers", [])], "predicted_vs_measured": check}
    finally:
        pool.stop()
        if args.logs is not None:  # the processes' logs, to see what a stall or a failover was
            kept = args.logs / root.name
            kept.mkdir(parents=True, exist_ok=True)
            for log in root.glob("*.log"):
                shutil.copy(log, kept / log.name)


def predicted_stage_ms(model_dir: Path, state: dict, batch: int, context_tokens: int) -> list[float]:
    """Each stage's step time at `batch` and `context_tokens` as the cost model predicts it from the
    figures /pool (`state`) shows for its provider: the probe's before any step, the steps' later."""
    shape = ModelShape.from_hf_config(json.loads((model_dir / "config.json").read_text()), name="bench",
                                      bytes_per_param=2.0, activation_bytes=2)  # served in bfloat16
    measured = {p["peer"]: p["measured"] for p in state["providers"] if p.get("measured")}
    stages = state["pipelines"][0]["stages"]
    out = []
    for i, stage in enumerate(stages):
        m = measured[stage["peer"]]
        spec = ProviderSpec(stage["peer"], 1, m["mem_bandwidth_gb_per_s"], m["matmul_tflops"],
                            step_overhead_ms=m.get("step_overhead_ms") or 0.0)
        seconds = stage_time_s(spec, shape, stage["end"] - stage["start"], i == 0, i == len(stages) - 1, batch,
                               context_tokens)
        out.append(round(seconds * 1e3, 3))
    return out


def prediction_check(model_dir: Path, ready: dict, final: dict, rows: list[dict], tokens: int) -> dict:
    """Predicted against measured: every level's stage compute as the probes' figures predicted it
    before the pool served (at the level's batch and mean context: a short prompt plus half the
    tokens), and the planner's own prediction on /pool at the end (at its workload's batch and
    context, with the coordinator's hops as steps measured them) against the largest level's step."""
    out = {"levels": []}
    same_split = [s["start"] for s in ready["pipelines"][0]["stages"]] == [
        s["start"] for s in final["pipelines"][0]["stages"]] if final["pipelines"] else False
    for r in rows:
        measured = r["breakdown"].get("stage_compute_ms")
        if not measured or not same_split:
            continue
        predicted = predicted_stage_ms(model_dir, ready, r["clients"], 12 + tokens // 2)
        out["levels"].append({"clients": r["clients"], "probe_predicted_stage_ms": predicted,
                              "measured_stage_ms": measured,
                              "ratio": [round(a / b, 3) for a, b in zip(predicted, measured)]})
    if final["pipelines"] and rows and rows[-1]["breakdown"].get("step_ms"):
        planned = final["pipelines"][0]
        measured = rows[-1]["breakdown"]
        out["planner"] = {"clients": rows[-1]["clients"], "predicted_step_ms": planned.get("predicted_step_ms"),
                          "measured_step_ms": measured["step_ms"],
                          "predicted_stage_ms": [s.get("predicted_ms") for s in planned["stages"]],
                          "measured_stage_ms": measured.get("stage_compute_ms")}
        if planned.get("predicted_step_ms"):
            out["planner"]["ratio"] = round(planned["predicted_step_ms"] / measured["step_ms"], 3)
    return out


def load_main(args, model_dir: Path, root: Path) -> None:
    levels = [int(x) for x in args.load.split(",")]
    device = devices_of(args)[0]
    in_process = {} if args.skip_in_process else in_process_rates(model_dir, device, levels, args.tokens)
    print(f"in process (one runtime, all layers, {device}): " +
          ", ".join(f"batch {b} {r} tok/s" for b, r in in_process.items()), flush=True)
    out = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device,
           "tokens": args.tokens, "rounds": args.rounds, "in_process_tokens_per_s": in_process, "rows": []}
    codes = [None] if args.baseline is None else [args.baseline.resolve(), None]
    sweep = [int(x) for x in args.microbatches.split(",")] if args.microbatches else [None]
    for n in [int(x) for x in args.stages.split(",")]:
        for code, m in itertools.product(codes, sweep):
            row = load_shape(root / f"load{n}{'b' if code else ''}m{m}", model_dir, n, levels, in_process, args,
                             code, m)
            out["rows"].append(row)
            print(f"{n} stage(s) on {','.join(row['devices'])} {[(s['start'], s['end']) for s in row['pipeline']]}"
                  f"{' (baseline)' if code else ''}{f' --microbatches {m}' if m else ''}:")
            for r in row["levels"]:
                print(f"  {r['clients']:>3} clients {r['tokens_per_s']:>8.1f} tok/s ({r.get('vs_in_process', '-')} of "
                      f"in-process)  ttft p50 {r['ttft_p50_ms']} ms p99 {r['ttft_p99_ms']} ms  errors {r['errors']}  "
                      f"steady {r.get('steady_tokens_per_s')} tok/s  "
                      f"stream {r.get('stream_decode_tokens_per_s_p50')} tok/s tail {r.get('tail_ms_p50')} ms  "
                      f"{r['breakdown']}", flush=True)
            if row["predicted_vs_measured"]:
                print(f"  predicted / measured: {json.dumps(row['predicted_vs_measured'])}", flush=True)
            args.out.write_text(json.dumps(out, indent=1))
        if args.baseline is not None and len(sweep) == 1:  # this code against the baseline, same run
            base, this = out["rows"][-2]["levels"], out["rows"][-1]["levels"]
            print("  this / baseline: " + ", ".join(
                f"{b['clients']} clients {t['tokens_per_s'] / b['tokens_per_s']:.2f}x" for b, t in zip(base, this)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer-dir", required=True, type=Path, help="a model directory with tokenizer files")
    p.add_argument("--model-dir", type=Path, help="write (or reuse) the checkpoint here")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--device", default="cuda:0", help="where the providers serve (cpu for a smoke run)")
    p.add_argument("--devices", default="", help="one per provider in turn, e.g. cuda:0,cuda:1 (overrides --device)")
    p.add_argument("--stages", default="1,2")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--context-tokens", type=int, default=512)
    p.add_argument("--audit-wait-s", type=float, default=180)
    p.add_argument("--serving-dtype", default="bfloat16", choices=("auto", "float32", "bfloat16"),
                   help="the coordinator's --serving-dtype (auto: bfloat16 only with two witnesses of the class)")
    p.add_argument("--witnesses", type=int, default=0, help="newcomers on the same GPU that only verify")
    p.add_argument("--fault", default="", help="the serving providers' --fault-injection (e.g. int8)")
    p.add_argument("--load", default="", help="client levels for a speed run, e.g. 1,8,32 (no audits)")
    p.add_argument("--rounds", type=int, default=2, help="--load: requests per client per level")
    p.add_argument("--baseline", type=Path, help="--load: a checkout whose pool is measured too, before this one's")
    p.add_argument("--skip-in-process", action="store_true", help="--load: no in-process baseline (a quick rerun)")
    p.add_argument("--microbatches", default="",
                   help="--load: the coordinator's --microbatches, each in turn (e.g. 1,2)")
    p.add_argument("--logs", type=Path, help="--load: copy each pool's process logs here (one folder a pool)")
    p.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="gpu-pool-"))
    model_dir = args.model_dir or root / "llama-3-8b-random"
    if not (model_dir / "config.json").exists():
        t0 = time.perf_counter()
        write_model(model_dir, args.tokenizer_dir, args.layers, args.device)
        print(f"checkpoint written in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.load:
        load_main(args, model_dir, root)
        return
    rows = []
    for n in [int(x) for x in args.stages.split(",")]:
        rows.append(run_shape(root / f"pool{n}", model_dir, n, args))
        r = rows[-1]
        print(f"{n} stage(s) {r['pipeline']}: {r['tokens']} tokens in {r['serve_s']} s = {r['tokens_per_s']} tok/s, "
              f"{r['clients']} clients; audits {r['audits']} ({r['audits_failed']} failed, "
              f"{r['same_recipe_audits']} by a same-class verifier), "
              f"unchecked {r['unchecked']}, escalated {r['escalated']}, penalties {r['penalties']}, "
              f"recompute {r['recompute_s']} s = {r['audit_compute_pct_at_default_p']} % of serving at the default p, "
              f"errors {r['errors']}", flush=True)
        if r["failed"]:
            print(json.dumps(r["failed"], indent=1)[:3000], flush=True)
        device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
        args.out.write_text(json.dumps({"device": device, "rows": rows}, indent=1))
        if args.fault and not r["penalties"]:
            print(f"the {args.fault} cheat was NOT slashed", flush=True)


if __name__ == "__main__":
    main()

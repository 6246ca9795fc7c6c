"""Per-layer audit calibration: honest drift and cheats, one layer checked at a time.

A stage served with `capture_trace` commits to its layer trace: its input and every layer's attention
and MLP updates (verification/trace.py). Each audit here re-executes ONE block (attention or MLP) of
ONE layer of ONE request (node/layer_reference.py) from what the stage committed as its input, in
float32 with the weights rounded to the serving dtype (the reference), and in the serving dtype
itself (same recipe), then compares (verification/layer_compare.py). Stage 0's trace row 0 (the
embeddings) is checked bit for bit.

Honest serving: prefill + decode at batch 1, and prefill in 3 chunks + decode at batch 8, in
float32 and bfloat16. Cheats: node/faults.py kinds on every layer of the stage (skip-layer on one,
token on the embeddings). Shapes: the default model (a 30-layer stage, all of it) and random-weight
Llama-3.2-1B / Llama-3-8B shapes (a few layers: a per-layer check does not depend on depth).

    nice python bench/layer_audit.py                          # CPU, all shapes, both dtypes
    python bench/layer_audit.py --device cuda --requests 32   # serve on a GPU, reference on the CPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.config import ModelConfig  # noqa: E402
from node.faults import Fault  # noqa: E402
from node.runtime import ShardRuntime  # noqa: E402
from node.shard import Shard, tensor_names  # noqa: E402
from verification.layer_compare import (FAIL, REFERENCE_THRESHOLDS, SAME_RECIPE_THRESHOLDS,  # noqa: E402
                                        check_embedding, check_update)
from verification.trace import residuals  # noqa: E402
from node.layer_reference import LayerReference  # noqa: E402

F32, BF16 = torch.float32, torch.bfloat16
CHEATS = ("int8", "fp8", "int4", "tamper", "skip-layer", "window", "token", "other-model")
# name, decode batch, prefill chunks (a batch over the requests there are: all of them at once)
SCENARIOS = (("prefill, decode b1", 1, 1), ("chunked3, decode b8", 8, 3), ("prefill, decode b64", 64, 1))
BLOCKS = ("attention", "mlp")
RANDOM_SHAPES = {  # public configs of meta-llama/Llama-3.2-1B and Meta-Llama-3-8B; vocab cut (unused)
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}
RANDOM_VOCAB = 4096
MAX_PROMPT_TOKENS = 160
WEIGHT_STD = 0.02  # Llama's initializer_range
# Embeddings of rms 4: the residual stream ~3-5x a layer's update, as in the default model's middle layers.
EMBED_STD = 4.0


def random_model(name: str, n_layers: int, seed: int = 0) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    raw = dict(architectures=["LlamaForCausalLM"], vocab_size=RANDOM_VOCAB, num_hidden_layers=n_layers,
               rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=False, **RANDOM_SHAPES[name])
    config = ModelConfig.from_dict(raw)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for n in tensor_names(config, Shard(name, 0, n_layers, n_layers)):
        shape = _shape(config, n)
        if n.endswith("norm.weight"):
            tensors[n] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            tensors[n] = torch.randn(shape, generator=g) * (EMBED_STD if "embed" in n else WEIGHT_STD)
    return config, tensors


def _shape(c: ModelConfig, name: str) -> tuple[int, ...]:
    D, I, Dh = c.hidden_size, c.intermediate_size, c.head_dim
    table = {"q_proj": (c.n_heads * Dh, D), "k_proj": (c.n_kv_heads * Dh, D), "v_proj": (c.n_kv_heads * Dh, D),
             "o_proj": (D, c.n_heads * Dh), "gate_proj": (I, D), "up_proj": (I, D), "down_proj": (D, I),
             "embed_tokens": (c.vocab_size, D), "lm_head": (c.vocab_size, D)}
    for key, shape in table.items():
        if key in name:
            return shape
    return (D,)  # norms


def default_model(n_layers: int | None):
    from bench.audit_calibration import PROMPTS
    from node.models import default_model_dir
    from node.shard import Checkpoint
    from transformers import AutoTokenizer

    model_dir = default_model_dir()
    config = ModelConfig.load(model_dir)
    end = config.n_layers if n_layers is None else n_layers
    tensors = Checkpoint(model_dir).load(tensor_names(config, Shard("m", 0, end, config.n_layers)), F32, "cpu")
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    return config, tensors, end, prompts


def make_prompts(base: list[list[int]], n: int, vocab: int, seed: int) -> list[list[int]]:
    """n prompts: the base ones, then pairs of them joined (longer contexts); random ids without a base."""
    if not base:
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(0, vocab, (int(torch.randint(72, MAX_PROMPT_TOKENS, (1,), generator=g)),),
                              generator=g).tolist()
                for _ in range(n)]
    pairs = itertools.cycle([(i, j) for i in range(len(base)) for j in range(len(base)) if i != j])
    out = list(base[:n])
    while len(out) < n:
        i, j = next(pairs)
        out.append((base[i] + base[j])[:MAX_PROMPT_TOKENS])
    return out


_sids = itertools.count()


@torch.inference_mode()
def serve(rt: ShardRuntime, prompts: list[list[int]], batch: int, chunks: int, new_tokens: int,
          seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Serve each prompt (prefill in `chunks`, then decode `new_tokens` at `batch`); greedy on a last
    stage, seeded random tokens otherwise. Returns [(ids (T,), trace (2L+1, T, D) on the CPU)]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for lo in range(0, len(prompts), batch):
        group = prompts[lo:lo + batch]
        sids = [f"la-{next(_sids)}" for _ in group]
        fed = [list(p) for p in group]
        last = []
        for sid, p in zip(sids, group):
            for piece in torch.tensor(p).tensor_split(chunks):
                y = rt.prefill(sid, piece)
            last.append(y[-1])
        for _ in range(new_tokens):
            if rt.shard.is_last:
                nxt = [int(v.argmax()) for v in last]
            else:
                nxt = torch.randint(0, rt.config.vocab_size, (len(group),), generator=g).tolist()
            y = rt.decode([(sid, torch.tensor([t])) for sid, t in zip(sids, nxt)])
            last = list(y)
            for f, t in zip(fed, nxt):
                f.append(t)
        for sid, f in zip(sids, fed):
            out.append((torch.tensor(f), rt.trace(sid).cpu()))
            rt.close(sid)
    return out


def _timed(clock: dict | None, key: str, fn, *a):
    t0 = time.perf_counter()
    out = fn(*a)
    if out[0].is_cuda:
        torch.cuda.synchronize()
    if clock is not None:
        clock[key] = clock.get(key, 0.0) + time.perf_counter() - t0
    return out


def audit_request(ref32: LayerReference, same: LayerReference | None, shard: Shard, ids: torch.Tensor,
                  trace: torch.Tensor, clock: dict | None = None) -> list[dict]:
    """Every check of one request: the embeddings (stage 0), then each layer's attention and MLP
    alone. `clock` accumulates the seconds of the float32 and same-recipe recomputes."""
    # a same-recipe recompute is judged by the thresholds of the verifier's device type
    same_thresholds = None if same is None else SAME_RECIPE_THRESHOLDS[same.device.type]
    rows = []
    if shard.is_first:
        v = check_embedding(trace[0], ref32.embed(ids).to(trace.dtype))
        rows.append(dict(layer=-1, outcome=v.outcome))
    boundaries, mids = residuals(trace)
    for i in range(shard.n_shard_layers):
        index, x, h = shard.start + i, boundaries[i], mids[i]
        r = [t.cpu() for t in _timed(clock, "reference_s", ref32.updates, index, x, h)]
        s = None if same is None else [t.cpu() for t in _timed(clock, "same_recipe_s", same.updates, index, x, h)]
        for k, block in enumerate(("attention", "mlp")):
            y = trace[1 + 2 * i + k]
            v_ref = check_update(y, r[k], index, thresholds=REFERENCE_THRESHOLDS, block=block)
            row = dict(layer=index, outcome=v_ref.outcome, **v_ref.stats.to_dict())
            if s is not None:
                st = check_update(y, r[k], index, same=s[k], thresholds=same_thresholds, block=block).stats
                # the verdict as a verifier gives it (node/layer_reference.py audit_trace): a block the
                # same-recipe count judges has its serving-dtype recompute as the reference
                judged = block in same_thresholds[y.dtype].same_blocks
                v_same = check_update(y, s[k].float() if judged else r[k], index, same=s[k],
                                      thresholds=same_thresholds, block=block)
                row.update(outcome_same=v_same.outcome, drift_ratio=st.drift_ratio, same_median=st.same_median,
                           ulp_fraction_same=st.ulp_fraction)
            rows.append(row)
    return rows


def quantiles(vals: list[float]) -> dict:
    vals = sorted(v for v in vals if not math.isnan(v))
    if not vals:
        return {}
    q = lambda p: vals[min(len(vals) - 1, int(p * len(vals)))]  # noqa: E731
    return dict(min=vals[0], p01=q(0.01), median=q(0.5), p99=q(0.99), max=vals[-1])


STAT_KEYS = ("median", "quantile", "max", "drift_ratio", "same_median", "ulp_fraction_same")


def summarise(rows: list[dict], touched=None) -> dict:
    layer_rows = [r for r in rows if r["layer"] >= 0 and (touched is None or touched(r))]
    emb = [r for r in rows if r["layer"] < 0]
    out = dict(layer_audits=len(layer_rows), failed_ref=sum(r["outcome"] == FAIL for r in layer_rows))
    if any("outcome_same" in r for r in layer_rows):
        out["failed_same"] = sum(r.get("outcome_same") == FAIL for r in layer_rows)
    if emb:
        out.update(embedding_audits=len(emb), embedding_failed=sum(r["outcome"] == FAIL for r in emb))
    for k in STAT_KEYS:
        qs = quantiles([r[k] for r in layer_rows if k in r])
        if qs:
            out[k] = qs
    return out


def per_layer_curve(rows: list[dict], key: str = "median") -> dict[int, float]:
    """The median over requests of a statistic, per layer index (is the check flat in depth?)."""
    by = {}
    for r in rows:
        if r["layer"] >= 0 and key in r and not math.isnan(r[key]):
            by.setdefault(r["layer"], []).append(r[key])
    return {k: sorted(v)[len(v) // 2] for k, v in sorted(by.items())}


def run_shape(name: str, args, results: dict) -> None:
    t0 = time.perf_counter()
    if name == "default":
        config, tensors, n_layers, base = default_model(args.layers.get(name))
    else:
        n_layers = args.layers.get(name, 2 if name == "llama-3-8b" else 4)
        config, tensors = random_model(name, n_layers)
        base = []
    shard = Shard(name, 0, n_layers, config.n_layers)
    n_req = args.requests if name == "default" else max(2, args.requests // 4)
    prompts = make_prompts(base, n_req, config.vocab_size, seed=1)
    # the longest prompts: a window of 64 tokens must cut something
    cheat_prompts = sorted(prompts, key=len, reverse=True)[:max(2, min(len(prompts), args.cheat_requests))]
    shape_out = results.setdefault(name, {"layers": n_layers, "hidden": config.hidden_size, "honest": {}, "cheats": {}})
    for dtype in args.dtypes:
        dname = str(dtype).removeprefix("torch.")
        ref32 = LayerReference(config, shard, tensors, dtype, F32, args.reference_device)
        same = None if dtype == F32 else LayerReference(config, shard, tensors, dtype, dtype, args.reference_device)

        def runtime():
            return ShardRuntime.from_tensors(config, shard, tensors, device=args.device, dtype=dtype,
                                             max_sessions=64, max_seq_len=512, capture_trace=True)

        all_rows = []
        for scen, batch, chunks in SCENARIOS:
            rt = runtime()
            t0 = time.perf_counter()
            served = serve(rt, prompts, batch, chunks, args.new_tokens)
            clock = dict(serve_s=time.perf_counter() - t0)
            rows = [r for ids, b in served for r in audit_request(ref32, same, shard, ids, b, clock)]
            del rt, served
            all_rows += rows
            s = summarise(rows)
            s["seconds"] = clock
            shape_out["honest"][f"{dname} {scen}"] = s
            show(name, dname, f"honest {scen}", s)
        shape_out["honest"][f"{dname} all"] = summarise(all_rows)
        for block in BLOCKS:  # the same-recipe limits may judge one block only (SAME_RECIPE_THRESHOLDS)
            shape_out["honest"][f"{dname} all {block}"] = summarise(all_rows, lambda r, b=block: r.get("block") == b)
        curve = shape_out[f"{dname} per-layer median"] = per_layer_curve(all_rows)
        print(f"  {dname} honest median of e_t per layer (median over requests): "
              + " ".join(f"{v:.2g}" for v in curve.values()), flush=True)
        if same is not None:
            shape_out[f"{dname} per-layer drift ratio"] = per_layer_curve(all_rows, "drift_ratio")
        for kind in args.cheats:
            rt = runtime()
            Fault.parse(kind, seed=3).install(rt)
            served = serve(rt, cheat_prompts, 8, 1, args.new_tokens)
            del rt
            per_request = [audit_request(ref32, same, shard, ids, b) for ids, b in served]
            rows = [r for rr in per_request for r in rr]
            skipped = shard.start + shard.n_shard_layers // 2
            touched = {"skip-layer": lambda r: r["layer"] == skipped, "token": lambda r: False}.get(kind)
            s = summarise(rows, touched)
            # a stage audit checks every block of every layer: caught when any check fails
            s["stage_audits"] = len(per_request)
            s["stage_caught_ref"] = sum(any(r["outcome"] == FAIL for r in rr) for rr in per_request)
            if same is not None:
                s["stage_caught_same"] = sum(any(r.get("outcome_same", r["outcome"]) == FAIL for r in rr)
                                             for rr in per_request)
            shape_out["cheats"][f"{dname} {kind}"] = s
            for block in BLOCKS:
                shape_out["cheats"][f"{dname} {kind} {block}"] = summarise(
                    rows, lambda r, b=block: r.get("block") == b and (touched is None or touched(r)))
            show(name, dname, kind, s)
        del ref32, same
    shape_out["elapsed_s"] = time.perf_counter() - t0


HEADER = (f"{'shape':13} {'dtype':8} {'scenario':24} {'audits':>6} {'fail':>5} {'failS':>5} "
          f"{'med p99/min':>11} {'q90 p99/min':>11} {'max p99/min':>11} {'ratio':>6} {'sameMed':>8} {'ulpS':>6} {'stage':>6}")


def show(shape: str, dtype: str, scen: str, s: dict) -> None:
    honest = scen.startswith("honest")
    pick = "p99" if honest else "min"

    def g(k):
        return s.get(k, {}).get(pick, float("nan"))

    audits = s["layer_audits"] + s.get("embedding_audits", 0) * (not honest and scen == "token")
    fails = s["failed_ref"] + (s.get("embedding_failed", 0) if scen == "token" else 0)
    stage = f"{s['stage_caught_ref']}/{s['stage_audits']}" if "stage_audits" in s else ""
    print(f"{shape:13} {dtype:8} {scen:24} {audits:>6} {fails:>5} {s.get('failed_same', ''):>5} "
          f"{g('median'):>11.3g} {g('quantile'):>11.3g} {g('max'):>11.3g} {g('drift_ratio'):>6.2f} {g('same_median'):>8.3g} "
          f"{g('ulp_fraction_same'):>6.3f} {stage:>6}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="where the stage serves (cpu, cuda)")
    p.add_argument("--reference-device", default="cpu", help="where the verifier recomputes")
    p.add_argument("--dtype", default="float32,bfloat16")
    p.add_argument("--shapes", default="default,llama-3.2-1b,llama-3-8b")
    p.add_argument("--layers", default="", help="layers per shape, e.g. default=30,llama-3-8b=2")
    p.add_argument("--requests", type=int, default=16, help="honest requests per scenario (default model)")
    p.add_argument("--cheat-requests", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--cheats", default=",".join(CHEATS))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--replace", action="store_true", help="drop other shapes' figures already in --out")
    p.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtypes = [getattr(torch, d) for d in args.dtype.split(",")]
    args.layers = {k: int(v) for k, v in (kv.split("=") for kv in args.layers.split(",") if kv)}
    args.cheats = [c for c in args.cheats.split(",") if c]
    results = dict(device=args.device, reference_device=args.reference_device, torch=torch.__version__,
                   host=platform.processor() or platform.machine(),
                   gpu=torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                   thresholds_ref={str(k): vars(v) for k, v in REFERENCE_THRESHOLDS.items()},
                   thresholds_same={device: {str(k): vars(v) for k, v in table.items()}
                                    for device, table in SAME_RECIPE_THRESHOLDS.items()}, shapes={})
    print("honest rows: p99 of each statistic; cheat rows: min over the layers it touches. fail: vs the fp32 "
          "reference; failS: vs same recipe; stage: stage audits caught (any check fails) / run")
    print(HEADER)
    started = time.perf_counter()
    out = Path(args.out)
    if out.exists() and not args.replace:  # keep the other shapes' figures (runs per shape, or per device)
        old = json.loads(out.read_text())
        if old.get("device") == args.device:
            results["shapes"] = old.get("shapes", {})
    for name in args.shapes.split(","):
        results["shapes"].pop(name, None)
        run_shape(name, args, results["shapes"])
        results["elapsed_s"] = time.perf_counter() - started
        out.write_text(json.dumps(results, indent=1, default=str) + "\n")  # after each shape
    print(f"elapsed {results['elapsed_s']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()

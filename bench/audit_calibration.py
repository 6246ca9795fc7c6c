"""Audit calibration: how far honest re-execution drifts, and how far cheats land, on the default model.

Requests are served through ShardRuntime exactly as stages serve them (prefill, maybe in chunks,
then one-row decode steps at batch 1 or 8; greedy), over 3 stages [0,10) [10,20) [20,30), in
float32, bfloat16 or mixed. Each (request, stage) is then audited as a verifier would: its inputs,
concatenated, go through one prefill (verification/recompute.py) in the dtype of its claimed
outputs, and the claimed outputs are compared (verification/compare.py). Honest pairs give the
drift the thresholds must allow; cheats (node/faults.py kinds, noise of several sizes, a 1e-3
relative Gaussian change of one layer's weights) give what they must catch.

    nice -n 5 .venv/bin/python bench/audit_calibration.py   # prints a table, writes bench/audit_calibration.json
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.config import ModelConfig  # noqa: E402
from node.faults import Fault  # noqa: E402
from node.models import default_model_dir, model_id_of  # noqa: E402
from node.runtime import ShardRuntime  # noqa: E402
from wire.messages import SamplingParams  # noqa: E402
from verification.sampling import sample  # noqa: E402
from node.shard import Checkpoint, Shard, tensor_names  # noqa: E402
from verification.compare import (HIDDEN_THRESHOLDS, TOKEN_MARGIN_LOGITS, compare_hidden,  # noqa: E402
                                  compare_tokens, hidden_errors, token_gap_logits)
from node.recompute import Recomputer  # noqa: E402

RANGES = [(0, 10), (10, 20), (20, 30)]
MAX_NEW_TOKENS = 32
F32, BF16 = torch.float32, torch.bfloat16
PROMPTS = [
    "Explain in a few paragraphs how a refrigerator moves heat from its inside to the room around it, "
    "and why the back of the appliance feels warm to the touch.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle that seems to have been "
    "written by her own grandmother, fifty years ago, on the very same island.",
    "List the main differences between TCP and UDP, and give one example of an application that should use "
    "each of them, with a sentence on why. Mention connection set-up, ordering, retransmission and congestion "
    "control, and say what happens to a video call and to a file download when a network starts dropping one "
    "packet in fifty. Finish with a short table that a student could copy into their notes before an exam.",
    "What were the main causes of the French Revolution? Summarise the economic, social and political "
    "factors, and mention the role of the Estates-General of 1789.",
    "A farmer has 17 sheep and all but 9 run away. How many are left? Explain the trick in the question "
    "and then give two more riddles of the same kind with their answers.",
    "Translate the following sentence into French and Spanish, then explain any differences in word order: "
    "'The old library on the hill closes early on Sundays during the winter months.'",
    "You are a helpful assistant. A user says their Python program prints 'RecursionError: maximum "
    "recursion depth exceeded'. Describe three likely causes and how to fix each one, with short code.",
    "Describe the water cycle for a ten-year-old student, covering evaporation, condensation, "
    "precipitation and collection, and suggest a simple experiment to do at home with a glass and a plate. "
    "The student lives in a dry town where it rains only a few days a year, so explain where the water in "
    "their taps comes from, why the nearby reservoir shrinks in summer, how clouds can form over the sea "
    "hundreds of kilometres away, and why the rain that falls on the mountains ends up in the river that "
    "runs through the middle of their town. Give one everyday example for every step.",
]


@dataclass
class StageRecord:
    """What one stage saw and claimed for one request (the receipt's tensors)."""

    shard: Shard
    inputs: list[torch.Tensor] = field(default_factory=list)  # ids (t,) or hidden (t, D) per step
    outputs: list[torch.Tensor] = field(default_factory=list)  # hidden (t, D) per step (last: before the norm)
    logits: list[torch.Tensor] = field(default_factory=list)  # last stage: logits of the sampled rows
    tokens: list[int] = field(default_factory=list)  # last stage: sampled tokens
    positions: list[int] = field(default_factory=list)  # last stage: their positions
    trace: torch.Tensor | None = None  # (2L + 1, T, D): the layer trace, as the runtime kept it
    serve_s: float = 0.0  # time spent in this stage's steps (batched decode: shared equally)

    def stage_input(self) -> torch.Tensor:
        return torch.cat(self.inputs)

    def claimed(self) -> torch.Tensor:
        return torch.cat(self.outputs)

    def sampled_rows(self) -> list[int]:
        return [p - 1 for p in self.positions]  # the row whose hidden state chose the token at p


def load_tensors(model_dir) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    config = ModelConfig.load(model_dir)
    names = sorted({n for s, e in RANGES for n in tensor_names(config, Shard("m", s, e, config.n_layers))})
    return config, Checkpoint(model_dir).load(names, dtype=F32, device="cpu")


def perturb_layer(tensors: dict[str, torch.Tensor], layer: int, rel: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """A copy of `tensors` with every tensor of `layer` changed by Gaussian noise of rel x its RMS."""
    generator = torch.Generator().manual_seed(seed)
    out = dict(tensors)
    for name in sorted(tensors):
        if name.startswith(f"model.layers.{layer}."):
            w = tensors[name]
            out[name] = w + rel * w.pow(2).mean().sqrt() * torch.randn(w.shape, generator=generator)
    return out


def build_stages(config, tensors, model_id, dtypes, fault_at: int | None = None, fault: Fault | None = None):
    stages = []
    for i, ((s, e), dt) in enumerate(zip(RANGES, dtypes)):
        rt = ShardRuntime.from_tensors(config, Shard(model_id, s, e, config.n_layers), tensors, dtype=dt,
                                       max_sessions=8, max_seq_len=256, capture_trace=True)
        if fault is not None and i == fault_at:
            fault.install(rt)
        stages.append(rt)
    return stages


_sids = itertools.count()


def serve(stages: list[ShardRuntime], prompts: list[list[int]], batch: int, chunks: int = 1,
          faults: dict[int, Fault] | None = None, max_new_tokens: int = MAX_NEW_TOKENS,
          params: SamplingParams = SamplingParams()) -> list[list[StageRecord]]:
    """Serve `prompts` in groups of `batch` (prefilled one by one, in `chunks` pieces, then decoded
    together); record every stage's inputs and outputs. Returns records[prompt][stage]."""
    faults = faults or {}
    last = len(stages) - 1
    records = [[StageRecord(st.shard) for st in stages] for _ in prompts]
    for g in range(0, len(prompts), batch):
        group = list(range(g, min(g + batch, len(prompts))))
        sids = {i: f"cal-{next(_sids)}" for i in group}
        generated: dict[int, list[int]] = {i: [] for i in group}
        try:
            for i in group:  # prefill
                ids = torch.tensor(prompts[i], dtype=torch.int64)
                pieces = ids.tensor_split(chunks)
                for n_piece, piece in enumerate(pieces):
                    x = piece
                    for k, st in enumerate(stages):
                        t0 = time.perf_counter()
                        out = st.prefill(sids[i], x)
                        rec = records[i][k]
                        rec.inputs.append(x)
                        if k < last:
                            out = faults[k].perturb(out) if k in faults else out
                            rec.outputs.append(out.clone())
                        else:
                            perturbed = faults[k].perturb_last_hidden(st, last_only=True) if k in faults else None
                            out = out if perturbed is None else perturbed
                            rec.outputs.append(st.last_hidden.clone())
                            if n_piece == len(pieces) - 1:  # tokens are sampled after the whole prompt
                                rec.logits.append(out[-1:].float())
                        rec.serve_s += time.perf_counter() - t0
                        x = out
                pos = len(prompts[i])
                generated[i] += sample(records[i][last].logits[-1], [params], [pos])
                records[i][last].tokens.append(generated[i][-1])
                records[i][last].positions.append(pos)
            for _ in range(max_new_tokens - 1):  # decode
                xs = {i: torch.tensor([generated[i][-1]]) for i in group}
                for k, st in enumerate(stages):
                    t0 = time.perf_counter()
                    out = st.decode([(sids[i], xs[i]) for i in group])  # (B, D) or (B, V)
                    if k < last:
                        out = faults[k].perturb(out) if k in faults else out
                        hidden = out
                    else:
                        perturbed = faults[k].perturb_last_hidden(st) if k in faults else None
                        out = out if perturbed is None else perturbed
                        hidden = st.last_hidden
                    dt = (time.perf_counter() - t0) / len(group)
                    for row, i in enumerate(group):
                        rec = records[i][k]
                        rec.inputs.append(xs[i])
                        rec.outputs.append(hidden[row:row + 1].clone())
                        rec.serve_s += dt
                        if k == last:
                            rec.logits.append(out[row:row + 1].float())
                        else:
                            xs[i] = out[row:row + 1]
                positions = [len(prompts[i]) + len(generated[i]) for i in group]
                for row, (i, pos) in enumerate(zip(group, positions)):
                    tok = sample(out[row:row + 1], [params], [pos])[0]
                    generated[i].append(tok)
                    records[i][last].tokens.append(tok)
                    records[i][last].positions.append(pos)
        finally:
            for k, st in enumerate(stages):
                for i, sid in sids.items():
                    if sid in st.sessions:
                        records[i][k].trace = st.trace(sid).clone()
                    st.close(sid)
    return records


def audit(recomputer: Recomputer, rec: StageRecord, params: SamplingParams = SamplingParams()) -> dict:
    """Re-execute one (request, stage) and compare: raw figures plus the verdict at current thresholds."""
    claimed = rec.claimed()
    t0 = time.perf_counter()
    hidden, logits = recomputer.run(rec.shard, claimed.dtype, rec.stage_input())
    recompute_s = time.perf_counter() - t0
    rel, agree = hidden_errors(claimed, hidden)
    verdict = compare_hidden(claimed, hidden, claimed.dtype)
    row = dict(rel_l2_max=float(rel.max()), topk_min=float(agree.min()), recompute_s=recompute_s,
               serve_s=rec.serve_s)
    if logits is not None:
        rows = rec.sampled_rows()
        sampled = logits[rows]  # (N, V)
        claimed_logits = torch.cat(rec.logits)
        gaps = [token_gap_logits(sampled[j], t, params, p) for j, (t, p) in enumerate(zip(rec.tokens, rec.positions))]
        row.update(logit_drift_max=float((claimed_logits - sampled).abs().max()),
                   token_gap_max=max(gaps), token_mismatches=sum(g > 0 for g in gaps))
        if verdict.ok:  # the last stage passes when its hidden states and then its tokens do
            verdict = compare_tokens(sampled, rec.tokens, rec.positions, params, claimed.dtype)
    row.update(ok=verdict.ok, reason=verdict.reason)
    return row


def summarise(rows: list[dict]) -> dict:
    out = dict(n=len(rows), failed=sum(not r["ok"] for r in rows))
    for key, fn in (("rel_l2_max", max), ("topk_min", min), ("logit_drift_max", max), ("token_gap_max", max)):
        vals = [r[key] for r in rows if key in r]
        if vals:
            out[key] = fn(vals)
            if key == "rel_l2_max":
                out["rel_l2_min"] = min(vals)
                out["rel_l2_median"] = sorted(vals)[len(vals) // 2]
            if key == "topk_min":
                out["topk_max"] = max(vals)
    mism = [r["token_mismatches"] for r in rows if "token_mismatches" in r]
    if mism:
        out["token_mismatches"] = sum(mism)
    return out


def tokenize(model_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok(p)["input_ids"] for p in PROMPTS]


HONEST = [  # name, stage dtypes, batch, prefill chunks, serve threads
    ("fp32 b1", (F32, F32, F32), 1, 1),
    ("fp32 b8", (F32, F32, F32), 8, 1),
    ("fp32 chunked2 b1", (F32, F32, F32), 1, 2),
    ("bf16 b1", (BF16, BF16, BF16), 1, 1),
    ("bf16 b8", (BF16, BF16, BF16), 8, 1),
    ("bf16 chunked3 b8", (BF16, BF16, BF16), 8, 3),
    ("mixed bf16>fp32>bf16 b8", (BF16, F32, BF16), 8, 1),
    ("mixed fp32>bf16>fp32 b8", (F32, BF16, F32), 8, 1),
]


def cheats(config) -> list[tuple[str, str, dict]]:
    """(name, kind, spec) for every cheat, at each stage."""
    out = []
    for k, (s, e) in enumerate(RANGES):
        for rel in (1e-1, 1e-2, 1e-3):
            out.append((f"noise {rel:g}", k, dict(fault=f"noise:{rel:g}")))
        for kind in ("skip", "wrong-model", "lazy", "bad-verifier"):
            out.append((kind, k, dict(fault=kind)))
        out.append(("weights 1e-3 first layer", k, dict(layer=s)))
        out.append(("weights 1e-3 last layer", k, dict(layer=e - 1)))
    return out


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model_dir = default_model_dir()
    model_id = model_id_of(model_dir)
    config, tensors = load_tensors(model_dir)
    prompts = tokenize(model_dir)
    recomputer = Recomputer(model_dir, max_cached=6)
    started = time.perf_counter()
    results = {"honest": {}, "cheats": {}}

    print(f"{'scenario':34} {'stage':>5} {'n':>3} {'fail':>4} {'rel_l2 max':>10} {'topk min':>8} "
          f"{'logit drift':>11} {'tok gap':>8}")

    def show(name, k, s):
        print(f"{name:34} {k:>5} {s['n']:>3} {s['failed']:>4} {s['rel_l2_max']:>10.3g} {s['topk_min']:>8.3f} "
              f"{s.get('logit_drift_max', float('nan')):>11.3g} {s.get('token_gap_max', float('nan')):>8.3g}")

    for name, dtypes, batch, chunks in HONEST:
        stages = build_stages(config, tensors, model_id, dtypes)
        records = serve(stages, prompts, batch, chunks)
        per_stage = {}
        for k in range(len(RANGES)):
            rows = [audit(recomputer, records[i][k]) for i in range(len(prompts))]
            per_stage[k] = dict(dtype=str(dtypes[k]), **summarise(rows))
            show(name, k, per_stage[k])
        results["honest"][name] = per_stage

    for dtype in (F32, BF16):
        for name, k, spec in cheats(config):
            fault = Fault.parse(spec.get("fault"), seed=k) if "fault" in spec else None
            if fault is not None and fault.lies_as_verifier:
                continue  # serves honestly: measured as a verifier in bench/audit_economics.py
            t = perturb_layer(tensors, spec["layer"], 1e-3, seed=k) if "layer" in spec else tensors
            stages = build_stages(config, t, model_id, (dtype,) * 3, fault_at=k, fault=fault)
            records = serve(stages, prompts[:4], 4, faults={k: fault} if fault else None, max_new_tokens=16)
            rows = [audit(recomputer, records[i][k]) for i in range(len(records))]
            s = dict(dtype=str(dtype), stage=k, **summarise(rows))
            results["cheats"][f"{dtype} {name} @stage{k}"] = s
            show(f"{str(dtype)[6:]} {name}", k, s)

    honest = [s for per in results["honest"].values() for s in per.values()]
    cheat = list(results["cheats"].values())
    summary = {}
    for dt in (F32, BF16):
        h = [s for s in honest if s["dtype"] == str(dt)]
        c = [s for s in cheat if s["dtype"] == str(dt)]
        summary[str(dt)] = dict(
            honest_rel_l2_max=max(s["rel_l2_max"] for s in h), honest_topk_min=min(s["topk_min"] for s in h),
            honest_logit_drift_max=max((s.get("logit_drift_max", 0.0) for s in h)),
            honest_token_gap_max=max((s.get("token_gap_max", 0.0) for s in h)),
            honest_failed=sum(s["failed"] for s in h), honest_audits=sum(s["n"] for s in h),
            cheat_rel_l2_min=min(s["rel_l2_min"] for s in c), cheat_audits=sum(s["n"] for s in c),
            cheat_passed=sum(s["n"] - s["failed"] for s in c),
            cheats_not_always_caught=sorted(n for n, s in results["cheats"].items()
                                            if s["dtype"] == str(dt) and s["failed"] < s["n"]),
            threshold_rel_l2=HIDDEN_THRESHOLDS[dt].rel_l2_max, threshold_topk=HIDDEN_THRESHOLDS[dt].topk_agreement_min,
            token_margin_logits=TOKEN_MARGIN_LOGITS[dt],
        )
    results["summary"] = summary
    results["elapsed_s"] = time.perf_counter() - started
    print()
    for dt, s in summary.items():
        print(f"{dt}: honest rel_l2 max {s['honest_rel_l2_max']:.3g} (threshold {s['threshold_rel_l2']:g}), "
              f"topk min {s['honest_topk_min']:.3f} (threshold {s['threshold_topk']:g}), logit drift max "
              f"{s['honest_logit_drift_max']:.3g} (margin {s['token_margin_logits']:g}); honest failed "
              f"{s['honest_failed']}/{s['honest_audits']}; cheats' min rel_l2 {s['cheat_rel_l2_min']:.3g}, cheats "
              f"passed {s['cheat_passed']}/{s['cheat_audits']}: {s['cheats_not_always_caught']}")
    print(f"elapsed {results['elapsed_s']:.0f} s")
    out = Path(__file__).with_suffix(".json")
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

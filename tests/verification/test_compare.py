"""Tolerant comparison on the default model: honest drift passes, cheats fail, bad input is refused.

Fixtures in conftest.py, shared prompts and the audit of one record in serving.py."""

from __future__ import annotations

import pytest
import torch

from bench.audit_calibration import perturb_layer
from node.runtime import ShardRuntime
from wire.messages import SamplingParams
from verification.sampling import gumbel_noise, sample
from node.shard import Shard
from tests.verification.serving import PROMPTS, PROMPTS_8, audit_record
from verification.layer_compare import REFERENCE_THRESHOLDS
from verification.compare import TOKEN_MARGIN_LOGITS, compare_hidden, compare_tokens, token_gap_logits

F32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize("dtypes,batch,chunks", [
    ((F32, F32, F32), 1, 1),
    ((F32, F32, F32), 8, 1),
    ((F32, F32, F32), 2, 2),
    ((BF16, BF16, BF16), 1, 1),
    ((BF16, BF16, BF16), 8, 1),
    ((BF16, F32, BF16), 2, 1),
    ((F32, BF16, F32), 2, 1),
], ids=["fp32-b1", "fp32-b8", "fp32-chunked", "bf16-b1", "bf16-b8", "bf16>fp32>bf16", "fp32>bf16>fp32"])
def test_honest_stages_pass(run_pool, auditor, dtypes, batch, chunks):
    records = run_pool(dtypes, batch=batch, chunks=chunks, prompts=PROMPTS_8 if batch == 8 else PROMPTS)
    for per_stage in records:
        for rec in per_stage:
            verdict = audit_record(auditor, rec)
            assert verdict.ok, (rec.shard, verdict)
    last = records[0][-1]
    assert verdict.metrics["tokens_checked"] == len(last.tokens) > 1


@pytest.mark.parametrize("layer", [10, 19])  # first and last layer of the middle stage
def test_one_layer_changed_by_1e_3_fails_in_float32(model, run_pool, auditor, layer):
    _, _, tensors, _ = model
    records = run_pool((F32,) * 3, batch=2, weights=perturb_layer(tensors, layer, 1e-3))
    for per_stage in records:
        verdict = audit_record(auditor, per_stage[1])
        assert verdict.outcome == "fail" and verdict.reason.startswith(f"layer {layer} "), verdict
        assert verdict.metrics["worst_median"] > 10 * REFERENCE_THRESHOLDS[F32].median_max
        assert audit_record(auditor, per_stage[0]).ok  # the stage before is honest


def test_recomputer_float32_equals_a_runtime_prefill(model, recomputer):
    model_dir, config, tensors, model_id = model
    ids = torch.tensor(PROMPTS[0])
    x = ids
    for start, end in ((0, 10), (10, 20), (20, 30)):
        shard = Shard(model_id, start, end, config.n_layers)
        rt = ShardRuntime(model_dir, shard, max_sessions=1, max_seq_len=64)
        out = rt.prefill("s", x, all_positions=True)
        hidden, logits = recomputer.run(shard, F32, x)
        if shard.is_last:
            assert torch.equal(hidden, rt.last_hidden) and torch.equal(logits, out)
        else:
            assert logits is None and torch.equal(hidden, out)
        x = out


def test_recomputer_refuses_wrong_inputs(model, recomputer):
    _, config, _, model_id = model
    first, middle = Shard(model_id, 0, 10, 30), Shard(model_id, 10, 20, 30)
    with pytest.raises(ValueError, match="token ids"):
        recomputer.run(first, F32, torch.zeros(4, config.hidden_size))
    with pytest.raises(ValueError, match="out of range"):
        recomputer.run(first, F32, torch.tensor([config.vocab_size]))
    with pytest.raises(ValueError, match="hidden states"):
        recomputer.run(middle, F32, torch.zeros(4, config.hidden_size + 1))
    with pytest.raises(ValueError, match="hidden states"):
        recomputer.run(middle, F32, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="does not fit"):
        recomputer.run(Shard(model_id, 0, 10, 12), F32, torch.tensor([1, 2]))


def test_shape_mismatch_and_non_finite_claims_are_refused():
    r = torch.randn(5, 64)
    assert compare_hidden(r.clone(), r, F32).ok
    v = compare_hidden(r[:4], r, F32)
    assert not v.ok and "shape mismatch" in v.reason
    bad = r.clone()
    bad[3, 7] = float("nan")
    v = compare_hidden(bad, r, F32)
    assert not v.ok and "non-finite" in v.reason and v.worst_position == 3
    bad[3, 7] = float("inf")
    assert not compare_hidden(bad, r, F32).ok
    assert not compare_hidden(torch.ones(5, 64, dtype=torch.int64), r, F32).ok
    with pytest.raises(ValueError, match="inconclusive"):
        compare_hidden(r, bad, F32)
    with pytest.raises(ValueError, match="no audit thresholds"):
        compare_hidden(r, r, torch.float64)


def test_hidden_metrics_fail_on_small_relative_changes():
    r = torch.randn(6, 576)
    v = compare_hidden(r * (1 + 1e-3), r, F32)
    assert not v.ok and abs(v.rel_l2_max - 1e-3) < 1e-5
    assert compare_hidden(r * (1 + 1e-3), r, BF16).ok  # below bf16's calibrated drift
    shuffled = r.clone()
    shuffled[2] = r[2].flip(0)  # same norm per row, other components largest
    v = compare_hidden(shuffled, r, BF16)
    assert not v.ok and v.worst_position == 2


def _tied_logits(params: SamplingParams, position: int, vocab: int, gap: float) -> torch.Tensor:
    """Logits whose sampling scores put token 7 first and token 3 `gap` logits behind it."""
    g = gumbel_noise(params.seed, position, vocab) if params.temperature else torch.zeros(vocab, dtype=torch.float64)
    t = params.temperature or 1.0
    scores = torch.full((vocab,), -20.0, dtype=torch.float64)
    scores[7], scores[3] = 5.0, 5.0 - gap / t
    return ((scores - g) * t).float()[None]  # (1, V)


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.7, seed=42)], ids=["greedy", "gumbel"])
def test_near_ties_are_tolerated_and_clear_mismatches_are_not(params):
    vocab, pos = 100, 12
    margin = TOKEN_MARGIN_LOGITS[F32]
    logits = _tied_logits(params, pos, vocab, gap=margin / 4)
    assert sample(logits, [params], [pos]) == [7]
    assert compare_tokens(logits, [7], [pos], params, F32).ok
    v = compare_tokens(logits, [3], [pos], params, F32)  # the runner-up of a near-tie
    assert v.ok and v.near_ties == 1 and v.token_mismatches == 1
    assert token_gap_logits(logits[0], 3, params, pos) == pytest.approx(margin / 4, rel=1e-3)
    logits = _tied_logits(params, pos, vocab, gap=10 * margin)
    v = compare_tokens(logits, [3], [pos], params, F32)
    assert not v.ok and "near-tie margin" in v.reason
    assert compare_tokens(logits, [3], [pos], params, BF16).ok is (10 * margin <= TOKEN_MARGIN_LOGITS[BF16])


def test_token_claims_of_the_wrong_count_or_range_are_refused():
    logits = torch.randn(3, 50)
    params = SamplingParams()
    good = sample(logits, [params] * 3, [4, 5, 6])
    assert compare_tokens(logits, good, [4, 5, 6], params, F32).ok
    assert "tokens claimed" in compare_tokens(logits, good[:2], [4, 5, 6], params, F32).reason
    assert "not in" in compare_tokens(logits, [0, 1, 50], [4, 5, 6], params, F32).reason
    with pytest.raises(ValueError):
        compare_tokens(logits, good, [4, 5], params, F32)


def test_top_p_boundary_is_a_near_tie():
    params = SamplingParams(temperature=1.0, top_p=0.499, seed=3)
    logits = torch.tensor([[2.0, 2.0 - 1e-5, -10.0, -10.0]])  # two tokens of ~0.5 each: nucleus {0}
    assert sample(logits, [params], [9]) == [0]
    v = compare_tokens(logits, [1], [9], params, F32)  # a stage whose drift ranked token 1 first
    assert v.ok and v.near_ties == 1
    assert token_gap_logits(logits[0], 2, params, 9) == float("inf")  # far outside the nucleus
    assert not compare_tokens(logits, [2], [9], params, F32).ok

"""Per-layer audits on the default model: a 3-layer stage [0, 3) served through ShardRuntime with its
layer trace captured, each layer's attention and MLP re-executed alone (node/layer_reference.py) and
compared (verification/layer_compare.py). Honest serving passes, every cheat fails, in float32 and in
bfloat16, garbage is could-not-check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.layer_audit import audit_request, serve
from node.config import ModelConfig
from node.faults import Fault
from node.runtime import ShardRuntime
from node.shard import Checkpoint, Shard, tensor_names
from verification.layer_compare import (COULD_NOT_CHECK, FAIL, PASS, REFERENCE_THRESHOLDS, SAME_RECIPE_THRESHOLDS,
                                        check_embedding, check_update, combine)
from node.layer_reference import LAST_MLP_ROWS, MLP_ROWS, LayerReference, audit_trace, mlp_rows
from verification.trace import n_trace_rows, residuals

F32, BF16 = torch.float32, torch.bfloat16
# 90-100 tokens: longer than the window cheat's 64
PROMPTS = [list(range(1000, 1090)), list(range(7000, 7200, 2))]


@pytest.fixture(scope="module")
def stage(default_model_dir):
    config = ModelConfig.load(default_model_dir)
    shard = Shard("default", 0, 3, config.n_layers)
    tensors = Checkpoint(default_model_dir).load(tensor_names(config, shard), F32, "cpu")
    refs = {dt: (LayerReference(config, shard, tensors, dt),
                 None if dt == F32 else LayerReference(config, shard, tensors, dt, compute_dtype=dt))
            for dt in (F32, BF16)}
    return config, shard, tensors, refs


def audits(stage, dtype, fault=None, batch=2, chunks=1, new_tokens=4):
    config, shard, tensors, refs = stage
    rt = ShardRuntime.from_tensors(config, shard, tensors, dtype=dtype, max_sessions=4, max_seq_len=128,
                                   capture_trace=True)
    if fault:
        Fault.parse(fault, seed=3).install(rt)
    ref32, same = refs[dtype]
    return [audit_request(ref32, same, shard, ids, b) for ids, b in serve(rt, PROMPTS, batch, chunks, new_tokens)]


def outcomes(per_request, key="outcome"):
    return [r.get(key, r["outcome"]) for rows in per_request for r in rows]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch,chunks", [(1, 1), (2, 3)], ids=["prefill-decode-b1", "chunked-decode-b2"])
def test_honest_serving_passes_every_layer(stage, dtype, batch, chunks):
    per_request = audits(stage, dtype, batch=batch, chunks=chunks)
    assert set(outcomes(per_request)) == {PASS}
    if dtype == BF16:
        assert set(outcomes(per_request, "outcome_same")) == {PASS}


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_trace_of_decode_matches_one_prefill(stage, dtype):
    """Decoded rows' traces agree with one prefill of the whole sequence (fp32: to ~1e-5), and the
    updates add up, rounded as the runtime rounds, to exactly what the stage sends."""
    config, shard, tensors, _ = stage
    rt = ShardRuntime.from_tensors(config, shard, tensors, dtype=dtype, max_sessions=2, max_seq_len=128,
                                   capture_trace=True)
    (ids, served), = serve(rt, PROMPTS[:1], 1, 1, 6)
    out = rt.prefill("one", ids)
    whole = rt.trace("one")
    assert whole.shape == served.shape == (n_trace_rows(shard.n_shard_layers), len(ids), config.hidden_size)
    assert torch.equal(out, residuals(whole)[0][-1])
    if dtype == F32:
        assert torch.allclose(served, whole, rtol=1e-4, atol=1e-4)
    plain = ShardRuntime.from_tensors(config, shard, tensors, dtype=dtype, max_sessions=2, max_seq_len=128)
    assert torch.equal(plain.prefill("p", ids), out)  # capturing changes nothing
    assert not plain.sessions["p"].trace


def test_audit_trace_gives_one_verdict(stage):
    config, shard, tensors, refs = stage
    rt = ShardRuntime.from_tensors(config, shard, tensors, dtype=BF16, max_sessions=2, max_seq_len=128,
                                   capture_trace=True)
    (ids, b), = serve(rt, PROMPTS[:1], 1, 2, 3)
    verdict, each = audit_trace(*refs[BF16], ids, b)
    assert verdict.outcome == PASS and len(each) == 2 * shard.n_shard_layers + 1  # embeddings, 2 blocks a layer
    assert audit_trace(*refs[BF16], ids, b[:-1])[0].outcome == COULD_NOT_CHECK
    forged = b.clone()
    forged[3, 5] *= 1.5  # one row of layer 1's attention update changed after the fact
    verdict, each = audit_trace(*refs[BF16], ids, forged)
    assert verdict.outcome == FAIL and verdict.layer == 1 and "attention" in verdict.reason


def test_a_same_class_verifier_recomputes_each_block_once(stage, monkeypatch):
    """Where the same-recipe count judges a block (both blocks on the CPU) the float32 reference is
    not run for it, and the verdicts stand: honest passes, a 1e-3 tampered copy fails on the count."""
    config, shard, tensors, refs = stage
    ref32, same = refs[BF16]
    asked, sampled = [], []
    real, real_same = ref32.updates, same.updates
    monkeypatch.setattr(ref32, "updates", lambda i, x, h, blocks, rows: asked.append(blocks) or real(i, x, h, blocks, rows))
    monkeypatch.setattr(same, "updates", lambda i, x, h, blocks, rows: sampled.append((blocks, len(rows)))
                        or real_same(i, x, h, blocks, rows))
    judged = SAME_RECIPE_THRESHOLDS["cpu"]
    for fault, outcome in ((None, PASS), ("tamper", FAIL)):
        rt = ShardRuntime.from_tensors(config, shard, tensors, dtype=BF16, max_sessions=2, max_seq_len=128,
                                       capture_trace=True)
        if fault:
            Fault.parse(fault, seed=3).install(rt)
        (ids, b), = serve(rt, PROMPTS[:1], 1, 1, 4)
        verdict, _ = audit_trace(ref32, same, ids, b, judged)
        assert verdict.outcome == outcome, verdict.reason
    assert "ulp" in verdict.reason
    assert asked == [()] * (2 * shard.n_shard_layers)  # every layer, twice: no float32 block recomputed
    assert sampled == [(("attention", "mlp"), MLP_ROWS)] * (2 * shard.n_shard_layers)  # the MLP at 32 of ~94
    asked.clear()
    sampled.clear()
    audit_trace(ref32, same, ids, b, SAME_RECIPE_THRESHOLDS["cuda"])  # judges the MLP only: attention in float32
    assert asked == [("attention",)] * shard.n_shard_layers
    assert sampled == [(("mlp",), MLP_ROWS)] * shard.n_shard_layers  # each block recomputed once


def test_the_mlp_is_sampled_at_the_latest_and_at_drawn_positions():
    assert mlp_rows(MLP_ROWS, torch.Generator()) is None  # a short request: every position
    draws = [mlp_rows(100, torch.Generator().manual_seed(seed)).tolist() for seed in range(2)]
    for rows in draws:
        assert len(set(rows)) == MLP_ROWS and rows == sorted(rows) and 0 <= rows[0] and rows[-1] == 99
        assert rows[-LAST_MLP_ROWS:] == list(range(100 - LAST_MLP_ROWS, 100))
    assert draws[0] != draws[1]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_a_cheat_on_the_decoded_rows_alone_fails_against_the_reference(stage, dtype):
    """Prefill honest, layer 1's MLP skipped on the decode steps: the largest row error shows it."""
    config, shard, tensors, refs = stage
    rt = ShardRuntime.from_tensors(config, shard, tensors, dtype=dtype, max_sessions=2, max_seq_len=128,
                                   capture_trace=True)
    (ids, b), = serve(rt, PROMPTS[:1], 1, 1, 4)
    forged = b.clone()
    forged[4, -4:] = 0  # layer 1's MLP "skipped" on the 4 decoded rows; layer 2 honest from there
    ref = refs[dtype][0]
    for row in (5, 6):  # layer 2's attention, then its MLP (which reads the attention's)
        boundaries, mids = residuals(forged)
        forged[row, -4:] = ref.updates(2, boundaries[2], mids[2])[row - 5][-4:].to(dtype)
    boundaries, mids = residuals(forged)
    verdicts = [check_update(forged[2 + 2 * i], ref.updates(i, boundaries[i], mids[i])[1], i,
                             thresholds=REFERENCE_THRESHOLDS, block="mlp") for i in range(3)]
    assert [v.outcome for v in verdicts] == [PASS, FAIL, PASS], [v.reason for v in verdicts]
    assert "largest" in verdicts[1].reason
    verdict, _ = audit_trace(ref, None, ids, forged)  # the MLP sampled: the latest positions always among it
    assert verdict.outcome == FAIL and verdict.layer == 1 and "mlp" in verdict.reason, verdict.reason


CHEATS = ["int8", "fp8", "int4", "tamper", "skip-layer", "window", "token", "other-model"]


@pytest.mark.parametrize("kind", CHEATS)
def test_every_cheat_fails_in_float32(stage, kind):
    per_request = audits(stage, F32, fault=kind)
    assert all(FAIL in [r["outcome"] for r in rows] for rows in per_request), kind


# bfloat16: against the float32 reference, or against a same-recipe recompute for the cheaper
# copies whose error bf16 rounding hides from the reference.
@pytest.mark.parametrize("kind", CHEATS)
def test_cheats_fail_in_bfloat16(stage, kind):
    per_request = audits(stage, BF16, fault=kind)
    for rows in per_request:
        assert FAIL in [r.get("outcome_same", r["outcome"]) for r in rows], kind


def test_could_not_check_is_never_a_pass():
    y = torch.randn(5, 16)
    assert check_update(y, torch.full((5, 16), float("nan"))).outcome == COULD_NOT_CHECK
    assert check_update(y, torch.randn(4, 16)).outcome == COULD_NOT_CHECK
    assert check_update(y, y, same=torch.randn(5, 8)).outcome == COULD_NOT_CHECK
    assert check_update(y.half(), y).outcome == COULD_NOT_CHECK  # no thresholds for float16
    assert check_embedding(y, torch.full((5, 16), float("inf"))).outcome == COULD_NOT_CHECK
    passed = check_update(y, y)
    assert passed.outcome == PASS
    assert combine([passed, check_update(y, torch.randn(4, 16))]).outcome == COULD_NOT_CHECK
    assert combine([]).outcome == COULD_NOT_CHECK
    bad = y.clone()
    bad[2, 3] = float("nan")
    assert check_update(bad, y).outcome == FAIL  # a non-finite claim is evidence of wrong work
    assert combine([passed, check_update(bad, y), check_update(y, torch.randn(4, 16))]).outcome == FAIL


def test_thresholds_sit_nearer_the_honest_side():
    """Each threshold is at least twice the honest maximum measured and at most half-way to the
    weakest cheat it is meant to catch (bench/layer_audit.json, default model)."""
    figures = json.loads((Path(__file__).parents[2] / "bench" / "layer_audit.json").read_text())["shapes"]["default"]
    checks = [  # dtype, statistic, threshold, cheat it must catch
        ("float32", "median", REFERENCE_THRESHOLDS[F32].median_max, "tamper"),
        ("float32", "quantile", REFERENCE_THRESHOLDS[F32].quantile_max, "tamper"),
        ("float32", "max", REFERENCE_THRESHOLDS[F32].max_max, "tamper"),
        ("bfloat16", "max", REFERENCE_THRESHOLDS[BF16].max_max, "skip-layer"),
        ("bfloat16", "median", REFERENCE_THRESHOLDS[BF16].median_max, "int4"),
        ("bfloat16", "quantile", REFERENCE_THRESHOLDS[BF16].quantile_max, "other-model"),
        ("bfloat16", "ulp_fraction_same", SAME_RECIPE_THRESHOLDS["cpu"][BF16].ulp_fraction_max, "tamper"),
    ]
    for dtype, stat, threshold, cheat in checks:
        honest = figures["honest"][f"{dtype} all"][stat]["max"]
        weakest = figures["cheats"][f"{dtype} {cheat}"][stat]["min"]
        assert 2 * honest <= threshold <= (honest + weakest) / 2, (dtype, stat, honest, threshold, weakest)

"""Per-layer audits on the default model: a 3-layer stage [0, 3) served through ShardRuntime with its
layer boundaries captured, each layer re-executed alone (node/layer_reference.py) and compared
(verification/layer_compare.py). Honest serving passes, every cheat fails, garbage is could-not-check."""

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
                                        check_embedding, check_layer, combine)
from node.layer_reference import LayerReference, audit_boundaries

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
                                   capture_boundaries=True)
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


def test_boundaries_of_decode_match_one_prefill(stage):
    """Decoded rows' boundaries agree with one prefill of the whole sequence (fp32: to ~1e-5)."""
    config, shard, tensors, _ = stage
    rt = ShardRuntime.from_tensors(config, shard, tensors, max_sessions=2, max_seq_len=128, capture_boundaries=True)
    (ids, served), = serve(rt, PROMPTS[:1], 1, 1, 6)
    out = rt.prefill("one", ids)
    whole = rt.boundaries("one")
    assert whole.shape == served.shape == (shard.n_shard_layers + 1, len(ids), config.hidden_size)
    assert torch.equal(out, whole[-1])  # the last boundary is what the stage sends
    assert torch.allclose(served, whole, rtol=1e-4, atol=1e-4)
    plain = ShardRuntime.from_tensors(config, shard, tensors, max_sessions=2, max_seq_len=128)
    assert torch.equal(plain.prefill("p", ids), out)  # capturing changes nothing
    assert not plain.sessions["p"].boundaries


def test_audit_boundaries_gives_one_verdict(stage):
    config, shard, tensors, refs = stage
    rt = ShardRuntime.from_tensors(config, shard, tensors, dtype=BF16, max_sessions=2, max_seq_len=128,
                                   capture_boundaries=True)
    (ids, b), = serve(rt, PROMPTS[:1], 1, 2, 3)
    verdict, each = audit_boundaries(*refs[BF16], ids, b)
    assert verdict.outcome == PASS and len(each) == shard.n_shard_layers + 1
    assert audit_boundaries(*refs[BF16], ids, b[:-1])[0].outcome == COULD_NOT_CHECK
    forged = b.clone()
    forged[2, 5] += 0.5  # one row of one boundary changed after the fact
    verdict, each = audit_boundaries(*refs[BF16], ids, forged)
    assert verdict.outcome == FAIL and verdict.layer == 1


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_a_cheat_on_the_decoded_rows_alone_fails_against_the_reference(stage, dtype):
    """Prefill honest, the decode steps of one layer skipped: the largest row error shows it."""
    config, shard, tensors, refs = stage
    rt = ShardRuntime.from_tensors(config, shard, tensors, dtype=dtype, max_sessions=2, max_seq_len=128,
                                   capture_boundaries=True)
    (ids, b), = serve(rt, PROMPTS[:1], 1, 1, 4)
    forged = b.clone()
    forged[2, -4:] = forged[1, -4:]  # layer 1 "skipped" on the 4 decoded rows; later layers honest from there
    forged[3, -4:] = refs[dtype][0].layer(2, forged[2])[-4:].to(dtype)  # layer 2 honest from its input
    verdicts = [check_layer(forged[i], forged[i + 1], refs[dtype][0].layer(i, forged[i]), i,
                            thresholds=REFERENCE_THRESHOLDS) for i in range(3)]
    assert [v.outcome for v in verdicts] == [PASS, FAIL, PASS], [v.reason for v in verdicts]
    assert "largest" in verdicts[1].reason


CHEATS = ["int8", "fp8", "int4", "tamper", "skip-layer", "window", "token", "other-model"]


@pytest.mark.parametrize("kind", CHEATS)
def test_every_cheat_fails_in_float32(stage, kind):
    per_request = audits(stage, F32, fault=kind)
    assert all(FAIL in [r["outcome"] for r in rows] for rows in per_request), kind


# bfloat16: against the float32 reference, or against a same-recipe recompute for the cheaper
# copies whose error bf16 rounding hides from the reference (tamper is hidden from both: not listed).
@pytest.mark.parametrize("kind", ["int8", "fp8", "int4", "skip-layer", "window", "token", "other-model"])
def test_cheats_fail_in_bfloat16(stage, kind):
    per_request = audits(stage, BF16, fault=kind)
    for rows in per_request:
        assert FAIL in [r.get("outcome_same", r["outcome"]) for r in rows], kind


def test_could_not_check_is_never_a_pass():
    x, y = torch.randn(5, 16), torch.randn(5, 16)
    assert check_layer(x, y, torch.full((5, 16), float("nan"))).outcome == COULD_NOT_CHECK
    assert check_layer(x, y, torch.randn(4, 16)).outcome == COULD_NOT_CHECK
    assert check_layer(x, y, y, same=torch.randn(5, 8)).outcome == COULD_NOT_CHECK
    assert check_layer(x, y.half(), y).outcome == COULD_NOT_CHECK  # no thresholds for float16
    assert check_embedding(y, torch.full((5, 16), float("inf"))).outcome == COULD_NOT_CHECK
    passed = check_layer(x, y, y)
    assert passed.outcome == PASS
    assert combine([passed, check_layer(x, y, torch.randn(4, 16))]).outcome == COULD_NOT_CHECK
    assert combine([]).outcome == COULD_NOT_CHECK
    bad = y.clone()
    bad[2, 3] = float("nan")
    assert check_layer(x, bad, y).outcome == FAIL  # a non-finite claim is evidence of wrong work
    assert combine([passed, check_layer(x, bad, y), check_layer(x, y, torch.randn(4, 16))]).outcome == FAIL


def test_thresholds_sit_nearer_the_honest_side():
    """Each threshold is above the honest maximum measured and at most half-way to the weakest cheat
    it is meant to catch (bench/layer_audit.json, default model)."""
    figures = json.loads((Path(__file__).parents[2] / "bench" / "layer_audit.json").read_text())["shapes"]["default"]
    checks = [  # dtype, statistic, threshold, cheat it must catch
        ("float32", "median", REFERENCE_THRESHOLDS[F32].median_max, "tamper"),
        ("float32", "quantile", REFERENCE_THRESHOLDS[F32].quantile_max, "tamper"),
        ("float32", "max", REFERENCE_THRESHOLDS[F32].max_max, "tamper"),
        ("bfloat16", "max", REFERENCE_THRESHOLDS[BF16].max_max, "skip-layer"),
        ("bfloat16", "median", REFERENCE_THRESHOLDS[BF16].median_max, "int4"),
        ("bfloat16", "quantile", REFERENCE_THRESHOLDS[BF16].quantile_max, "int4"),
        ("bfloat16", "same_median", SAME_RECIPE_THRESHOLDS["cpu"][BF16].same_median_max, "int8"),
        ("bfloat16", "ulp_fraction_same", SAME_RECIPE_THRESHOLDS["cpu"][BF16].ulp_fraction_max, "int8"),
    ]
    for dtype, stat, threshold, cheat in checks:
        honest = figures["honest"][f"{dtype} all"][stat]["max"]
        weakest = figures["cheats"][f"{dtype} {cheat}"][stat]["min"]
        assert honest < threshold <= (honest + weakest) / 2, (dtype, stat, honest, threshold, weakest)

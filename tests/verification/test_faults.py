"""Injected faults: each kind, served through ShardRuntime, fails its audit (bad-verifier lies instead)."""

from __future__ import annotations

import pytest
import torch

from node.faults import FAULT_KINDS, Fault, SkippedLayer
from node.fused import Ops
from node.layer_reference import LayerAuditor
from verification.check import FAIL
from node.runtime import ShardRuntime
from node.shard import Shard
from tests.verification.serving import PROMPTS, audit_record

F32, BF16 = torch.float32, torch.bfloat16


def test_parse():
    assert Fault.parse(None) is None and Fault.parse("") is None
    assert Fault.parse("noise").noise_rel == 1e-2
    assert Fault.parse("noise:1e-3").noise_rel == 1e-3
    assert [Fault.parse(k).kind for k in FAULT_KINDS] == list(FAULT_KINDS)
    with pytest.raises(ValueError, match="unknown fault 'sloppy'"):
        Fault.parse("sloppy")
    with pytest.raises(ValueError, match="takes no argument"):
        Fault.parse("skip:3")
    with pytest.raises(ValueError, match="not a number"):
        Fault.parse("noise:lots")
    with pytest.raises(ValueError):
        Fault("noise", noise_rel=0.0)


@pytest.mark.parametrize("stage", [1, 2], ids=["middle", "last"])
@pytest.mark.parametrize("kind", ["noise", "noise:1e-3", "skip", "wrong-model", "lazy"])
def test_every_serving_fault_fails_its_audit(run_pool, auditor, kind, stage):
    fault = Fault.parse(kind, seed=1)
    records = run_pool((F32,) * 3, batch=2, fault_at=stage, fault=fault)
    for per_stage in records:
        verdict = audit_record(auditor, per_stage[stage])
        assert not verdict.ok, (kind, verdict)
        assert audit_record(auditor, per_stage[0]).ok  # the honest stage upstream still passes


@pytest.mark.parametrize("kind", ["noise:0.1", "skip", "lazy"])
def test_coarse_faults_fail_in_bfloat16(run_pool, auditor, kind):
    records = run_pool((BF16,) * 3, batch=2, fault_at=1, fault=Fault.parse(kind))
    assert not any(audit_record(auditor, per_stage[1]).ok for per_stage in records)


@pytest.mark.parametrize("kind", ["int8", "tamper"])
def test_fine_copies_in_bfloat16_are_caught_by_a_verifier_of_their_hardware_class(run_pool, auditor, model, kind):
    """An 8-bit or 1e-3-tampered copy served in bfloat16 hides inside bf16's own rounding from a float32
    reference; a verifier of the stage's hardware class also re-runs its recipe and catches it."""
    same_class = LayerAuditor(model[0], hardware_class="cpu/test")
    records = run_pool((BF16,) * 3, batch=2, fault_at=1, fault=Fault.parse(kind, seed=1))
    for per_stage in records:
        caught = audit_record(same_class, per_stage[1], hardware_class="cpu/test")
        assert caught.outcome == FAIL and caught.metrics["same_recipe"], caught
        assert audit_record(same_class, per_stage[0], hardware_class="cpu/test").ok  # honest, same check
        # another class's verifier runs the reference alone
        assert not audit_record(same_class, per_stage[1], hardware_class="cpu/other").metrics["same_recipe"]
    if kind == "tamper":  # the reference alone lets this one through: what the class's verifier adds
        assert audit_record(auditor, records[0][1]).ok


def test_a_same_class_verifier_keeps_each_shards_references_with_their_twins(run_pool, model):
    """A same-recipe audit needs two references of its shard (float32, and the stage's recipe), kept
    as one of `max_cached` shards: a verifier auditing two stages in turn builds each reference once."""
    verifier = LayerAuditor(model[0], hardware_class="cpu/test", max_cached=2)
    per_stage = run_pool((BF16,) * 3, batch=1)[0]
    for _ in range(2):
        for rec in per_stage[:2]:
            assert audit_record(verifier, rec, hardware_class="cpu/test").ok
    assert verifier.references_built == 4
    assert audit_record(verifier, per_stage[2], hardware_class="cpu/test").ok  # a third shard: the oldest goes
    assert audit_record(verifier, per_stage[1], hardware_class="cpu/test").ok
    assert verifier.references_built == 6
    assert audit_record(verifier, per_stage[0], hardware_class="cpu/test").ok  # gone, so built again
    assert verifier.references_built == 8
    float32_stage = run_pool((F32,) * 3, batch=1)[0][0]  # its recipe is the reference: one built
    assert audit_record(verifier, float32_stage, hardware_class="cpu/test").ok
    assert verifier.references_built == 9


def test_bad_verifier_serves_honestly_but_lies(run_pool, auditor):
    fault = Fault.parse("bad-verifier")
    records = run_pool((F32,) * 3, fault_at=1, fault=fault)
    honest = audit_record(auditor, records[0][1])
    assert honest.ok and fault.lies_as_verifier
    assert fault.verifier_report(honest.ok) is False and fault.verifier_report(False) is True
    assert not Fault.parse("skip").lies_as_verifier


def test_skip_and_lazy_keep_the_cache_bookkeeping(model):
    model_dir, config, tensors, model_id = model
    shard = Shard(model_id, 0, 5, config.n_layers)
    ids = torch.tensor(PROMPTS[0][:6])
    skip = ShardRuntime.from_tensors(config, shard, tensors, max_sessions=2, max_seq_len=32)
    skip.fused_rows = Ops(use_triton=False)  # as on a GPU: prompts through the fused ops of the real layers
    Fault.parse("skip").install(skip)
    assert skip.fused_rows is None and skip.graphs is None  # the cheat's modules serve every step
    assert [isinstance(m, SkippedLayer) for m in skip.model.layers] == [False, False, True, True, True]
    skip.prefill("a", ids)
    skip.decode([("a", torch.tensor([7]))])
    assert skip.sessions["a"].n_tokens == 7
    lazy = ShardRuntime.from_tensors(config, shard, tensors, max_sessions=2, max_seq_len=32)
    Fault.parse("lazy").install(lazy)
    assert torch.equal(lazy.prefill("a", ids), lazy.model.embed(ids))  # stage 0 returns the embeddings
    middle = ShardRuntime.from_tensors(config, Shard(model_id, 10, 11, config.n_layers), tensors, max_seq_len=32)
    Fault.parse("skip").install(middle)  # one layer: it is the one skipped
    h = torch.randn(3, config.hidden_size)
    assert torch.equal(middle.prefill("a", h), h)


def test_noise_is_deterministic_and_sized():
    x = torch.randn(4, 576) * 3
    a, b = Fault.parse("noise:1e-2", seed=5), Fault.parse("noise:1e-2", seed=5)
    ya, yb = a.perturb(x), b.perturb(x)
    assert torch.equal(ya, yb) and not torch.equal(a.perturb(x), ya)  # same seed, same steps; next step differs
    rel = ((ya - x).norm(dim=-1) / x.norm(dim=-1))
    assert torch.all((rel > 0.8e-2) & (rel < 1.2e-2))
    assert Fault.parse("skip").perturb(x) is x
    assert a.perturb(x.to(BF16)).dtype == BF16

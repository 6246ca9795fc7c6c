"""Receipts and audits of one request through two real stages (StageWorker over ShardRuntime),
in one process: what the stages sign and retain, what the coordinator pays on, what an audit
concludes from the retained tensors."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
import torch

from coordinator.receipts import ReceiptBoard
from ledger.errors import ReceiptError
from ledger.receipts import StageReceipt
from node.config import ModelConfig
from node.models import model_id_of
from node.faults import Fault
from node.retention import RetentionStore, SessionRecord
from verification.commitments import tensor_digest, trace_digest, trace_matches
from node.runtime import ShardRuntime
from wire.messages import SamplingParams
from node.shard import Shard
from node.stage import StageWorker
from node.transport.identity import Identity
from tests.node.random_models import make_random_model
from verification.check import check_stage
from wire.messages import AuditTask, Close, Stage, Step
from node.layer_reference import LayerAuditor

PROMPT = [3, 17, 5, 9, 11]
SAMPLING = SamplingParams(temperature=0.9, seed=1234)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_random_model("llama", path, n_layers=4)
    return path


def stages(model_dir, fault: Fault | None = None):
    n = ModelConfig.load(model_dir).n_layers
    out = []
    for start, end in ((0, 2), (2, n)):
        runtime = ShardRuntime(model_dir, Shard(model_id_of(model_dir), start, end, n), max_sessions=4, max_seq_len=64,
                               capture_trace=True)
        if fault is not None and start == 0:
            fault.install(runtime)
        out.append(StageWorker(runtime, "p", Identity.generate(), RetentionStore(),
                               fault if start == 0 else None))
    return out


def serve(workers, request_id: str, n_decode: int = 3) -> tuple[list[int], list[StageReceipt]]:
    """Prefill, then decode steps batched with a second session; returns the tokens and the receipts."""
    step = iter(range(1000))
    tokens = {}
    for sid, prompt in (("a", PROMPT), ("b", [1, 2])):
        x = torch.tensor(prompt)
        for w in workers:
            out = w.step(Step("p", next(step), "prefill", (sid,), (0,), (SAMPLING,), (), x))
            x = getattr(out, "x", None)
        tokens[sid] = [out.tokens[0]]
    for _ in range(n_decode):
        positions = [len(PROMPT) + len(tokens["a"]) - 1, 2 + len(tokens["b"]) - 1]
        x = torch.tensor([tokens["a"][-1], tokens["b"][-1]])
        for w in workers:
            out = w.step(Step("p", next(step), "decode", ("a", "b"), tuple(positions), (SAMPLING,) * 2, (), x))
            x = getattr(out, "x", None)
        for sid, t in zip(["a", "b"], out.tokens):
            tokens[sid].append(t)
    receipts = [r for w in workers for r in w.close(Close("p", ("a", "b"), (request_id, "")))]
    return tokens["a"], receipts


def request_of(request_id, workers, tokens):
    return SimpleNamespace(request_id=request_id, prompt_ids=list(PROMPT), tokens=list(tokens),
                           tokens_processed=len(PROMPT) + len(tokens) - 1,
                           stages=tuple(Stage(w.identity.peer_id_str, w.runtime.shard.start, w.runtime.shard.end)
                                        for w in workers))


def audit_task(request_id: str, worker, receipt) -> AuditTask:
    shard = worker.runtime.shard
    return AuditTask(f"{request_id}.0", request_id, receipt.provider_id, (), shard.model_id, shard.start, shard.end,
                     shard.n_layers, receipt.input_hash, receipt.output_hash, receipt.layers_hash, receipt.dtype,
                     "", SAMPLING, 0, b"")


def test_stages_sign_receipts_that_chain_and_the_coordinator_pays_on_them(model_dir):
    workers = stages(model_dir)
    tokens, receipts = serve(workers, "req-1")
    assert len(receipts) == 2  # one per stage, none for the session closed without a request id
    first, last = receipts
    assert all(r.signature_valid() and r.request_id == "req-1" for r in receipts)
    assert first.token_count == last.token_count == len(PROMPT) + len(tokens) - 1
    assert first.input_hash == tensor_digest([torch.tensor(PROMPT + tokens[:-1])])
    assert last.input_hash == first.output_hash  # what stage 0 sent is what stage 1 took
    board = ReceiptBoard()
    for w, r in zip(workers, receipts):
        board.add(r, w.identity.peer_id_str)
    assert board.collect(request_of("req-1", workers, tokens), model_id_of(model_dir), timeout_s=1) == receipts


def test_receipts_that_do_not_match_are_refused_or_not_paid(model_dir):
    workers = stages(model_dir)
    tokens, receipts = serve(workers, "req-2")
    board = ReceiptBoard()
    stranger = Identity.generate()
    with pytest.raises(ReceiptError, match="sent by"):  # a receipt for another provider's work
        board.add(receipts[0], stranger.peer_id_str)
    forged = StageReceipt(**{**receipts[0].to_dict(), "token_count": receipts[0].token_count + 100})
    with pytest.raises(ReceiptError, match="signature"):
        board.add(forged, workers[0].identity.peer_id_str)
    for w, r in zip(workers, receipts):
        board.add(r, w.identity.peer_id_str)
    # the coordinator saw one token fewer than the stages claim: nothing checks out, nothing is paid
    assert board.collect(request_of("req-2", workers, tokens[:-1]), model_id_of(model_dir), timeout_s=1) == []


def test_audits_pass_honest_stages_and_fail_tampered_or_cheating_ones(model_dir):
    auditor = LayerAuditor(model_dir)
    workers = stages(model_dir)
    tokens, receipts = serve(workers, "req-3")
    for w, r in zip(workers, receipts):
        kept = w.retained.get("req-3")
        task = audit_task("req-3", w, r)
        assert r.layers_hash and r.dtype == "float32"  # the receipt commits to the layer trace
        outcome = check_stage(auditor, task, kept.tensors)
        assert outcome.ok and outcome.metrics["layers_checked"] == w.runtime.shard.n_shard_layers, outcome
        forged = [kept.stage_input, kept.output[0] * 1.01, *kept.output[1:], kept.trace]
        outcome = check_stage(auditor, task, forged)
        assert outcome.outcome == "fail" and "output hash" in outcome.reason
        trace = kept.trace.clone()
        trace[1] *= 1.01  # an update unlike the one committed to
        outcome = check_stage(auditor, task, [*kept.tensors[:-1], trace])
        assert outcome.outcome == "fail" and "layers hash" in outcome.reason
    assert workers[1].retained.get("req-3").output[2].tolist() == tokens  # the last stage keeps what it sent

    cheats = stages(model_dir, Fault.parse("noise:1e-2"))  # stage 0 perturbs what it sends, and signs it
    _, receipts = serve(cheats, "req-4")
    kept = cheats[0].retained.get("req-4")
    outcome = check_stage(auditor, audit_task("req-4", cheats[0], receipts[0]), kept.tensors)
    assert outcome.outcome == "fail" and "not what the trace's updates add up to" in outcome.reason


def test_retention_forgets_after_the_window_or_over_the_budget():
    now = [0.0]
    store = RetentionStore(window_s=10.0, budget_bytes=3000, clock=lambda: now[0])
    record = SessionRecord()
    record.add(torch.zeros(4, 64), torch.ones(4, 64))  # 2 KiB sealed
    store.put("a", record.seal())
    assert store.get("a") is not None
    store.put("b", record.seal())  # over the budget: the oldest goes
    assert store.get("a") is None and store.get("b") is not None
    now[0] = 11.0
    assert store.get("b") is None


def test_tensor_digest_covers_dtype_shape_and_bytes():
    x = torch.arange(6, dtype=torch.float32)
    assert tensor_digest([x]) == tensor_digest([x.clone()])
    assert tensor_digest([x]) != tensor_digest([x.reshape(2, 3)])
    assert tensor_digest([x]) != tensor_digest([x.to(torch.bfloat16)])
    assert tensor_digest([x, x]) != tensor_digest([torch.cat([x, x])])


def test_trace_digest_binds_every_row_and_earlier_receipts_still_check():
    """The layers hash is taken row by row: SHA-256 over a tag, the trace's dtype and shape, then each
    row's tensor digest; a receipt that hashed the trace as one tensor (before) is still accepted for
    the same trace, and neither for a changed one."""
    trace = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    digest = trace_digest(trace)
    rows = b"".join(bytes.fromhex(tensor_digest([row])) for row in trace)
    assert digest == hashlib.sha256(b"meshpool-trace/2\x00bfloat16[5, 3, 8]\x00" + rows).hexdigest()
    assert digest == trace_digest(trace.clone()) and digest != tensor_digest([trace])
    assert trace_digest(trace.reshape(5, 8, 3)) != digest and trace_digest(trace.float()) != digest
    changed = trace.clone()
    changed[4, 2, 7] += 1
    assert trace_digest(changed) != digest
    for layers_hash in (digest, tensor_digest([trace])):
        assert trace_matches(trace, layers_hash) and not trace_matches(changed, layers_hash)

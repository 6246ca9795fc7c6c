"""Batched multi-session prefill: new requests that arrive together are prefilled in one step (one pass
over each stage's weights, every session attending only to its own keys), with running decodes riding
along; each session's tokens, receipts' records and layer traces are as if it had been served alone.

The driver (coordinator/driver.py) drives two real stages (StageWorker over ShardRuntime on the default
model) in this process, every step and result through its wire frames; the single-session path and
`transformers` generate are the references. The multi-process pool under a burst of clients is covered in
tests/coordinator/test_api_e2e.py."""

from __future__ import annotations

import concurrent.futures
import pytest
import torch

from coordinator.driver import GenerationRequest, PipelineDriver
from node.config import ModelConfig
from node.layer_reference import LayerAuditor
from node.models import model_id_of
from node.retention import RetentionStore
from node.runtime import ShardRuntime
from node.shard import Shard
from node.stage import StageWorker
from node.transport.identity import Identity
from verification.check import check_stage
from wire.messages import AuditTask, Close, MessageError, Result, SamplingParams, Step, decode

GREEDY = SamplingParams()
NEW_TOKENS = 6
CHUNK_TOKENS = 24  # small, so that the prompts below need two prefill steps and one of them chunks
PROMPTS = ["Once upon a time, in a small village,", "The three primary colors are", "def fibonacci(n):",
           "The history of the printing press begins", "Water boils at",
           "A long prompt: " + "the quick brown fox jumps over the lazy dog, " * 3]


class InProcessLink:
    """A pipeline of StageWorkers in this process, one step at a time in step order, each hop through
    the message's wire frame (as between processes)."""

    def __init__(self, workers: list[StageWorker]):
        self.workers = workers
        self.pool = concurrent.futures.ThreadPoolExecutor(1)
        self.steps: list[Step] = []

    def send(self, step, timeout_s, on_done):
        self.steps.append(step)
        future = self.pool.submit(self._run, step)
        future.add_done_callback(on_done)
        return future

    def _run(self, step: Step) -> Result:
        message = step
        for worker in self.workers:
            message = worker.step(decode(message.to_frame(), Step))
        return decode(message.to_frame(), Result)

    def close_sessions(self, sessions, requests):
        close = Close("p", tuple(sessions), tuple(requests))
        self.pool.submit(lambda: [w.close(close) for w in self.workers]).result()

    def abort(self, reason):
        pass

    def shutdown(self):
        self.pool.shutdown(wait=False)


def make_workers(model_dir) -> list[StageWorker]:
    n = ModelConfig.load(model_dir).n_layers
    return [StageWorker(ShardRuntime(model_dir, Shard(model_id_of(model_dir), start, end, n), max_sessions=8,
                                     max_seq_len=256, capture_trace=True), "p", Identity.generate(), RetentionStore())
            for start, end in ((0, n // 2), (n // 2, n))]


def serve(model_dir, prompts: list[list[int]], together: bool):
    """Serve `prompts` (all submitted before the driver starts, or one after another) on fresh stages;
    their tokens, the stages' retained records by request id, and the steps sent."""
    link = InProcessLink(make_workers(model_dir))
    driver = PipelineDriver("p", link, on_failure=lambda *a: pytest.fail(f"pipeline failed: {a[2]}"), max_batch=8,
                            microbatches=2, prefill_chunk_tokens=CHUNK_TOKENS)
    requests = [GenerationRequest(list(p), NEW_TOKENS, GREEDY, request_id=f"r{i}") for i, p in enumerate(prompts)]
    if together:
        for r in requests:
            driver.submit(r)
        driver.start()
    else:
        driver.start()
        for r in requests:
            driver.submit(r)
            assert r.done.wait(120)
    try:
        for r in requests:
            assert r.done.wait(120) and r.error is None, r.error
    finally:
        driver.stop()
    retained = [{r.request_id: w.retained.get(r.request_id) for r in requests} for w in link.workers]
    return [r.tokens for r in requests], retained, link


@pytest.fixture(scope="module")
def prompt_ids(default_reference):
    _, tokenizer = default_reference
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def served(default_model_dir, prompt_ids):
    return serve(default_model_dir, prompt_ids, together=True), serve(default_model_dir, prompt_ids, together=False)


def test_a_burst_of_requests_is_prefilled_in_shared_steps_with_decodes_riding_along(served, prompt_ids):
    (_, _, link), (_, _, alone_link) = served
    prefills = [s for s in link.steps if s.kind == "prefill"]
    assert len(prefills[0].sessions) >= 3  # the short prompts that fit CHUNK_TOKENS rows, in one step
    assert prefills[0].rows == tuple(len(p) for p in prompt_ids[:len(prefills[0].sessions)])
    assert sum(prefills[0].rows) <= CHUNK_TOKENS
    assert any(s.kind == "chunk" for s in link.steps)  # the long prompt still goes in chunks
    # a later prefill carries sessions already decoding, one row each
    assert any(1 in s.rows and any(p > 0 for p in s.positions) and len(s.sessions) > 1 for s in prefills[1:])
    prompt_rows = sum(len(p) for p in prompt_ids)
    assert len(prefills) < len(prompt_ids)
    assert all(len(s.sessions) == 1 for s in alone_link.steps if s.kind == "prefill")
    assert sum(sum(s.rows) for s in link.steps if s.kind != "decode") >= prompt_rows


def test_every_session_gets_the_tokens_it_gets_alone_and_transformers_greedy(served, prompt_ids, default_reference):
    (together, _, _), (alone, _, _) = served
    assert together == alone
    model, _ = default_reference
    for i in (0, 2, len(PROMPTS) - 1):  # a first-step prompt, a later one, the chunked one (the rest: as alone)
        ids, tokens = prompt_ids[i], together[i]
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False)
        assert out[0, x.shape[1]:].tolist() == tokens


def test_each_session_keeps_its_own_records_and_trace_and_passes_its_audit(served, default_model_dir):
    (tokens, kept, _), (_, kept_alone, _) = served
    auditor = LayerAuditor(default_model_dir)
    for stage, (batched, alone) in enumerate(zip(kept, kept_alone)):
        for request_id in batched:
            a, b = batched[request_id], alone[request_id]
            assert a.trace.shape == b.trace.shape  # (2L + 1, tokens the stage fed, D)
            torch.testing.assert_close(a.trace, b.trace, atol=2e-3, rtol=1e-3)
            assert a.stage_input.shape == b.stage_input.shape
            if stage == 0:
                assert torch.equal(a.stage_input, b.stage_input)  # the session's own token ids, in order
            else:
                assert [o.tolist() for o in a.output[1:]] == [o.tolist() for o in b.output[1:]]  # positions, tokens
            if request_id == "r0":  # an audit of one request per stage (each re-runs the stage's layers)
                n = ModelConfig.load(default_model_dir).n_layers
                start, end = (0, n // 2) if stage == 0 else (n // 2, n)
                task = AuditTask("a", request_id, "x", (), model_id_of(default_model_dir), start, end, n, a.input_hash,
                                 a.output_hash, a.layers_hash, "float32", "", GREEDY, 0, b"")
                outcome = check_stage(auditor, task, a.tensors)
                assert outcome.ok, outcome
    assert all(len(t) == NEW_TOKENS for t in tokens)


def test_a_prefill_of_several_sessions_must_say_their_rows():
    x = torch.arange(7)
    step = Step("p", 1, "prefill", ("a", "b"), (0, 4), (GREEDY,) * 2, (), x, (5, 2))
    assert decode(step.to_frame(), Step).rows == (5, 2)
    for bad, reason in (((), "lengths"), ((5, 1), "add up"), ((7, 0), "positive"), ((7,), "one positive")):
        with pytest.raises(MessageError, match=reason):
            decode(Step("p", 1, "prefill", ("a", "b"), (0, 4), (GREEDY,) * 2, (), x, bad).to_frame(), Step)
    with pytest.raises(MessageError, match="chunk"):
        decode(Step("p", 1, "chunk", ("a", "b"), (0, 0), (GREEDY,) * 2, (), x, (5, 2)).to_frame(), Step)

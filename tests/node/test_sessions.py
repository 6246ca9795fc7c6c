"""Session bookkeeping of a shard: slots, limits, timeouts and input checks."""

from __future__ import annotations

import pytest
import torch

from node.config import ModelConfig
from node.fused import Ops
from node.runtime import SessionError, ShardRuntime
from wire.messages import SamplingParams
from verification.sampling import gumbel_noise, sample
from node.shard import Shard
from tests.node.random_models import make_random_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    make_random_model("qwen2", path, n_layers=2)
    return path


def runtime(model_dir, start, end, **kwargs):
    return ShardRuntime(model_dir, Shard("m", start, end, ModelConfig.load(model_dir).n_layers), **kwargs)


def test_slots_are_reused_and_full_pool_is_refused(model_dir):
    rt = runtime(model_dir, 0, 2, max_sessions=2)
    rt.prefill("a", torch.tensor([1, 2]))
    rt.prefill("b", torch.tensor([3]))
    with pytest.raises(SessionError, match="all 2 session slots are busy"):
        rt.prefill("c", torch.tensor([4]))
    rt.close("a")
    rt.prefill("c", torch.tensor([4]))
    assert rt.sessions["c"].slot == 0 and set(rt.sessions) == {"b", "c"}


def test_idle_sessions_are_evicted(model_dir):
    rt = runtime(model_dir, 0, 2, max_sessions=2, idle_timeout_s=30.0)
    rt.prefill("old", torch.tensor([1]))
    rt.prefill("new", torch.tensor([1]))
    rt.sessions["old"].last_used_s -= 60.0
    assert rt.evict_idle() == ["old"]
    rt.prefill("other", torch.tensor([1]))
    rt.sessions["new"].last_used_s -= 60.0
    rt.prefill("third", torch.tensor([1]))  # a full pool evicts idle sessions before refusing
    assert set(rt.sessions) == {"other", "third"}


def test_context_limit(model_dir):
    rt = runtime(model_dir, 0, 2, max_seq_len=8)
    with pytest.raises(SessionError, match="over the limit of 8"):
        rt.prefill("long", torch.arange(9))
    assert "long" not in rt.sessions  # a refused new session does not keep its slot
    rt.prefill("s", torch.arange(7))
    rt.decode([("s", torch.tensor([1]))])
    with pytest.raises(SessionError, match="would hold 9 tokens"):
        rt.decode([("s", torch.tensor([1]))])
    assert rt.sessions["s"].n_tokens == 8


def test_bad_inputs_change_nothing(model_dir):
    first, later = runtime(model_dir, 0, 1), runtime(model_dir, 1, 2)
    for bad in [torch.tensor([[1, 2]]), torch.tensor([1.0]), torch.tensor([], dtype=torch.int64),
                torch.tensor([512]), torch.tensor([-1]), [1, 2]]:
        with pytest.raises(SessionError):
            first.prefill("s", bad)
    for bad in [torch.zeros(3, 64), torch.zeros(128), torch.zeros(0, 128), torch.zeros(2, 128, dtype=torch.int64)]:
        with pytest.raises(SessionError):
            later.prefill("s", bad)
    assert not first.sessions and not later.sessions
    with pytest.raises(SessionError, match="unknown session"):
        first.decode([("nope", torch.tensor([1]))])
    first.prefill("s", torch.tensor([1, 2]))
    with pytest.raises(SessionError, match="twice"):
        first.decode([("s", torch.tensor([1])), ("s", torch.tensor([2]))])
    with pytest.raises(SessionError, match="exactly one token"):
        first.decode([("s", torch.tensor([1, 2]))])
    assert first.sessions["s"].n_tokens == 2


def test_greedy_is_argmax_and_seeded_sampling_is_reproducible():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))
    assert sample(logits, [SamplingParams()] * 3, [0, 0, 0]) == logits.argmax(-1).tolist()
    hot = [SamplingParams(temperature=1.0, seed=s) for s in (1, 1, 2)]
    first = sample(logits[[0, 0, 0]], hot, [5, 5, 5])
    assert first == sample(logits[[0, 0, 0]], hot, [5, 5, 5])
    # the same seed and position choose the same token whatever else is in the batch
    assert sample(logits[[0]], [hot[0]], [5]) == first[:1]
    assert gumbel_noise(1, 5, 10).tolist() != gumbel_noise(1, 6, 10).tolist()


def test_gumbel_max_draws_follow_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    params = SamplingParams(temperature=1.0, seed=7)
    n = 4000
    draws = [sample(logits, [params], [pos])[0] for pos in range(n)]
    freq = torch.bincount(torch.tensor(draws), minlength=4).double() / n
    assert torch.allclose(freq, logits[0].double().softmax(-1), atol=0.03)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[5.0, 4.9, 0.0, -3.0]])  # the first two hold ~99% of the mass
    params = [SamplingParams(temperature=2.0, top_p=0.9, seed=s) for s in range(200)]
    draws = {sample(logits, [p], [0])[0] for p in params}
    assert draws == {0, 1}


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(seed=-1)])
def test_sampling_params_are_validated(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_garbage_in_unused_cache_memory_never_reaches_outputs(model_dir):
    """A batch reads every row up to its longest context; the shorter rows' unwritten positions
    must not matter even when the never-initialised cache memory holds NaNs."""
    rt = runtime(model_dir, 0, 2, max_sessions=4)
    rt.cache.k.fill_(float("nan"))
    rt.cache.v.fill_(float("nan"))
    clean = runtime(model_dir, 0, 2, max_sessions=4)
    prompts = {"short": [1, 2], "long": [3, 4, 5, 6, 7, 8, 9], "mid": [10, 11, 12]}
    for sid, ids in prompts.items():
        rt.prefill(sid, torch.tensor(ids))
        clean.prefill(sid, torch.tensor(ids))
    for step in range(3):
        batch = [(sid, torch.tensor([20 + step])) for sid in prompts]
        got = rt.decode(batch)
        assert torch.isfinite(got).all()
        alone = torch.cat([clean.decode([one]) for one in batch])
        torch.testing.assert_close(got, alone, atol=1e-4, rtol=1e-4)


def test_a_prompt_in_chunks_samples_only_at_its_end_like_one_prefill(model_dir):
    """A "chunk" step feeds part of a prompt and samples nothing; the prompt's last piece and the
    decodes after it give the same tokens as one prefill, and the receipt's record names only the
    positions really sampled (an audit checks each against the tokens the stage sent)."""
    from node.retention import RetentionStore
    from node.stage import StageWorker
    from node.transport.identity import Identity
    from wire.messages import Close, Result, Step, decode

    n_layers = ModelConfig.load(model_dir).n_layers
    ids = torch.tensor([5, 17, 3, 99, 42, 7, 250, 31, 8], dtype=torch.int64)
    greedy = (SamplingParams(),)

    def over_the_wire(message):
        return decode(message.to_frame())

    workers = [StageWorker(runtime(model_dir, 0, n_layers), "p", Identity.generate(), RetentionStore())
               for _ in range(2)]
    whole = over_the_wire(workers[0].step(Step("p", 0, "prefill", ("s",), (0,), greedy, (), ids)))
    chunk = over_the_wire(workers[1].step(over_the_wire(Step("p", 0, "chunk", ("s",), (0,), greedy, (), ids[:4]))))
    assert isinstance(chunk, Result) and chunk.tokens == ()
    rest = over_the_wire(workers[1].step(Step("p", 1, "prefill", ("s",), (4,), greedy, (), ids[4:])))
    assert rest.tokens == whole.tokens
    nxt = [w.step(Step("p", 2, "decode", ("s",), (len(ids),), greedy, (), torch.tensor(whole.tokens))).tokens
           for w in workers]
    assert nxt[0] == nxt[1]
    for worker in workers:
        worker.close(Close("p", ("s",), ("req",)))
    kept = [w.retained.get("req") for w in workers]
    assert [r.output[1].tolist() for r in kept] == [[len(ids), len(ids) + 1]] * 2
    assert [r.output[2].tolist() for r in kept] == [[whole.tokens[0], nxt[0][0]]] * 2
    assert torch.equal(kept[0].stage_input, kept[1].stage_input)


@pytest.mark.parametrize("way", ["prompt-by-prompt", "packed", "fused", pytest.param("graphs", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_several_sessions_prefilled_as_one_batch_match_each_fed_alone(model_dir, way):
    """prefill_many: new prompts, the next chunk of a prompt and one-token rows of decoding sessions in
    one ragged batch give each session the logits, cache and trace rows it gets alone; a batch the
    slots cannot hold opens nothing. Packed (the GPU's way for long prompts): the new prompts attend in
    one call, each within its own rows. Fused (the GPU's way): every row is a row of the fused decode
    step (here its PyTorch twins), attending to its slot's keys up to its own position; graphs (on a
    GPU): the same rows replayed from the decode step's CUDA graphs, against the layers there."""
    kw = {"device": "cuda"} if way == "graphs" else {}
    alone = runtime(model_dir, 0, 2, capture_trace=True, max_sessions=7, cuda_graphs=False, **kw)
    together = runtime(model_dir, 0, 2, capture_trace=True, max_sessions=7, **kw)
    tolerance = {"atol": 1e-3, "rtol": 1e-3} if way == "graphs" else {"atol": 1e-4, "rtol": 1e-4}
    together.pack_prompts = way == "packed"
    if way == "fused":
        together.fused_rows = Ops(use_triton=False)
    generator = torch.Generator().manual_seed(0)
    prompts = {f"p{i}": torch.randint(0, 200, (3 + 2 * i,), generator=generator) for i in range(3)}
    for rt in (alone, together):
        rt.prefill("d0", torch.tensor([5, 6, 7]))
        rt.prefill("d1", torch.tensor([8, 9]))
        rt.prefill("c", torch.tensor([10, 11, 12]))
    logits = {sid: alone.prefill(sid, x) for sid, x in prompts.items()}
    logits["c"] = alone.prefill("c", torch.tensor([13, 14]))
    logits.update(zip(("d0", "d1"), alone.decode([("d0", torch.tensor([3])), ("d1", torch.tensor([4]))])[:, None]))
    steps = [("p0", prompts["p0"]), ("d1", torch.tensor([4])), ("p1", prompts["p1"]), ("c", torch.tensor([13, 14])),
             ("d0", torch.tensor([3])), ("p2", prompts["p2"])]
    got = together.prefill_many(steps)
    torch.testing.assert_close(got, torch.cat([logits[sid] for sid, _ in steps]), **tolerance)
    assert together.last_hidden.shape[0] == sum(x.shape[0] for _, x in steps)
    for sid, _ in steps:
        assert together.sessions[sid].n_tokens == alone.sessions[sid].n_tokens
        torch.testing.assert_close(together.trace(sid), alone.trace(sid), **tolerance)
    later = [(sid, torch.tensor([1])) for sid in ("d0", "p2", "p0", "c")]
    torch.testing.assert_close(together.decode(later), alone.decode(later), **tolerance)
    # one session alone takes the same way (ShardRuntime.prefill), all positions' logits too
    torch.testing.assert_close(together.prefill("p1", torch.tensor([2, 3]), all_positions=True),
                               alone.prefill("p1", torch.tensor([2, 3]), all_positions=True), **tolerance)
    torch.testing.assert_close(together.trace("p1"), alone.trace("p1"), **tolerance)
    with pytest.raises(SessionError, match="slots are busy"):
        together.prefill_many([("n0", torch.tensor([1, 2])), ("n1", torch.tensor([3]))])
    assert set(together.sessions) == set(alone.sessions)  # "n0" took the last slot, then gave it back
    if way == "graphs":  # the prompt steps were replayed (the last stage's, with each session's head row)
        assert any(heads for _, _, heads, _ in together.graphs.graphs)


def test_sessions_released_now_are_sealed_off_the_serving_thread_as_close_seals_them(model_dir):
    """A provider frees an ended request's sessions where steps are served (StageWorker.release) and the
    Sealer hashes, retains and signs them on its own threads: the same receipt a synchronous close
    signs, sent once sealed; a slot is free again before the sealing; shutting down seals what is left."""
    from node.retention import RetentionStore
    from node.sealer import Sealer
    from node.stage import StageWorker
    from node.transport.identity import Identity
    from wire.messages import Close, Step

    n_layers = ModelConfig.load(model_dir).n_layers
    identity = Identity.generate()
    workers = [StageWorker(runtime(model_dir, 0, n_layers, max_sessions=1, capture_trace=True), "p", identity,
                           RetentionStore()) for _ in range(2)]
    for w in workers:
        w.step(Step("p", 0, "prefill", ("s",), (0,), (SamplingParams(),), (), torch.tensor([5, 17, 3, 99])))
    sent: list = []
    sealer = Sealer(sent.extend, workers=1)
    unsealed = workers[0].release(Close("p", ("s",), ("req",)))
    assert [u.request_id for u in unsealed] == ["req"] and unsealed[0].trace is not None
    workers[0].runtime.prefill("next", torch.tensor([1]))  # the only slot is free before any sealing
    sealer.submit(workers[0], unsealed)
    sealer.shutdown()
    closed = workers[1].close(Close("p", ("s",), ("req",)))
    assert [r.to_dict() for r in sent] == [r.to_dict() for r in closed]  # same hashes, same signer
    assert workers[0].retained.get("req").layers_hash == workers[1].retained.get("req").layers_hash


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("staging_bytes", [8 << 20, 1000], ids=["whole", "in-pieces"])
def test_a_cuda_trace_is_sealed_through_pinned_memory_into_a_pageable_copy(model_dir, monkeypatch, staging_bytes):
    """On a GPU a closed session's trace goes to the host through a pinned buffer (node/stage.py
    `_off_device`, so the serving steps are not held up), in pieces when it is larger: what is
    retained is the device's trace bit for bit, its layers hash commits to it, and it holds no
    pinned memory."""
    import node.stage
    from node.retention import RetentionStore
    from node.stage import StageWorker
    from node.transport.identity import Identity
    from verification.commitments import trace_digest
    from wire.messages import Close, Step

    monkeypatch.setattr(node.stage, "STAGING_BYTES", staging_bytes)
    n_layers = ModelConfig.load(model_dir).n_layers
    worker = StageWorker(runtime(model_dir, 0, n_layers, max_sessions=1, capture_trace=True, device="cuda"), "p",
                         Identity.generate(), RetentionStore())
    worker.step(Step("p", 0, "prefill", ("s",), (0,), (SamplingParams(),), (), torch.tensor([5, 17, 3, 99])))
    on_device = worker.runtime.trace("s").clone()
    worker.close(Close("p", ("s",), ("req",)))
    kept = worker.retained.get("req")
    assert kept.trace.device.type == "cpu" and not kept.trace.is_pinned()
    assert torch.equal(kept.trace, on_device.cpu()) and kept.layers_hash == trace_digest(on_device)


def test_receipts_sealed_while_one_send_is_under_way_go_together_in_the_next(model_dir):
    """The Sealer sends receipts as soon as they are sealed, but those sealed while a send is under way
    wait for it and then go in one message (one control stream to the coordinator, not one each)."""
    import threading
    import time

    from node.retention import RetentionStore
    from node.sealer import Sealer
    from node.stage import StageWorker
    from node.transport.identity import Identity
    from wire.messages import Close, Step

    worker = StageWorker(runtime(model_dir, 0, 2, max_sessions=6, capture_trace=True), "p", Identity.generate(),
                         RetentionStore())
    for i in range(6):
        worker.step(Step("p", i, "prefill", (f"s{i}",), (0,), (SamplingParams(),), (), torch.tensor([5, 17, i])))
    first_send, release = threading.Event(), threading.Event()
    sends: list[list[str]] = []

    def send(receipts) -> None:
        sends.append([r.request_id for r in receipts])
        first_send.set()
        release.wait(10)

    sealer = Sealer(send, workers=3)
    sealer.submit(worker, worker.release(Close("p", ("s0",), ("r0",))))
    assert first_send.wait(10)
    for i in range(1, 6):  # sealed while r0's send waits
        sealer.submit(worker, worker.release(Close("p", (f"s{i}",), (f"r{i}",))))
    deadline_s = time.monotonic() + 30
    while sealer.unsent < 5 and time.monotonic() < deadline_s:  # sealed, and handed to the send under way
        time.sleep(0.01)
    assert sealer.unsent == 5 and sends == [["r0"]]
    release.set()
    sealer.shutdown()
    assert sends[0] == ["r0"] and sorted(sends[1]) == [f"r{i}" for i in range(1, 6)] and len(sends) == 2


def test_long_attention_leaves_the_fused_rows_for_the_layers(model_dir, monkeypatch):
    """Through the fused ops every row reads its keys as a decode row does; a step whose rows x keys
    pass FUSED_ROW_KEYS runs the layers' prefill instead, with the same results."""
    import node.runtime

    fused, plain = (runtime(model_dir, 0, 2, capture_trace=True, max_sessions=2) for _ in range(2))
    fused.fused_rows = Ops(use_triton=False)
    ways = []
    forward_rows, forward = fused._forward_rows, fused._forward
    monkeypatch.setattr(fused, "_forward_rows", lambda *a: (ways.append("fused"), forward_rows(*a))[1])
    monkeypatch.setattr(fused, "_forward", lambda *a, **k: (ways.append("layers"), forward(*a, **k))[1])
    monkeypatch.setattr(node.runtime, "FUSED_ROW_KEYS", 4 * 6)  # 4 new rows after 2 cached: 4 x 6 fits
    ids = torch.arange(1, 9)
    for rt in (fused, plain):
        rt.prefill("s", ids[:2])
    torch.testing.assert_close(fused.prefill("s", ids[2:6]), plain.prefill("s", ids[2:6]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused.prefill_many([("s", ids[6:8]), ("t", ids[:5])]),
                               plain.prefill_many([("s", ids[6:8]), ("t", ids[:5])]), atol=1e-4, rtol=1e-4)
    assert ways == ["fused", "fused", "layers"]  # 2 x 2, 4 x 6, then 2 x 8 + 5 x 5 > 24
    torch.testing.assert_close(fused.trace("s"), plain.trace("s"), atol=1e-4, rtol=1e-4)

"""Capacity that bends (coordinator/planner/capacity.py): fewer sessions, then a shorter context,
before a pool is declared too small; each pipeline holds what its stages' memory allows."""

from __future__ import annotations

import pytest

from coordinator.planner import (MIN_CONTEXT_TOKENS, Capacity, InsufficientMemoryError, ModelShape, ProviderSpec,
                                 Workload, bent_workloads, plan, plan_within_memory, sessions_held, stage_memory_bytes)

TOY = ModelShape("toy", n_layers=6, hidden=64, intermediate=128, n_heads=4, n_kv_heads=2, head_dim=16, vocab=256,
                 bytes_per_param=4.0, activation_bytes=4)
WANTED = Workload(batch=8, context_tokens=512, microbatches_in_flight=1)


def whole(sessions: int, context: int) -> float:
    return stage_memory_bytes(TOY, TOY.n_layers, True, True, sessions, context)


def test_the_ladder_drops_sessions_before_context():
    rungs = [(w.batch, w.context_tokens) for w in bent_workloads(WANTED)]
    assert rungs == [(8, 512), (4, 512), (2, 512), (1, 512), (1, 256), (1, 128), (1, 64)]
    assert rungs[-1][1] == MIN_CONTEXT_TOKENS


@pytest.mark.parametrize("sessions,context", [(8, 512), (3, 512), (1, 512), (1, 100)])
def test_a_pool_serves_whatever_fits(sessions, context):
    provider = ProviderSpec("p", int(whole(sessions, context)), 10, 1)
    result, bent = plan_within_memory([provider], TOY, WANTED)
    # the first rung at or under what fits: sessions halved to a power of two, then context halved
    want_batch = 8 if sessions == 8 else 2 if sessions == 3 else 1
    want_context = 512 if context == 512 else 64
    assert (bent.batch, bent.context_tokens) == (want_batch, want_context)
    [pipeline] = result.pipelines
    # the pipeline then holds every session its memory allows at that context, up to what was asked
    held = sessions_held(pipeline, {"p": provider}, TOY, bent.context_tokens, 8)
    assert held == min(sessions, 8)
    assert whole(held, bent.context_tokens) <= provider.memory_bytes
    assert held == 8 or provider.memory_bytes < whole(held + 1, bent.context_tokens)
    if sessions < 8:  # the plan as asked would not fit
        with pytest.raises(InsufficientMemoryError):
            plan([provider], TOY, WANTED)


def test_only_weights_that_do_not_fit_are_refused():
    provider = ProviderSpec("p", int(whole(0, 1)) + 10, 10, 1)  # the weights, and KV cache for almost nothing
    with pytest.raises(InsufficientMemoryError, match="the weights themselves do not fit"):
        plan_within_memory([provider], TOY, WANTED)


def test_capacity_is_at_least_one_session_of_one_token():
    with pytest.raises(ValueError):
        Capacity(0, 512)
    assert Capacity(1, 64).sessions == 1


@pytest.mark.parametrize("asked,n_stages,want", [(2, 1, 1), (2, 2, 2), (2, 3, 2), (4, 3, 3), (1, 4, 1)])
def test_a_pipeline_keeps_at_most_one_micro_batch_per_stage_with_the_same_sessions(asked, n_stages, want):
    from coordinator.pool import in_flight

    workload, m = in_flight(Workload(batch=5, context_tokens=512, microbatches_in_flight=asked), asked, n_stages)
    assert m == want == workload.microbatches_in_flight
    # every session asked for still has a place: fewer micro-batches carry more each
    assert workload.batch * m >= 5 * asked and workload.batch * (m - 1) < 5 * asked
    assert workload.context_tokens == 512


def test_stages_on_one_gpu_count_as_one_device():
    from coordinator.planner import Pipeline, Stage
    from coordinator.pool import devices_of, in_flight

    def gpu(uuid):
        return {"devices": [{"kind": "cuda", "uuid": uuid}]}

    pipeline = Pipeline((Stage("a", 0, 2), Stage("b", 2, 4), Stage("c", 4, 6)))
    assert devices_of(pipeline, {"a": gpu("GPU-1"), "b": gpu("GPU-1"), "c": gpu("GPU-2")}) == 2
    assert devices_of(pipeline, {"a": gpu("GPU-1"), "b": gpu("GPU-1"), "c": gpu("GPU-1")}) == 1
    # CPUs, profiles without the id (older providers) or with a malformed one: each stage its own device
    assert devices_of(pipeline, {"a": gpu(""), "b": {"devices": [{}]}, "c": gpu(["GPU-1"])}) == 3
    assert devices_of(pipeline, {}) == 3
    _, m = in_flight(Workload(batch=4, context_tokens=64, microbatches_in_flight=2), 2,
                     devices_of(pipeline, {p: gpu("GPU-1") for p in "abc"}))
    assert m == 1

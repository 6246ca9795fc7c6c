"""Capacity that bends: serve whatever fits rather than nothing.

The workload asks for `batch` sessions of `context_tokens` each on every stage. A pool that holds
the weights but not that much KV cache still serves: plan_within_memory() tries fewer sessions
first (halving down to one), then a shorter context (halving down to MIN_CONTEXT_TOKENS), and only
when the weights with one short session do not fit does it raise. Then each pipeline holds as many
sessions as its stages' memory allows at that context (sessions_held), up to what was asked.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Mapping, Sequence

from coordinator.planner.cost import served_model, stage_memory_bytes
from coordinator.planner.hardware import Links, ProviderSpec
from coordinator.planner.placement import plan
from coordinator.planner.shapes import ModelShape
from coordinator.planner.values import InsufficientMemoryError, Objective, Pipeline, Plan, Workload

MIN_CONTEXT_TOKENS = 64  # shorter is no use to anyone: below this a pool answers that the weights do not fit


@dataclass(frozen=True)
class Capacity:
    """What one pipeline holds on every stage: KV cache for `sessions` × `context_tokens`."""

    sessions: int
    context_tokens: int

    def __post_init__(self):
        if self.sessions < 1 or self.context_tokens < 1:
            raise ValueError(f"a pipeline holds at least one session of one token, got {self}")


def bent_workloads(workload: Workload) -> Iterator[Workload]:
    """The workload asked for, then fewer sessions, then one session of a shorter context."""
    batch = workload.batch
    while batch >= 1:
        yield replace(workload, batch=batch)
        batch //= 2
    context = workload.context_tokens // 2
    while context >= MIN_CONTEXT_TOKENS:
        yield replace(workload, batch=1, context_tokens=context)
        context //= 2


def plan_within_memory(providers: Sequence[ProviderSpec], model: ModelShape, workload: Workload,
                       links: Links | None = None, objective: Objective = Objective.THROUGHPUT
                       ) -> tuple[Plan, Workload]:
    """The plan of the first workload of bent_workloads() that fits, and that workload. Raises the
    InsufficientMemoryError of the smallest one: then not even the weights fit."""
    error = None
    for bent in bent_workloads(workload):
        try:
            return plan(providers, model, bent, links, objective=objective), bent
        except InsufficientMemoryError as exc:
            error = exc
    raise InsufficientMemoryError(f"{error} (even with 1 session of {bent.context_tokens} tokens: "
                                  f"the weights themselves do not fit)", error.needed_bytes, error.available_bytes)


def sessions_held(pipeline: Pipeline, providers: Mapping[str, ProviderSpec], model: ModelShape,
                  context_tokens: int, most: int) -> int:
    """Sessions of `context_tokens` whose KV cache fits beside the weights on every stage, at most `most`
    (0 if not even one does)."""
    held, k = most, len(pipeline.stages)
    for i, stage in enumerate(pipeline.stages):
        provider = providers[stage.peer_id]
        served = served_model(provider, model)
        weights = stage_memory_bytes(served, stage.n_layers, i == 0, i == k - 1, 0, context_tokens)
        per_session = stage.n_layers * context_tokens * served.kv_bytes_per_token_layer
        held = min(held, max(0, int((provider.memory_bytes - weights) // per_session)))
    return held

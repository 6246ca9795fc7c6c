"""Baseline placements to measure the planner against, evaluated by the same cost model.

Both put every provider into one ring (exo's way), ordered by memory, largest first; they ignore
speed and the KV cache, so a plan may not fit (PipelineCost.fits_memory is False).
"""

from __future__ import annotations

from typing import Sequence

from coordinator.planner.cost import evaluate_pipeline
from coordinator.planner.hardware import Links, ProviderSpec
from coordinator.planner.placement import DATACENTRE_LINK
from coordinator.planner.shapes import ModelShape
from coordinator.planner.split import MICROBATCH_CHOICES
from coordinator.planner.values import Objective, Pipeline, Plan, Stage, Workload


def memory_proportional(providers: Sequence[ProviderSpec], model: ModelShape, workload: Workload,
                        links: Links | None = None, objective: Objective = Objective.THROUGHPUT) -> Plan:
    """exo's RingMemoryWeightedPartitioningStrategy: layers in proportion to memory."""
    ring = _ring(providers, model)
    return _plan(ring, _proportional([p.memory_bytes for p in ring], model.n_layers), providers, model, workload,
                 links, objective)


def equal_split(providers: Sequence[ProviderSpec], model: ModelShape, workload: Workload,
                links: Links | None = None, objective: Objective = Objective.THROUGHPUT) -> Plan:
    """The same ring with the same number of layers on every provider (±1)."""
    ring = _ring(providers, model)
    return _plan(ring, _proportional([1] * len(ring), model.n_layers), providers, model, workload, links, objective)


def _ring(providers: Sequence[ProviderSpec], model: ModelShape) -> list[ProviderSpec]:
    ring = sorted(providers, key=lambda p: (-p.memory_bytes, p.peer_id))
    return ring[: model.n_layers]  # a ring longer than the model leaves the smallest out


def _proportional(weights: Sequence[float], n_layers: int) -> list[int]:
    """Cumulative rounding of weights to layer counts, each at least one."""
    total, acc, bounds = sum(weights), 0.0, [0]
    for i, w in enumerate(weights[:-1]):
        acc += w
        cut = round(n_layers * acc / total)
        cut = max(bounds[-1] + 1, min(cut, n_layers - (len(weights) - 1 - i)))
        bounds.append(cut)
    bounds.append(n_layers)
    return [b - a for a, b in zip(bounds, bounds[1:])]


def _plan(ring, counts, providers, model, workload, links, objective) -> Plan:
    stages, start = [], 0
    for p, n in zip(ring, counts):
        stages.append(Stage(p.peer_id, start, start + n))
        start += n
    pipeline = Pipeline(tuple(stages))
    by_id = {p.peer_id: p for p in providers}
    links = links or Links(DATACENTRE_LINK)
    objective = Objective(objective)
    cost = evaluate_pipeline(pipeline, by_id, model, workload, links, workload.microbatches_in_flight or 1)
    if objective is Objective.THROUGHPUT and workload.microbatches_in_flight is None:
        # as fair as the planner: the best number of micro-batches in flight that fits
        for m in MICROBATCH_CHOICES[1:]:
            more = evaluate_pipeline(pipeline, by_id, model, workload, links, m)
            if not more.fits_memory:
                break
            if more.tokens_per_s > cost.tokens_per_s:
                cost = more
    return Plan(objective=objective, pipelines=(pipeline,), costs=(cost,))

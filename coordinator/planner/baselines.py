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
from node.shard import split_layers


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
    """Layer counts proportional to weights, each at least one (the shard runtime's own split)."""
    return [end - start for start, end in split_layers(n_layers, list(weights))]


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

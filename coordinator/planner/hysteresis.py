"""Re-planning with hysteresis: keep the pipelines that serve unless a new plan is clearly better.

Moving a pipeline costs a pause for every request on it (shards reload, requests replay), and
measured figures move a little with every step, so a re-plan that is only slightly better under
today's figures is not worth it. The plan kept is the current pipelines (those still possible)
extended by a plan of the providers they leave idle, so a newcomer is put to work without moving
anyone; the fresh plan replaces it only when it predicts at least `min_gain` x its throughput (or
1 / `min_gain` of its latency). Pure: no I/O, no clock.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from coordinator.planner.cost import evaluate_pipeline
from coordinator.planner.hardware import Links, ProviderSpec
from coordinator.planner.placement import plan
from coordinator.planner.shapes import ModelShape
from coordinator.planner.values import Objective, Pipeline, PlanError, Workload

MIN_GAIN = 1.2  # a re-plan must predict >= 20% more tokens/s (or 20% less latency) to move pipelines


def score(pipelines: Sequence[Pipeline], providers: Mapping[str, ProviderSpec], model: ModelShape,
          workload: Workload, links: Links, objective: Objective) -> float | None:
    """Higher is better: summed tokens/s (throughput) or minus the best latency; None if a pipeline
    is no longer possible (a provider gone, or it no longer fits)."""
    if not pipelines:
        return 0.0 if objective is Objective.THROUGHPUT else None
    costs = []
    for pipeline in pipelines:
        if any(p not in providers for p in pipeline.peer_ids):
            return None
        try:
            cost = evaluate_pipeline(pipeline, providers, model, workload, links, workload.microbatches_in_flight or 1)
        except PlanError:
            return None
        if not cost.fits_memory:
            return None
        costs.append(cost)
    if objective is Objective.THROUGHPUT:
        return sum(c.tokens_per_s for c in costs)
    return -min(c.latency_s for c in costs)


def choose(current: Sequence[Pipeline], fresh: Sequence[Pipeline], providers: Mapping[str, ProviderSpec],
           model: ModelShape, workload: Workload, links: Links, objective: Objective = Objective.THROUGHPUT,
           min_gain: float = MIN_GAIN) -> tuple[Pipeline, ...]:
    """The pipelines to serve: `fresh` (the planner's best now) only if it is clearly better than the
    current ones extended over the idle providers."""
    objective = Objective(objective)
    fresh = tuple(fresh)
    kept = tuple(p for p in current if score([p], providers, model, workload, links, objective) is not None)
    if not kept:
        return fresh
    busy = {peer for p in kept for peer in p.peer_ids}
    idle = [spec for peer, spec in providers.items() if peer not in busy]
    extended = kept
    if idle and objective is Objective.THROUGHPUT:
        try:
            extended = kept + plan(idle, model, workload, links, objective).pipelines
        except PlanError:  # the idle ones cannot hold the model together: they stay idle
            pass
    held = score(extended, providers, model, workload, links, objective)
    new = score(fresh, providers, model, workload, links, objective)
    if held is None or new is None:
        return fresh if new is not None else extended
    better = new >= held * min_gain if objective is Objective.THROUGHPUT else -new * min_gain <= -held
    return fresh if better else extended

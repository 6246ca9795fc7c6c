"""plan(): the public entry point: check the pool, search, and return a Plan with its figures."""

from __future__ import annotations

from typing import Sequence

from coordinator.planner.cost import evaluate_pipeline, extra_memory_bytes, served_model
from coordinator.planner.hardware import Link, Links, ProviderSpec
from coordinator.planner.search import exact, local_search
from coordinator.planner.shapes import ModelShape
from coordinator.planner.split import Split, SplitSolver
from coordinator.planner.values import InsufficientMemoryError, Objective, Plan, PlanError, Workload

EXACT_MAX_PROVIDERS = 6  # exact search costs sum_r n!/(n-r)! splits: 1,956 for 6, 13,699 for 7
MAX_PROVIDERS = 1024
DATACENTRE_LINK = Link(latency_ms=0.01, bandwidth_gbps=100.0)


def plan(providers: Sequence[ProviderSpec], model: ModelShape, workload: Workload = Workload(),
         links: Links | None = None, objective: Objective = Objective.THROUGHPUT,
         exact_max_providers: int = EXACT_MAX_PROVIDERS, max_moves: int = 2000) -> Plan:
    """The best pipelines the pool allows under the cost model.

    Exact (exhaustive over subsets, orders and splits) for pools of at most `exact_max_providers`;
    local search beyond. Raises InsufficientMemoryError when no placement fits.
    """
    by_id = _check_pool(providers)
    objective = Objective(objective)
    links = links or Links(DATACENTRE_LINK)
    # a lower bound whatever the mix: every layer held in the leanest precision any provider serves in
    lightest = min((served_model(p, model) for p in providers), key=lambda m: m.bytes_per_param)
    needed, available = minimum_memory_bytes(lightest, workload), sum(p.memory_bytes for p in providers)
    if available < needed:
        raise InsufficientMemoryError(
            f"the pool cannot hold {model.name}: it needs at least {_gib(needed)} "
            f"(weights {_gib(lightest.total_weight_bytes)} + KV cache {_gib(needed - lightest.total_weight_bytes)} "
            f"for {workload.batch} sessions × {workload.context_tokens} tokens) but its "
            f"{len(providers)} providers have {_gib(available)} in all", needed, available)
    solver = SplitSolver(by_id, model, workload, links, objective)
    peer_ids = sorted(by_id)
    if len(peer_ids) <= exact_max_providers:
        splits = exact(solver, peer_ids)
    else:
        splits = local_search(solver, peer_ids, max_moves=max_moves)
    if not splits:
        largest = max(p.memory_bytes for p in providers)
        raise InsufficientMemoryError(
            f"no placement of {model.name} fits: whole layers ({_gib(model.layer_weight_bytes)} of weights each, "
            f"plus KV cache) and the embedding/LM head ({_gib(extra_memory_bytes(model, True, True))}) "
            f"do not pack into the pool's {_gib(available)} (largest provider {_gib(largest)}); "
            f"at least {_gib(needed)} needed, more with several stages in flight", needed, available)
    return plan_from_splits(splits, by_id, model, workload, links, objective)


def plan_from_splits(splits: list[Split], providers: dict[str, ProviderSpec], model: ModelShape, workload: Workload,
                     links: Links, objective: Objective) -> Plan:
    splits = sorted(splits, key=lambda s: (-s.tokens_per_s, s.peer_ids))
    pipelines = tuple(s.pipeline() for s in splits)
    costs = tuple(evaluate_pipeline(s.pipeline(), providers, model, workload, links, s.microbatches) for s in splits)
    for p, c in zip(pipelines, costs):  # the split honours memory by construction; check at the boundary
        if not c.fits_memory:
            raise AssertionError(f"planner placed more than fits: {p} needs {c.stage_memory_bytes}")
    return Plan(objective=objective, pipelines=pipelines, costs=costs)


def minimum_memory_bytes(model: ModelShape, workload: Workload) -> float:
    """Weights plus KV cache of one micro-batch: no placement of the model needs less."""
    kv = workload.batch * workload.context_tokens * model.kv_bytes_per_token_layer * model.n_layers
    return model.total_weight_bytes + kv


def _check_pool(providers: Sequence[ProviderSpec]) -> dict[str, ProviderSpec]:
    if not providers:
        raise InsufficientMemoryError("the pool is empty: no provider to place the model on", 1, 0)
    if len(providers) > MAX_PROVIDERS:
        raise PlanError(f"pool of {len(providers)} providers exceeds the planner's limit of {MAX_PROVIDERS}")
    by_id = {p.peer_id: p for p in providers}
    if len(by_id) != len(providers):
        raise PlanError("provider peer ids must be unique")
    return by_id


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"

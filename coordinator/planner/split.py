"""The best contiguous layer split for one ordered chain of providers.

Stage time is convex in its layer count (a constant plus a max of two affine functions), so:
- latency (sum of stage times) is minimised exactly by giving every stage one layer and then
  the rest where a layer costs least: the n_layers - k smallest marginal times of all stages
  (greedy allocation is exact for separable convex costs);
- throughput (cycle = max(slowest stage, busiest link, trip / micro-batches)) is minimised by
  trying caps T on the slowest stage: under cap T the best trip is again the greedy minimum sum,
  the first term grows with T and the trip term shrinks, so the optimum sits where they cross,
  found by binary search over the finitely many stage times.
Memory enters as a per-stage cap on layers (weights + KV cache for the sessions in flight).
For throughput the number of micro-batches in flight m is searched too (1, 2, 3, 4, 6, 8, ..., 64):
more hide the trip's latency but reserve more KV cache. The least feasible slowest-stage time
cannot fall as m grows (caps only shrink), so the search stops once that bound reaches the best.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from itertools import accumulate
from typing import Mapping

from coordinator.planner.cost import link_costs_s, max_layers, pipeline_figures, stage_time_s
from coordinator.planner.hardware import Links, ProviderSpec
from coordinator.planner.shapes import ModelShape
from coordinator.planner.values import Objective, Pipeline, Stage, Workload

MICROBATCH_CHOICES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # about 1.5x apart, a bound on KV memory


@dataclass(frozen=True)
class Split:
    peer_ids: tuple[str, ...]
    layer_counts: tuple[int, ...]
    latency_s: float
    cycle_s: float
    tokens_per_s: float
    microbatches: int

    def pipeline(self) -> Pipeline:
        stages, start = [], 0
        for peer, n in zip(self.peer_ids, self.layer_counts):
            stages.append(Stage(peer, start, start + n))
            start += n
        return Pipeline(tuple(stages))


class SplitSolver:
    """Best splits for orders of one pool, model and workload; caches per-provider time tables."""

    def __init__(self, providers: Mapping[str, ProviderSpec], model: ModelShape, workload: Workload, links: Links,
                 objective: Objective):
        self.providers, self.model, self.workload, self.links = providers, model, workload, links
        self.objective = objective
        self._tables: dict[tuple[str, bool, bool, int], list[float]] = {}
        self._marginals: dict[tuple[str, bool, bool, int], list[float]] = {}
        self._splits: dict[tuple[str, ...], Split | None] = {}

    def table(self, peer_id: str, first: bool, last: bool, sessions: int) -> list[float]:
        """Stage times for 1..cap layers, cap = what fits in memory (empty if nothing fits)."""
        key = (peer_id, first, last, sessions)
        if key not in self._tables:
            p, w = self.providers[peer_id], self.workload
            cap = max_layers(p, self.model, first, last, sessions, w.context_tokens)
            self._tables[key] = [stage_time_s(p, self.model, n, first, last, w.batch, w.context_tokens)
                                 for n in range(1, cap + 1)]
            self._marginals[key] = marginals(self._tables[key])
        return self._tables[key]

    def layer_time_s(self, peer_id: str) -> float:
        """Time of one middle layer at the workload's batch: a provider's speed, for ordering."""
        w = self.workload
        return stage_time_s(self.providers[peer_id], self.model, 1, False, False, w.batch, w.context_tokens)

    def solve(self, peer_ids: tuple[str, ...]) -> Split | None:
        """The best split of the model over `peer_ids` in this order, or None if it cannot fit."""
        if peer_ids not in self._splits:
            self._splits[peer_ids] = self._solve(peer_ids)
        return self._splits[peer_ids]

    def _solve(self, peer_ids: tuple[str, ...]) -> Split | None:
        if not peer_ids or len(peer_ids) > self.model.n_layers:
            return None
        links_s = link_costs_s(peer_ids, self.model, self.workload.batch, self.links)
        fixed = self.workload.microbatches_in_flight
        if self.objective is Objective.LATENCY:
            return self._solve_with(peer_ids, fixed or 1, links_s)[0]
        best = None
        for m in [fixed] if fixed else MICROBATCH_CHOICES:
            split, bound_s = self._solve_with(peer_ids, m, links_s)
            if split is None or (best is not None and bound_s >= best.cycle_s):
                break  # no more micro-batches fit, or none can beat the best
            if best is None or split.cycle_s < best.cycle_s * (1 - 1e-12):
                best = split
        return best

    def _solve_with(self, peer_ids: tuple[str, ...], m: int, links_s: tuple[float, float]
                    ) -> tuple[Split | None, float]:
        """(best split with m micro-batches in flight, lower bound on its cycle) or (None, inf)."""
        k, n_layers, batch = len(peer_ids), self.model.n_layers, self.workload.batch
        keys = [(p, i == 0, i == k - 1, batch * m) for i, p in enumerate(peer_ids)]
        tables = [self.table(*key) for key in keys]
        margins = [self._marginals[key] for key in keys]
        caps = [min(len(t), n_layers - (k - 1)) for t in tables]
        if min(caps) < 1 or sum(caps) < n_layers:
            return None, float("inf")
        link_total, link_busiest = links_s
        if self.objective is Objective.LATENCY:
            counts, bound_s = min_sum_counts(margins, caps, n_layers), 0.0
        else:
            counts, bound_s = _min_cycle_counts(tables, margins, caps, n_layers, link_total, link_busiest, m)
        times = [t[n - 1] for t, n in zip(tables, counts)]
        latency, cycle, tokens_per_s = pipeline_figures(times, link_total, link_busiest, batch, m)
        return Split(peer_ids, tuple(counts), latency, cycle, tokens_per_s, m), bound_s


def marginals(table: list[float]) -> list[float]:
    """t[n+1] - t[n], made non-decreasing against rounding (the times are convex in n)."""
    return list(accumulate((b - a for a, b in zip(table, table[1:])), max))


def min_sum_counts(marginals: list[list[float]], caps: list[int], n_layers: int) -> list[int]:
    """Layer counts (1 <= n_i <= caps[i], sum n_layers) minimising the sum of stage times,
    given each stage's marginal times (see `marginals`).

    With convex tables the marginal costs of each stage rise, so the optimum hands out the
    n_layers - k smallest marginals of all stages (ties go to the earlier stage).
    """
    k = len(marginals)
    extra = n_layers - k
    if extra == 0:
        return [1] * k
    pooled = sorted(x for m, c in zip(marginals, caps) for x in m[: c - 1])
    threshold = pooled[extra - 1]
    counts = [bisect_left(m, threshold, 0, c - 1) for m, c in zip(marginals, caps)]  # strictly below
    left = extra - sum(counts)
    for i, (m, c) in enumerate(zip(marginals, caps)):
        while left and counts[i] < c - 1 and m[counts[i]] == threshold:
            counts[i] += 1
            left -= 1
    return [n + 1 for n in counts]


def _min_cycle_counts(tables, margins, caps, n_layers, link_total, link_busiest, microbatches) -> tuple[list[int], float]:
    """Counts minimising the cycle, and a lower bound on the cycle (least feasible slowest stage)."""
    candidates = sorted({x for t, c in zip(tables, caps) for x in t[:c]})

    def caps_under(cap_s: float) -> list[int]:
        return [bisect_right(t, cap_s, 0, c) for t, c in zip(tables, caps)]

    def feasible(i: int) -> bool:
        under = caps_under(candidates[i])
        return min(under) >= 1 and sum(under) >= n_layers

    lo = _first_true(0, len(candidates), feasible)  # the last candidate (no cap) is always feasible

    def evaluate(i: int) -> tuple[float, list[int]]:
        under = caps_under(candidates[i])
        counts = min_sum_counts(margins, under, n_layers)
        trip = sum(t[n - 1] for t, n in zip(tables, counts)) + link_total
        return max(candidates[i], link_busiest, trip / microbatches), counts

    def trip_bound_reached(i: int) -> bool:
        bound, _ = evaluate(i)
        return candidates[i] >= bound  # the cap term dominates from here on

    cross = _first_true(lo, len(candidates), trip_bound_reached)
    options = [evaluate(i) for i in (cross - 1, cross) if lo <= i < len(candidates)]
    return min(options, key=lambda o: o[0])[1], max(candidates[lo], link_busiest)


def _first_true(lo: int, hi: int, predicate) -> int:
    """Smallest i in [lo, hi) with predicate(i) true (predicate monotone), hi if none."""
    while lo < hi:
        mid = (lo + hi) // 2
        if predicate(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo

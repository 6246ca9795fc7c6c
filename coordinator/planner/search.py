"""Which providers form each pipeline, and in which order: exact search and local search.

Both search over orders of providers and score each order with its best split (split.py).
- exact: latency — every ordered subset; throughput — the best order of every subset, then a
  DP over subsets for the partition of the pool into pipelines that maximises the summed tokens/s.
- local search: from a few greedy starts (chains filled fastest-first, largest-first, most memory
  per unit of time first), first-improvement moves (insert, remove, replace, relocate, swap or
  reverse within a chain; move or swap between pipelines, merge, dissolve, open a new one) until
  none improves, then a bounded number of seeded random kicks (iterated local search).
"""

from __future__ import annotations

import random
from itertools import permutations

from coordinator.planner.split import Split, SplitSolver
from coordinator.planner.values import Objective

_EPS = 1e-12


def score(split: Split | None, objective: Objective) -> float | None:
    """Higher is better; None when the order cannot hold the model."""
    if split is None:
        return None
    return -split.latency_s if objective is Objective.LATENCY else split.tokens_per_s


def exact(solver: SplitSolver, peer_ids: list[str]) -> list[Split]:
    """The optimal pipelines under the cost model ([] if none fits). Cost: sum over r of n!/(n-r)! splits."""
    objective = solver.objective
    n = len(peer_ids)
    best_of_set: dict[int, Split] = {}  # bitmask of providers → best order of exactly that set
    for r in range(1, n + 1):
        for order in permutations(range(n), r):
            split = solver.solve(tuple(peer_ids[i] for i in order))
            if split is None:
                continue
            mask = sum(1 << i for i in order)
            held = best_of_set.get(mask)
            if held is None or score(split, objective) > score(held, objective) + _EPS:
                best_of_set[mask] = split
    if not best_of_set:
        return []
    if objective is Objective.LATENCY:
        return [max(best_of_set.values(), key=lambda s: score(s, objective))]
    # best[mask]: max tokens/s from providers in mask, some possibly unused
    best: list[float] = [0.0] * (1 << n)
    choice: list[int] = [0] * (1 << n)  # the pipeline holding mask's lowest provider, 0 = it is unused
    for mask in range(1, 1 << n):
        low = mask & -mask
        best[mask], choice[mask] = best[mask ^ low], 0
        rest = mask ^ low
        sub = rest
        while True:  # every subset of `rest`, joined with `low`
            group = sub | low
            split = best_of_set.get(group)
            if split is not None:
                total = split.tokens_per_s + best[mask ^ group]
                if total > best[mask] + _EPS:
                    best[mask], choice[mask] = total, group
            if sub == 0:
                break
            sub = (sub - 1) & rest
    pipelines, mask = [], (1 << n) - 1
    while mask:
        group = choice[mask]
        if group:
            pipelines.append(best_of_set[group])
            mask ^= group
        else:
            mask ^= mask & -mask
    return pipelines


def local_search(solver: SplitSolver, peer_ids: list[str], max_moves: int = 2000, kicks: int = 20,
                 seed: int = 0) -> list[Split]:
    """A good plan for large pools ([] if no start fits); exact results are not guaranteed.

    Local search from a few greedy starts, then `kicks` rounds of iterated local search: two random
    moves from the best plan so far, improved again, kept if better (seeded, so deterministic).
    """
    rng = random.Random(seed)
    best, best_value = None, None
    for start in _starts(solver, peer_ids):
        groups = _improve(solver, start, peer_ids, max_moves)
        value = _total(groups, solver)
        if groups and (best is None or value > best_value + _EPS):
            best, best_value = groups, value
    if best is None:
        return []
    for _ in range(kicks):
        groups = best
        for _ in range(2):
            moves = list(_neighbours(solver, groups, peer_ids))
            for move in rng.sample(moves, min(len(moves), 32)):  # the first feasible of a few
                if _feasible(move, solver):
                    groups = move
                    break
        groups = _improve(solver, groups, peer_ids, max_moves)
        value = _total(groups, solver)
        if value > best_value + abs(best_value) * 1e-9 + _EPS:
            best, best_value = groups, value
    return [solver.solve(g) for g in best]


def _feasible(groups, solver: SplitSolver) -> bool:
    if solver.objective is Objective.LATENCY and len(groups) != 1:
        return False
    return all(solver.solve(g) is not None for g in groups)


def _total(groups, solver: SplitSolver) -> float:
    return sum(score(solver.solve(g), solver.objective) for g in groups)


def _starts(solver: SplitSolver, peer_ids: list[str]) -> list[list[tuple[str, ...]]]:
    """Greedy starting plans: chains filled in a few sort orders until they hold the model."""
    by_speed = sorted(peer_ids, key=lambda p: (solver.layer_time_s(p), p))
    by_memory = sorted(peer_ids, key=lambda p: (-solver.providers[p].memory_bytes, p))
    by_density = sorted(peer_ids, key=lambda p: (-solver.providers[p].memory_bytes / solver.layer_time_s(p), p))
    starts = []
    for ordering in (by_speed, by_memory, by_density):
        if solver.objective is Objective.LATENCY:
            chain = _fill_chain(solver, ordering)
            groups = [chain] if chain else []
        else:
            groups, left = [], list(ordering)
            while left:
                chain = _fill_chain(solver, left)
                if not chain:
                    break
                groups.append(chain)
                left = [p for p in left if p not in chain]
        if groups and groups not in starts:
            starts.append(groups)
    return starts


def _fill_chain(solver: SplitSolver, ordering: list[str]) -> tuple[str, ...] | None:
    """The shortest prefix of `ordering` that holds the model, itself ordered fastest first."""
    for r in range(1, len(ordering) + 1):
        chain = tuple(sorted(ordering[:r], key=lambda p: (solver.layer_time_s(p), p)))
        if solver.solve(chain) is not None:
            return chain
    return None


def _improve(solver: SplitSolver, groups: list[tuple[str, ...]], peer_ids: list[str], max_moves: int):
    value = _total(groups, solver)
    for _ in range(max_moves):
        for candidate in _neighbours(solver, groups, peer_ids):
            if not _feasible(candidate, solver):
                continue
            candidate_value = _total(candidate, solver)
            if candidate_value > value + abs(value) * 1e-9 + _EPS:
                groups, value = candidate, candidate_value
                break
        else:
            return groups  # a local optimum
    return groups


def _neighbours(solver: SplitSolver, groups: list[tuple[str, ...]], peer_ids: list[str]):
    objective = solver.objective
    used = {p for g in groups for p in g}
    unused = [p for p in peer_ids if p not in used]
    multi = objective is Objective.THROUGHPUT

    def with_group(gi: int, new: tuple[str, ...]) -> list[tuple[str, ...]]:
        return [new if i == gi else g for i, g in enumerate(groups) if new or i != gi]

    for gi, g in enumerate(groups):
        for u in unused:  # add an idle provider anywhere, or let it replace a member
            for pos in range(len(g) + 1):
                yield with_group(gi, g[:pos] + (u,) + g[pos:])
            for pos in range(len(g)):
                yield with_group(gi, g[:pos] + (u,) + g[pos + 1:])
        for pos in range(len(g)):  # drop a member, or move it elsewhere in its chain
            rest = g[:pos] + g[pos + 1:]
            if rest or multi:
                yield with_group(gi, rest)
            for new_pos in range(len(rest) + 1):
                if new_pos != pos:
                    yield with_group(gi, rest[:new_pos] + (g[pos],) + rest[new_pos:])
            for other in range(pos + 1, len(g)):  # swap two members of the chain
                swapped = list(g)
                swapped[pos], swapped[other] = g[other], g[pos]
                yield with_group(gi, tuple(swapped))
        if len(g) > 2:
            yield with_group(gi, g[::-1])
    if not multi:
        return
    for gi, g in enumerate(groups):
        for hi, h in enumerate(groups):
            if gi == hi:
                continue
            for pos in range(len(g)):  # move a member to another pipeline
                rest = g[:pos] + g[pos + 1:]
                for new_pos in range(len(h) + 1):
                    moved = h[:new_pos] + (g[pos],) + h[new_pos:]
                    new_groups = []
                    for i, x in enumerate(groups):
                        if i == hi:
                            new_groups.append(moved)
                        elif i != gi:
                            new_groups.append(x)
                        elif rest:
                            new_groups.append(rest)
                    yield new_groups
            if gi < hi:
                for a in range(len(g)):  # swap members of two pipelines
                    for b in range(len(h)):
                        new_g = g[:a] + (h[b],) + g[a + 1:]
                        new_h = h[:b] + (g[a],) + h[b + 1:]
                        yield [new_g if i == gi else new_h if i == hi else x for i, x in enumerate(groups)]
                for merged in (g + h, h + g):  # merge two pipelines
                    yield [merged if i == gi else x for i, x in enumerate(groups) if i != hi]
    for gi in range(len(groups)):  # dissolve a pipeline
        yield [x for i, x in enumerate(groups) if i != gi]
    if unused:  # open a new pipeline from idle providers
        chain = _fill_chain(solver, sorted(unused, key=lambda p: (solver.layer_time_s(p), p)))
        if chain:
            yield groups + [chain]

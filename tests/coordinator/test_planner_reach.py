"""Relayed hops in the planner (coordinator/planner/reach.py): priced from measured round trips
and the relay's rate, directed (a hop costs what entering its downstream costs), and orders that
put relayed providers next to each other lose to those that do not."""

from __future__ import annotations

import itertools

import pytest

from coordinator.planner import COORDINATOR, Link, ModelShape, Pipeline, ProviderSpec, Stage, Workload, evaluate_pipeline, plan
from coordinator.planner.reach import RELAY_FORWARD_MS, RELAYED_BANDWIDTH_GBPS, measured_links

MODEL = ModelShape("wide", n_layers=8, hidden=4096, intermediate=8192, n_heads=32, n_kv_heads=8, head_dim=128,
                   vocab=1024)
WORKLOAD = Workload(batch=8, context_tokens=256, microbatches_in_flight=1)
DEFAULT = Link(latency_ms=0.5, bandwidth_gbps=1.0)
RTT_MS = {"p1": 10.0, "p2": 12.0, "r1": 40.0, "r2": 44.0}  # the homes behind NAT are further away
RELAYED = ("r1", "r2")


def providers() -> list[ProviderSpec]:
    # each holds a little over a quarter of the model: every pipeline has all four
    memory = int(MODEL.layer_weight_bytes * 2.6 + MODEL.embedding_bytes * 1.2 + (64 << 20))
    return [ProviderSpec(p, memory_bytes=memory, mem_bandwidth_gb_per_s=50.0, matmul_tflops=1.0) for p in RTT_MS]


def test_relayed_hops_are_priced_from_round_trips_and_the_relay_rate() -> None:
    links = measured_links(DEFAULT, RTT_MS, RELAYED)
    assert links.between(COORDINATOR, "r1") == Link(20.0, DEFAULT.bandwidth_gbps)  # the home dialed the coordinator
    assert links.between("p1", "r1") == Link((10.0 + 40.0) / 2 + RELAY_FORWARD_MS, RELAYED_BANDWIDTH_GBPS)
    assert links.between("r1", "p1") == DEFAULT  # r1 dials p1 directly: not measured, the default
    assert links.between("r1", "r2").latency_ms > links.between("p1", "r2").latency_ms


def test_the_plan_keeps_relayed_providers_apart_when_it_can() -> None:
    links = measured_links(DEFAULT, RTT_MS, RELAYED)
    result = plan(providers(), MODEL, WORKLOAD, links=links)
    [order] = [tuple(s.peer_id for s in p.stages) for p in result.pipelines[:1]]
    assert len(order) == 4
    assert not any(a in RELAYED and b in RELAYED for a, b in zip(order, order[1:])), order
    # and it is right to: every order with the two homes adjacent is slower under the same links
    best = result.costs[0].tokens_per_s
    counts = [len(range(s.start, s.end)) for s in result.pipelines[0].stages]
    for perm in itertools.permutations(RTT_MS):
        if any(a in RELAYED and b in RELAYED for a, b in zip(perm, perm[1:])):
            stages, start = [], 0
            for peer, n in zip(perm, counts):
                stages.append(Stage(peer, start, start + n))
                start += n
            cost = evaluate_pipeline(Pipeline(tuple(stages)), {p.peer_id: p for p in providers()}, MODEL, WORKLOAD,
                                     links, 1)
            assert cost.tokens_per_s < best, perm

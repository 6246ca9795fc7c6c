"""Hop bandwidth is measured, not assumed: two `provider join` processes, one whose outgoing frame
links pass a 20 Mbit/s shaper (MESHPOOL_SHAPE_BULK, node/transport/shaper.py), each timed by the
coordinator's link tests (coordinator/hop_bandwidth.py); /pool shows each hop's bandwidth, and the
planner prices the hops at it."""

from __future__ import annotations

import json

import pytest

from coordinator.local_pool import LocalPool
from coordinator.measurements import Measurements, hop_bandwidth_gbps
from coordinator.planner import Links, ModelShape, Pipeline, ProviderSpec, Stage, Workload, evaluate_pipeline
from coordinator.planner.hardware import Link

SHAPED_MBIT = 20.0


class ShapedPool(LocalPool):
    def process_env(self, name: str) -> dict[str, str]:
        # the shaper sits in front of this provider's bulk listener: the frame links it opens as a
        # sender are dialed there, so its hops out are shaped and hops into it are not
        return {"MESHPOOL_SHAPE_BULK": f"0,{SHAPED_MBIT}"} if name == "shaped" else {}


def hop(state: dict, sender: str, receiver: str) -> dict | None:
    providers = {p["peer"]: p for p in state["providers"]}
    links = {link["peer"]: link for link in providers.get(sender, {}).get("links", [])}
    found = links.get(receiver)
    return found if found and found.get("bandwidth_gbps") else None


def test_a_shaped_hop_is_measured_slower_than_an_unshaped_one(tmp_path):
    pool = ShapedPool(tmp_path, heartbeat_timeout_s=3.0)
    try:
        pool.start_coordinator()
        shaped = pool.add_provider("shaped")
        plain = pool.add_provider("plain")
        state = pool.wait_for(lambda s: hop(s, shaped, plain) and hop(s, plain, shaped), 120, "both hops measured")
    finally:
        pool.stop()
    slow, fast = hop(state, shaped, plain), hop(state, plain, shaped)
    assert slow["path"] == fast["path"] == "link"  # the path stage frames take
    # no faster than the shaper lets through (its 64 KiB pacing may let a little more by at the start)
    assert slow["bandwidth_gbps"] <= SHAPED_MBIT / 1000 * 1.25, slow
    assert fast["bandwidth_gbps"] > 2 * slow["bandwidth_gbps"], (fast, slow)
    log = (tmp_path / "coordinator.log").read_text()
    assert f"hop {shaped} -> {plain}:" in log


def test_the_planner_prices_a_measured_hop_at_its_bandwidth(default_model_dir):
    """Until tested a hop has the default's bandwidth; after, the measured one, whichever way
    reachability priced it, and a slow hop makes the pipeline through it slower."""
    raw = json.loads((default_model_dir / "config.json").read_text())
    shape = ModelShape.from_hf_config(raw, name="m", bytes_per_param=4.0, activation_bytes=4)
    store = Measurements(shape, 8)
    assert store.links().between("a", "b").bandwidth_gbps == store.links().default.bandwidth_gbps
    gbps = store.record_hop("a", "b", 1 << 20, rtt_ms=1.0, transfer_ms=421.0, path="link", now_s=0.0)
    assert gbps == pytest.approx(hop_bandwidth_gbps(1 << 20, 1.0, 421.0)) and gbps < 0.021
    assert store.links().between("a", "b").bandwidth_gbps == pytest.approx(gbps)
    relayed = Links(Link(1.0, 100.0), {("a", "b"): Link(3.0, 0.05)})
    priced = store.with_hop_bandwidths(relayed).between("a", "b")
    assert priced.bandwidth_gbps == pytest.approx(gbps) and priced.latency_ms == 3.0
    specs = {p: ProviderSpec(p, 2**34, mem_bandwidth_gb_per_s=10.0, matmul_tflops=0.1) for p in "ab"}
    half = shape.n_layers // 2
    pipeline = Pipeline((Stage("a", 0, half), Stage("b", half, shape.n_layers)))
    workload = Workload(batch=8, context_tokens=512, microbatches_in_flight=1)
    before = evaluate_pipeline(pipeline, specs, shape, workload, Measurements(shape, 8).links(), 1)
    after = evaluate_pipeline(pipeline, specs, shape, workload, store.links(), 1)
    assert after.link_times_s[1] > before.link_times_s[1] and after.tokens_per_s < before.tokens_per_s
    # a provider that registers again is tested again
    store.forget_probe("b")
    assert store.hop_measured_s("a", "b") is None

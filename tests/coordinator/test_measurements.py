"""The measurement store the planner plans from, and re-planning with hysteresis (no processes)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from coordinator.measurements import (CONTRADICTION_RATIO, MAX_OVERHEAD_SHARE, MIN_STEP_SAMPLES, STEP_TRUST_FACTOR,
                                      STEP_WINDOW, Measurements, Observation, speed_from)
from coordinator.planner import (COORDINATOR, LLAMA3_8B, LLAMA3_70B, Link, Links, Objective, Pipeline, ProviderSpec, Stage,
                                 Workload, choose_with_hysteresis, evaluate_pipeline, plan, stage_time_s)

MODEL = LLAMA3_8B
BATCH = 8
GIB = 2**30


def honest(peer: str, memory_gib: int = 48, bandwidth: float = 900.0, tflops: float = 150.0) -> ProviderSpec:
    return ProviderSpec(peer, memory_gib * GIB, bandwidth, tflops)


def probe_obs(seconds: float, batch: int = BATCH) -> Observation:
    return Observation(n_layers=2, first=False, last=False, batch=batch, context_tokens=12, seconds=seconds)


def test_the_cost_model_inverted_predicts_the_time_it_was_measured_at():
    obs = Observation(n_layers=5, first=True, last=False, batch=4, context_tokens=300, seconds=0.0123)
    speed = speed_from(MODEL, obs)
    spec = ProviderSpec("p", GIB, speed.mem_bandwidth_gb_per_s, speed.matmul_tflops)
    assert stage_time_s(spec, MODEL, 5, True, False, 4, 300) == pytest.approx(0.0123, rel=1e-9)
    # twice the time, half the figures
    slow = speed_from(MODEL, replace(obs, seconds=0.0246))
    assert slow.mem_bandwidth_gb_per_s == pytest.approx(speed.mem_bandwidth_gb_per_s / 2)


def test_two_probes_give_the_fixed_time_a_step_and_serving_steps_are_read_net_of_it():
    """A GPU-like provider: 0.4 ms a step whatever its layers, then a roofline. The probes of 4 and 1
    layers find both; a 32-layer stage is then predicted at its time (read as layers alone, the 4-layer
    probe would price it at ~1.9x), and its honest steps are believed (not held to the probe's cap)."""
    store = Measurements(MODEL, BATCH)
    truth = replace(honest("gpu", bandwidth=3000.0, tflops=400.0), step_overhead_ms=0.4)

    def probe(n_layers: int) -> Observation:
        return replace(probe_obs(stage_time_s(truth, MODEL, n_layers, False, False, BATCH, 12)), n_layers=n_layers)

    whole_s = stage_time_s(truth, MODEL, 32, True, True, BATCH, 12)
    plain = Measurements(MODEL, BATCH)
    plain.record_probe(truth, probe(4))
    assert stage_time_s(plain.spec_for(truth), MODEL, 32, True, True, BATCH, 12) > 1.5 * whole_s
    store.record_probe(truth, probe(4), probe(1))
    planned = store.spec_for(truth)
    assert planned.step_overhead_ms == pytest.approx(0.4) and store.public("gpu")["step_overhead_ms"] == 0.4
    # (within rounding of the roofline: the probe's two terms are equal, the head's are not)
    assert stage_time_s(planned, MODEL, 32, True, True, BATCH, 12) == pytest.approx(whole_s, rel=1e-3)
    for _ in range(MIN_STEP_SAMPLES):
        assert store.record_step(("gpu",), (32,), BATCH, 12, wall_s=whole_s + 0.0004, stage_ms=(whole_s * 1e3,))
    assert store.public("gpu")["source"] == "steps"
    assert stage_time_s(store.spec_for(truth), MODEL, 32, True, True, BATCH, 12) == pytest.approx(whole_s, rel=1e-3)


def test_a_bfloat16_provider_is_read_at_its_own_bytes():
    """Probed in bfloat16 at batch 32, its steps at batch 1 are predicted at their time, and its claim
    holds: read at the pool's float32 bytes, its bandwidth came out doubled (half the time predicted)."""
    truth = replace(honest("bf16", bandwidth=3000.0, tflops=400.0), dtype_bytes=2)
    pool_model = replace(MODEL, bytes_per_param=4.0, activation_bytes=4)  # a coordinator's: float32
    probe = replace(probe_obs(stage_time_s(truth, pool_model, 4, False, False, 32, 12), batch=32), n_layers=4)
    store = Measurements(pool_model, 32)
    store.record_probe(truth, probe)
    planned = replace(store.spec_for(truth), dtype_bytes=2)  # as the pool plans it
    at_batch_1 = stage_time_s(truth, pool_model, 32, True, True, 1, 12)
    assert stage_time_s(planned, pool_model, 32, True, True, 1, 12) == pytest.approx(at_batch_1, rel=0.05)
    assert store.claim_ratio("bf16") == pytest.approx(1.0)
    for _ in range(MIN_STEP_SAMPLES):  # its steps are read at the same bytes
        store.record_step(("bf16",), (32,), 1, 12, wall_s=1.0, stage_ms=(at_batch_1 * 1e3,))
    store.plan_batch = 1
    planned = replace(store.spec_for(truth), dtype_bytes=2)
    assert stage_time_s(planned, pool_model, 32, True, True, 1, 12) == pytest.approx(at_batch_1, rel=1e-6)


def test_a_provider_that_paces_its_smaller_probe_gains_a_bounded_factor():
    """The smaller probe made as slow as the larger (a fake fixed time, free layers): the fitted fixed
    time is held to MAX_OVERHEAD_SHARE of the larger probe, so its layers look at most 1 / (1 - share)
    faster than the larger probe's plain time says; a probe faster with fewer layers than more (noise)
    fits no negative fixed time."""
    larger = replace(probe_obs(0.002), n_layers=4)
    paced, plain, noisy = Measurements(MODEL, BATCH), Measurements(MODEL, BATCH), Measurements(MODEL, BATCH)
    a = honest("a")
    paced.record_probe(a, larger, replace(larger, n_layers=1))
    plain.record_probe(a, larger)
    assert paced.spec_for(a).step_overhead_ms == pytest.approx(MAX_OVERHEAD_SHARE * 2.0)
    gain = paced.spec_for(a).mem_bandwidth_gb_per_s / plain.spec_for(a).mem_bandwidth_gb_per_s
    assert gain == pytest.approx(1 / (1 - MAX_OVERHEAD_SHARE))
    noisy.record_probe(a, larger, replace(larger, n_layers=1, seconds=0.0001))
    assert noisy.spec_for(a) == plain.spec_for(a) and noisy.spec_for(a).step_overhead_ms == 0.0


def test_a_forged_profile_is_planned_at_its_measured_speed_and_recorded_as_misconduct():
    store = Measurements(MODEL, BATCH)
    truth = honest("forger", bandwidth=20.0, tflops=0.1)  # a CPU
    forged = replace(truth, mem_bandwidth_gb_per_s=3.35e6, matmul_tflops=1e6)  # "3.35 PB/s"
    seconds = stage_time_s(truth, MODEL, 2, False, False, BATCH, 12) * 3  # honest hardware runs below its roofline
    assert store.record_probe(forged, probe_obs(seconds)) is True
    planned = store.spec_for(forged)
    assert planned.mem_bandwidth_gb_per_s < truth.mem_bandwidth_gb_per_s  # measured, not claimed
    assert planned.matmul_tflops < truth.matmul_tflops
    assert planned.memory_bytes == forged.memory_bytes  # memory is not a speed figure
    public = store.public("forger")
    assert public["contradicted"] and public["source"] == "probe" and public["claim_ratio"] > CONTRADICTION_RATIO
    assert store.summary()["contradictions_total"] == 1
    assert store.summary()["events"][0]["peer"] == "forger"
    # an honest claim that the same hardware measures 3x below is not misconduct
    assert store.record_probe(truth, probe_obs(seconds)) is False
    # the claim is used only until measured
    unmeasured = honest("new")
    assert store.spec_for(unmeasured) == unmeasured and not store.probed("new")


def test_with_the_70b_shape_a_forger_is_planned_as_if_it_had_told_the_truth():
    """Four honest 48 GiB providers and a fifth claiming 1000x their speed: planned on claims it is
    given the most layers it can hold and the plan promises throughput that is not there; planned on
    measurement the plan is the one it would get had it told the truth."""
    model = LLAMA3_70B
    store, truthful = Measurements(model, BATCH), Measurements(model, BATCH)
    peers = [honest(f"h{i}") for i in range(4)]
    truth = honest("forger")
    forged = replace(truth, mem_bandwidth_gb_per_s=truth.mem_bandwidth_gb_per_s * 1000,
                     matmul_tflops=truth.matmul_tflops * 1000)
    seconds = stage_time_s(truth, model, 2, False, False, BATCH, 12)  # the probe: same hardware, same time
    for spec in peers:
        store.record_probe(spec, probe_obs(seconds))
        truthful.record_probe(spec, probe_obs(seconds))
    assert store.record_probe(forged, probe_obs(seconds))  # misconduct
    assert not truthful.record_probe(truth, probe_obs(seconds))
    workload = Workload(batch=BATCH, context_tokens=4096, microbatches_in_flight=4)
    on_claims = plan(peers + [forged], model, workload)
    measured = plan([store.spec_for(s) for s in peers + [forged]], model, workload)
    honest_plan = plan([truthful.spec_for(s) for s in peers + [truth]], model, workload)
    assert measured.pipelines == honest_plan.pipelines
    assert measured.tokens_per_s == pytest.approx(honest_plan.tokens_per_s)
    assert on_claims.pipelines != measured.pipelines and on_claims.tokens_per_s > 1.3 * measured.tokens_per_s
    forger_layers = {s.peer_id: s.n_layers for p in on_claims.pipelines for s in p.stages}["forger"]
    assert forger_layers == max(s.n_layers for p in on_claims.pipelines for s in p.stages)


def test_step_reports_are_checked_against_the_coordinators_clock_and_capped_by_the_probe():
    store = Measurements(MODEL, BATCH)
    a, b = honest("a"), honest("b")
    base = stage_time_s(a, MODEL, 2, False, False, BATCH, 12)
    store.record_probe(a, probe_obs(base))
    store.record_probe(b, probe_obs(base))
    probe_bw = store.spec_for(a).mem_bandwidth_gb_per_s
    peers, layers = ("a", "b"), (16, 16)
    # more compute reported than the whole step took: impossible, ignored
    assert not store.record_step(peers, layers, BATCH, 100, wall_s=0.010, stage_ms=(8.0, 8.0))
    assert store.public("a")["source"] == "probe"
    # one report per stage, or nothing
    assert not store.record_step(peers, layers, BATCH, 100, wall_s=1.0, stage_ms=(8.0,))
    # a stage that reports itself absurdly fast is believed at most STEP_TRUST_FACTOR x its probe
    for _ in range(MIN_STEP_SAMPLES):
        assert store.record_step(peers, layers, BATCH, 100, wall_s=1.0, stage_ms=(0.001, 400.0))
    assert store.spec_for(a).mem_bandwidth_gb_per_s == pytest.approx(probe_bw * STEP_TRUST_FACTOR)
    assert store.spec_for(b).mem_bandwidth_gb_per_s < probe_bw  # 400 ms for 16 layers: slow, believed
    assert store.public("b")["source"] == "steps" and store.public("b")["steps_measured"] == MIN_STEP_SAMPLES
    # the rest of the step is the links: (1000 - 400.001) ms over three hops
    assert store.summary()["hop_latency_ms"] == pytest.approx(599.999 / 3, rel=1e-3)
    # steps at another batch size do not stand in for the planned batch
    before = store.spec_for(b)
    store.record_step(peers, layers, 1, 100, wall_s=1.0, stage_ms=(1.0, 1.0))
    assert store.spec_for(b) == before


def test_the_step_figure_is_the_median_of_recent_steps_so_lone_slow_steps_move_nothing():
    """Steps replace the probe once MIN_STEP_SAMPLES were seen; then the figure is the median of the last
    STEP_WINDOW: steps that took 50x (a CUDA graph captured, a pause) change nothing, however recent,
    while a provider that really became twice as slow is planned so once most of the window says so."""
    store = Measurements(MODEL, BATCH)
    a = honest("a")
    store.record_probe(a, probe_obs(stage_time_s(a, MODEL, 2, False, False, BATCH, 12)))
    probed_s = stage_time_s(store.spec_for(a), MODEL, 32, True, True, BATCH, 12)

    def planned_s() -> float:
        return stage_time_s(store.spec_for(a), MODEL, 32, True, True, BATCH, 12)

    def step(seconds: float) -> None:
        assert store.record_step(("a",), (32,), BATCH, 12, wall_s=10.0, stage_ms=(1e3 * seconds,))

    for _ in range(MIN_STEP_SAMPLES - 1):  # the first steps at the planned batch: a capture among them
        step(50 * probed_s)
    assert planned_s() == pytest.approx(probed_s) and store.public("a")["source"] == "probe"
    for _ in range(STEP_WINDOW):
        step(1.1 * probed_s)
    assert planned_s() == pytest.approx(1.1 * probed_s) and store.public("a")["source"] == "steps"
    for _ in range(STEP_WINDOW // 2):  # the newest steps, and slow ones
        step(50 * probed_s)
    assert planned_s() == pytest.approx(1.1 * probed_s)
    for _ in range(STEP_WINDOW // 2 + 1):  # the provider has become twice as slow: most of the window shows it
        step(2 * probed_s)
    assert planned_s() == pytest.approx(2 * probed_s)
    assert store.public("a")["steps_measured"] == MIN_STEP_SAMPLES - 1 + STEP_WINDOW + 2 * (STEP_WINDOW // 2) + 1


def test_links_and_memory_caps_come_from_what_was_seen():
    store = Measurements(MODEL, BATCH)
    store.record_rtt("a", 3.0)
    links = store.links()
    assert links.between(COORDINATOR, "a").latency_ms == pytest.approx(1.5)
    assert links.between("a", "b") == links.default
    # once "a" served, the coordinator's hops to it are priced at what its steps' hops took (the data
    # path), not at the control path's round trip; a provider that has not served keeps its ping's
    store.record_rtt("b", 8.0)
    assert store.record_step(("a",), (32,), BATCH, 12, wall_s=0.0050, stage_ms=(4.6,))
    links = store.links()
    assert links.between(COORDINATOR, "a").latency_ms == pytest.approx(0.2)
    assert links.between("a", COORDINATOR).latency_ms == pytest.approx(0.2)
    assert links.between(COORDINATOR, "b").latency_ms == pytest.approx(4.0)
    assert store.public("a")["hop_ms"] == pytest.approx(0.2)
    store.record_assignment_failure("a", 10 * GIB, "out of memory: CUDA")
    assert store.spec_for(honest("a")).memory_bytes < 10 * GIB
    store.record_assignment_failure("a", 20 * GIB, "out of memory: again")  # the lowest cap stays
    assert store.spec_for(honest("a")).memory_bytes < 10 * GIB
    # a provider that registers again is probed again; what it was caught at stays
    store.record_probe(replace(honest("a"), mem_bandwidth_gb_per_s=1e9), probe_obs(1.0))
    store.forget_probe("a")
    assert not store.probed("a") and store.public("a")["contradicted"]
    assert store.public("a")["memory_cap_bytes"] < 10 * GIB


# -- hysteresis ------------------------------------------------------------------------------------

WORKLOAD = Workload(batch=BATCH, context_tokens=4096, microbatches_in_flight=4)
LINKS = Links(Link(latency_ms=0.5, bandwidth_gbps=10.0))


def one_stage(peer: str) -> Pipeline:
    return Pipeline((Stage(peer, 0, MODEL.n_layers),))


def tps(pipelines, providers) -> float:
    return sum(evaluate_pipeline(p, providers, MODEL, WORKLOAD, LINKS, 4).tokens_per_s for p in pipelines)


def test_hysteresis_keeps_the_plan_unless_the_new_one_is_clearly_better():
    providers = {"a": honest("a", 48), "b": honest("b", 48)}
    current = [Pipeline((Stage("a", 0, 18), Stage("b", 18, 32)))]
    balanced = plan(list(providers.values()), MODEL, WORKLOAD, LINKS).pipelines
    assert tps(balanced, providers) > tps(current, providers)  # a little better: not worth moving
    assert choose_with_hysteresis(current, balanced, providers, MODEL, WORKLOAD, LINKS) == tuple(current)
    # a 10x faster b that holds the model alone: two pipelines beat one by far, so the plan moves
    providers = {"a": honest("a", 80, bandwidth=300.0, tflops=50.0), "b": honest("b", 80, 3000.0, 500.0)}
    current = [Pipeline((Stage("a", 0, 16), Stage("b", 16, 32)))]
    fresh = plan(list(providers.values()), MODEL, WORKLOAD, LINKS).pipelines
    assert tps(fresh, providers) > 1.2 * tps(current, providers)
    assert choose_with_hysteresis(current, fresh, providers, MODEL, WORKLOAD, LINKS) == tuple(fresh)


def test_hysteresis_puts_newcomers_to_work_without_moving_anyone():
    providers = {p: honest(p, 80) for p in ("a", "b", "c")}
    current = [one_stage("a"), one_stage("b")]
    fresh = plan(list(providers.values()), MODEL, WORKLOAD, LINKS).pipelines
    chosen = choose_with_hysteresis(current, fresh, providers, MODEL, WORKLOAD, LINKS)
    assert one_stage("a") in chosen and one_stage("b") in chosen
    assert any("c" in p.peer_ids for p in chosen)  # the newcomer serves too


def test_hysteresis_replaces_pipelines_that_are_no_longer_possible():
    providers = {"b": honest("b", 80)}
    fresh = plan(list(providers.values()), MODEL, WORKLOAD, LINKS).pipelines
    assert choose_with_hysteresis([one_stage("gone")], fresh, providers, MODEL, WORKLOAD, LINKS) == tuple(fresh)
    # a pipeline that no longer fits the memory measured for it goes too
    small = {"a": honest("a", 8), "b": honest("b", 80)}
    chosen = choose_with_hysteresis([one_stage("a")], fresh, small, MODEL, WORKLOAD, LINKS)
    assert chosen == tuple(fresh)


def test_hysteresis_on_latency():
    slow, fast = honest("a", 80), honest("b", 80, bandwidth=2000.0, tflops=400.0)
    providers = {"a": slow, "b": fast}
    chosen = choose_with_hysteresis([one_stage("a")], [one_stage("b")], providers, MODEL, WORKLOAD, LINKS,
                                    objective=Objective.LATENCY)
    assert chosen == (one_stage("b"),)  # 2.2x less latency
    near = {"a": slow, "b": honest("b", 80, bandwidth=950.0)}
    chosen = choose_with_hysteresis([one_stage("a")], [one_stage("b")], near, MODEL, WORKLOAD, LINKS,
                                    objective=Objective.LATENCY)
    assert chosen == (one_stage("a"),)
    assert math.isfinite(tps(chosen, near))


def test_without_a_probe_the_checked_step_reports_replace_the_claim():
    """A model too small to probe (fewer than three layers): claims stand until steps are measured."""
    store = Measurements(MODEL, BATCH)
    claim = honest("a", bandwidth=1e6)
    assert store.spec_for(claim) == claim
    for _ in range(MIN_STEP_SAMPLES):
        assert store.record_step(("a",), (32,), BATCH, 100, wall_s=1.0, stage_ms=(500.0,))
    assert store.spec_for(claim).mem_bandwidth_gb_per_s < 1e3
    assert stage_time_s(store.spec_for(claim), MODEL, 32, True, True, BATCH, 100) == pytest.approx(0.5)


def test_a_stage_that_met_one_slow_step_is_not_moved_by_the_next_plan():
    """Two providers of one GPU serve [0, 16) and [16, 32); steps show both alike, then one step of the
    first takes 50x (it captured a CUDA graph). The plan the measured figures give keeps the pipeline;
    with that step as the newest third of an average (before) the fresh plan looked far better."""
    providers = {p: honest(p, 80) for p in ("a", "b")}
    store = Measurements(MODEL, BATCH)
    for spec in providers.values():
        store.record_probe(spec, probe_obs(stage_time_s(spec, MODEL, 2, False, False, BATCH, 12)))
    current = [Pipeline((Stage("a", 0, 16), Stage("b", 16, 32)))]
    compute_ms = [1e3 * stage_time_s(providers[s.peer_id], MODEL, s.n_layers, s.start == 0, s.end == 32, BATCH, 100)
                  for s in current[0].stages]
    for slow in [1] * STEP_WINDOW + [50]:
        stage_ms = (compute_ms[0] * slow, compute_ms[1])
        assert store.record_step(("a", "b"), (16, 16), BATCH, 100, wall_s=sum(stage_ms) / 1e3 + 0.01, stage_ms=stage_ms)
    measured = {peer: store.spec_for(spec) for peer, spec in providers.items()}
    fresh = plan(list(measured.values()), MODEL, WORKLOAD, LINKS).pipelines
    assert choose_with_hysteresis(current, fresh, measured, MODEL, WORKLOAD, LINKS) == tuple(current)
    averaged = replace(measured["a"], mem_bandwidth_gb_per_s=measured["a"].mem_bandwidth_gb_per_s / (0.7 + 0.3 * 50),
                       matmul_tflops=measured["a"].matmul_tflops / (0.7 + 0.3 * 50))
    skewed = {**measured, "a": averaged}
    fresh = plan(list(skewed.values()), MODEL, WORKLOAD, LINKS).pipelines
    assert choose_with_hysteresis(current, fresh, skewed, MODEL, WORKLOAD, LINKS) != tuple(current)

"""The admission probe against in-process providers on the default model's real layers: an honest one
is measured, one that answers without the work is refused, one with a forged profile is caught."""

from __future__ import annotations

import json
import time

import pytest
import torch

from coordinator.admission import (MAX_DIFFERENCE_GAIN, OVERHEAD_PROBE_LAYERS, PROBE_LAYERS, PROBE_STEPS, Admission,
                                    AdmissionFailed)
from coordinator.measurements import Measurements
from coordinator.planner import ModelShape, ProviderSpec
from node.faults import Fault
from node.models import model_id_of
from node.probe import RUNS, ProbeWork, expected_answers
from wire.messages import Ack, MessageError, Ping, Probe, ProbeResult, ProbeRun, decode, refuse

BATCH = 2


class InProcessProvider:
    """Answers the assign protocol's probe messages as node/provider.py does, optionally lying (on the
    runs numbered in `lie_on`), stalling (`stall_s` before the runs in `stall_on`), taking `step_s`
    more a step (a slower device) or answering one run a probe (`one_run`)."""

    def __init__(self, model_dir, lie: bool = False, lie_on: tuple[int, ...] = (0, 1, 2), stall_s: float = 0.0,
                 stall_on=(), one_run: bool = False, step_s: float = 0.0):
        self.model_dir, self.lie, self.lie_on, self.work = model_dir, lie, lie_on, None
        self.stall_s, self.stall_on, self.one_run, self.runs = stall_s, stall_on, one_run, 0
        self.step_s = step_s
        self.probed_layers = []  # each probe's layer count, in order

    def request(self, peer: str, message, timeout_s: float):
        message = decode(message.to_frame())  # through the wire, as a real request goes
        if isinstance(message, Ping):
            return Ack()
        if isinstance(message, Probe):
            self.work = ProbeWork(self.model_dir, message)
            self.probed_layers.append(message.end - message.start)
            return Ack()
        if isinstance(message, ProbeRun):
            if self.work is None or not self.work.runs_left:
                return refuse("no probe prepared")
            run, self.runs = self.runs, self.runs + 1
            time.sleep(self.stall_s * (run in self.stall_on) + self.step_s * message.steps)
            out = self.work.run(message)
            if self.one_run:
                self.work = None
            if self.lie and run in self.lie_on:  # fast and made up
                out = torch.randn_like(out)
            return decode(ProbeResult(message.seed, out).to_frame())
        return refuse("unexpected")


@pytest.fixture(autouse=True)
def one_thread():
    """As `provider join` runs in a shared pool (coordinator/local_pool.py): spinning threads of two
    processes on two cores make every step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shape(default_model_dir):
    raw = json.loads((default_model_dir / "config.json").read_text())
    return ModelShape.from_hf_config(raw, name=model_id_of(default_model_dir), bytes_per_param=4.0, activation_bytes=4)


def admission(model_dir, shape, provider) -> tuple[Admission, Measurements]:
    store = Measurements(shape, BATCH)
    return Admission(model_dir, model_id_of(model_dir), shape.n_layers, BATCH, provider.request, store), store


def cpu_claim(peer: str, factor: float = 1.0) -> ProviderSpec:
    return ProviderSpec(peer, 2**30, mem_bandwidth_gb_per_s=10.0 * factor, matmul_tflops=0.05 * factor)


def test_an_honest_provider_is_measured_on_middle_layers(default_model_dir, shape):
    provider = InProcessProvider(default_model_dir)
    gate, store = admission(default_model_dir, shape, provider)
    assert gate.possible and 0 < gate.start < gate.end < shape.n_layers and gate.end - gate.start == PROBE_LAYERS
    # a modest claim (0.1 GB/s): however loaded this machine is, the probe does not contradict it
    outcome = gate.admit(cpu_claim("honest", 0.01), "float32")
    assert outcome.seconds_per_step > 0 and not outcome.contradicted
    assert store.probed("honest") and store.public("honest")["source"] == "probe"
    # two probes, the second smaller: with them, the provider's fixed time a step (never negative, and
    # at most its share of the larger probe's step)
    assert provider.probed_layers == [PROBE_LAYERS, OVERHEAD_PROBE_LAYERS]
    assert 0 <= store.public("honest")["step_overhead_ms"] <= outcome.seconds_per_step * 1e3
    assert store.public("honest")["rtt_ms"] is not None
    planned = store.spec_for(cpu_claim("honest", 0.01))
    assert planned.mem_bandwidth_gb_per_s != cpu_claim("honest", 0.01).mem_bandwidth_gb_per_s  # measured, not claimed


def test_an_answer_without_the_work_is_refused(default_model_dir, shape):
    gate, store = admission(default_model_dir, shape, InProcessProvider(default_model_dir, lie=True))
    with pytest.raises(AdmissionFailed, match="not the work"):
        gate.admit(cpu_claim("liar"), "float32")
    assert not store.probed("liar")


def test_the_coordinator_checks_every_run_by_one_prefill(default_model_dir, shape):
    """Its answers by one prefill a session are what a provider's decode steps give, run after run (a
    later run continues the sessions): float32 on this CPU agrees to rounding, far inside the tolerance."""
    probe = Probe(model_id_of(default_model_dir), 2, 6, shape.n_layers, 3, 5, 7, "float32")
    runs = [ProbeRun(11 + i, PROBE_STEPS[i % 2]) for i in range(RUNS)]
    work = ProbeWork(default_model_dir, probe)
    for run, expected in zip(runs, expected_answers(default_model_dir, probe, runs)):
        answer = work.run(run)
        assert answer.shape == expected.shape == (3, answer.shape[1])
        assert float((answer - expected).norm() / expected.norm()) < 1e-4
    # and a different run's answer is far from it: the check tells the runs apart
    assert float((answer - expected_answers(default_model_dir, probe, runs[:2])[0]).norm() / answer.norm()) > 0.5


def test_the_fastest_run_is_the_measurement_and_every_run_is_checked(default_model_dir, shape):
    quiet, _ = admission(default_model_dir, shape, InProcessProvider(default_model_dir))
    stalled, _ = admission(default_model_dir, shape, InProcessProvider(default_model_dir, stall_s=1.0, stall_on=(0,)))
    # a run slowed by something else on the machine (1 s: ~28 ms a step) does not count
    assert stalled.admit(cpu_claim("stalled", 0.01), "float32").seconds_per_step < 1.0 / max(PROBE_STEPS)
    assert quiet.admit(cpu_claim("quiet", 0.01), "float32").seconds_per_step < 1.0 / max(PROBE_STEPS)
    # what every run costs whatever its steps (a slow round trip, a slow answer) is not a step's time: a
    # ping taken off would have left 0.5 s / 24 steps = 21 ms a step in
    every_run = InProcessProvider(default_model_dir, stall_s=0.5, stall_on=range(2 * RUNS))  # both probes
    slow_link, store = admission(default_model_dir, shape, every_run)
    assert slow_link.admit(cpu_claim("slow-link", 0.01), "float32").seconds_per_step < 0.5 / max(PROBE_STEPS)
    # nor is it a fixed time a step: the one-layer probe is not held to the larger one's floor (half its
    # plain time, here ~10 ms and more, which would have fitted a fixed time of ~10 ms)
    assert store.public("slow-link")["step_overhead_ms"] < 0.25e3 * 0.5 / max(PROBE_STEPS)
    late_liar, store = admission(default_model_dir, shape, InProcessProvider(default_model_dir, lie=True, lie_on=(2,)))
    with pytest.raises(AdmissionFailed, match="not the work"):
        late_liar.admit(cpu_claim("late-liar"), "float32")
    assert not store.probed("late-liar")
    older, store = admission(default_model_dir, shape, InProcessProvider(default_model_dir, one_run=True))
    assert older.admit(cpu_claim("older", 0.01), "float32").seconds_per_step > 0 and store.probed("older")


def test_stalled_short_runs_gain_at_most_the_bounded_factor(default_model_dir, shape):
    """A device taking 20 ms a step that stalls its short runs (the big probe's runs 1 and 3) until they
    take nearly as long as its long ones: the difference alone would show ~1 ms a step; it is held to at
    least half the long run's plain figure."""
    step_s, (long, short) = 0.02, PROBE_STEPS
    stall_s = step_s * (long - short) - 0.02  # the long run is then 20 ms longer than the short
    paced = InProcessProvider(default_model_dir, step_s=step_s, stall_s=stall_s, stall_on=(1, 3))
    gate, _ = admission(default_model_dir, shape, paced)
    measured = gate.admit(cpu_claim("pacer", 0.01), "float32").seconds_per_step
    assert step_s / MAX_DIFFERENCE_GAIN * 0.9 <= measured <= step_s * 1.5


def test_a_forged_profile_is_caught_by_the_probe(default_model_dir, shape):
    gate, store = admission(default_model_dir, shape, InProcessProvider(default_model_dir))
    fault = Fault.parse("inflate-profile:1e6")
    profile = fault.inflate_profile({"devices": [{"mem_bandwidth_gb_per_s": 10.0, "matmul_tflops": 0.05,
                                                  "memory_total_bytes": 2**30}]})
    device = profile["devices"][0]
    assert device["mem_bandwidth_gb_per_s"] == 1e7 and device["memory_total_bytes"] == 2**30
    assert gate.admit(cpu_claim("forger", 1e6), "float32").contradicted
    assert store.public("forger")["contradicted"] and store.summary()["contradictions_total"] == 1


def test_probe_messages_are_checked_before_any_work(default_model_dir, shape):
    model = model_id_of(default_model_dir)
    for bad in (dict(start=0, end=2), dict(start=1, end=30), dict(start=1, end=20), dict(batch=0),
                dict(tokens=10_000), dict(dtype="int8")):
        fields = {**dict(model=model, start=14, end=16, n_layers=30, batch=2, tokens=8, seed=1, dtype="float32"),
                  **bad}
        with pytest.raises(MessageError):
            decode(Probe(**fields).to_frame())
    with pytest.raises(MessageError):
        decode(ProbeRun(1, 0).to_frame())
    with pytest.raises(MessageError):
        decode(ProbeResult(1, torch.zeros(3)).to_frame())  # not (batch, D)
    with pytest.raises(ValueError):
        Fault.parse("inflate-profile:0.5")
    with pytest.raises(ValueError):
        Fault.parse("inflate-profile:lots")

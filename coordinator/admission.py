"""Admission: a provider is timed on real layers before it is planned.

The coordinator pings the newcomer (the link's round trip), has it prepare a probe (load a few
middle layers, prefill a batch of sessions: untimed, loading takes what it takes), then times,
with its own clock, runs of batched decode steps whose inputs come from a seed sent only then.
It recomputes the same steps itself (node/probe.py) and refuses an answer that is not the work
(the provider cannot be fast by answering anything). Runs are long and short: the fastest long run
less the fastest short one, over the steps between them, is the probe's measurement, free of what a
run costs whatever its steps (the request's round trip, the answer's transfer: ~20 ms a run beyond a
ping on one H200 host, as long as 20 steps of 4 layers). The fastest: one run made two pools of the
same providers on this CPU plan 1.5x apart. The planner plans from it instead of the profile's claims
(coordinator/measurements.py). A second, smaller probe of one layer gives the provider's fixed time a
step apart from its layers (host work, launches, the output's copy: 0.25-0.73 ms of a 4-layer step of
0.93-1.24 ms at batch 32 on an H200); read as layers alone, a 2-layer probe had the 8B shape's
32-layer stage predicted at 2.6x its time.

The coordinator's clock is the judge, and a provider can only slow a run down. Slower long runs show
it slower; slower short runs would show it faster, so a step of the larger probe is held to at least
1 / MAX_DIFFERENCE_GAIN of its plain figure (the long run less a ping). The one-layer probe only sets
the fixed time: faster, it makes the provider's layers look dearer; slower, its fixed time is bounded
(coordinator/measurements.py MAX_OVERHEAD_SHARE).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from coordinator.measurements import Measurements, Observation
from coordinator.planner import ProviderSpec
from node.probe import RUNS, WARM_UP_STEPS, expected_answers
from node.transport import TransportError
from wire.messages import Ack, Message, Ping, Probe, ProbeResult, ProbeRun

log = logging.getLogger("meshpool.coordinator")

PROBE_LAYERS = 4  # middle layers timed: enough to hold real work, little to load
OVERHEAD_PROBE_LAYERS = 1  # the smaller probe's: with the larger, the line time = fixed + layers x a layer
PROBE_TOKENS = 8  # prefilled per session: the decode steps attend to a short context
# decode steps of the long and the short run (alternating, long first: a provider that answers one run
# is timed on it, less a ping): the long's steps well beyond the short's hold the run's own costs
PROBE_STEPS = (24, 4)
# A provider that stalls its short runs makes the difference small: a step is taken at no less than
# 1 / MAX_DIFFERENCE_GAIN of the long run less a ping (what the probe measured before the difference;
# on one H200 host that held ~20 ms of the answer's transfer beyond the ping, ~1.5x the steps' time)
MAX_DIFFERENCE_GAIN = 2.0
PINGS = 3  # round trips measured; the fastest is taken off the run's time
# Largest relative L2 error of an honest answer: float32 on the same CPU is bit-equal, bfloat16 on two
# layers drifts ~1e-2 (README's per-layer figures); a made-up answer is ~1.4 off (two random vectors).
PROBE_TOLERANCE = 0.1


class AdmissionFailed(RuntimeError):
    """The provider did not take or pass its probe: it is not planned."""


@dataclass(frozen=True)
class ProbeOutcome:
    seconds_per_step: float
    rtt_ms: float
    contradicted: bool
    claim_ratio: float = 0.0  # the probe's time over the time the claimed figures predict


class Admission:
    """`request(peer, message, timeout_s)` sends one message on the assign protocol and returns the
    decoded answer (raising on transport errors)."""

    def __init__(self, model_dir: Path, model_id: str, n_layers: int, batch: int,
                 request: Callable[[str, Message, float], Message], measurements: Measurements,
                 prepare_timeout_s: float = 120.0, run_timeout_s: float = 60.0):
        self.model_dir, self.model_id, self.n_layers, self.batch = model_dir, model_id, n_layers, batch
        self.request, self.measurements = request, measurements
        self.prepare_timeout_s, self.run_timeout_s = prepare_timeout_s, run_timeout_s
        self.start = max(1, n_layers // 2 - PROBE_LAYERS // 2)
        self.end = min(n_layers - 1, self.start + PROBE_LAYERS)
        self.lock = threading.Lock()  # one probe at a time: probes are timed, and would slow each other

    @property
    def possible(self) -> bool:
        """A model of fewer than 3 layers has no middle layer to probe: providers are planned on their claim."""
        return self.start < self.end

    def admit(self, claimed: ProviderSpec, dtype: str) -> ProbeOutcome:
        """Probe `claimed.peer_id` in `dtype`; record what was measured. Raises AdmissionFailed."""
        peer = claimed.peer_id
        claimed = replace(claimed, dtype_bytes=getattr(torch, dtype).itemsize)  # its times are read at these
        with self.lock:
            rtt_ms = self._ping(peer)
            obs = self._probe(peer, self.end, dtype, rtt_ms)
            smaller_end = self.start + OVERHEAD_PROBE_LAYERS
            # not judged: a faster smaller probe (a wrong answer, stalled short runs) fits a smaller fixed
            # time, so dearer layers (coordinator/measurements.py), and a slower one is bounded there
            smaller = self._probe(peer, smaller_end, dtype, rtt_ms, judged=False) if smaller_end < self.end else None
        self.measurements.record_rtt(peer, rtt_ms)
        contradicted = self.measurements.record_probe(claimed, obs, smaller)
        overhead_ms = self.measurements.public(peer)["step_overhead_ms"]
        log.info("provider %s probed: %.2f ms a step of %d layers at batch %d%s, fixed time a step %.2f ms "
                 "(rtt %.2f ms)%s", peer, obs.seconds * 1e3, obs.n_layers, self.batch,
                 f" ({smaller.seconds * 1e3:.2f} ms of {smaller.n_layers})" if smaller else "", overhead_ms, rtt_ms,
                 "; its profile is contradicted by the measurement" if contradicted else "")
        return ProbeOutcome(obs.seconds, rtt_ms, contradicted, self.measurements.claim_ratio(peer) or 0.0)

    def _probe(self, peer: str, end: int, dtype: str, rtt_ms: float, judged: bool = True) -> Observation:
        """One probe of layers [start, end): prepared and timed; `judged`: every run's answer recomputed
        and compared, and the step held to the floor (else only that it answered each run: a floor
        that binds on an honest host, one with ~20 ms of transfer a run, would skew the fit)."""
        probe = Probe(self.model_id, self.start, end, self.n_layers, self.batch, PROBE_TOKENS,
                      secrets.randbelow(2**62), dtype)
        answer = self._ask(peer, probe, self.prepare_timeout_s)
        if not isinstance(answer, Ack) or not answer.ok:
            raise AdmissionFailed(f"refused its probe: {getattr(answer, 'reason', answer.TYPE)}")
        timed = []  # (run, answer, seconds)
        for i in range(RUNS):
            run = ProbeRun(secrets.randbelow(2**62), PROBE_STEPS[i % 2])
            started_s = time.perf_counter()
            answer = self._ask(peer, run, self.run_timeout_s)
            wall_s = time.perf_counter() - started_s
            if timed and not isinstance(answer, ProbeResult):
                break  # a provider that answers one run a probe is timed on that run
            timed.append((run, answer, wall_s))
        for run, answer, _ in timed:
            if not isinstance(answer, ProbeResult) or answer.seed != run.seed:
                raise AdmissionFailed(f"answered its probe with {answer.TYPE}")
        # the coordinator's own answers, computed after the timing so that they do not slow it
        expected = expected_answers(self.model_dir, probe, [run for run, _, _ in timed]) if judged else []
        for (_, answer, _), expected_x in zip(timed, expected):
            error = _relative_error(answer.x, expected_x)
            if error > PROBE_TOLERANCE:
                raise AdmissionFailed(f"probe answer is not the work: relative error {error:.3g} > "
                                      f"{PROBE_TOLERANCE}")
        fastest = {}  # steps of a run: its fastest wall time
        for run, _, wall_s in timed:
            fastest[run.steps] = min(wall_s, fastest.get(run.steps, wall_s))
        (long, long_s), (short, short_s) = max(fastest.items()), min(fastest.items())
        seconds = max(long_s - rtt_ms / 1e3, 1e-6) / long  # one run (or noise): the long run less a ping
        if long > short and long_s > short_s:
            difference = (long_s - short_s) / (long - short)
            seconds = max(difference, seconds / MAX_DIFFERENCE_GAIN) if judged else difference
        # the decode steps attend to the prefilled tokens plus the steps so far: their mean context
        context = PROBE_TOKENS + WARM_UP_STEPS + (sum(run.steps for run, _, _ in timed) + 1) // 2
        return Observation(end - self.start, False, False, self.batch, context, seconds)

    def _ping(self, peer: str) -> float:
        best = float("inf")
        for _ in range(PINGS):
            started_s = time.perf_counter()
            answer = self._ask(peer, Ping(), 5.0)
            if not isinstance(answer, Ack):
                raise AdmissionFailed(f"answered a ping with {answer.TYPE}")
            best = min(best, (time.perf_counter() - started_s) * 1e3)
        return best

    def _ask(self, peer: str, message: Message, timeout_s: float) -> Message:
        try:
            return self.request(peer, message, timeout_s)
        except (TransportError, OSError, ValueError, RuntimeError) as exc:  # unreachable, malformed answers
            raise AdmissionFailed(f"probe: {type(exc).__name__}: {exc}") from exc


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    if got.shape != expected.shape or not torch.isfinite(got).all():
        return float("inf")
    return float((got.float() - expected).norm() / expected.norm().clamp_min(1e-12))

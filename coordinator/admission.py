"""Admission: a provider is timed on real layers before it is planned.

The coordinator pings the newcomer (the link's round trip), has it prepare a probe (load a few
middle layers, prefill a batch of sessions: untimed, loading takes what it takes), then times,
with its own clock, runs of batched decode steps whose inputs come from a seed sent only then.
It recomputes the same steps itself (node/probe.py) and refuses an answer that is not the work
(the provider cannot be fast by answering anything). The time of the fastest run, less the round
trip, is the probe's measurement (one run: two pools of the same providers on this CPU were planned
1.5x apart from it); the planner plans from it instead of the profile's claims
(coordinator/measurements.py). Only a slower answer is possible for a provider: the coordinator's
clock is the judge.
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
from node.probe import RUNS, WARM_UP_STEPS, ProbeWork
from node.transport import TransportError
from wire.messages import Ack, Message, Ping, Probe, ProbeResult, ProbeRun

log = logging.getLogger("meshpool.coordinator")

PROBE_LAYERS = 2  # middle layers timed: enough to hold real work, little to load
PROBE_TOKENS = 8  # prefilled per session: the decode steps attend to a short context
PROBE_STEPS = 16  # decode steps timed in one run: many, so the round trip taken off is a small part
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
        """Probe `claimed.peer_id`; record what was measured. Raises AdmissionFailed."""
        peer = claimed.peer_id
        with self.lock:
            rtt_ms = self._ping(peer)
            probe = Probe(self.model_id, self.start, self.end, self.n_layers, self.batch, PROBE_TOKENS,
                          secrets.randbelow(2**62), dtype)
            answer = self._ask(peer, probe, self.prepare_timeout_s)
            if not isinstance(answer, Ack) or not answer.ok:
                raise AdmissionFailed(f"refused its probe: {getattr(answer, 'reason', answer.TYPE)}")
            timed = []  # (run, answer, seconds)
            for _ in range(RUNS):
                run = ProbeRun(secrets.randbelow(2**62), PROBE_STEPS)
                started_s = time.perf_counter()
                answer = self._ask(peer, run, self.run_timeout_s)
                wall_s = time.perf_counter() - started_s
                if timed and not isinstance(answer, ProbeResult):
                    break  # a provider of an older version answers one run a probe
                timed.append((run, answer, wall_s))
            # the coordinator's own answers, computed after the timing so that they do not slow it
            expected = ProbeWork(self.model_dir, replace(probe, dtype="float32"))
            for run, answer, _ in timed:
                if not isinstance(answer, ProbeResult) or answer.seed != run.seed:
                    raise AdmissionFailed(f"answered its probe with {answer.TYPE}")
                error = _relative_error(answer.x, expected.run(run))
                if error > PROBE_TOLERANCE:
                    raise AdmissionFailed(f"probe answer is not the work: relative error {error:.3g} > "
                                          f"{PROBE_TOLERANCE}")
        seconds = max(min(wall_s for _, _, wall_s in timed) - rtt_ms / 1e3, 1e-6) / PROBE_STEPS
        self.measurements.record_rtt(peer, rtt_ms)
        # the decode steps attend to the prefilled tokens plus the steps so far: their mean context
        context = PROBE_TOKENS + WARM_UP_STEPS + (len(timed) * PROBE_STEPS + 1) // 2
        contradicted = self.measurements.record_probe(
            claimed, Observation(self.end - self.start, False, False, self.batch, context, seconds))
        log.info("provider %s probed: %.2f ms a step of %d layers at batch %d (rtt %.2f ms)%s", peer,
                 seconds * 1e3, self.end - self.start, self.batch, rtt_ms,
                 "; its profile is contradicted by the measurement" if contradicted else "")
        return ProbeOutcome(seconds, rtt_ms, contradicted, self.measurements.claim_ratio(peer) or 0.0)

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

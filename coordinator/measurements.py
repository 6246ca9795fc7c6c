"""What the coordinator has measured of each provider: the figures the planner plans from.

A provider's profile is a claim. The coordinator times each provider itself: an admission probe
on real layers (coordinator/admission.py, timed by the coordinator's own clock) and then every
step of the pipelines it serves (each stage reports its compute ms in the step's Result; the
coordinator checks those reports against its own wall time of the step). A measurement is turned
into the planner's units by inverting the cost model (coordinator/planner/cost.py) at the point it
was taken: the effective bandwidth and matmul rate with which the roofline predicts exactly the
time measured for that stage's layers, role and batch, beyond the provider's fixed time a step. That
fixed time comes from the probe, run at two layer counts: a step of n layers takes overhead + n x a
layer's time. The planner then sees measured figures in place of claimed ones, so a provider that
claims more than it has gains nothing.

Thread-safe: drivers record steps, the planner thread records probes and reads specs, the API reads
`public`.
"""

from __future__ import annotations

import collections
import math
import threading
from dataclasses import dataclass, field, replace

from contracts import DEFAULT_PARAMS
from coordinator.planner import Link, Links, ModelShape, ProviderSpec
from coordinator.planner.cost import model_in_dtype, stage_step_bytes_and_flops, stage_time_s
from coordinator.planner.hardware import COORDINATOR

EWMA_WEIGHT = 0.3  # weight of the newest probe, round trip, hop latency or link test
# A provider's step figure at a batch size is the median of its last STEP_WINDOW decode steps there,
# taken once MIN_STEP_SAMPLES were seen (the probe stands until then). A step that captures a new CUDA
# graph, or meets a pause, takes tens of times its usual time, and as the newest third of an average
# (before) one such step could make a provider look several times slower: the likely cause of re-plans
# seen mid-load on an H200, two stages of one GPU swapped for nothing (a pause and a replay for every
# stream, time to first token p99 1.5 s at 8 clients). A median ignores up to 4 such steps in 9.
STEP_WINDOW = 9
MIN_STEP_SAMPLES = 5
# A claim is contradicted when the probe takes this many times longer than the claimed figures
# predict. Measured honest ratios on this 2-core CPU, shared with other work: 4.5x (batch 1) and 9.3x
# (batch 8) for two layers of the 135M default model timed in one process, 9.8-18.5x through the
# admission probe of a real pool (coordinator and three providers on the two cores; tiny layers are
# dominated by per-op overhead the roofline leaves out). An H200 decodes the 8B shape at 74.6% of its
# bandwidth floor (1.35x). A profile inflated 1000x measured 4,408x; the forged "H100, 3.35 PB/s"
# profile of a CPU is ~1e5x off. It is the ledger's `misconduct_claim_ratio` (contracts/params.py), so
# that a probe shown contradicted here is one the ledger records as misconduct; whole ratios, as the
# ledger holds them: "more than 100x" is >= 101x.
CONTRADICTION_RATIO = DEFAULT_PARAMS.misconduct_claim_ratio
# Steps' compute times are the stages' own reports: they may show a provider at most this much
# faster than the probe the coordinator timed itself, so under-reporting gains little.
STEP_TRUST_FACTOR = 2.0
# The most of the larger probe's step its fitted fixed part may be. A provider that paced its smaller
# probe slower to fake a large fixed time and cheap layers is thus shown at most 1 / (1 - share) = 4x
# faster a layer than the plain time of its larger probe. An honest H200 (8B shape, bfloat16, 4 layers
# at batch 32): 0.25-0.73 ms of 0.93-1.24 (at most 2/3).
MAX_OVERHEAD_SHARE = 0.75
MAX_EVENTS = 64  # misconduct events kept for /pool and the dashboard
DEFAULT_LINK = Link(latency_ms=0.01, bandwidth_gbps=100.0)  # until a hop is measured: a datacentre link
MIN_LATENCY_MS = 0.001


@dataclass(frozen=True)
class Speed:
    """Effective figures: with them the cost model predicts the times measured."""

    mem_bandwidth_gb_per_s: float
    matmul_tflops: float
    step_overhead_ms: float = 0.0  # the fixed time a step, besides the roofline's

    def blend(self, new: "Speed") -> "Speed":
        """EWMA in time per unit (so averages of times, not of rates)."""
        return Speed(_ewma_rate(self.mem_bandwidth_gb_per_s, new.mem_bandwidth_gb_per_s),
                     _ewma_rate(self.matmul_tflops, new.matmul_tflops),
                     _ewma(self.step_overhead_ms, new.step_overhead_ms))


@dataclass(frozen=True)
class Observation:
    """One stage's measured step: `seconds` for `n_layers` in this role at this batch and context."""

    n_layers: int
    first: bool
    last: bool
    batch: int
    context_tokens: int
    seconds: float


def speed_from(model: ModelShape, obs: Observation, step_overhead_ms: float = 0.0) -> Speed:
    """The cost model inverted at one observation: with `step_overhead_ms` fixed, both roofline terms
    equal the rest of the time measured."""
    bytes_read, flops = stage_step_bytes_and_flops(model, obs.n_layers, obs.first, obs.last, obs.batch,
                                                   obs.context_tokens)
    seconds = max(obs.seconds - step_overhead_ms / 1e3, 1e-9)
    return Speed(bytes_read / seconds / 1e9, flops / seconds / 1e12, step_overhead_ms)


def probe_speed(model: ModelShape, obs: Observation, smaller: Observation | None = None) -> Speed:
    """The figures of a probe `obs`; with a probe of fewer layers at the same batch, the fixed time a
    step too: the line through both (time = overhead + layers x a layer's time), its overhead kept in
    [0, MAX_OVERHEAD_SHARE x obs's time]. The figures predict obs's time exactly."""
    overhead_s = 0.0
    if smaller is not None and 0 < smaller.n_layers < obs.n_layers:
        layer_s = (obs.seconds - smaller.seconds) / (obs.n_layers - smaller.n_layers)
        overhead_s = min(max(smaller.seconds - smaller.n_layers * layer_s, 0.0), MAX_OVERHEAD_SHARE * obs.seconds)
    return speed_from(model, obs, overhead_s * 1e3)


@dataclass
class StepFigures:
    """A provider's decode steps at one batch size: the last STEP_WINDOW, and how many in all."""

    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=STEP_WINDOW))
    samples: int = 0

    def add(self, speed: Speed) -> None:
        self.recent.append(speed)
        self.samples += 1

    @property
    def speed(self) -> Speed | None:
        """The median of the recent steps, None until there were MIN_STEP_SAMPLES."""
        if len(self.recent) < MIN_STEP_SAMPLES:
            return None
        return sorted(self.recent, key=lambda s: s.mem_bandwidth_gb_per_s)[len(self.recent) // 2]


@dataclass
class PeerFigures:
    probe: Speed | None = None  # timed by the coordinator: the trusted figure
    # from the stages' own step reports, capped by the probe; per batch size, because the
    # effective figures of one batch size do not predict another's (per-op overhead)
    steps: dict[int, StepFigures] = field(default_factory=dict)
    rtt_ms: float | None = None  # coordinator <-> provider round trip, EWMA
    hop_ms: float | None = None  # one hop of its pipelines' steps (the data path), EWMA
    claim_ratio: float | None = None  # probe time / time the claim predicts
    contradicted: bool = False
    memory_cap_bytes: int | None = None  # below the stage whose assignment it failed
    # bytes of a weight in the precision it was probed (and serves) in: its times are read at those
    # bytes. Read at the pool's float32 bytes, a bfloat16 H200 was shown at 2x its bandwidth (~6 TB/s),
    # and its batch-1 steps predicted at 0.55-0.8x their time from a probe at batch 32.
    dtype_bytes: int | None = None


def hop_bandwidth_gbps(payload_bytes: int, rtt_ms: float, transfer_ms: float) -> float:
    """A hop's bandwidth from a link test (node/link_test.py): the payload's bits over what its transfer
    took beyond an empty round trip, which is what the cost model's per-byte term prices (its latency
    term comes from steps). At least half the transfer: on a link so fast that the payload takes little
    more than a round trip (1 MiB in 2.06 ms on loopback against a 1.69 ms round trip, both minima of
    three under contention), the difference is noise, and the estimate stays within 2x of the plain
    payload / transfer rate instead of reading that noise as an unbounded one."""
    serial_ms = max(transfer_ms - rtt_ms, transfer_ms / 2, 1e-6)
    return payload_bytes * 8 / (serial_ms / 1e3) / 1e9


@dataclass
class HopFigures:
    """provider -> provider, as the sending provider timed it."""

    bandwidth_gbps: float
    rtt_ms: float
    path: str  # "link" (the frame link) or "libp2p"
    measured_s: float  # monotonic, of the last test
    samples: int = 1


@dataclass
class Measurements:
    model: ModelShape
    plan_batch: int  # the batch the planner plans for: step figures at this batch replace the probe's
    peers: dict[str, PeerFigures] = field(default_factory=dict)
    hop_latency_ms: float | None = None  # provider <-> provider, EWMA over pipelines' steps
    hops: dict[tuple[str, str], HopFigures] = field(default_factory=dict)  # (sender, receiver): link tests
    events: list[dict] = field(default_factory=list)
    contradictions_total: int = 0
    contradiction_ratio: int = CONTRADICTION_RATIO  # the ledger's, where there is one
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -- recording ------------------------------------------------------------------------

    def record_probe(self, claimed: ProviderSpec, obs: Observation, smaller: Observation | None = None) -> bool:
        """The admission probe of `claimed.peer_id` (with `smaller`, a probe of fewer layers: see
        `probe_speed`); True when `obs` contradicts the claim (misconduct)."""
        speed = probe_speed(model_in_dtype(self.model, claimed.dtype_bytes), obs, smaller)
        predicted_s = stage_time_s(claimed, self.model, obs.n_layers, obs.first, obs.last, obs.batch,
                                   obs.context_tokens)
        ratio = obs.seconds / max(predicted_s, 1e-12)
        with self.lock:
            figures = self.peers.setdefault(claimed.peer_id, PeerFigures())
            figures.dtype_bytes = claimed.dtype_bytes
            figures.probe = speed if figures.probe is None else figures.probe.blend(speed)
            figures.steps = {}  # a new probe starts the step figures again
            figures.claim_ratio = ratio
            contradicted = math.floor(ratio) > self.contradiction_ratio
            if contradicted:
                figures.contradicted = True
                self._event(claimed.peer_id, "profile contradicted by measurement",
                            f"probe took {ratio:.0f}x the time its claimed figures predict "
                            f"(claimed {claimed.mem_bandwidth_gb_per_s:.3g} GB/s, {claimed.matmul_tflops:.3g} TFLOP/s; "
                            f"measured {speed.mem_bandwidth_gb_per_s:.3g} GB/s, {speed.matmul_tflops:.3g} TFLOP/s)")
            return contradicted

    def record_step(self, peers: tuple[str, ...], layers: tuple[int, ...], batch: int, context_tokens: int,
                    wall_s: float, stage_ms: tuple[float, ...]) -> bool:
        """One decode step of a pipeline as the coordinator timed it (`wall_s`) with each stage's own
        report (`stage_ms`). False (and nothing recorded) when the reports cannot be true: more
        compute than the whole step took, or not one report per stage."""
        k = len(peers)
        if len(stage_ms) != k or k == 0 or any(not (ms >= 0) for ms in stage_ms):
            return False
        if sum(stage_ms) / 1e3 > wall_s * 1.01:
            return False
        hop_ms = max((wall_s * 1e3 - sum(stage_ms)) / (k + 1), MIN_LATENCY_MS)
        with self.lock:
            for i, (peer, n_layers, ms) in enumerate(zip(peers, layers, stage_ms)):
                figures = self.peers.setdefault(peer, PeerFigures())
                obs = Observation(n_layers, i == 0, i == k - 1, batch, context_tokens, ms / 1e3)
                model = model_in_dtype(self.model, figures.dtype_bytes)
                if figures.probe is None:  # no probe possible: the reports stand alone
                    speed = speed_from(model, obs)
                else:
                    speed = _capped(speed_from(model, obs, figures.probe.step_overhead_ms), figures.probe)
                figures.steps.setdefault(batch, StepFigures()).add(speed)
                figures.hop_ms = _ewma(figures.hop_ms, hop_ms)
            if k > 1:  # the links between providers: what the step took beyond its stages' compute
                self.hop_latency_ms = _ewma(self.hop_latency_ms, hop_ms)
        return True

    def record_rtt(self, peer: str, rtt_ms: float) -> None:
        with self.lock:
            figures = self.peers.setdefault(peer, PeerFigures())
            figures.rtt_ms = _ewma(figures.rtt_ms, rtt_ms)

    def record_assignment_failure(self, peer: str, stage_memory_bytes: int, reason: str) -> None:
        """A provider could not load a stage its claimed memory should hold: plan it below that from now on."""
        with self.lock:
            figures = self.peers.setdefault(peer, PeerFigures())
            cap = max(0, int(stage_memory_bytes) - 1)
            figures.memory_cap_bytes = cap if figures.memory_cap_bytes is None else min(cap, figures.memory_cap_bytes)
            self._event(peer, "assignment failed", f"could not take a stage of {stage_memory_bytes / 2**20:.0f} MiB: "
                        f"{reason[:200]}; planned below that from now on")

    def record_hop(self, sender: str, receiver: str, payload_bytes: int, rtt_ms: float, transfer_ms: float,
                   path: str, now_s: float) -> float:
        """A link test of the hop sender -> receiver; its bandwidth (Gbit/s), EWMA'd in time per bit."""
        gbps = hop_bandwidth_gbps(payload_bytes, rtt_ms, transfer_ms)
        with self.lock:
            held = self.hops.get((sender, receiver))
            if held is not None:
                gbps = _ewma_rate(held.bandwidth_gbps, gbps)
                rtt_ms = _ewma(held.rtt_ms, rtt_ms)
            self.hops[(sender, receiver)] = HopFigures(gbps, rtt_ms, path, now_s,
                                                      1 if held is None else held.samples + 1)
            return gbps

    def hop_measured_s(self, sender: str, receiver: str) -> float | None:
        """When the hop was last tested (monotonic), None if never."""
        with self.lock:
            held = self.hops.get((sender, receiver))
            return None if held is None else held.measured_s

    def with_hop_bandwidths(self, links: Links) -> Links:
        """`links` with every tested hop priced at its measured bandwidth (its latency as `links` has it)."""
        with self.lock:
            measured = {pair: h.bandwidth_gbps for pair, h in self.hops.items()}
        if not measured:
            return links
        pairs = dict(links.pairs)
        for (a, b), gbps in measured.items():
            pairs[(a, b)] = replace(links.between(a, b), bandwidth_gbps=gbps)
        return Links(links.default, pairs)

    def hop_links(self, peer: str, links: list[dict]) -> list[dict]:
        """For /pool: `peer`'s links (how it holds them, from its heartbeat) with what its link tests
        measured of the hop from it to each peer (`bandwidth_gbps`, `hop_rtt_ms`, `path`); a tested hop
        it holds no connection for yet has kind ""."""
        with self.lock:
            tested = {b: h for (a, b), h in self.hops.items() if a == peer}
        out = []
        for link in links:
            hop = tested.pop(link.get("peer"), None)
            out.append(link if hop is None else {**link, **_hop_public(hop)})
        return out + [{"peer": b, "kind": "", **_hop_public(h)} for b, h in sorted(tested.items())]

    def forget_probe(self, peer: str) -> None:
        """A provider that registers again is probed again (its hardware may have changed), and its hops
        tested again (its network may have); what it was caught at (contradicted, memory cap) stays."""
        with self.lock:
            self.hops = {pair: h for pair, h in self.hops.items() if peer not in pair}
            figures = self.peers.get(peer)
            if figures is not None:
                figures.probe, figures.steps, figures.hop_ms = None, {}, None

    # -- reading --------------------------------------------------------------------------

    def claim_ratio(self, peer: str) -> float | None:
        """The last probe's time over the time its claim predicted."""
        with self.lock:
            figures = self.peers.get(peer)
            return None if figures is None else figures.claim_ratio

    def probed(self, peer: str) -> bool:
        with self.lock:
            figures = self.peers.get(peer)
            return figures is not None and figures.probe is not None

    def spec_for(self, claimed: ProviderSpec) -> ProviderSpec:
        """What the planner plans `claimed.peer_id` with: its measured speed (the steps' figure once
        there is one, else the probe's), the claim only where nothing is measured yet; memory as
        claimed, below any stage it failed to take."""
        with self.lock:
            figures = self.peers.get(claimed.peer_id)
            if figures is None:
                return claimed
            speed = self._stepped(figures) or figures.probe
            spec = claimed
            if speed is not None:
                spec = replace(spec, mem_bandwidth_gb_per_s=speed.mem_bandwidth_gb_per_s,
                               matmul_tflops=speed.matmul_tflops, step_overhead_ms=speed.step_overhead_ms)
            if figures.memory_cap_bytes is not None:
                spec = replace(spec, memory_bytes=min(spec.memory_bytes, figures.memory_cap_bytes))
            return spec

    def _stepped(self, figures: PeerFigures) -> Speed | None:
        held = figures.steps.get(self.plan_batch)
        return None if held is None else held.speed

    def links(self) -> Links:
        """Measured links: coordinator <-> provider from round trips (then from steps: `with_step_hops`),
        provider <-> provider latency from steps and bandwidth from link tests (a hop not tested yet:
        DEFAULT_LINK's)."""
        with self.lock:
            default = DEFAULT_LINK
            if self.hop_latency_ms is not None:
                default = replace(DEFAULT_LINK, latency_ms=self.hop_latency_ms)
            pairs = {(COORDINATOR, peer): replace(DEFAULT_LINK, latency_ms=max(f.rtt_ms / 2, MIN_LATENCY_MS))
                     for peer, f in self.peers.items() if f.rtt_ms is not None}
        return self.with_step_hops(self.with_hop_bandwidths(Links(default, pairs)))

    def with_step_hops(self, links: Links) -> Links:
        """`links` with the coordinator's hops to and from each provider that served steps at the hop
        time its steps showed. A round trip on the control path (a request on a fresh stream) took
        4-16 ms on one H200 host where a step's hop took 0.35-1.1 ms: priced at the ping, a step's two
        coordinator hops were predicted at ~10x what they took."""
        with self.lock:
            hops = {peer: f.hop_ms for peer, f in self.peers.items() if f.hop_ms is not None}
        if not hops:
            return links
        pairs = dict(links.pairs)
        for peer, hop_ms in hops.items():
            for pair in ((COORDINATOR, peer), (peer, COORDINATOR)):
                pairs[pair] = replace(links.between(*pair), latency_ms=hop_ms)
        return Links(links.default, pairs)

    def public(self, peer: str) -> dict | None:
        """For /pool and the dashboard: what is measured of `peer` and what the planner uses."""
        with self.lock:
            figures = self.peers.get(peer)
            if figures is None:
                return None
            stepped = self._stepped(figures)
            speed = stepped or figures.probe
            return {
                "source": "steps" if stepped else "probe" if figures.probe else "claim",
                "mem_bandwidth_gb_per_s": _round(speed.mem_bandwidth_gb_per_s if speed else None),
                "matmul_tflops": _round(speed.matmul_tflops if speed else None),
                "step_overhead_ms": _round(speed.step_overhead_ms if speed else None),
                "steps_measured": sum(s.samples for s in figures.steps.values()),
                "rtt_ms": _round(figures.rtt_ms),
                "hop_ms": _round(figures.hop_ms),
                "claim_ratio": _round(figures.claim_ratio),
                "contradicted": figures.contradicted,
                "memory_cap_bytes": figures.memory_cap_bytes,
            }

    def summary(self) -> dict:
        with self.lock:
            return {"hop_latency_ms": _round(self.hop_latency_ms), "contradictions_total": self.contradictions_total,
                    "events": list(self.events)}

    def _event(self, peer: str, kind: str, detail: str) -> None:  # under lock
        if kind.startswith("profile"):
            self.contradictions_total += 1
        self.events = (self.events + [{"peer": peer, "kind": kind, "detail": detail}])[-MAX_EVENTS:]


def _ewma(old: float | None, new: float) -> float:
    """The newest figure weighted EWMA_WEIGHT against what was held (none held: the newest)."""
    return new if old is None else (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * new


def _ewma_rate(old: float, new: float) -> float:
    """A rate's EWMA in time per unit (an average of times, not of rates)."""
    return 1.0 / ((1 - EWMA_WEIGHT) / old + EWMA_WEIGHT / new)


def _capped(speed: Speed, probe: Speed) -> Speed:
    """A step figure no more than STEP_TRUST_FACTOR x the probe the coordinator timed itself."""
    return Speed(min(speed.mem_bandwidth_gb_per_s, probe.mem_bandwidth_gb_per_s * STEP_TRUST_FACTOR),
                 min(speed.matmul_tflops, probe.matmul_tflops * STEP_TRUST_FACTOR), speed.step_overhead_ms)


def _hop_public(hop: HopFigures) -> dict:
    return {"bandwidth_gbps": _round(hop.bandwidth_gbps), "hop_rtt_ms": _round(hop.rtt_ms), "path": hop.path,
            "tests": hop.samples}


def _round(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.4g}")

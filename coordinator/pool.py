"""The pool: turns the registry into pipelines and keeps requests running across changes.

One planner thread owns every change of the plan, so joins, leaves, deaths and failed pipelines
are handled one at a time. A change stops the drivers of pipelines that are no longer in the plan,
assigns shards for the new ones, and replays the interrupted requests (prompt plus the tokens
already produced) on the new pipelines: callers see a pause, not an error.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable

from coordinator import incidents, precision
from coordinator.admission import AdmissionFailed
from coordinator.backoff import Backoff
from coordinator.driver import GenerationRequest, PipelineDriver, PipelineLink
from coordinator.measurements import Measurements
from coordinator.planner import (Capacity, InsufficientMemoryError, Links, ModelShape, Objective, Pipeline,
                                 PipelineCost, PlanError, ProviderSpec, Workload, choose_with_hysteresis, plan_score,
                                 evaluate_pipeline, plan_within_memory, provider_spec_from_profile, sessions_held,
                                 stage_memory_bytes)
from coordinator.registry import Registry, ProviderRecord
from wire.messages import MAX_BATCH_SESSIONS, SERVING_DTYPES, Assign, Stage, Step

log = logging.getLogger("meshpool.coordinator")

MAX_PENDING_REQUESTS = 1024
MAX_REPLAYS = 8
PENDING_TIMEOUT_S = 120.0  # a request waits this long for a pipeline, then fails with "busy"
PLAN_INTERVAL_S = 0.5  # the planner looks at the registry at least this often
PLANNER_JOIN_TIMEOUT_S = 10.0
PLAN_RETRY_S = 0.5  # after a round that raised
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}  # a stage's weights and KV cache per element, by its serving dtype
assert set(DTYPE_BYTES) == set(SERVING_DTYPES)
OUT_OF_MEMORY = "out of memory"  # how a provider's refusal of a stage it cannot hold begins


WAITING_FOR_PROVIDERS = "waiting for providers to (re)join"
REJOIN_RETRY_AFTER_S = 2  # providers re-dial a lost coordinator at least every 2 s (node/provider.py)
RETRY_AFTER_S = 5


class PoolBusy(RuntimeError):
    """No pipeline can take the request now (none exists, or all queues are full); `retry_after_s`
    is when asking again may help."""

    def __init__(self, message: str, retry_after_s: int = RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AssignmentFailed(RuntimeError):
    """A provider did not take the stage it was assigned (unreachable, or it refused)."""

    def __init__(self, peer: str, reason: str):
        super().__init__(f"{peer}: {reason}")
        self.peer, self.reason = peer, reason


@dataclass
class ActivePipeline:
    id: str
    pipeline: Pipeline
    driver: PipelineDriver
    capacity: Capacity
    stages: tuple[Stage, ...]  # as assigned: with the precision each serves in
    predicted: PipelineCost | None = None  # under the figures of the latest planner round

    def public(self) -> dict:
        stages = [{"peer": s.peer_id, "start": s.start, "end": s.end, "dtype": s.dtype} for s in self.stages]
        out = {"id": self.id, "stages": stages,
               "max_sessions": self.capacity.sessions, "context_tokens": self.capacity.context_tokens,
               "microbatches": self.driver.microbatches}
        if self.predicted is not None:
            for stage, seconds in zip(stages, self.predicted.stage_times_s):
                stage["predicted_ms"] = round(seconds * 1e3, 3)
            out["predicted_step_ms"] = round(self.predicted.latency_s * 1e3, 3)  # every stage and hop
            out["predicted_tokens_per_s"] = round(self.predicted.tokens_per_s, 2)
        return out

    def holds(self, request: GenerationRequest) -> bool:
        """Whether the request's prompt and every token it may add fit the context this pipeline holds."""
        return len(request.prompt_ids) + request.max_new_tokens <= self.capacity.context_tokens


def in_flight(workload: Workload, microbatches: int, n_devices: int) -> tuple[Workload, int]:
    """The workload and micro-batch count a pipeline whose stages run on `n_devices` devices runs: the
    same sessions in at most one micro-batch per device. A decode step reads every weight of its stage
    whatever its batch, so a second micro-batch on a device that has no other device to overlap with
    halves each stream's rate for nothing (H200, 8B, one stage, 8 clients: 428 tok/s with 2 in flight,
    587 with 1; two stages on one H200, 8 / 32 clients: 518 / 1,000 tok/s with 2, 707 / 1,179 with 1)."""
    m = max(1, min(microbatches, n_devices))
    return replace(workload, batch=-(-workload.batch * microbatches // m), microbatches_in_flight=m), m


def devices_of(pipeline: Pipeline, profiles: dict[str, dict]) -> int:
    """How many of the pipeline's stages can work at once: stages whose providers' profiles name the
    same GPU count once (a GPU runs one process's kernels at a time: two stages on it take turns)."""
    ids = [gpu_uuid(profiles.get(s.peer_id)) for s in pipeline.stages]
    return len({i for i in ids if i}) + ids.count("")


def gpu_uuid(profile: dict | None) -> str:
    """The GPU a provider's signed profile says it serves on ("" for none or a malformed one)."""
    devices = profile.get("devices") if isinstance(profile, dict) else None
    uuid = devices[0].get("uuid") if isinstance(devices, list) and devices and isinstance(devices[0], dict) else ""
    return uuid if isinstance(uuid, str) and len(uuid) <= 64 else ""


def pipeline_id(pipeline: Pipeline, capacity: Capacity, dtype_for: Callable[[str], str]) -> str:
    """Names the stages, the precision each serves in and what they hold: the same stages in another
    precision, holding more or fewer sessions, or another context, are another pipeline (their shards
    are assigned again)."""
    text = ";".join(f"{s.peer_id}:{s.start}:{s.end}:{dtype_for(s.peer_id)}" for s in pipeline.stages)
    text += f";{capacity.sessions}x{capacity.context_tokens}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Pool:
    """`lock` guards `active`, `pending`, `_pending_since_s`, `plan_error` and `suspects`: every other
    thread reads them under it. Nothing blocks under it: drivers are stopped and joined, and shards
    assigned, outside it (a failing driver takes it to hand its requests back)."""

    def __init__(
        self,
        registry: Registry,
        model_shape: ModelShape,
        model_id: str,
        coordinator: tuple[str, tuple[str, ...]],
        assign: Callable[[str, Assign], None],
        unassign: Callable[[str, str], None],
        make_link: Callable[[str, tuple[str, ...]], PipelineLink],
        probe: Callable[[str], bool],
        workload: Workload,
        objective: Objective = Objective.THROUGHPUT,
        step_timeout_s: float = 30.0,
        serving_dtype: str = "",
        admit: Callable[[ProviderSpec, str], object] | None = None,
        measurements: Measurements | None = None,
    ):
        """`coordinator`: its peer id and addresses, stage 0's upstream and the last stage's downstream.
        `serving_dtype`: the precision every stage is assigned; "" gives each provider the one its
        profile asks for where audits can verify it, else float32 (coordinator/precision.py).
        `admit(claimed spec, dtype)`: the admission probe (coordinator/admission.py), run once per
        registration before a provider is planned; it raises AdmissionFailed. None: providers are
        planned on their claims until their steps are measured. `measurements`: the figures the
        planner plans from (coordinator/measurements.py)."""
        self.registry, self.model_shape, self.model_id = registry, model_shape, model_id
        self.coordinator_peer, self.coordinator_addrs = coordinator
        self.assign, self.unassign, self.make_link, self.probe = assign, unassign, make_link, probe
        self.workload, self.objective, self.step_timeout_s = workload, objective, step_timeout_s
        self.serving_dtype = serving_dtype
        self.admit = admit
        self.measurements = measurements or Measurements(model_shape, workload.batch)
        # hops priced by reachability (coordinator/reachability.py: relayed ones through the relay); None: unknown
        self.reach_links: Callable[[], Links] | None = None
        self.lock = threading.RLock()
        self.active: dict[str, ActivePipeline] = {}
        self.pending: list[GenerationRequest] = []
        self._pending_since_s: dict[int, float] = {}  # id(request) -> when it started waiting
        self.plan_error = ""
        self.suspects: set[str] = set()  # peers of failed pipelines, probed before re-planning
        self.backoff = Backoff()  # stages that keep failing steps, left out of the plan for a while
        self._blamed: dict[str, tuple[str, str]] = {}  # pipeline id -> (peer at fault, reason) of its failure
        self.pipelines_started = 0  # since the coordinator started: a pipeline re-planned in a loop shows here
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="planner", daemon=True)

    # -- public ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=PLANNER_JOIN_TIMEOUT_S)
        with self.lock:
            stopping, self.active = list(self.active.values()), {}
            waiting, self.pending = self.pending, []
        for active in stopping:  # outside the lock: a driver's failure path takes it
            waiting += active.driver.stop()
        for request in waiting:
            request.fail("coordinator shutting down")

    def request_replan(self) -> None:
        self._wake.set()

    def submit(self, request: GenerationRequest) -> None:
        with self.lock:
            if not self.active and self.plan_error:
                raise PoolBusy(f"no pipeline: {self.plan_error}",
                               REJOIN_RETRY_AFTER_S if self.plan_error == WAITING_FOR_PROVIDERS else RETRY_AFTER_S)
            if self.active and not any(a.holds(request) for a in self.active.values()):
                held = max(a.capacity.context_tokens for a in self.active.values())
                raise PoolBusy(f"the pool holds contexts of at most {held} tokens now (its memory is short); this "
                               f"request needs {len(request.prompt_ids) + request.max_new_tokens} "
                               f"(prompt plus max_tokens)")
            if not self._dispatch(request):
                if len(self.pending) >= MAX_PENDING_REQUESTS:
                    raise PoolBusy("the pool's queue is full")
                self.pending.append(request)

    def snapshot(self) -> dict:
        with self.lock:
            providers = [{**p, "measured": self.measurements.public(p["peer"]),
                          "links": self.measurements.hop_links(p["peer"], p["links"])}
                         for p in self.registry.snapshot()]
            return {"providers": providers,
                    "pipelines": [a.public() for a in self.active.values()],
                    "pending_requests": len(self.pending), "plan_error": self.plan_error,
                    "benched": self.backoff.public(time.monotonic()), "pipelines_started": self.pipelines_started,
                    "measurements": self.measurements.summary()}

    def blame(self, pipeline: str, reporter: str, peer: str, reason: str) -> None:
        """A stage of `pipeline` reported a failed step, naming `peer` at fault: if the pipeline then
        fails, the failure counts against `peer` (coordinator/backoff.py). Reports from outside the
        pipeline, or naming a peer outside it, count against nobody."""
        with self.lock:
            active = self.active.get(pipeline)
            if active is None or reporter not in active.pipeline.peer_ids or peer not in active.pipeline.peer_ids:
                return
            self._blamed.setdefault(pipeline, (peer, reason))  # the first report of a failure is its cause

    def suspect(self, peer: str) -> None:
        """A stage blamed `peer` for a failed step: probe it before the next plan."""
        with self.lock:
            self.suspects.add(peer)
        self.request_replan()

    def serves(self, peer: str) -> bool:
        """Whether `peer` is a stage of an active pipeline."""
        with self.lock:
            return any(peer in a.pipeline.peer_ids for a in self.active.values())

    def fail_peer(self, peer: str, reason: str) -> None:
        """A provider is gone (dead, left, misbehaved): stop its pipelines and re-plan."""
        self.registry.set_state(peer, "dead", reason)
        with self.lock:
            for active in list(self.active.values()):
                if peer in active.pipeline.peer_ids:
                    active.driver.link.abort(f"provider {peer} {reason}")
        self.request_replan()

    # -- planner thread -------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(timeout=PLAN_INTERVAL_S)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self._round()
            except Exception:  # keep the planner alive whatever one round does
                incidents.record("planner")
                self._wake.set()
                time.sleep(PLAN_RETRY_S)

    def _round(self) -> None:
        for peer in self.registry.expire():
            log.warning("provider %s missed its heartbeats", peer)
            self.fail_peer(peer, "missed its heartbeats")
        with self.lock:
            suspects, self.suspects = self.suspects, set()
        for peer in suspects:
            record = self.registry.get(peer)
            if record is None or record.state == "dead":  # already failed over (its connection closed)
                continue
            if not self.probe(peer):
                log.warning("provider %s does not answer after its pipeline failed", peer)
                self.fail_peer(peer, "stopped answering")
        with self.lock:  # a pipeline that serves clears its stages' strikes
            for active in self.active.values():
                if active.driver.steps_done:
                    for peer in active.pipeline.peer_ids:
                        self.backoff.served(peer)
        self.registry.refresh()
        self._replan()

    def _replan(self) -> None:
        with self.lock:
            benched = self.backoff.benched(time.monotonic())
            out = [b for b in self.backoff.public(time.monotonic()) if b["benched"]]
        candidates = self._admitted([c for c in self.registry.candidates() if c.peer not in benched])
        wanted: dict[str, Pipeline] = {}
        capacities: dict[str, Capacity] = {}
        predicted: dict[str, PipelineCost] = {}  # per pipeline, with the micro-batches the plan keeps in flight
        error = ""
        with self.lock:
            dead = {pid for pid, a in self.active.items() if not a.driver.is_alive()}
            current = [a.pipeline for pid, a in self.active.items() if pid not in dead]
        if candidates:
            # measured figures where there are any (claims only until measured), each provider at the
            # bytes of the precision it will be assigned (mixed pools)
            specs = {c.peer: replace(self.measurements.spec_for(
                provider_spec_from_profile(c.peer, c.profile, c.max_memory_bytes // 2**20)),
                dtype_bytes=DTYPE_BYTES[self._dtype_for(c.peer)]) for c in candidates}
            links = self._links()
            try:
                # fewer sessions or a shorter context when the pool cannot hold what was asked
                result, bent = plan_within_memory(list(specs.values()), self.model_shape, self.workload, links=links,
                                                  objective=self.objective)
                chosen = choose_with_hysteresis(current, result.pipelines, specs, self.model_shape, bent, links,
                                                self.objective)
                if any(p not in chosen for p in current):
                    self._log_move(current, chosen, specs, bent, links)
                m = self.workload.microbatches_in_flight or 1
                profiles = {c.peer: c.profile for c in candidates}
                for p in chosen:
                    work, in_flight_m = in_flight(bent, m, devices_of(p, profiles))
                    cost = evaluate_pipeline(p, specs, self.model_shape, work, links, in_flight_m)
                    # what was asked of a pipeline like it, within what one step may carry
                    most = min(self.workload.batch * m, MAX_BATCH_SESSIONS)
                    capacity = Capacity(sessions_held(p, specs, self.model_shape, bent.context_tokens, most),
                                        bent.context_tokens)
                    if capacity.sessions < 1:  # a kept pipeline that no longer holds one session here
                        continue
                    pid = pipeline_id(p, capacity, self._dtype_for)
                    wanted[pid], capacities[pid], predicted[pid] = p, capacity, cost
            except (InsufficientMemoryError, PlanError) as exc:
                error = str(exc)
        elif out:
            error = "no provider can serve now"
        elif any(r.state not in ("dead", "banned") for r in self.registry.records()):
            error = "no provider may serve yet (newcomers only verify until vouched for or promoted)"
        else:  # none registered: the coordinator just (re)started, or every provider is gone
            error = WAITING_FOR_PROVIDERS
        if error and out:
            error += "; out of the plan after failing steps: " + ", ".join(
                f"{b['peer']} for {b['back_in_s']:.0f} s ({b['reason'][:200]})" for b in out)

        with self.lock:
            self.plan_error = error
            for pid, active in self.active.items():
                active.predicted = predicted.get(pid, active.predicted)
            dead = {pid for pid, a in self.active.items() if not a.driver.is_alive()}
            keep = {pid for pid in self.active if pid in wanted and pid not in dead}
            if keep == set(self.active) and set(wanted) == keep:
                self._flush_pending()
                return
            stopped = [self.active.pop(pid) for pid in [p for p in self.active if p not in keep]]
            busy = {peer for a in self.active.values() for peer in a.pipeline.peer_ids}
        # Stop drivers outside the lock: a failing driver takes the lock to hand its requests back,
        # and waiting for it while holding the lock would stall both until the join times out.
        orphans: list[GenerationRequest] = []
        released: set[str] = set()
        for active in stopped:
            orphans += active.driver.stop()
            released |= set(active.pipeline.peer_ids)
            log.info("pipeline %s stopped", active.id)
        for peer in released - {p for pipeline in wanted.values() for p in pipeline.peer_ids}:
            record = self.registry.get(peer)
            if record is not None and record.state != "dead":
                self.unassign(peer, "")
                if record.state == "leaving":  # its work moved elsewhere: it may go
                    self.registry.set_state(peer, "dead", "left")

        # Assign outside the lock: loading shards takes seconds and requests may arrive meanwhile.
        started: dict[str, ActivePipeline] = {}
        for pid, pipeline in wanted.items():
            if pid in keep or busy & set(pipeline.peer_ids):
                continue
            try:
                stages = self._assign_pipeline(pid, pipeline, capacities[pid])
            except AssignmentFailed as exc:  # a provider that cannot take its stage is not used again
                log.warning("assigning pipeline %s failed: %s", pid, exc)
                if exc.reason.startswith(OUT_OF_MEMORY):  # it claimed memory it does not have
                    self.measurements.record_assignment_failure(exc.peer, self._stage_bytes(pipeline, exc.peer),
                                                                exc.reason)
                self.registry.set_state(exc.peer, "dead", f"assignment failed: {exc}")
                self._wake.set()
                continue
            # never more sessions in flight than the stages hold KV cache for
            driver = PipelineDriver(pid, self.make_link(pid, pipeline.peer_ids), self._driver_failed,
                                    capacities[pid].sessions, step_timeout_s=self.step_timeout_s, stages=stages,
                                    microbatches=min(predicted[pid].microbatches, capacities[pid].sessions),
                                    on_step_timed=self._step_timer(pipeline))
            started[pid] = ActivePipeline(pid, pipeline, driver, capacities[pid], stages, predicted[pid])
            busy |= set(pipeline.peer_ids)

        with self.lock:
            for pid, active in started.items():
                self.active[pid] = active
                self._blamed.pop(pid, None)
                self.pipelines_started += 1
                active.driver.start()
                for stage in active.pipeline.stages:
                    self.registry.set_state(stage.peer_id, "serving")
                log.info("pipeline %s serving: %s", pid, active.public()["stages"])
            serving = {peer for a in self.active.values() for peer in a.pipeline.peer_ids}
            for record in self.registry.candidates():
                if record.state == "serving" and record.peer not in serving:
                    self.registry.set_state(record.peer, "idle")
            self.pending = orphans + self.pending
            self._flush_pending()

    def _links(self) -> Links:
        """Measured hop times (coordinator/measurements.py), hops into relayed providers priced as relayed,
        every hop whose bandwidth a link test measured at that bandwidth, whatever the estimate, and the
        coordinator's hops to providers that served at what their steps showed."""
        measured = self.measurements.links()
        if self.reach_links is None:
            return measured
        merged = Links(measured.default, {**measured.pairs, **self.reach_links().pairs})
        return self.measurements.with_step_hops(self.measurements.with_hop_bandwidths(merged))

    def _admitted(self, candidates: list[ProviderRecord]) -> list[ProviderRecord]:
        """The candidates measured by an admission probe, probing those not yet measured; a provider
        that fails its probe is not planned (it is marked dead, and may register again)."""
        if self.admit is None:
            return candidates
        admitted = []
        for record in candidates:
            if not self.measurements.probed(record.peer):
                claimed = provider_spec_from_profile(record.peer, record.profile, record.max_memory_bytes // 2**20)
                try:
                    self.admit(claimed, self._dtype_for(record.peer))
                except AdmissionFailed as exc:
                    log.warning("provider %s failed its admission probe: %s", record.peer, exc)
                    self.registry.set_state(record.peer, "dead", f"admission probe failed: {exc}")
                    continue
            admitted.append(record)
        return admitted

    def _log_move(self, current, chosen, specs, workload, links) -> None:
        """Why serving pipelines are moved: what the planner predicted of each plan, from which figures."""
        objective = Objective(self.objective)
        unit = "tok/s" if objective is Objective.THROUGHPUT else "s of latency, negated"

        def scored(pipelines) -> str:
            value = plan_score(pipelines, specs, self.model_shape, workload, links, objective)
            return "not possible" if value is None else f"{value:.4g} {unit}"

        figures = ", ".join(f"{peer[-8:]} {m['mem_bandwidth_gb_per_s']} GB/s ({m['source']})" for peer in
                            sorted({p for pipeline in (*current, *chosen) for p in pipeline.peer_ids})
                            if (m := self.measurements.public(peer)) is not None)
        log.info("re-plan moves serving pipelines: the new plan scores %s against %s for the current ones "
                 "(measured: %s)", scored(chosen), scored(current), figures or "none")

    def _step_timer(self, pipeline: Pipeline) -> Callable[[Step, float, tuple], None]:
        """What a driver calls after each step: decode steps are timed per stage (measurements.py)."""
        peers, layers = pipeline.peer_ids, tuple(s.n_layers for s in pipeline.stages)

        def timed(step: Step, wall_s: float, stage_ms: tuple) -> None:
            if step.kind != "decode":
                return
            context = sum(step.positions) // len(step.positions) + 1
            self.measurements.record_step(peers, layers, len(step.sessions), context, wall_s, stage_ms)
        return timed

    def _stage_bytes(self, pipeline: Pipeline, peer: str) -> int:
        stages = pipeline.stages
        for i, stage in enumerate(stages):
            if stage.peer_id == peer:
                m = self.workload.microbatches_in_flight or 1
                return int(stage_memory_bytes(self.model_shape, stage.n_layers, i == 0, i == len(stages) - 1,
                                              self.workload.batch * m, self.workload.context_tokens))
        return 0

    def _assign_pipeline(self, pid: str, pipeline: Pipeline, capacity: Capacity) -> tuple[Stage, ...]:
        """Assign every stage; the stages as assigned, each with the precision it serves in. Each holds
        KV cache for the sessions of `capacity`: the plan's micro-batches of its batch, as memory allows.

        All stages at once: each loads its layers in its own process, so a failover waits for the
        slowest load, not their sum. No stage forwards anything before the driver starts, which is
        after every assignment is acknowledged."""
        stages = tuple(replace(s, dtype=self._dtype_for(s.peer_id)) for s in pipeline.stages)
        assignments = []
        for i in range(len(stages)):
            prev_peer = stages[i - 1].peer_id if i > 0 else self.coordinator_peer
            if i + 1 < len(stages):
                next_record = self.registry.get(stages[i + 1].peer_id)
                next_peer, next_addrs = stages[i + 1].peer_id, tuple(next_record.addrs) if next_record else ()
            else:
                next_peer, next_addrs = self.coordinator_peer, self.coordinator_addrs
            assignments.append((stages[i].peer_id, Assign(
                pid, self.model_id, stages[i].start, stages[i].end, self.model_shape.n_layers, prev_peer, next_peer,
                next_addrs, capacity.sessions, capacity.context_tokens, stages[i].dtype)))
        with ThreadPoolExecutor(len(assignments), thread_name_prefix=f"assign-{pid[:6]}") as assigning:
            for done in [assigning.submit(self.assign, peer, spec) for peer, spec in assignments]:
                done.result()  # the first AssignmentFailed, once every stage has answered
        return stages

    def _dtype_for(self, peer: str) -> str:
        """The coordinator decides each stage's precision (coordinator/precision.py); the stage's
        receipt commits to it."""
        return precision.serving_dtype(self.registry.get(peer), self.registry.records(), self.serving_dtype)

    def _driver_failed(self, pid: str, requests: list[GenerationRequest], reason: str) -> None:
        with self.lock:
            active = self.active.get(pid)
            if active is not None and active.driver is threading.current_thread():
                del self.active[pid]
                self.suspects |= set(active.pipeline.peer_ids)
                blamed = self._blamed.pop(pid, None)
                if blamed is not None:
                    bench_s = self.backoff.fail(*blamed, time.monotonic())
                    if bench_s is not None:
                        log.warning("provider %s leaves the plan for %.0f s: %s", blamed[0], bench_s, blamed[1])
            for request in requests:
                if request.replay(MAX_REPLAYS):
                    self.pending.append(request)
                else:
                    request.fail(f"gave up after {MAX_REPLAYS} pipeline failures: {reason}")
        self.request_replan()

    def _dispatch(self, request: GenerationRequest) -> bool:
        drivers = sorted((a.driver for a in self.active.values() if a.driver.is_alive() and a.holds(request)),
                         key=lambda d: d.load)
        for driver in drivers:
            try:
                driver.submit(request)
                return True
            except queue.Full:  # try the next pipeline
                continue
        return False

    def _flush_pending(self) -> None:
        waiting, self.pending = self.pending, []
        now = time.monotonic()
        since = {id(r): self._pending_since_s.get(id(r), now) for r in waiting}
        self._pending_since_s = {}
        for request in waiting:
            if request.done.is_set() or self._dispatch(request):
                continue
            if now - since[id(request)] > PENDING_TIMEOUT_S:
                request.fail(f"no pipeline could take the request within {PENDING_TIMEOUT_S:.0f} s"
                             + (f": {self.plan_error}" if self.plan_error else ""))
                continue
            self.pending.append(request)
            self._pending_since_s[id(request)] = since[id(request)]

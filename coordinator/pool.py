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

from coordinator import incidents
from coordinator.driver import GenerationRequest, PipelineDriver, PipelineLink
from coordinator.planner import (InsufficientMemoryError, ModelShape, Objective, Pipeline, PlanError, Workload,
                                 plan, provider_spec_from_profile)
from coordinator.registry import Registry
from wire.messages import SERVING_DTYPES, Assign, Stage

log = logging.getLogger("meshpool.coordinator")

MAX_PENDING_REQUESTS = 1024
MAX_REPLAYS = 8
PENDING_TIMEOUT_S = 120.0  # a request waits this long for a pipeline, then fails with "busy"
PLAN_INTERVAL_S = 0.5  # the planner looks at the registry at least this often
PLANNER_JOIN_TIMEOUT_S = 10.0
PLAN_RETRY_S = 0.5  # after a round that raised


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
        self.peer = peer


@dataclass
class ActivePipeline:
    id: str
    pipeline: Pipeline
    driver: PipelineDriver

    def public(self) -> dict:
        return {"id": self.id, "stages": [{"peer": s.peer_id, "start": s.start, "end": s.end}
                                          for s in self.pipeline.stages]}


def pipeline_id(pipeline: Pipeline) -> str:
    text = ";".join(f"{s.peer_id}:{s.start}:{s.end}" for s in pipeline.stages)
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
    ):
        """`coordinator`: its peer id and addresses, stage 0's upstream and the last stage's downstream.
        `serving_dtype`: the precision every stage is assigned; "" lets each provider serve in the one
        its profile asks for (`serving_dtype`, float32 when it names none)."""
        self.registry, self.model_shape, self.model_id = registry, model_shape, model_id
        self.coordinator_peer, self.coordinator_addrs = coordinator
        self.assign, self.unassign, self.make_link, self.probe = assign, unassign, make_link, probe
        self.workload, self.objective, self.step_timeout_s = workload, objective, step_timeout_s
        self.serving_dtype = serving_dtype
        self.lock = threading.RLock()
        self.active: dict[str, ActivePipeline] = {}
        self.pending: list[GenerationRequest] = []
        self._pending_since_s: dict[int, float] = {}  # id(request) -> when it started waiting
        self.plan_error = ""
        self.suspects: set[str] = set()  # peers of failed pipelines, probed before re-planning
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
            if not self._dispatch(request):
                if len(self.pending) >= MAX_PENDING_REQUESTS:
                    raise PoolBusy("the pool's queue is full")
                self.pending.append(request)

    def snapshot(self) -> dict:
        with self.lock:
            return {"providers": self.registry.snapshot(),
                    "pipelines": [a.public() for a in self.active.values()],
                    "pending_requests": len(self.pending), "plan_error": self.plan_error}

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
        self.registry.refresh()
        self._replan()

    def _replan(self) -> None:
        candidates = self.registry.candidates()
        wanted: dict[str, Pipeline] = {}
        error = ""
        if candidates:
            specs = [provider_spec_from_profile(c.peer, c.profile, c.max_memory_bytes // 2**20) for c in candidates]
            try:
                result = plan(specs, self.model_shape, self.workload, objective=self.objective)
                wanted = {pipeline_id(p): p for p in result.pipelines}
            except (InsufficientMemoryError, PlanError) as exc:
                error = str(exc)
        elif any(r.state not in ("dead", "banned") for r in self.registry.records()):
            error = "no provider may serve yet (newcomers only verify until vouched for or promoted)"
        else:  # none registered: the coordinator just (re)started, or every provider is gone
            error = WAITING_FOR_PROVIDERS

        with self.lock:
            self.plan_error = error
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
                stages = self._assign_pipeline(pid, pipeline)
            except AssignmentFailed as exc:  # a provider that cannot take its stage is not used again
                log.warning("assigning pipeline %s failed: %s", pid, exc)
                self.registry.set_state(exc.peer, "dead", f"assignment failed: {exc}")
                self._wake.set()
                continue
            driver = PipelineDriver(pid, self.make_link(pid, pipeline.peer_ids), self._driver_failed,
                                    self.workload.batch, step_timeout_s=self.step_timeout_s, stages=stages)
            started[pid] = ActivePipeline(pid, pipeline, driver)
            busy |= set(pipeline.peer_ids)

        with self.lock:
            for pid, active in started.items():
                self.active[pid] = active
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

    def _assign_pipeline(self, pid: str, pipeline: Pipeline) -> tuple[Stage, ...]:
        """Assign every stage; the stages as assigned, each with the precision it serves in.

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
                next_addrs, self.workload.batch, self.workload.context_tokens, stages[i].dtype)))
        with ThreadPoolExecutor(len(assignments), thread_name_prefix=f"assign-{pid[:6]}") as assigning:
            for done in [assigning.submit(self.assign, peer, spec) for peer, spec in assignments]:
                done.result()  # the first AssignmentFailed, once every stage has answered
        return stages

    def _dtype_for(self, peer: str) -> str:
        """The coordinator decides each stage's precision; the stage's receipt commits to it."""
        if self.serving_dtype:
            return self.serving_dtype
        record = self.registry.get(peer)
        wanted = record.profile.get("serving_dtype") if record else None
        return wanted if wanted in SERVING_DTYPES else "float32"

    def _driver_failed(self, pid: str, requests: list[GenerationRequest], reason: str) -> None:
        with self.lock:
            active = self.active.get(pid)
            if active is not None and active.driver is threading.current_thread():
                del self.active[pid]
                self.suspects |= set(active.pipeline.peer_ids)
            for request in requests:
                if request.replay(MAX_REPLAYS):
                    self.pending.append(request)
                else:
                    request.fail(f"gave up after {MAX_REPLAYS} pipeline failures: {reason}")
        self.request_replan()

    def _dispatch(self, request: GenerationRequest) -> bool:
        drivers = sorted((a.driver for a in self.active.values() if a.driver.is_alive()), key=lambda d: d.load)
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

"""Drives the requests of one pipeline: prefill each new request, then decode all running ones
together, one batched step at a time. When a step fails, every request goes back to the pool with
the tokens produced so far, to be replayed on another pipeline."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from coordinator import incidents
from wire.messages import MAX_BATCH_SESSIONS, Result, SamplingParams, Stage, Step

log = logging.getLogger("meshpool.coordinator")

MAX_QUEUED_REQUESTS = 1024  # waiting for one pipeline
_session_ids = itertools.count()


@dataclass(eq=False)
class GenerationRequest:
    """One consumer request as the pool runs it.

    The API thread creates it; the driver of the pipeline it runs on, the planner (on a failover)
    and the API thread (on a cancel) change it, always through the methods below and under `lock`.
    Once `done` is set nothing changes any more, so settlement reads it without the lock."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: tuple[int, ...] = ()
    request_id: str = ""  # the ledger's name for it: stages sign their receipts with it
    # hooks, set before the request is submitted: on_token(token) after each token, on_step(pipeline id, kind, tokens of
    # this observer's requests in the step, seconds the whole pipeline took, each stage's compute ms)
    # after each step (coordinator/metrics.py); both run on the driver's thread
    on_token: Callable[[int], None] | None = None
    on_step: Callable[[str, str, int, float, tuple], None] | None = None
    tokens: list[int] = field(default_factory=list)
    stages: tuple[Stage, ...] = ()  # the stages of the attempt that ran last (a failover replays it)
    replays: int = 0
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def tokens_processed(self) -> int:
        """Positions every stage of the last attempt processed: the last token is never fed back."""
        return len(self.prompt_ids) + len(self.tokens) - 1 if self.tokens else 0

    @property
    def finished(self) -> bool:
        return bool(self.tokens) and (len(self.tokens) >= self.max_new_tokens or self.tokens[-1] in self.stop_ids)

    @property
    def finish_reason(self) -> str:
        return "stop" if self.tokens and self.tokens[-1] in self.stop_ids else "length"

    def start_attempt(self, stages: tuple[Stage, ...]) -> list[int]:
        """A pipeline takes the request: what it must prefill (a replay: prompt plus tokens so far)."""
        with self.lock:
            self.stages = stages
            return self.prompt_ids + self.tokens

    def add_token(self, token: int) -> None:
        with self.lock:
            if self.done.is_set():
                return
            self.tokens.append(token)
        if self.on_token:
            self.on_token(token)

    def replay(self, max_replays: int) -> bool:
        """Count a failed attempt; False once there were more than `max_replays`."""
        with self.lock:
            self.replays += 1
            return self.replays <= max_replays

    def finish(self) -> None:
        self.done.set()

    def fail(self, reason: str) -> None:
        with self.lock:
            if self.done.is_set():
                return
            self.error = reason
            self.done.set()


class PipelineLink(Protocol):
    def step(self, step: Step, timeout_s: float) -> Result: ...
    def close_sessions(self, sessions: list[str], requests: list[str]) -> None: ...
    def abort(self, reason: str) -> None: ...
    def shutdown(self) -> None: ...


class StepFailed(RuntimeError):
    pass


class PipelineDriver(threading.Thread):
    def __init__(self, pipeline_id: str, link: PipelineLink,
                 on_failure: Callable[[str, list[GenerationRequest], str], None],
                 max_batch: int, step_timeout_s: float = 30.0, max_queue: int = MAX_QUEUED_REQUESTS,
                 stages: tuple[Stage, ...] = (), on_step_timed: Callable[[Step, float, tuple], None] | None = None):
        """`on_step_timed(step, seconds the coordinator waited for it, each stage's reported ms)`: after each
        step, for the measurements the planner plans from (coordinator/measurements.py)."""
        super().__init__(name=f"driver-{pipeline_id}", daemon=True)
        self.pipeline_id, self.link, self.on_failure = pipeline_id, link, on_failure
        self.on_step_timed = on_step_timed
        self.stages = stages
        self.step_timeout_s = step_timeout_s
        self.inbox: queue.Queue[GenerationRequest] = queue.Queue(maxsize=max_queue)
        self.running: dict[str, GenerationRequest] = {}  # session id -> request; this thread's alone
        # never more sessions in flight than the stages have KV-cache slots for (the assignment's max_sessions)
        if not 0 < max_batch <= MAX_BATCH_SESSIONS:
            raise ValueError(f"max_batch must be in 1..{MAX_BATCH_SESSIONS}, got {max_batch}")
        self.max_batch = max_batch
        self.stopping = threading.Event()
        self._steps = itertools.count()

    @property
    def load(self) -> int:
        return self.inbox.qsize() + len(self.running)  # an estimate, read from other threads

    def submit(self, request: GenerationRequest) -> None:
        self.inbox.put_nowait(request)  # raises queue.Full: the pool answers "busy"

    def stop(self) -> list[GenerationRequest]:
        """Stop after the current step; return the requests not finished."""
        self.stopping.set()
        if threading.current_thread() is not self:
            self.join(timeout=self.step_timeout_s + 5)
        return self._drain()

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                self._admit(block=not self.running)
                if self.running and not self.stopping.is_set():
                    self._decode()
        except (StepFailed, TimeoutError, EOFError, ConnectionError, OSError) as exc:
            reason = f"pipeline {self.pipeline_id} failed: {exc}"
            log.warning(reason)
            self.stopping.set()
            self.on_failure(self.pipeline_id, self._drain(), reason)
        except Exception as exc:  # a bug here: its requests are replayed elsewhere, and it is counted
            incidents.record("driver")
            self.stopping.set()
            self.on_failure(self.pipeline_id, self._drain(), f"pipeline {self.pipeline_id} driver error: {exc!r}")
        finally:
            self.link.shutdown()

    def _drain(self) -> list[GenerationRequest]:
        pending = list(self.running.values())
        self.running.clear()
        while True:
            try:
                pending.append(self.inbox.get_nowait())
            except queue.Empty:
                return [r for r in pending if not r.done.is_set()]

    def _admit(self, block: bool) -> None:
        while len(self.running) < self.max_batch:
            try:
                request = self.inbox.get(timeout=0.2) if block else self.inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if request.done.is_set():  # cancelled while queued
                continue
            self._prefill(request)

    def _prefill(self, request: GenerationRequest) -> None:
        # A replayed request feeds its prompt plus the tokens it already produced.
        sid = f"s{next(_session_ids)}"
        ids = request.start_attempt(self.stages)
        step = Step(self.pipeline_id, next(self._steps), "prefill", (sid,), (0,), (request.sampling,), (),
                    torch.tensor(ids, dtype=torch.int64))
        # running before the step: if the step fails, the failure hands the request back for replay
        self.running[sid] = request
        [token] = self._step(step, [request])
        request.add_token(token)
        if request.finished:
            self._finish(sid, request)

    def _decode(self) -> None:
        sids = [sid for sid, r in self.running.items() if not r.done.is_set()]
        for sid in [s for s in self.running if s not in sids]:  # cancelled by the caller
            self._finish(sid, self.running[sid])
        if not sids:
            return
        requests = [self.running[s] for s in sids]
        step = Step(self.pipeline_id, next(self._steps), "decode", tuple(sids),
                    tuple(len(r.prompt_ids) + len(r.tokens) - 1 for r in requests), tuple(r.sampling for r in requests),
                    (), torch.tensor([r.tokens[-1] for r in requests], dtype=torch.int64))
        for sid, request, token in zip(sids, requests, self._step(step, requests)):
            request.add_token(token)
            if request.finished:
                self._finish(sid, request)

    def _step(self, step: Step, requests: list[GenerationRequest]) -> list[int]:
        started_s = time.perf_counter()
        result = self.link.step(step, self.step_timeout_s)
        if result.sessions != step.sessions:
            raise StepFailed(f"result of step {step.step} does not match its sessions")
        wall_s = time.perf_counter() - started_s
        _observe_step(self.pipeline_id, step.kind, requests, wall_s, result.stage_ms)
        if self.on_step_timed is not None:
            self.on_step_timed(step, wall_s, result.stage_ms)
        return list(result.tokens)

    def _finish(self, sid: str, request: GenerationRequest) -> None:
        self.running.pop(sid, None)
        self.link.close_sessions([sid], [request.request_id])
        request.finish()


def _observe_step(pipeline_id: str, kind: str, requests: list[GenerationRequest], seconds: float,
                  stage_ms: tuple) -> None:
    """Metrics: one call per distinct observer (one per API app), however many requests it has."""
    observers: dict[Callable, int] = {}
    for r in requests:
        if r.on_step is not None:
            observers[r.on_step] = observers.get(r.on_step, 0) + 1
    for observe, n_tokens in observers.items():
        observe(pipeline_id, kind, n_tokens, seconds, stage_ms)

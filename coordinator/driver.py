"""Drives the requests of one pipeline: keeps the plan's micro-batches in flight, each a batched
decode step of running requests or a prefill of new ones (running requests riding along); requests
join and leave at any step.
When a step fails, every request goes back to the pool with the tokens produced so far, to be
replayed on another pipeline."""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from coordinator import incidents
from wire.messages import MAX_BATCH_SESSIONS, SamplingParams, Stage, Step

log = logging.getLogger("meshpool.coordinator")

MAX_QUEUED_REQUESTS = 1024  # waiting for one pipeline
_session_ids = itertools.count()
# unique in this process: a late result of a stopped driver never matches a step of its successor
_step_numbers = itertools.count()
IDLE_WAKE_S = 0.2  # an idle driver looks at `stopping` this often
# A longer prompt is prefilled in chunks of this many tokens, one step each, between decode steps:
# running streams wait at most one chunk's time for it (and a chunk still keeps a GPU busy)
PREFILL_CHUNK_TOKENS = 256


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
    on_done: Callable[[], None] | None = None  # once `done` is set, on the thread that set it
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
        if self.take_token(token):
            self.notify(token)

    def take_token(self, token: int) -> bool:
        """Append a token without telling anyone yet (`notify` does); False if the request is done."""
        with self.lock:
            if self.done.is_set():
                return False
            self.tokens.append(token)
            return True

    def notify(self, token: int) -> None:
        if self.on_token:
            self.on_token(token)

    def replay(self, max_replays: int) -> bool:
        """Count a failed attempt; False once there were more than `max_replays`."""
        with self.lock:
            self.replays += 1
            return self.replays <= max_replays

    def finish(self) -> None:
        self.done.set()
        self._told_done()

    def fail(self, reason: str) -> None:
        with self.lock:
            if self.done.is_set():
                return
            self.error = reason
            self.done.set()
        self._told_done()

    def _told_done(self) -> None:
        if self.on_done:
            self.on_done()


class PipelineLink(Protocol):
    def send(self, step: Step, timeout_s: float,
             on_done: Callable[[concurrent.futures.Future], None]) -> concurrent.futures.Future: ...
    def close_sessions(self, sessions: list[str], requests: list[str]) -> None: ...
    def abort(self, reason: str) -> None: ...
    def shutdown(self) -> None: ...


class StepFailed(RuntimeError):
    pass


@dataclass(eq=False)
class _Flight:
    """A step sent and not yet answered."""

    step: Step
    requests: list[GenerationRequest]
    future: concurrent.futures.Future
    sent_s: float
    prompted: tuple[str, ...] = ()  # the sessions whose prompts this step ends (the rest were decoding)


class PipelineDriver(threading.Thread):
    """Keeps up to `microbatches` steps in flight on one pipeline, so that while stage k works on one
    micro-batch, stage k + 1 works on the one before it (the plan's micro-batches, DESIGN decision 3).

    Sessions are not tied to a micro-batch: a session is either waiting for its prefill, in exactly one
    step in flight, or ready (its next token known). Whenever a step's result comes back its sessions
    are ready again, and each free slot gets the next step: a prefill, or a decode of up to
    ceil(decoding sessions / microbatches) ready sessions (so micro-batches stay about even as requests
    join and leave). A prefill step carries the waiting prompts that fit in `prefill_chunk_tokens` rows
    together (a burst of new requests is prefilled in one pass over the weights, not one step each),
    and one decode share of ready sessions rides along with it, so running streams move on every step.
    A prompt longer than `prefill_chunk_tokens` goes in chunks, one step each, and a decode step follows
    each chunk. A request leaves the step after its last token (its session is closed at once); one
    that arrives joins at the next free slot."""

    def __init__(self, pipeline_id: str, link: PipelineLink,
                 on_failure: Callable[[str, list[GenerationRequest], str], None],
                 max_batch: int, step_timeout_s: float = 30.0, max_queue: int = MAX_QUEUED_REQUESTS,
                 stages: tuple[Stage, ...] = (), microbatches: int = 1,
                 prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS,
                 on_step_timed: Callable[[Step, float, tuple], None] | None = None):
        """`on_step_timed(step, seconds the coordinator waited for it, each stage's reported ms)`: after each
        step, for the measurements the planner plans from (coordinator/measurements.py)."""
        super().__init__(name=f"driver-{pipeline_id}", daemon=True)
        self.pipeline_id, self.link, self.on_failure = pipeline_id, link, on_failure
        self.on_step_timed = on_step_timed
        self.stages = stages
        self.step_timeout_s = step_timeout_s
        self.inbox: queue.Queue[GenerationRequest] = queue.Queue(maxsize=max_queue)
        # never more sessions in flight than the stages have KV-cache slots for (the assignment's max_sessions)
        if not 0 < max_batch <= MAX_BATCH_SESSIONS * microbatches:
            raise ValueError(f"max_batch must be in 1..{MAX_BATCH_SESSIONS * microbatches}, got {max_batch}")
        if microbatches < 1:
            raise ValueError(f"microbatches must be >= 1, got {microbatches}")
        if prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be >= 1, got {prefill_chunk_tokens}")
        self.max_batch, self.microbatches, self.prefill_chunk_tokens = max_batch, microbatches, prefill_chunk_tokens
        # this thread's alone:
        self.running: dict[str, GenerationRequest] = {}  # session id -> request, every session the stages hold
        self.to_prefill: collections.deque[str] = collections.deque()  # admitted, (rest of) prefill not sent
        self.prompts: dict[str, tuple[list[int], int]] = {}  # session -> ids to prefill, how many sent so far
        self.ready: dict[str, None] = {}  # running sessions in no step, next token known (ordered: oldest first)
        self.in_flight: dict[int, _Flight] = {}  # step number -> its flight
        self._decoding = 0  # sessions past their prefill (ready or in a decode step)
        self._last_kind = "decode"
        # what results owe their observers (token callbacks, metrics, measurements), done once the
        # next steps are sent: the pipeline works while this thread does it
        self._after_send: list[Callable[[], None]] = []
        # results and new requests wake the thread through this queue (step numbers; None: look at the inbox)
        self._events: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.steps_done = 0  # steps that came back with a result: the pool forgives its stages' strikes

    @property
    def load(self) -> int:
        return self.inbox.qsize() + len(self.running)  # an estimate, read from other threads

    def submit(self, request: GenerationRequest) -> None:
        self.inbox.put_nowait(request)  # raises queue.Full: the pool answers "busy"
        self._events.put(None)

    def stop(self) -> list[GenerationRequest]:
        """Stop now (steps in flight are abandoned); return the requests not finished, to be replayed."""
        self.stopping.set()
        self._events.put(None)
        if threading.current_thread() is not self:
            self.join(timeout=self.step_timeout_s + 5)
        return self._drain()

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                self._admit()
                self._issue()
                self._run_after_send()
                self._wait()
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

    def _run_after_send(self) -> None:
        after, self._after_send = self._after_send, []
        for call in after:
            call()

    def _drain(self) -> list[GenerationRequest]:
        self._run_after_send()  # tokens taken are told before their requests go back for a replay
        pending = list(self.running.values())
        self.running.clear()
        self.ready.clear()
        self.to_prefill.clear()
        self.prompts.clear()
        self.in_flight.clear()
        while True:
            try:
                pending.append(self.inbox.get_nowait())
            except queue.Empty:
                return [r for r in pending if not r.done.is_set()]

    # -- scheduling -----------------------------------------------------------------------

    def _admit(self) -> None:
        """New requests take free session slots; their prefill is sent when a step slot frees."""
        while len(self.running) < self.max_batch:
            try:
                request = self.inbox.get_nowait()
            except queue.Empty:
                return
            if request.done.is_set():  # cancelled while queued
                continue
            sid = f"s{next(_session_ids)}"
            # running before its step: if a step fails, the failure hands the request back for replay
            self.running[sid] = request
            self.to_prefill.append(sid)

    def _issue(self) -> None:
        """Fill the free step slots."""
        for sid in [s for s in self.ready if self.running[s].done.is_set()]:  # cancelled by the caller
            del self.ready[sid]
            self._decoding -= 1
            self._finish(sid, self.running[sid])
        while len(self.in_flight) < self.microbatches and not self.stopping.is_set():
            while self.to_prefill and self.running[self.to_prefill[0]].done.is_set():
                sid = self.to_prefill.popleft()
                self.prompts.pop(sid, None)
                self._finish(sid, self.running[sid])
            # a chunk step carries no decodes: the step after it serves the running streams first
            prefill = bool(self.to_prefill) and (self._last_kind != "chunk" or not self.ready)
            if prefill:
                self._send_prefill()
            elif self.ready:
                self._send_decode()
            else:
                return

    def _prompt(self, sid: str) -> tuple[list[int], int]:
        """A session's ids to prefill and how many were sent; a replayed request feeds its prompt plus
        the tokens it already produced."""
        if sid not in self.prompts:
            self.prompts[sid] = (self.running[sid].start_attempt(self.stages), 0)
        return self.prompts[sid]

    def _send_prefill(self) -> None:
        """One step of prompt rows, at most `prefill_chunk_tokens` of them: the first waiting prompt
        whole, or its next chunk if it is longer; then every following prompt that still fits whole,
        oldest first, up to 1 / microbatches of the rows waiting (a burst fills every micro-batch, not
        one); and one decode share of ready sessions riding along with their one token each. The
        stages run all of them as one pass over the weights (`ShardRuntime.prefill_many`)."""
        sid = self.to_prefill.popleft()
        ids, start = self._prompt(sid)
        if len(ids) - start > self.prefill_chunk_tokens:
            end = start + self.prefill_chunk_tokens
            self.prompts[sid] = (ids, end)
            request = self.running[sid]
            self._send(Step(self.pipeline_id, next(_step_numbers), "chunk", (sid,), (start,), (request.sampling,), (),
                            torch.tensor(ids[start:end], dtype=torch.int64)), [request])
            return
        entries = [(sid, start, ids[start:])]  # (session, position, ids it feeds)
        # a burst is spread over the micro-batches, so that the stages work on its parts in turn
        waiting = len(ids) - start + sum(len(i) - p for i, p in map(self._prompt, self.to_prefill))
        budget = min(self.prefill_chunk_tokens, -(-waiting // self.microbatches)) - (len(ids) - start)
        while self.to_prefill and len(entries) < MAX_BATCH_SESSIONS:
            sid = self.to_prefill[0]
            if self.running[sid].done.is_set():
                break  # cancelled: the next _issue finishes it
            ids, start = self._prompt(sid)
            if len(ids) - start > budget:
                break
            self.to_prefill.popleft()
            entries.append((sid, start, ids[start:]))
            budget -= len(ids) - start
        prompted = tuple(sid for sid, _, _ in entries)
        for sid in prompted:
            self.prompts.pop(sid)
        size = min(len(self.ready), -(-self._decoding // self.microbatches), MAX_BATCH_SESSIONS - len(entries))
        for sid in list(itertools.islice(self.ready, size)):
            del self.ready[sid]
            request = self.running[sid]
            entries.append((sid, len(request.prompt_ids) + len(request.tokens) - 1, [request.tokens[-1]]))
        requests = [self.running[sid] for sid, _, _ in entries]
        self._send(Step(self.pipeline_id, next(_step_numbers), "prefill", tuple(sid for sid, _, _ in entries),
                        tuple(p for _, p, _ in entries), tuple(r.sampling for r in requests), (),
                        torch.tensor([t for _, _, ids in entries for t in ids], dtype=torch.int64),
                        tuple(len(ids) for _, _, ids in entries)), requests, prompted)

    def _send_decode(self) -> None:
        size = min(len(self.ready), -(-self._decoding // self.microbatches), MAX_BATCH_SESSIONS)
        sids = list(itertools.islice(self.ready, size))
        for sid in sids:
            del self.ready[sid]
        requests = [self.running[s] for s in sids]
        self._send(Step(self.pipeline_id, next(_step_numbers), "decode", tuple(sids),
                        tuple(len(r.prompt_ids) + len(r.tokens) - 1 for r in requests),
                        tuple(r.sampling for r in requests), (),
                        torch.tensor([r.tokens[-1] for r in requests], dtype=torch.int64)), requests)

    def _send(self, step: Step, requests: list[GenerationRequest], prompted: tuple[str, ...] = ()) -> None:
        number = step.step
        future = self.link.send(step, self.step_timeout_s, lambda _f: self._events.put(number))
        self.in_flight[number] = _Flight(step, requests, future, time.perf_counter(), prompted)
        self._last_kind = step.kind

    def _wait(self) -> None:
        """Block for the next event (a result, a new request, a stop) and handle the results that came."""
        if self.in_flight:
            oldest = min(f.sent_s for f in self.in_flight.values())
            timeout_s = oldest + self.step_timeout_s - time.perf_counter()
            if timeout_s <= 0:
                number = next(n for n, f in self.in_flight.items() if f.sent_s == oldest)
                raise TimeoutError(f"step {number} of pipeline {self.pipeline_id} got no result "
                                   f"in {self.step_timeout_s} s")
        else:
            timeout_s = IDLE_WAKE_S
        try:
            event = self._events.get(timeout=timeout_s)
        except queue.Empty:
            return
        while True:
            if event is not None and event in self.in_flight:
                self._complete(self.in_flight.pop(event))
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return

    def _complete(self, flight: _Flight) -> None:
        step = flight.step
        result = flight.future.result()  # raises what the link set: the stage's failure report, an abort
        n_tokens = 0 if step.kind == "chunk" else len(step.sessions)
        if result.sessions != step.sessions or len(result.tokens) != n_tokens:
            raise StepFailed(f"result of step {step.step} does not match its sessions")
        self.steps_done += 1
        wall_s = time.perf_counter() - flight.sent_s
        self._after_send.append(lambda: _observe_step(self.pipeline_id, step.kind, flight.requests, wall_s,
                                                      result.stage_ms))
        if self.on_step_timed is not None:
            self._after_send.append(lambda: self.on_step_timed(step, wall_s, result.stage_ms))
        if step.kind == "chunk":  # the rest of its prompt goes before prompts that came later
            self.to_prefill.appendleft(step.sessions[0])
            return
        self._decoding += len(flight.prompted)
        for sid, request, token in zip(step.sessions, flight.requests, result.tokens):
            if request.take_token(token):
                self._after_send.append(lambda request=request, token=token: request.notify(token))
            if request.finished or request.done.is_set():
                self._decoding -= 1
                self._finish(sid, request)
            else:
                self.ready[sid] = None

    def _finish(self, sid: str, request: GenerationRequest) -> None:
        self.running.pop(sid, None)
        self.link.close_sessions([sid], [request.request_id])
        self._run_after_send()  # its last token is told before it is done (streaming.py ends on done)
        request.finish()


def _observe_step(pipeline_id: str, kind: str, requests: list[GenerationRequest], seconds: float,
                  stage_ms: tuple) -> None:
    """Metrics: one call per distinct observer (one per API app), however many requests it has."""
    observers: dict[Callable, int] = {}
    per_request = 0 if kind == "chunk" else 1  # a chunk produces no token
    for r in requests:
        if r.on_step is not None:
            observers[r.on_step] = observers.get(r.on_step, 0) + per_request
    for observe, n_tokens in observers.items():
        observe(pipeline_id, kind, n_tokens, seconds, stage_ms)

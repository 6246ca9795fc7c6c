"""Prometheus metrics of one coordinator app (`GET /metrics`), and the live rates the dashboard shows.

Each app owns a `CollectorRegistry` (never the global one), so several apps in one process do not
clash. What the request path observes is pushed here as it happens: tokens handed to consumers,
requests by model and status, time to first token, the gap between tokens, and each pipeline
step (the driver calls `observe_step` through `GenerationRequest.on_step`). What the pool and the
ledger hold (providers by state, audits, slashes, entries, escrow, supply) is read at scrape time
by `PoolCollector`, so it is never out of step with its source.

Labels are bounded: `model` is the served model or "other" (a consumer's typo never creates a
series), `status` an HTTP status code, `pipeline` at most MAX_PIPELINE_SERIES live series.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from coordinator import incidents

log = logging.getLogger("meshpool.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PROVIDER_STATES = ("newcomer", "idle", "serving", "leaving", "dead", "banned")
MAX_PIPELINE_SERIES = 64
MAX_STAGE_SERIES = 64
RATE_WINDOW_S = 5.0
MAX_RATE_SAMPLES = 4096  # per pipeline, within the window
RECENT_TTFT = 64
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
STEP_BUCKETS_S = TOKEN_BUCKETS_S


def _finite_or_0(value: float) -> float:
    return value if math.isfinite(value) else 0.0


class Metrics:
    def __init__(self, model_id: str, clock=time.monotonic):
        self.model_id, self.clock = model_id, clock
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.tokens = Counter("meshpool_tokens_generated", "Tokens generated and handed to consumers",
                              ["model"], registry=r)
        self.requests = Counter("meshpool_requests", "Consumer API requests by model and HTTP status "
                                "(499: the client went away)", ["model", "status"], registry=r)
        self.in_flight = Gauge("meshpool_requests_in_flight", "Consumer requests admitted and not yet ended",
                               registry=r)
        self.in_flight.set_function(lambda: self._in_flight)
        self.ttft = Histogram("meshpool_time_to_first_token_seconds", "From the request's arrival to its first token",
                              ["model"], buckets=TTFT_BUCKETS_S, registry=r)
        self.token_latency = Histogram("meshpool_token_latency_seconds", "Gap between consecutive tokens of a request",
                                       ["model"], buckets=TOKEN_BUCKETS_S, registry=r)
        # The coordinator sees a step from sending it to stage 0 until the last stage's token comes
        # back: the whole pipeline (every stage and every hop), not each stage on its own.
        self.step = Histogram("meshpool_pipeline_step_seconds", "One step through a whole pipeline, as the "
                              "coordinator sees it", ["pipeline", "kind"], buckets=STEP_BUCKETS_S, registry=r)
        # Each stage reports its compute time in the step's frames; the rest of the step is spent
        # on the hops between them (sending, receiving, queueing), averaged over the step's hops.
        self.stage_step = Histogram("meshpool_stage_step_seconds", "Compute time of one step on one stage, as "
                                    "the stage reports it", ["stage"], buckets=STEP_BUCKETS_S, registry=r)
        self.hop = Histogram("meshpool_hop_seconds", "Transfer time of one hop of a step (coordinator to stage 0, "
                             "stage to stage, last stage to coordinator), averaged over its hops",
                             buckets=STEP_BUCKETS_S, registry=r)
        self.pipeline_tokens = Counter("meshpool_pipeline_tokens", "Tokens sampled by a pipeline's last stage",
                                       ["pipeline"], registry=r)
        self._lock = threading.Lock()
        self._samples: OrderedDict[str, deque] = OrderedDict()  # pipeline -> (t_s, tokens, step_s)
        self._ttft_s: deque[float] = deque(maxlen=RECENT_TTFT)
        self._in_flight = 0

    def model_label(self, model: str | None) -> str:
        return self.model_id if model == self.model_id else "other"

    # -- the request path -----------------------------------------------------------------

    def request(self, model: str | None) -> "RequestTimer":
        """A request was admitted to generation: in flight until its timer ends."""
        return RequestTimer(self, self.model_label(model))

    def rejected(self, model: str | None, status: int | str) -> None:
        """A request refused before generation (bad key, rate limit, invalid body)."""
        self.requests.labels(self.model_label(model), str(status)).inc()

    def observe_step(self, pipeline_id: str, kind: str, n_tokens: int, seconds: float,
                     stage_ms: list | tuple = ()) -> None:
        """Called by a driver thread after each step; never raises into it."""
        try:
            # a stage's own report: NaN or an infinity counts as 0, so no sum is poisoned for good
            stage_s = [min(max(_finite_or_0(float(ms)), 0.0), 1e6) / 1000 for ms in stage_ms[:MAX_STAGE_SERIES]]
            for index, s in enumerate(stage_s):
                self.stage_step.labels(str(index)).observe(s)
            if stage_s:
                self.hop.observe(max(0.0, seconds - sum(stage_s)) / (len(stage_s) + 1))
            now = self.clock()
            with self._lock:
                samples = self._samples.get(pipeline_id)
                if samples is None:
                    samples = self._samples[pipeline_id] = deque(maxlen=MAX_RATE_SAMPLES)
                    if len(self._samples) > MAX_PIPELINE_SERIES:
                        old, _ = self._samples.popitem(last=False)
                        self._forget(old)
                else:
                    self._samples.move_to_end(pipeline_id)
                samples.append((now, n_tokens, seconds))
            self.step.labels(pipeline_id, kind).observe(seconds)
            self.pipeline_tokens.labels(pipeline_id).inc(n_tokens)
        except Exception:  # metrics must never stop a pipeline
            log.exception("observing a step failed")

    def _forget(self, pipeline_id: str) -> None:
        for kind in ("prefill", "chunk", "decode"):
            try:
                self.step.remove(pipeline_id, kind)
            except KeyError:
                pass
        try:
            self.pipeline_tokens.remove(pipeline_id)
        except KeyError:
            pass

    # -- live figures for the dashboard ---------------------------------------------------

    def rates(self, window_s: float = RATE_WINDOW_S) -> dict[str, dict]:
        """Per pipeline: tokens/s over the last `window_s` and the mean step time in ms."""
        since = self.clock() - window_s
        out = {}
        with self._lock:
            for pid, samples in self._samples.items():
                recent = [s for s in samples if s[0] >= since]
                tokens = sum(s[1] for s in recent)
                out[pid] = {"tokens_per_s": tokens / window_s,
                            "step_ms": 1000 * sum(s[2] for s in recent) / len(recent) if recent else None}
        return out

    def recent_ttft_ms(self) -> list[float]:
        with self._lock:
            return [1000 * s for s in self._ttft_s]

    def tokens_total(self) -> int:
        return int(sum(s.value for m in self.tokens.collect() for s in m.samples if s.name.endswith("_total")))

    def in_flight_now(self) -> int:
        return self._in_flight

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """One admitted request: its tokens, its first-token time, its end (exactly once)."""

    def __init__(self, metrics: Metrics, model: str):
        self.metrics, self.model = metrics, model
        self.started_s = time.perf_counter()
        self.last_s: float | None = None
        self.ended = False
        with metrics._lock:
            metrics._in_flight += 1

    def token(self) -> None:
        now, m = time.perf_counter(), self.metrics
        if self.last_s is None:
            m.ttft.labels(self.model).observe(now - self.started_s)
            with m._lock:
                m._ttft_s.append(now - self.started_s)
        else:
            m.token_latency.labels(self.model).observe(now - self.last_s)
        self.last_s = now
        m.tokens.labels(self.model).inc()

    def end(self, status: int | str) -> None:
        if self.ended:
            return
        self.ended = True
        with self.metrics._lock:
            self.metrics._in_flight -= 1
        self.metrics.requests.labels(self.model, str(status)).inc()


class PoolCollector(Collector):
    """Gauges and counters read from the pool and the ledger when Prometheus scrapes."""

    def __init__(self, pool, ledger_view=None):
        self.pool, self.ledger_view = pool, ledger_view

    def describe(self):
        return []  # computed at scrape time; do not call collect() on registration

    def collect(self):
        try:
            snapshot = self.pool.snapshot()
        except Exception:
            log.exception("pool snapshot for /metrics failed")
            snapshot = {"providers": [], "pipelines": [], "pending_requests": 0}
        states = GaugeMetricFamily("meshpool_providers", "Providers known to the registry, by state", labels=["state"])
        counts = dict.fromkeys(PROVIDER_STATES, 0)
        for p in snapshot.get("providers", []):
            state = p.get("state", "")
            if state in counts:
                counts[state] += 1
        for state, n in counts.items():
            states.add_metric([state], n)
        yield states
        yield GaugeMetricFamily("meshpool_pipelines", "Pipelines serving now", value=len(snapshot.get("pipelines", [])))
        yield GaugeMetricFamily("meshpool_requests_pending", "Requests waiting for a pipeline",
                                value=snapshot.get("pending_requests", 0))
        unexpected = CounterMetricFamily("meshpool_unexpected_errors", "Unexpected exceptions the coordinator "
                                         "survived (each logged with its traceback), by where", labels=["where"])
        for where, n in incidents.counts().items():
            unexpected.add_metric([where], n)
        yield unexpected
        yield CounterMetricFamily("meshpool_profile_contradictions", "Providers' profiles that the coordinator's own "
                                  "timing contradicted (misconduct: planned at the measured speed)",
                                  value=snapshot.get("measurements", {}).get("contradictions_total", 0))
        if self.ledger_view is None:
            return
        try:
            ledger = self.ledger_view.summary()
        except Exception:
            log.exception("ledger summary for /metrics failed")
            return
        audits = CounterMetricFamily("meshpool_audits", "Audits recorded in the ledger, by verdict", labels=["verdict"])
        for verdict in ("pass", "fail"):
            audits.add_metric([verdict], ledger["audits_by_verdict"].get(verdict, 0))
        yield audits
        yield CounterMetricFamily("meshpool_slashes", "Slashes (penalties) recorded in the ledger",
                                  value=ledger["slash_count"])
        yield CounterMetricFamily("meshpool_slashed_units", "Credit units taken by slashes",
                                  value=ledger["slashed_units"])
        supply = ledger["supply"]
        yield CounterMetricFamily("meshpool_ledger_entries", "Entries in the ledger's log", value=supply["entry_count"])
        escrow = GaugeMetricFamily("meshpool_escrow_units", "Credit units held in escrow", labels=["account"])
        escrow.add_metric(["requests"], supply["escrow_requests_units"])
        escrow.add_metric(["stakes"], supply["escrow_stakes_units"])
        yield escrow
        yield GaugeMetricFamily("meshpool_ledger_open_holds", "Requests' holds not yet settled or voided",
                                value=supply["open_holds"])
        yield GaugeMetricFamily("meshpool_credit_supply_units", "Credit units minted minus burned",
                                value=supply["supply_units"])


def make_router(metrics: Metrics):
    """`GET /metrics` in Prometheus' text format."""
    from fastapi import APIRouter
    from fastapi.responses import Response

    router = APIRouter(tags=["metrics"])

    @router.get("/metrics", summary="Prometheus metrics (text format)", response_class=Response)
    def get_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return router

"""The planner's nouns: workloads, objectives, stages, pipelines, plans, and its errors."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from wire.messages import Stage  # one stage of a pipeline, as it travels


class Objective(str, Enum):
    LATENCY = "latency"  # lowest per-token latency of one stream: one pipeline
    THROUGHPUT = "throughput"  # highest pool tokens/s: several pipelines, micro-batched


@dataclass(frozen=True)
class Workload:
    """What the pool is planned for.

    `batch`: sessions decoded together in one step (one micro-batch).
    `context_tokens`: context reserved per session in the KV cache; decode attends to all of it
    (the worst case, end of context).
    `microbatches_in_flight`: micro-batches of `batch` sessions a pipeline keeps going at once, so
    that every stage and link stays busy while others work; every stage reserves KV cache for
    batch × microbatches sessions. None: 1 for the latency objective, and for throughput the
    planner picks the best count per pipeline (1, 2, 3, 4, 6, 8, 12, ..., 64) that fits in memory.
    """

    batch: int = 1
    context_tokens: int = 4096
    microbatches_in_flight: int | None = None

    def __post_init__(self):
        if self.batch < 1 or self.context_tokens < 1:
            raise ValueError(f"batch and context_tokens must be >= 1, got {self}")
        if self.microbatches_in_flight is not None and self.microbatches_in_flight < 1:
            raise ValueError(f"microbatches_in_flight must be >= 1, got {self.microbatches_in_flight}")


@dataclass(frozen=True)
class Pipeline:
    stages: tuple[Stage, ...]

    @property
    def peer_ids(self) -> tuple[str, ...]:
        return tuple(s.peer_id for s in self.stages)


@dataclass(frozen=True)
class PipelineCost:
    """Predicted figures of one pipeline under the cost model (seconds per decode step)."""

    stage_times_s: tuple[float, ...]  # compute per step of one micro-batch, per stage
    link_times_s: tuple[float, ...]  # coordinator→stage0, stage i→i+1, last→coordinator
    stage_memory_bytes: tuple[float, ...]  # weights + KV cache reserved, per stage
    fits_memory: bool
    microbatches: int  # micro-batches of `batch` sessions in flight; sessions held = batch × this
    latency_s: float  # one token of one micro-batch through the whole pipeline
    cycle_s: float  # time between tokens of the pipeline when it is full
    tokens_per_s: float


@dataclass(frozen=True)
class Plan:
    objective: Objective
    pipelines: tuple[Pipeline, ...]
    costs: tuple[PipelineCost, ...]

    @property
    def tokens_per_s(self) -> float:
        return sum(c.tokens_per_s for c in self.costs)

    @property
    def latency_s(self) -> float:
        """Per-token latency of the fastest pipeline."""
        return min(c.latency_s for c in self.costs)

    @property
    def fits_memory(self) -> bool:
        return all(c.fits_memory for c in self.costs)


class PlanError(ValueError):
    """The planner cannot build a plan from this input."""


class InsufficientMemoryError(PlanError):
    """The pool (or the providers left) cannot hold the model with its KV cache."""

    def __init__(self, message: str, needed_bytes: float, available_bytes: float):
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes

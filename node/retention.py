"""What a stage keeps of each request for audits (DESIGN decisions 4 and 5).

While a session runs, the stage records every input it took and every output it sent. When the
session closes it concatenates them, hashes them for the receipt it signs, and retains them for
the audit window, so that a verifier can fetch them, check them against the receipt hashes, and
recompute the stage. On the last stage the "output" is the hidden states behind the logits plus
the sampled tokens and the positions they were sampled at.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from verification.commitments import tensor_digest, trace_digest

DEFAULT_WINDOW_S = 600.0
DEFAULT_BUDGET_BYTES = 512 * 2**20
# one part of an audit fetch, half the frame limit (wire/frames.py): an 8B stage's trace of 4,096
# tokens is 2 GB, and one row of it (a layer's update over the request) 32 MB
AUDIT_PART_BYTES = 32 * 2**20


@dataclass
class SessionRecord:
    """Inputs and outputs of one session on one stage, in the order they passed."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # last stage: where tokens were sampled
    tokens: list[int] = field(default_factory=list)
    n_tokens: int = 0

    def add(self, x: torch.Tensor, out: torch.Tensor, sampled: tuple[int, int] | None = None) -> None:
        self.inputs.append(x.detach().to("cpu"))
        self.outputs.append(out.detach().to("cpu"))
        self.n_tokens += x.shape[0]
        if sampled is not None:
            self.positions.append(sampled[0])
            self.tokens.append(sampled[1])

    def seal(self, trace: torch.Tensor | None = None) -> "Retained":
        """`trace`: the layer trace (2L + 1, T, D) (verification/trace.py), if the runtime kept it."""
        stage_input = torch.cat(self.inputs)
        output = [torch.cat(self.outputs)]
        if self.positions:
            output += [torch.tensor(self.positions, dtype=torch.int64), torch.tensor(self.tokens, dtype=torch.int64)]
        if trace is None:
            return Retained(stage_input, output, tensor_digest([stage_input]), tensor_digest(output))
        trace = trace.detach().to("cpu")
        return Retained(stage_input, output, tensor_digest([stage_input]), tensor_digest(output), trace,
                        trace_digest(trace))


@dataclass(frozen=True)
class Retained:
    stage_input: torch.Tensor
    output: list[torch.Tensor]  # [hidden] or, on the last stage, [hidden, positions, tokens]
    input_hash: str
    output_hash: str
    trace: torch.Tensor | None = None  # (2L + 1, T, D): the input, then each layer's attention and MLP updates
    layers_hash: str = ""

    @property
    def tensors(self) -> list[torch.Tensor]:
        """What an audit fetches: [input, *output] and the trace when kept."""
        return [self.stage_input, *self.output, *([] if self.trace is None else [self.trace])]

    def parts(self, part_bytes: int | None = None) -> list[list[torch.Tensor]]:
        """What an audit fetches, in frames: [input, *output], then the trace in slices of whole rows
        of at most `part_bytes` each (at least one row)."""
        if self.trace is None:
            return [[self.stage_input, *self.output]]
        row_bytes = max(1, self.trace[0].numel() * self.trace.element_size())
        rows = max(1, (part_bytes or AUDIT_PART_BYTES) // row_bytes)
        return [[self.stage_input, *self.output], *([s] for s in self.trace.split(rows))]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


class RetentionStore:
    """Sealed records by request id, dropped after `window_s` or when over `budget_bytes` (oldest first)."""

    def __init__(self, window_s: float = DEFAULT_WINDOW_S, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                 clock=time.monotonic):
        self.window_s, self.budget_bytes, self.clock = window_s, budget_bytes, clock
        self._items: OrderedDict[str, tuple[float, Retained]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, request_id: str, retained: Retained) -> None:
        with self._lock:
            old = self._items.pop(request_id, None)
            if old is not None:
                self._bytes -= old[1].nbytes
            self._items[request_id] = (self.clock(), retained)
            self._bytes += retained.nbytes
            self._expire()

    def usage(self) -> tuple[int, int]:
        """(requests, bytes) kept now."""
        with self._lock:
            self._expire()
            return len(self._items), self._bytes

    def drop(self, request_id: str) -> None:
        """Forget a request no audit will ask for."""
        with self._lock:
            old = self._items.pop(request_id, None)
            if old is not None:
                self._bytes -= old[1].nbytes

    def get(self, request_id: str) -> Retained | None:
        with self._lock:
            self._expire()
            item = self._items.get(request_id)
            return item[1] if item else None

    def _expire(self) -> None:
        now = self.clock()
        while self._items:
            at, oldest = next(iter(self._items.values()))
            if now - at <= self.window_s and self._bytes <= self.budget_bytes:
                return
            self._bytes -= oldest.nbytes
            self._items.popitem(last=False)

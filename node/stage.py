"""One stage of a pipeline: runs a `Step` (checked on decode, wire/messages.py) on the shard and
builds the message to send on (hidden states to the next stage, or sampled tokens to the coordinator). It records
what each session took and sent; when a session closes for a request it seals that record for
audits and signs the request's receipt."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ledger.receipts import StageReceipt
from node.faults import Fault
from node.retention import Retained, RetentionStore, SessionRecord
from node.runtime import SessionError, ShardRuntime
from node.transport.identity import Identity
from verification.sampling import sample
from wire.messages import Close, Result, Step, dtype_name


@dataclass(frozen=True)
class Unsealed:
    """A closed session's record and layer trace (on the runtime's device), not yet hashed."""

    request_id: str
    record: SessionRecord
    trace: torch.Tensor | None
    ready: "torch.cuda.Event | None"  # recorded after the trace was built, on the serving stream


def _ready_event(trace: torch.Tensor | None):
    if trace is None or trace.device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(trace.device))
    return event


# Bytes of a trace each sealing thread stages in its pinned buffer at a time
STAGING_BYTES = 8 << 20
_staging = threading.local()


def _off_device(trace: torch.Tensor, ready: "torch.cuda.Event") -> torch.Tensor:
    """A CUDA trace copied to pageable host memory on a side stream, so the serving stream's steps
    go on meanwhile. It goes through pinned memory: copied straight to pageable memory (the driver
    stages such a copy through its own buffer, synchronously), tens of MB a request slowed the
    serving thread's steps 4x (H200, 8B, batch-32 decode steps while a request of 72 tokens was
    sealed every 2 steps, bench/seal_contention.py: 22.3 ms a step against 5.5). The pinned memory
    is one buffer of each sealing thread's, taken once, the trace passing through it in pieces:
    allocating pinned memory while serving (cudaHostAlloc, tens of MB a trace) takes the driver's
    locks, the likeliest cause of an H200 stage's decode step that spent 35 ms in its launches with
    its thread idle while traces were sealed."""
    staging = getattr(_staging, "buffer", None)
    if staging is None or staging.numel() < STAGING_BYTES:
        staging = _staging.buffer = torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True)
    out = torch.empty(trace.shape, dtype=trace.dtype)
    host = out.view(-1).view(torch.uint8)
    stream = torch.cuda.Stream(device=trace.device)
    stream.wait_event(ready)
    with torch.cuda.stream(stream):
        device = trace.reshape(-1).view(torch.uint8)  # a copy on this stream if the trace is a strided view
        for start in range(0, device.numel(), STAGING_BYTES):
            n = min(STAGING_BYTES, device.numel() - start)
            staging[:n].copy_(device[start:start + n], non_blocking=True)
            stream.synchronize()
            host[start:start + n].copy_(staging[:n])
    return out


class StepError(ValueError):
    """A step this stage refuses: malformed, or out of line with the sessions it holds."""


class StageWorker:
    def __init__(self, runtime: ShardRuntime, pipeline_id: str, identity: Identity | None = None,
                 retained: RetentionStore | None = None, fault: Fault | None = None):
        """`identity` signs receipts and `retained` keeps sealed records (both or neither);
        `fault`: a deliberate misbehaviour of the outputs, for testing the auditors (its changes to the
        runtime are installed once, by whoever loads the runtime)."""
        self.runtime, self.pipeline_id = runtime, pipeline_id
        self.identity, self.retained, self.fault = identity, retained, fault
        self.records: dict[str, SessionRecord] = {}

    def step(self, step: Step) -> Step | Result:
        message, keep_record = self.run(step)
        keep_record()
        return message

    def run(self, step: Step) -> tuple[Step | Result, Callable[[], None]]:
        """The message a step sends on, and what keeps the step in its sessions' records: call it
        before this worker's next step or release (the outputs it copies are valid until then). A
        provider sends first, so the next stage need not wait for the bookkeeping (~0.2 ms a step of
        8 sessions on an H200 stage; more the more sessions)."""
        if step.pipeline != self.pipeline_id:
            raise StepError(f"step for pipeline {step.pipeline!r}, this stage serves {self.pipeline_id!r}")
        if self.fault is not None and self.fault.refuses_steps:
            raise StepError("this stage refuses every step (fault injection 'refuse')")
        if self.fault is not None and self.fault.crashes_steps:
            raise RuntimeError("this stage fails every step (fault injection 'crash')")
        kind, sessions, positions, params, x = step.kind, step.sessions, step.positions, step.sampling, step.x
        lengths = step.rows
        ends = list(itertools.accumulate(lengths))  # each session's rows are [end - length, end)
        started_s = time.perf_counter()
        try:
            if kind != "decode":  # prompts, or a chunk of one (a session already decoding may ride along)
                for sid, start in zip(sessions, positions):  # every session checked before any changes
                    held = self.runtime.sessions.get(sid)
                    if start > 0 and (held.n_tokens if held else 0) != start:
                        raise StepError(f"session {sid!r} holds {held.n_tokens if held else 0} tokens, step says {start}")
                for sid, start in zip(sessions, positions):
                    if start == 0:
                        self.runtime.close(sid)  # a replay from the start replaces the old session
                if len(sessions) == 1:
                    out = self.runtime.prefill(sessions[0], x)
                else:
                    out = self.runtime.prefill_many([(sid, x[e - k:e]) for sid, k, e in zip(sessions, lengths, ends)])
                # records of sessions the runtime evicted go; a prefill from position 0 starts anew
                fresh = {sid for sid, start in zip(sessions, positions) if start == 0}
                self.records = {k: r for k, r in self.records.items()
                                if k in self.runtime.sessions and k not in fresh}
            else:
                for sid, pos in zip(sessions, positions):
                    held = self.runtime.sessions.get(sid)
                    if held is None or held.n_tokens != pos:
                        raise StepError(f"session {sid!r} is not at position {pos}")
                out = self.runtime.decode([(sid, x[i:i + 1]) for i, sid in enumerate(sessions)])
        except SessionError as exc:
            raise StepError(str(exc)) from exc
        last = self.runtime.shard.is_last
        if last:
            if self.fault is not None:
                rows = None if kind == "decode" else [e - 1 for e in ends]
                perturbed = self.fault.perturb_last_hidden(self.runtime, rows=rows)
                out = out if perturbed is None else perturbed
            hidden = self.runtime.last_hidden
        elif self.fault is not None:
            out = self.fault.perturb(out)
        chosen = [p + k for p, k in zip(positions, lengths)]
        # a chunk samples nothing: its last row is not the prompt's end, so no token is chosen there
        sampled = last and kind != "chunk"
        tokens = sample(out, list(params), chosen) if sampled else []
        # what goes on leaves the device in one copy for the whole step (not one a session)
        sent = None if last else out.detach().to("cpu")

        def keep_record() -> None:
            # each session's record holds its own rows: all it fed in this step, and what came of them
            fed, outputs = x.detach().to("cpu"), sent if sent is not None else hidden.detach().to("cpu")
            for i, (sid, k, e) in enumerate(zip(sessions, lengths, ends)):
                record = self.records.setdefault(sid, SessionRecord())
                record.add(fed[e - k:e], outputs[e - k:e], (chosen[i], tokens[i]) if sampled else None)

        forward = step.forward(out if last else sent, (time.perf_counter() - started_s) * 1000)
        if not last:
            return forward, keep_record
        return Result(step.pipeline, step.step, sessions, tuple(tokens), forward.stage_ms), keep_record

    def close(self, close: Close) -> list[StageReceipt]:
        """Free the sessions; for each named with a request id, seal its record and sign a receipt."""
        return [self.seal(unsealed) for unsealed in self.release(close)]

    def release(self, close: Close) -> list[Unsealed]:
        """Free the sessions now; what each named with a request id left to seal (`seal`, which may
        run on another thread: hashing a GPU stage's trace takes tens of ms a request, and the
        stage's next steps need not wait for it)."""
        out = []
        for sid, request_id in zip(close.sessions, close.requests):
            record = self.records.pop(sid, None)
            keep = record is not None and request_id and self.identity is not None and self.retained is not None
            trace = None
            if keep and self.runtime.capture_trace and sid in self.runtime.sessions:
                trace = self.runtime.trace(sid)
            self.runtime.close(sid)
            if keep:
                out.append(Unsealed(request_id, record, trace, _ready_event(trace)))
        return out

    def seal(self, unsealed: Unsealed) -> StageReceipt:
        """Hash and retain a released record; its signed receipt. Thread-safe."""
        trace = unsealed.trace
        if trace is not None and trace.device.type == "cuda":
            trace = _off_device(trace, unsealed.ready)
        retained = unsealed.record.seal(trace)
        self.retained.put(unsealed.request_id, retained)
        return self._sign(unsealed.request_id, unsealed.record.n_tokens, retained)

    def _sign(self, request_id: str, n_tokens: int, retained: Retained) -> StageReceipt:
        shard = self.runtime.shard
        unsigned = StageReceipt(request_id=request_id, model=shard.model_id, layer_start=shard.start,
                                layer_end=shard.end, token_count=n_tokens, input_hash=retained.input_hash,
                                output_hash=retained.output_hash, provider_id=self.identity.peer_id_str,
                                public_key=self.identity.public_key_bytes.hex(), layers_hash=retained.layers_hash,
                                dtype=dtype_name(self.runtime.dtype))
        signature = self.identity.sign(unsigned.signed_bytes()).hex()
        return StageReceipt(**{**unsigned.to_dict(), "signature": signature})
